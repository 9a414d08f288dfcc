"""Signed federation requests, responses, descriptors and key rotations (docs/protocol.md §4).

Each HTTP request between nodes is signed **when sent** by the origin node over canonical bytes:
a domain tag, then a msgpack array ``[version, method, path, origin, destination, created, nonce,
blake2b-256(body)]``. Fixed field order and types make the encoding canonical. Responses are signed
too (``[responder, requester, request nonce, blake2b-256(body)]``), so a man in the middle on plain
HTTP cannot fake an acceptance and make the sender drop its outbox copy.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.signing

from .errors import BadSignature, MalformedFrame, UnsupportedVersion
from .ids import key_from_node_id, node_id_from_key
from .wire import PROTOCOL_VERSION, packb, unpackb

REQ_TAG = b"haven-fed-req-v1\x00"
RESP_TAG = b"haven-fed-resp-v1\x00"
DESC_TAG = b"haven-descriptor-v1\x00"
# the longest relay statement (federation/relayauth.py), e.g. in the descriptor's ``relay``:
# two 52-char ids, an int, 64 bytes of signature, msgpack framing
DESC_RELAY_MAX = 256
ROT_TAG = b"haven-rotate-v1\x00"
LOC_TAG = b"haven-locator-v1\x00"
HOST_MAX = 255  # a host (with port) named in a locator change (§12.5)
AUTH_TAG = b"haven-device-auth-v1\x00"
NONCE_LEN = 16
SIG_LEN = 64
CHALLENGE_MIN, CHALLENGE_MAX = 16, 32  # descriptor challenge ``?c=`` (§4.1)

H_VERSION = "Haven-Version"
H_ORIGIN = "Haven-Origin"
H_DEST = "Haven-Destination"
H_CREATED = "Haven-Created"
H_NONCE = "Haven-Nonce"
H_SIG = "Haven-Signature"


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b64d(text: str) -> bytes:
    """Lenient base64url decoding (padding optional), for invites and contact cards."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError) as exc:
        raise MalformedFrame("bad base64") from exc


_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_DECIMAL_RE = re.compile(r"0|[1-9][0-9]{0,15}")


def b64d_exact(text: str, min_len: int, max_len: int | None = None) -> bytes:
    """Strict base64url (docs/protocol.md §4.2): only ``A-Z a-z 0-9 - _``, no padding, and the
    canonical spelling of ``min_len``..``max_len`` bytes (re-encoding gives the same text, so
    the unused low bits are zero). Raises MalformedFrame otherwise."""
    hi = min_len if max_len is None else max_len
    if not isinstance(text, str) or len(text) > (hi * 4 + 2) // 3:
        raise MalformedFrame("bad base64")
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise MalformedFrame("bad base64")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if not min_len <= len(data) <= hi or b64e(data) != text:
        raise MalformedFrame("bad base64")
    return data


def decimal(text: str) -> int:
    """A header integer (§4.2): ``0|[1-9][0-9]{0,15}``; no sign, no leading zeros, no ``_``."""
    if not isinstance(text, str) or not _DECIMAL_RE.fullmatch(text):
        raise MalformedFrame("bad decimal")
    return int(text)


def body_hash(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=32).digest()


def verify_detached(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise BadSignature unless ``signature`` is a valid Ed25519 signature by ``public_key``."""
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, TypeError) as exc:
        raise BadSignature("signature does not verify") from exc


class NodeKey:
    """A node's Ed25519 identity key."""

    def __init__(self, seed: bytes) -> None:
        self._sk = nacl.signing.SigningKey(seed)
        self.public_key = bytes(self._sk.verify_key)
        self.node_id = node_id_from_key(self.public_key)

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(os.urandom(32))

    @property
    def seed(self) -> bytes:
        return bytes(self._sk)

    def sign(self, message: bytes) -> bytes:
        return self._sk.sign(message).signature


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """The signature headers of one federation request, parsed but not yet verified."""

    version: int
    origin: str
    destination: str
    created: int
    nonce: bytes
    signature: bytes

    @classmethod
    def from_headers(cls, headers: Any) -> SignedRequest:
        """Parse from a case-insensitive mapping with the exact grammar of §4.2.

        Every header must appear once, in its one canonical spelling; anything else is
        MalformedFrame (``malformed``), checked before the version value, the destination and
        the clock. Raises MalformedFrame / UnsupportedVersion.
        """
        values = {}
        for name in (H_VERSION, H_ORIGIN, H_DEST, H_CREATED, H_NONCE, H_SIG):
            got = headers.getall(name, []) if hasattr(headers, "getall") else [headers.get(name)]
            if len(got) != 1 or not isinstance(got[0], str):
                raise MalformedFrame("missing or repeated signature header")
            values[name] = got[0]
        version = decimal(values[H_VERSION])
        created = decimal(values[H_CREATED])
        origin, destination = values[H_ORIGIN], values[H_DEST]
        key_from_node_id(origin)  # canonical lower-case id; raises MalformedFrame
        key_from_node_id(destination)
        nonce = b64d_exact(values[H_NONCE], NONCE_LEN)
        signature = b64d_exact(values[H_SIG], SIG_LEN)
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersion(f"federation version {version}")
        return cls(version, origin, destination, created, nonce, signature)

    def to_headers(self) -> dict[str, str]:
        return {
            H_VERSION: str(self.version),
            H_ORIGIN: self.origin,
            H_DEST: self.destination,
            H_CREATED: str(self.created),
            H_NONCE: b64e(self.nonce),
            H_SIG: b64e(self.signature),
        }


def _request_bytes(
    version: int,
    method: str,
    path: str,
    origin: str,
    dest: str,
    created: int,
    nonce: bytes,
    body: bytes,
) -> bytes:
    fields = [version, method.upper(), path, origin, dest, created, nonce, body_hash(body)]
    return REQ_TAG + packb(fields)


def sign_request(
    key: NodeKey, method: str, path: str, destination: str, body: bytes, created: int
) -> SignedRequest:
    """Sign one outgoing request; ``created`` is in the *destination's* clock (see §4.3).

    ``path`` is the request target exactly as it goes on the wire (path and query, still
    percent-encoded): the receiver verifies over the raw target it received (§4.4)."""
    nonce = os.urandom(NONCE_LEN)
    msg = _request_bytes(
        PROTOCOL_VERSION, method, path, key.node_id, destination, created, nonce, body
    )
    return SignedRequest(PROTOCOL_VERSION, key.node_id, destination, created, nonce, key.sign(msg))


def verify_request(req: SignedRequest, method: str, path: str, body: bytes) -> None:
    """Check the request signature against the origin's key (the node id *is* the key).

    ``path`` must be the raw request target as received (aiohttp ``request.raw_path``), never
    a decoded or normalised form (§4.4)."""
    msg = _request_bytes(
        req.version, method, path, req.origin, req.destination, req.created, req.nonce, body
    )
    verify_detached(key_from_node_id(req.origin), msg, req.signature)


def sign_response(key: NodeKey, requester: str, nonce: bytes, body: bytes) -> str:
    msg = RESP_TAG + packb([key.node_id, requester, nonce, body_hash(body)])
    return b64e(key.sign(msg))


def verify_response(responder: str, requester: str, nonce: bytes, body: bytes, sig: str) -> None:
    msg = RESP_TAG + packb([responder, requester, nonce, body_hash(body)])
    verify_detached(key_from_node_id(responder), msg, b64d_exact(sig, SIG_LEN))


@dataclass(frozen=True, slots=True)
class Rotation:
    """A statement, signed by the old node key, that the node now uses ``new_id``."""

    old_id: str
    new_id: str
    created: int
    signature: bytes

    @classmethod
    def make(cls, old: NodeKey, new_id: str, created: int) -> Rotation:
        msg = ROT_TAG + packb([old.node_id, new_id, created])
        return cls(old.node_id, new_id, created, old.sign(msg))

    def verify(self) -> None:
        msg = ROT_TAG + packb([self.old_id, self.new_id, self.created])
        verify_detached(key_from_node_id(self.old_id), msg, self.signature)

    def to_wire(self) -> list[Any]:
        return [self.old_id, self.new_id, self.created, self.signature]

    @classmethod
    def from_wire(cls, obj: Any) -> Rotation:
        if (
            not isinstance(obj, list)
            or len(obj) != 4
            or not isinstance(obj[0], str)
            or not isinstance(obj[1], str)
            or not isinstance(obj[2], int)
            or not isinstance(obj[3], bytes)
        ):
            raise MalformedFrame("bad rotation statement")
        return cls(obj[0], obj[1], obj[2], obj[3])


@dataclass(frozen=True, slots=True)
class LocatorChange:
    """A statement, signed by the node key, that the node moved from ``old_host`` to
    ``new_host`` (e.g. to another relay: docs/protocol.md §12.5). The node id stays."""

    node_id: str
    old_host: str
    new_host: str
    created: int
    signature: bytes

    @staticmethod
    def _message(node_id: str, old_host: str, new_host: str, created: int) -> bytes:
        return LOC_TAG + packb([node_id, old_host, new_host, created])

    @classmethod
    def make(cls, key: NodeKey, old_host: str, new_host: str, created: int) -> LocatorChange:
        """Sign a move of ``key``'s node from ``old_host`` to ``new_host`` (lower-cased)."""
        old, new = old_host.lower(), new_host.lower()
        sig = key.sign(cls._message(key.node_id, old, new, created))
        return cls(key.node_id, old, new, created, sig)

    def verify(self) -> None:
        """Raise BadSignature unless the node key named by ``node_id`` signed this."""
        msg = self._message(self.node_id, self.old_host, self.new_host, self.created)
        verify_detached(key_from_node_id(self.node_id), msg, self.signature)

    def to_wire(self) -> list[Any]:
        return [self.node_id, self.old_host, self.new_host, self.created, self.signature]

    @classmethod
    def from_wire(cls, obj: Any) -> LocatorChange:
        """Decode ``[node id, old host, new host, created, sig]``; MalformedFrame otherwise."""
        if (
            not isinstance(obj, list)
            or len(obj) != 5
            or not all(isinstance(v, str) for v in obj[:3])
            or not isinstance(obj[3], int)
            or isinstance(obj[3], bool)
            or not isinstance(obj[4], bytes)
            or len(obj[4]) != SIG_LEN
        ):
            raise MalformedFrame("bad locator change")
        node_id, old, new = obj[0], obj[1], obj[2]
        if not (0 < len(old) <= HOST_MAX and 0 < len(new) <= HOST_MAX) or old == new:
            raise MalformedFrame("bad locator change hosts")
        if old != old.lower() or new != new.lower():
            raise MalformedFrame("bad locator change hosts")
        key_from_node_id(node_id)  # canonical id; raises MalformedFrame
        return cls(node_id, old, new, obj[3], obj[4])


@dataclass(frozen=True, slots=True)
class MovePlan:
    """What :func:`plan_moves` found in a set of locator changes."""

    follow: tuple[LocatorChange, ...]  # to follow, in order
    bad: int  # statements that start at the pinned host but do not verify
    replayed: int  # statements at the pinned host not newer than the last one followed


def plan_moves(
    moves: Iterable[LocatorChange], node_id: str, host: str, last_created: int
) -> MovePlan:
    """The chain of ``node_id``'s locator changes to follow from its pinned ``host``
    (docs/protocol.md §12.5): oldest first, each starting at the host the previous one
    reached, verifying under the node key and *newer* than the last statement followed
    (``last_created``, 0 for none). An older statement is skipped: after A→B then B→A, the
    public A→B statement must not move the pin back. It counts as ``replayed`` unless the set
    also holds the last statement followed (a descriptor's full history is not a replay)."""
    moves = tuple(moves)
    follow: list[LocatorChange] = []
    bad = stale = 0
    current, after = host.lower(), last_created
    for change in moves:
        if change.node_id != node_id or change.old_host != current:
            continue
        try:
            change.verify()
        except BadSignature:
            bad += 1
            continue
        if change.created <= after:
            stale += 1
            continue
        follow.append(change)
        current, after = change.new_host, change.created
    history = last_created > 0 and any(
        m.node_id == node_id and m.created == last_created for m in moves
    )
    return MovePlan(tuple(follow), bad, 0 if history else stale)


MOVES_MAX = 64  # locator changes a descriptor or a ``/moved`` request may carry


def decode_moves(obj: Any) -> tuple[LocatorChange, ...]:
    """An array of locator changes (descriptor ``moves``, ``/moved`` body); MalformedFrame
    for anything else or more than MOVES_MAX."""
    if not isinstance(obj, list) or len(obj) > MOVES_MAX:
        raise MalformedFrame("bad locator changes")
    return tuple(LocatorChange.from_wire(m) for m in obj)


MOVED_BODY_MAX = 64 * 1024


def encode_moved(moves: tuple[LocatorChange, ...]) -> bytes:
    """The body of ``POST /haven/v1/federation/moved``: ``{"moves": [statement, ...]}``."""
    return packb({"moves": [m.to_wire() for m in moves]})


def decode_moved(body: bytes) -> tuple[LocatorChange, ...]:
    """Decode a ``/moved`` body (signatures not yet checked); MalformedFrame otherwise."""
    obj = unpackb(body, max_len=MOVED_BODY_MAX)
    if not isinstance(obj, dict) or set(obj) != {"moves"}:
        raise MalformedFrame("bad moved request")
    return decode_moves(obj["moves"])


@dataclass(frozen=True, slots=True)
class Descriptor:
    """The signed node descriptor served at ``GET /.well-known/haven/node`` (§4.1)."""

    node_id: str
    public_url: str
    version: int
    now: int
    limits: dict[str, int]
    rotations: tuple[Rotation, ...] = ()
    challenge: bytes = b""  # echoed from ``?c=``: proves the key holder answered *now*
    features: tuple[str, ...] = ()  # optional protocol parts this node serves, e.g. "blobs"
    moves: tuple[LocatorChange, ...] = ()  # its signed host changes, oldest first (§12.5)
    # its relay authorisation statement, encoded (§12.4): b"" for nodes without a relay
    relay: bytes = b""

    def sign(self, key: NodeKey) -> bytes:
        fields: dict[str, Any] = {}
        if self.moves:  # absent for nodes that never moved: their descriptors are unchanged
            fields["moves"] = [m.to_wire() for m in self.moves]
        if self.relay:  # absent for nodes without a relay, likewise
            fields["relay"] = self.relay
        inner = packb(
            fields
            | {
                "node_id": self.node_id,
                "public_url": self.public_url,
                "version": self.version,
                "now": self.now,
                "limits": self.limits,
                "rotations": [r.to_wire() for r in self.rotations],
                "challenge": self.challenge,
                "features": list(self.features),
            }
        )
        return packb({"d": inner, "sig": key.sign(DESC_TAG + inner)})

    @classmethod
    def verify_decode(cls, data: bytes) -> Descriptor:
        """Decode and verify a descriptor against the key its own node id names."""
        outer = unpackb(data, max_len=64 * 1024)
        if not isinstance(outer, dict) or not isinstance(outer.get("d"), bytes):
            raise MalformedFrame("bad descriptor")
        inner_bytes, sig = outer["d"], outer.get("sig")
        if not isinstance(sig, bytes):
            raise MalformedFrame("bad descriptor signature")
        d = unpackb(inner_bytes, max_len=64 * 1024)
        if not isinstance(d, dict):
            raise MalformedFrame("bad descriptor")
        relay = d.get("relay", b"")
        if not isinstance(relay, bytes) or len(relay) > DESC_RELAY_MAX:
            raise MalformedFrame("bad descriptor relay statement")
        try:
            desc = cls(
                node_id=str(d["node_id"]),
                public_url=str(d["public_url"]),
                version=int(d["version"]),
                now=int(d["now"]),
                limits={str(k): int(v) for k, v in dict(d.get("limits", {})).items()},
                rotations=tuple(Rotation.from_wire(r) for r in d.get("rotations", [])),
                challenge=bytes(d.get("challenge", b"")),
                features=tuple(str(f)[:64] for f in list(d.get("features", []))[:64]),
                moves=decode_moves(d.get("moves", [])),
                relay=relay,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedFrame("bad descriptor fields") from exc
        verify_detached(key_from_node_id(desc.node_id), DESC_TAG + inner_bytes, sig)
        return desc


def descriptor_challenge(raw_query: str) -> bytes:
    """The ``c`` challenge of a descriptor request, from the *raw* query string (§4.1).

    No percent-decoding and no ``+`` as space: the value must be the canonical unpadded
    base64url of CHALLENGE_MIN..CHALLENGE_MAX bytes, given at most once; b"" without ``c``.
    Raises MalformedFrame otherwise.
    """
    values = [v for k, _, v in (p.partition("=") for p in raw_query.split("&")) if k == "c"]
    if not values:
        return b""
    if len(values) > 1:
        raise MalformedFrame("repeated descriptor challenge")
    return b64d_exact(values[0], CHALLENGE_MIN, CHALLENGE_MAX)


def rotation_chain_allows(pinned_id: str, new_id: str, rotations: tuple[Rotation, ...]) -> bool:
    """True when ``rotations`` holds a valid signed chain from ``pinned_id`` to ``new_id``."""
    by_old = {r.old_id: r for r in rotations}
    current, hops = pinned_id, 0
    while current != new_id and hops < 16:
        rot = by_old.get(current)
        if rot is None:
            return False
        try:
            rot.verify()
        except BadSignature:
            return False
        current, hops = rot.new_id, hops + 1
    return current == new_id


def device_auth_message(node_id: str, challenge: bytes, mailbox: bytes) -> bytes:
    """Bytes a device signs to prove it owns ``mailbox`` on node ``node_id`` (§5.2)."""
    return AUTH_TAG + packb([node_id, challenge, mailbox])
