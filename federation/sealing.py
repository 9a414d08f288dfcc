"""Sealed sender and padding (docs/protocol.md §3.3).

The recipient node never learns who sent an envelope: the Olm ciphertext, together with the
sender's address and device key, is sealed to the recipient *device's* X25519 sealing key
(libsodium sealed box: anonymous public-key encryption) after padding to a fixed bucket, so the
body length reveals only the bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import nacl.exceptions
import nacl.public

from .errors import MalformedEnvelope, TooLarge
from .wire import packb, unpackb

SEAL_OVERHEAD = 48  # crypto_box_SEALBYTES
BUCKETS = (1024, 4096, 16384, 65536)
SEALED_VERSION = 1


def pad(data: bytes) -> bytes:
    """Prefix the length and zero-pad so that the *sealed* result is exactly one bucket."""
    need = len(data) + 4 + SEAL_OVERHEAD
    for bucket in BUCKETS:
        if need <= bucket:
            return len(data).to_bytes(4, "big") + data + bytes(bucket - need)
    raise TooLarge(f"message of {len(data)} bytes exceeds the largest bucket")


def unpad(data: bytes) -> bytes:
    if len(data) < 4:
        raise MalformedEnvelope("padded data too short")
    n = int.from_bytes(data[:4], "big")
    if n > len(data) - 4:
        raise MalformedEnvelope("bad padding length")
    return data[4 : 4 + n]


@dataclass(frozen=True, slots=True)
class SealedContent:
    """What only the recipient device sees: sender, sender device key, Olm message."""

    sender: str  # address name@host
    sender_device: str  # sender device's Curve25519 identity key, base64 (vodozemac form)
    olm_type: int
    olm_body: bytes

    def encode(self) -> bytes:
        return packb(
            [SEALED_VERSION, self.sender, self.sender_device, self.olm_type, self.olm_body]
        )

    @classmethod
    def decode(cls, data: bytes) -> SealedContent:
        obj = unpackb(data, max_len=len(data))
        if (
            not isinstance(obj, list)
            or len(obj) != 5
            or obj[0] != SEALED_VERSION
            or not isinstance(obj[1], str)
            or not isinstance(obj[2], str)
            or obj[3] not in (0, 1)
            or not isinstance(obj[4], bytes)
        ):
            raise MalformedEnvelope("bad sealed content")
        return cls(obj[1], obj[2], obj[3], obj[4])


def seal(recipient_sealing_key: bytes, content: SealedContent) -> bytes:
    """Pad and seal ``content`` to a device's X25519 public sealing key."""
    box = nacl.public.SealedBox(nacl.public.PublicKey(recipient_sealing_key))
    return bytes(box.encrypt(pad(content.encode())))


def opener(sealing_private_key: bytes) -> nacl.public.SealedBox[nacl.public.PrivateKey]:
    """The box :func:`unseal` opens with. Building it derives the public key (a scalar
    multiplication), so a device opening a batch builds it once and passes it as ``box``."""
    return nacl.public.SealedBox(nacl.public.PrivateKey(sealing_private_key))


def unseal(
    sealing_private_key: bytes,
    body: bytes,
    *,
    box: nacl.public.SealedBox[nacl.public.PrivateKey] | None = None,
) -> SealedContent:
    """Open an envelope body. Raises MalformedEnvelope when it is not sealed to this key."""
    if box is None:
        box = opener(sealing_private_key)
    try:
        padded = box.decrypt(body)
    except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, TypeError) as exc:
        raise MalformedEnvelope("envelope not sealed to this device") from exc
    return SealedContent.decode(unpad(padded))
