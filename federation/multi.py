"""Multi-recipient submission: one upload per message, one small header per recipient device
(docs/protocol.md §11.3).

A device that sends one message to many devices (a group) does not encrypt it once per device.
It seals the message once with a fresh 32-byte key ``K`` (the **group body**) and, for each
recipient device, seals only ``K`` to that device's X25519 sealing key (a 48-byte **header**),
with one ephemeral key pair shared by all headers of the submission, as Signal's multi-recipient
sealed sender does. The home node fans the submission out; each recipient device gets an ordinary
envelope whose body is its **group copy**::

    copy   = eph (32) || header (48) || gbody
    header = crypto_box(K, nonce_for(eph, rcpt), rcpt, eph_secret)      # X25519 + XSalsa20-Poly1305
    gbody  = crypto_secretbox(pad_gbody(inner), random nonce, K)        # nonce (24) || ct

``pad_gbody`` pads so that ``len(copy)`` is exactly one of the sealing buckets (1, 4, 16, 64 KiB,
``federation/sealing.py``), like a sealed-sender body: nodes (and a seized disk) see the same
sizes for group and 1:1 messages. A device tells the two apart by trying to open the body as a
sealed box first and as a group copy second (:func:`open_copy`).

``inner`` is :class:`GroupInner` (msgpack): who sent it and what it carries. Nodes never see it.
"""

from __future__ import annotations

from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.hash
import nacl.public
import nacl.secret
import nacl.utils

from .errors import MalformedEnvelope, TooLarge
from .sealing import BUCKETS
from .wire import packb, unpackb

FEATURE = "multi"  # descriptor / challenge feature: send_multi, /federation/multi, keys_multi
KEY_LEN = 32
EPH_LEN = 32
HEADER_LEN = KEY_LEN + 16  # crypto_box MAC
COPY_OVERHEAD = EPH_LEN + HEADER_LEN  # 80 bytes before the group body
GBODY_OVERHEAD = 24 + 16  # secretbox nonce + MAC
MAX_RECIPIENTS = 2048  # devices per submission (1,000 members, some with 2 devices)
MAX_GBODY = BUCKETS[-1] - COPY_OVERHEAD  # the largest group body that still makes a 64 KiB copy
INNER_VERSION = 1
INNER_MEGOLM = 1  # data = msgpack([session_id: str, megolm message: bin])
INNER_STATE = 2  # data = a signed group state (client/group_state.py)
_PERSON = b"haven-mrs-v1"  # BLAKE2b personalisation of the header nonce


def nonce_for(eph_pub: bytes, rcpt_pub: bytes) -> bytes:
    """The header nonce: BLAKE2b-192(eph || rcpt, person "haven-mrs-v1"). Unique per recipient
    because the ephemeral key is fresh per submission."""
    return nacl.hash.blake2b(
        eph_pub + rcpt_pub, digest_size=24, person=_PERSON, encoder=nacl.encoding.RawEncoder
    )


@dataclass(frozen=True, slots=True)
class GroupInner:
    """The plaintext of a group body: ``[1, kind, sender, sender_device, data]``."""

    kind: int  # INNER_MEGOLM or INNER_STATE (others: a newer device's, ignored)
    sender: str  # sender address name@host
    sender_device: str  # sender device's Curve25519 identity key (base64)
    data: bytes

    def encode(self) -> bytes:
        return packb([INNER_VERSION, self.kind, self.sender, self.sender_device, self.data])

    @classmethod
    def decode(cls, raw: bytes) -> GroupInner:
        obj = unpackb(raw, max_len=len(raw))
        if (
            not isinstance(obj, list)
            or len(obj) != 5
            or obj[0] != INNER_VERSION
            or not isinstance(obj[1], int)
            or not isinstance(obj[2], str)
            or not isinstance(obj[3], str)
            or not isinstance(obj[4], bytes)
        ):
            raise MalformedEnvelope("bad group body")
        return cls(obj[1], obj[2], obj[3], obj[4])


def _pad_gbody(inner: bytes) -> bytes:
    need = len(inner) + 4 + GBODY_OVERHEAD + COPY_OVERHEAD
    for bucket in BUCKETS:
        if need <= bucket:
            return len(inner).to_bytes(4, "big") + inner + bytes(bucket - need)
    raise TooLarge(f"group message of {len(inner)} bytes exceeds the largest bucket")


@dataclass(frozen=True, slots=True)
class Sealed:
    """One sealed submission: the shared parts and one header per recipient sealing key."""

    eph: bytes  # the shared ephemeral public key (32)
    gbody: bytes  # the group body, sealed under K
    headers: tuple[bytes, ...]  # one per recipient, in the order given to seal_multi

    def copy_for(self, i: int) -> bytes:
        """The envelope body recipient ``i`` gets (what a node composes, §11.3)."""
        return compose(self.eph, self.headers[i], self.gbody)


def seal_multi(inner: GroupInner, recipients: list[bytes]) -> Sealed:
    """Seal ``inner`` once and ``K`` to each recipient's 32-byte X25519 sealing key."""
    if len(recipients) > MAX_RECIPIENTS:
        raise TooLarge(f"more than {MAX_RECIPIENTS} recipient devices")
    key = nacl.utils.random(KEY_LEN)
    gbody = bytes(nacl.secret.SecretBox(key).encrypt(_pad_gbody(inner.encode())))
    eph = nacl.public.PrivateKey.generate()
    eph_pub = bytes(eph.public_key)
    eph_sec = bytes(eph)
    headers = tuple(
        nacl.bindings.crypto_box(key, nonce_for(eph_pub, pk), pk, eph_sec) for pk in recipients
    )
    return Sealed(eph_pub, gbody, headers)


def compose(eph: bytes, header: bytes, gbody: bytes) -> bytes:
    """A recipient's group copy. Nodes call this; it needs no key."""
    if len(eph) != EPH_LEN or len(header) != HEADER_LEN:
        raise MalformedEnvelope("bad multi-recipient header")
    return eph + header + gbody


def open_copy(sealing_private_key: bytes, sealing_public_key: bytes, body: bytes) -> GroupInner:
    """Open a group copy with this device's sealing key pair.

    Raises MalformedEnvelope when ``body`` is not a group copy sealed to this device.
    """
    if len(body) < COPY_OVERHEAD + GBODY_OVERHEAD + 4:
        raise MalformedEnvelope("not a group copy")
    eph, header, gbody = body[:EPH_LEN], body[EPH_LEN:COPY_OVERHEAD], body[COPY_OVERHEAD:]
    try:
        key = nacl.bindings.crypto_box_open(
            header, nonce_for(eph, sealing_public_key), eph, sealing_private_key
        )
        padded = nacl.secret.SecretBox(key).decrypt(gbody)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, TypeError) as exc:
        raise MalformedEnvelope("group copy not sealed to this device") from exc
    n = int.from_bytes(padded[:4], "big")
    if n > len(padded) - 4:
        raise MalformedEnvelope("bad group body padding")
    return GroupInner.decode(padded[4 : 4 + n])


__all__ = [
    "COPY_OVERHEAD",
    "FEATURE",
    "HEADER_LEN",
    "INNER_MEGOLM",
    "INNER_STATE",
    "MAX_GBODY",
    "MAX_RECIPIENTS",
    "GroupInner",
    "Sealed",
    "compose",
    "open_copy",
    "seal_multi",
]
