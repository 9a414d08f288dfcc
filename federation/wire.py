"""Envelopes and federation batches: frozen wire types, validated once when decoded.

An envelope (docs/protocol.md §3) is ``[v, id, to, expires, body]`` as a msgpack array:
``id`` 16 random bytes, ``to`` a 16-byte mailbox id, ``expires`` epoch ms, ``body`` the sealed,
padded E2E ciphertext. Sizes are checked before parsing; decoding random bytes raises only
:class:`federation.errors.RemoteProtocolError` subclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import MalformedEnvelope, TooLarge, UnsupportedVersion
from .ids import ENVELOPE_ID_LEN, MAILBOX_ID_LEN

PROTOCOL_VERSION = 1
MAX_BODY = 64 * 1024  # largest padding bucket (federation/sealing.py) with headroom
MAX_BATCH_ENVELOPES = 256
MAX_BATCH_BYTES = MAX_BATCH_ENVELOPES * (MAX_BODY // 16) + 1024 * 1024  # ~2 MiB
MAX_TTL_MS = 14 * 86_400_000


@dataclass(frozen=True, slots=True)
class Envelope:
    """One sealed message for one recipient device mailbox."""

    id: bytes
    to: bytes
    expires: int
    body: bytes
    v: int = PROTOCOL_VERSION

    def to_wire(self) -> list[Any]:
        return [self.v, self.id, self.to, self.expires, self.body]

    @classmethod
    def from_wire(cls, obj: Any) -> Envelope:
        """Validate a decoded msgpack value. Raises MalformedEnvelope / UnsupportedVersion."""
        if not isinstance(obj, (list, tuple)) or len(obj) != 5:
            raise MalformedEnvelope("envelope must be a 5-element array")
        v, eid, to, expires, body = obj
        if not isinstance(v, int) or isinstance(v, bool):
            raise MalformedEnvelope("bad version field")
        if v != PROTOCOL_VERSION:
            raise UnsupportedVersion(f"envelope version {v}")
        if not isinstance(eid, bytes) or len(eid) != ENVELOPE_ID_LEN:
            raise MalformedEnvelope("bad envelope id")
        if not isinstance(to, bytes) or len(to) != MAILBOX_ID_LEN:
            raise MalformedEnvelope("bad mailbox id")
        if not isinstance(expires, int) or isinstance(expires, bool) or expires <= 0:
            raise MalformedEnvelope("bad expiry")
        if not isinstance(body, bytes):
            raise MalformedEnvelope("bad body")
        if len(body) > MAX_BODY:
            raise TooLarge("envelope body too large")
        return cls(id=eid, to=to, expires=expires, body=body, v=v)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpackb(data: bytes, *, max_len: int) -> Any:
    """Decode msgpack after a size check; translate every msgpack failure to MalformedEnvelope."""
    if len(data) > max_len:
        raise TooLarge(f"{len(data)} bytes exceeds limit {max_len}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_len,
            max_str_len=max_len,
            max_array_len=65_536,
            max_map_len=4096,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise MalformedEnvelope("malformed msgpack") from e
    except Exception as e:  # msgpack raises assorted internal errors on hostile input
        raise MalformedEnvelope("malformed msgpack") from e


@dataclass(frozen=True, slots=True)
class Batch:
    """The body of ``POST /haven/v1/federation/batch``: ``{"envs": [envelope, ...]}``."""

    envelopes: tuple[Envelope, ...]

    def encode(self) -> bytes:
        return packb({"envs": [e.to_wire() for e in self.envelopes]})

    @classmethod
    def decode(cls, data: bytes) -> Batch:
        obj = unpackb(data, max_len=MAX_BATCH_BYTES)
        if not isinstance(obj, dict) or not isinstance(obj.get("envs"), list):
            raise MalformedEnvelope("batch must be a map with an envs array")
        envs = obj["envs"]
        if len(envs) > MAX_BATCH_ENVELOPES:
            raise TooLarge(f"batch of {len(envs)} envelopes exceeds {MAX_BATCH_ENVELOPES}")
        return cls(tuple(Envelope.from_wire(e) for e in envs))


@dataclass(frozen=True, slots=True)
class BatchResult:
    """Answer to a batch: ids durably accepted, and ``(id, code)`` for each refused envelope."""

    accepted: tuple[bytes, ...]
    rejected: tuple[tuple[bytes, str], ...] = ()

    def encode(self) -> bytes:
        return packb(
            {"accepted": list(self.accepted), "rejected": [list(r) for r in self.rejected]}
        )

    @classmethod
    def decode(cls, data: bytes) -> BatchResult:
        obj = unpackb(data, max_len=MAX_BATCH_BYTES)
        if not isinstance(obj, dict):
            raise MalformedEnvelope("batch result must be a map")
        acc = obj.get("accepted", [])
        rej = obj.get("rejected", [])
        if not isinstance(acc, list) or not all(isinstance(i, bytes) for i in acc):
            raise MalformedEnvelope("bad accepted list")
        if not isinstance(rej, list) or not all(
            isinstance(r, list)
            and len(r) == 2
            and isinstance(r[0], bytes)
            and isinstance(r[1], str)
            for r in rej
        ):
            raise MalformedEnvelope("bad rejected list")
        return cls(tuple(acc), tuple((r[0], r[1]) for r in rej))
