"""Client API frames: device <-> node over WebSocket, msgpack maps (docs/protocol.md §5).

Every frame is a map with a ``t`` (type) key. Requests carry an integer ``rid`` that the answer
echoes. Decoding validates sizes first, then each field's type, and returns a frozen dataclass;
random bytes raise only :class:`RemoteProtocolError` subclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

from .devicelist import SignedDeviceList
from .errors import LocalProtocolError, MalformedFrame, UnknownFrame
from .ids import MAILBOX_ID_LEN
from .wire import MAX_BATCH_ENVELOPES, Envelope, packb, unpackb

MAX_FRAME = 4 * 1024 * 1024
MAX_OTKS_PER_FRAME = 100


def _req(m: dict[str, Any], key: str, typ: type | tuple[type, ...]) -> Any:
    if key not in m:
        raise MalformedFrame(f"missing field {key!r}")
    value = m[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise MalformedFrame(f"bad field {key!r}")
    return value


def _rid(m: dict[str, Any]) -> int:
    rid = _req(m, "rid", int)
    if not 0 <= rid < 2**53:
        raise MalformedFrame("bad rid")
    return int(rid)


def _mailbox(m: dict[str, Any], key: str = "mailbox") -> bytes:
    mb = _req(m, key, bytes)
    if len(mb) != MAILBOX_ID_LEN:
        raise MalformedFrame("bad mailbox id")
    return bytes(mb)


def _keypairs(value: Any, limit: int) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or len(value) > limit:
        raise MalformedFrame("bad key list")
    out = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], str)
            or len(item[0]) > 64
            or len(item[1]) > 192  # "curve25519 key:ed25519 signature", base64
        ):
            raise MalformedFrame("bad key entry")
        out.append((item[0], item[1]))
    return tuple(out)


class Frame:
    """Base of all frames. ``T`` is the wire type string."""

    T: ClassVar[str] = ""

    def to_map(self) -> dict[str, Any]:
        m: dict[str, Any] = {"t": self.T}
        for f in fields(self):  # type: ignore[arg-type]
            m[f.name] = _to_wire(getattr(self, f.name))
        return m

    def encode(self) -> bytes:
        return packb(self.to_map())

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Frame:  # pragma: no cover - every frame overrides
        raise LocalProtocolError(f"{cls.__name__} has no decoder")


def _to_wire(value: Any) -> Any:
    if isinstance(value, (Envelope, SignedDeviceList)):
        return value.to_wire()
    if isinstance(value, tuple):
        return [_to_wire(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    return value


# ---- node -> device -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Challenge(Frame):
    T: ClassVar[str] = "challenge"
    node_id: str
    nonce: bytes
    v: int
    now: int

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Challenge:
        return cls(
            _req(m, "node_id", str), _req(m, "nonce", bytes), _req(m, "v", int), _req(m, "now", int)
        )


@dataclass(frozen=True, slots=True)
class AuthOk(Frame):
    T: ClassVar[str] = "auth_ok"
    rid: int
    address: str
    otk_count: int

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> AuthOk:
        return cls(_rid(m), _req(m, "address", str), _req(m, "otk_count", int))


@dataclass(frozen=True, slots=True)
class Registered(Frame):
    T: ClassVar[str] = "registered"
    rid: int
    address: str

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Registered:
        return cls(_rid(m), _req(m, "address", str))


@dataclass(frozen=True, slots=True)
class Ok(Frame):
    T: ClassVar[str] = "ok"
    rid: int
    otk_count: int = 0

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Ok:
        return cls(_rid(m), _req(m, "otk_count", int))


@dataclass(frozen=True, slots=True)
class Keys(Frame):
    """Answer to a key query: the signed list and, if claimed, one key per device id."""

    T: ClassVar[str] = "keys"
    rid: int
    node_id: str
    device_list: SignedDeviceList
    claimed: dict[str, tuple[str, str]]  # device_id -> (key_id, curve25519 key)

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Keys:
        claimed = _req(m, "claimed", dict)
        out: dict[str, tuple[str, str]] = {}
        for k, v in claimed.items():
            pairs = _keypairs([v], 1)
            if not isinstance(k, str):
                raise MalformedFrame("bad claimed key")
            out[k] = pairs[0]
        return cls(
            _rid(m),
            _req(m, "node_id", str),
            SignedDeviceList.from_wire(_req(m, "device_list", list)),
            out,
        )


@dataclass(frozen=True, slots=True)
class Accepted(Frame):
    T: ClassVar[str] = "accepted"
    rid: int
    ids: tuple[bytes, ...]
    rejected: tuple[tuple[bytes, str], ...] = ()
    # advisory, e.g. ("peer_key_changed", node_id): the envelopes were queued, but the
    # destination presented a different key with no signed rotation (docs/protocol.md §5.4)
    warnings: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Accepted:
        ids = _req(m, "ids", list)
        rej = m.get("rejected", [])
        if not all(isinstance(i, bytes) for i in ids) or not isinstance(rej, list):
            raise MalformedFrame("bad ids")
        out = []
        for r in rej:
            if (
                not isinstance(r, list)
                or len(r) != 2
                or not isinstance(r[0], bytes)
                or not isinstance(r[1], str)
            ):
                raise MalformedFrame("bad rejected entry")
            out.append((r[0], r[1]))
        warns = m.get("warnings", [])
        if not isinstance(warns, list) or not all(
            isinstance(w, list) and len(w) == 2 and all(isinstance(x, str) for x in w)
            for w in warns
        ):
            raise MalformedFrame("bad warnings")
        return cls(_rid(m), tuple(ids), tuple(out), tuple((w[0], w[1]) for w in warns))


@dataclass(frozen=True, slots=True)
class Deliver(Frame):
    T: ClassVar[str] = "deliver"
    envs: tuple[Envelope, ...]

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Deliver:
        envs = _req(m, "envs", list)
        return cls(tuple(Envelope.from_wire(e) for e in envs))


@dataclass(frozen=True, slots=True)
class Error(Frame):
    T: ClassVar[str] = "error"
    rid: int
    code: str
    message: str

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Error:
        return cls(_req(m, "rid", int), _req(m, "code", str), _req(m, "message", str))


# ---- device -> node -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Auth(Frame):
    """Prove ownership of ``mailbox`` by signing the challenge with the device's Ed25519 key."""

    T: ClassVar[str] = "auth"
    rid: int
    mailbox: bytes
    sig: bytes

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Auth:
        sig = _req(m, "sig", bytes)
        if len(sig) != 64:
            raise MalformedFrame("bad signature length")
        return cls(_rid(m), _mailbox(m), sig)


@dataclass(frozen=True, slots=True)
class Register(Frame):
    """Redeem an invite: create this device's mailbox and publish the signed device list.

    ``sig`` signs the challenge like :class:`Auth`, proving the device holds ``auth_key``.
    """

    T: ClassVar[str] = "register"
    rid: int
    invite: bytes
    mailbox: bytes
    auth_key: bytes
    sig: bytes
    device_list: SignedDeviceList | None  # None when redeeming a device-link token

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Register:
        invite = _req(m, "invite", bytes)
        auth_key = _req(m, "auth_key", bytes)
        sig = _req(m, "sig", bytes)
        if len(invite) > 64 or len(auth_key) != 32 or len(sig) != 64:
            raise MalformedFrame("bad register fields")
        dl = m.get("device_list")
        return cls(
            _rid(m),
            invite,
            _mailbox(m),
            auth_key,
            sig,
            None if dl is None else SignedDeviceList.from_wire(dl),
        )


@dataclass(frozen=True, slots=True)
class MintLink(Frame):
    """Ask the node for a single-use token that registers another device on this account."""

    T: ClassVar[str] = "mint_link"
    rid: int

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> MintLink:
        return cls(_rid(m))


@dataclass(frozen=True, slots=True)
class LinkToken(Frame):
    T: ClassVar[str] = "link_token"
    rid: int
    token: bytes
    expires: int

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> LinkToken:
        return cls(_rid(m), _req(m, "token", bytes), _req(m, "expires", int))


@dataclass(frozen=True, slots=True)
class PublishKeys(Frame):
    """Top up one-time keys, set the fallback key and/or replace the signed device list."""

    T: ClassVar[str] = "publish_keys"
    rid: int
    otks: tuple[tuple[str, str], ...]
    fallback: tuple[tuple[str, str], ...]  # zero or one (key_id, key)
    device_list: SignedDeviceList | None

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> PublishKeys:
        dl = m.get("device_list")
        return cls(
            _rid(m),
            _keypairs(m.get("otks", []), MAX_OTKS_PER_FRAME),
            _keypairs(m.get("fallback", []), 1),
            None if dl is None else SignedDeviceList.from_wire(dl),
        )


@dataclass(frozen=True, slots=True)
class QueryKeys(Frame):
    """Fetch a user's signed device list; with ``claim``, also claim one key per device."""

    T: ClassVar[str] = "query_keys"
    rid: int
    address: str
    claim: bool

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> QueryKeys:
        address = _req(m, "address", str)
        if len(address) > 300:
            raise MalformedFrame("address too long")
        return cls(_rid(m), address, bool(_req(m, "claim", bool)))


@dataclass(frozen=True, slots=True)
class Send(Frame):
    """Envelopes to store or forward: ``items`` are ``(destination node id, envelope)``."""

    T: ClassVar[str] = "send"
    rid: int
    items: tuple[tuple[str, Envelope], ...]

    def to_map(self) -> dict[str, Any]:
        return {"t": self.T, "rid": self.rid, "items": [[n, e.to_wire()] for n, e in self.items]}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Send:
        items = _req(m, "items", list)
        if len(items) > MAX_BATCH_ENVELOPES:
            from .errors import TooLarge

            raise TooLarge("too many envelopes in one send")
        out = []
        for item in items:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], str):
                raise MalformedFrame("bad send item")
            out.append((item[0], Envelope.from_wire(item[1])))
        return cls(_rid(m), tuple(out))


@dataclass(frozen=True, slots=True)
class Ack(Frame):
    """The device has durably stored these envelopes; the node deletes them."""

    T: ClassVar[str] = "ack"
    ids: tuple[bytes, ...]

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Ack:
        ids = _req(m, "ids", list)
        if len(ids) > 4096 or not all(isinstance(i, bytes) and len(i) == 16 for i in ids):
            raise MalformedFrame("bad ack ids")
        return cls(tuple(ids))


FRAME_TYPES: dict[str, type[Frame]] = {
    c.T: c
    for c in (
        Challenge,
        AuthOk,
        Registered,
        Ok,
        Keys,
        Accepted,
        Deliver,
        Error,
        Auth,
        Register,
        MintLink,
        LinkToken,
        PublishKeys,
        QueryKeys,
        Send,
        Ack,
    )
}


def decode_frame(data: bytes, max_len: int = MAX_FRAME) -> Frame:
    """Decode one frame. Raises TooLarge, MalformedFrame/MalformedEnvelope or UnknownFrame."""
    m = unpackb(data, max_len=max_len)
    if not isinstance(m, dict) or not isinstance(m.get("t"), str):
        raise MalformedFrame("frame must be a map with a type")
    cls = FRAME_TYPES.get(m["t"])
    if cls is None:
        raise UnknownFrame("unknown frame type")
    return cls.from_map(m)
