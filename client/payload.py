"""The innermost layer: what one device says to another, inside Olm (docs/protocol.md §3.1).

Kinds: ``text`` (with an optional disappearing timer), ``edit`` and ``delete`` (of an earlier
message by the same sender), ``delivered`` and ``read`` receipts (listing message ids). Every
field, timers included, travels inside the encryption; nodes never see any of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from federation.errors import MalformedEnvelope
from federation.wire import packb, unpackb

PAYLOAD_VERSION = 1
KINDS = frozenset({"text", "edit", "delete", "delivered", "read"})


@dataclass(frozen=True, slots=True)
class Payload:
    id: bytes
    kind: str
    to: str  # the conversation's other party, as the sender addressed it
    sent_at: int
    text: str = ""
    target: bytes = b""  # edit/delete: the message it applies to
    expires_in: int = 0  # disappearing timer, ms (0 = keep)
    ids: tuple[bytes, ...] = field(default=())  # receipts: the messages they acknowledge

    def encode(self) -> bytes:
        return packb(
            {
                "v": PAYLOAD_VERSION,
                "id": self.id,
                "kind": self.kind,
                "to": self.to,
                "sent_at": self.sent_at,
                "text": self.text,
                "target": self.target,
                "expires_in": self.expires_in,
                "ids": list(self.ids),
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Payload:
        obj = unpackb(data, max_len=len(data))
        try:
            if obj["v"] != PAYLOAD_VERSION or obj["kind"] not in KINDS:
                raise MalformedEnvelope("unknown payload version or kind")
            p = cls(
                id=bytes(obj["id"]),
                kind=str(obj["kind"]),
                to=str(obj["to"]),
                sent_at=int(obj["sent_at"]),
                text=str(obj.get("text", "")),
                target=bytes(obj.get("target", b"")),
                expires_in=int(obj.get("expires_in", 0)),
                ids=tuple(bytes(i) for i in obj.get("ids", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEnvelope("bad payload") from exc
        if len(p.id) != 16 or p.expires_in < 0 or len(p.ids) > 1000:
            raise MalformedEnvelope("bad payload fields")
        return p
