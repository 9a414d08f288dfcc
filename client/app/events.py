"""The JSON objects of the local API (docs/app.md "Objects" and "Events"), built from the store.

Pure functions of the device's stored rows: the daemon core builds events with them, the web
layer returns them. Texts, display names and nicknames are hostile input and stay plain JSON
strings here; the page renders them as text, never as HTML.
"""

from __future__ import annotations

from typing import Any

from client.state import STATUS_NAMES, Contact, HistoryRow

Obj = dict[str, Any]


def message_obj(row: HistoryRow, now: int) -> Obj:
    """A ``Message``: one history row as the UI shows it."""
    return {
        "id": row.msg_id.hex(),
        "chat": row.peer,
        "outgoing": row.outgoing,
        "sender": row.sender,
        "text": row.text,
        "sent_at": row.sent_at,
        "status": STATUS_NAMES.get(row.status, "sent") if row.outgoing else None,
        "read": row.read,
        "edited": row.edited,
        "expire_at": row.expire_at,
        "not_delivered": row.outgoing and row.not_delivered(now),
        "error": (row.error or None) if row.outgoing else None,
        "devices": {"total": row.devices_total, "verified": row.devices_verified},
    }


def contact_obj(c: Contact, key_changed: bool = False) -> Obj:
    """A ``Contact``: names and key state (nicknames stay on this device)."""
    return {
        "address": c.address,
        "display_name": c.display_name,
        "nickname": c.nickname,
        "verified": c.verified,
        "key_changed": key_changed,
    }


def chat_obj(address: str, c: Contact | None, last: Obj | None, unread: int) -> Obj:
    """A ``Chat``: a conversation's summary for the chat list and the header."""
    return {
        "kind": "direct",
        "address": address,
        "display_name": c.display_name if c else "",
        "nickname": c.nickname if c else "",
        "verified": c.verified if c else False,
        "last": last,
        "unread": unread,
        "timer_ms": c.timer_ms if c else 0,
    }


def event(kind: str, **fields: Any) -> Obj:
    """One WebSocket event: ``{"type": kind, ...fields}``."""
    return {"type": kind, **fields}


class MovedNotices:
    """Contacts' address changes the daemon followed (docs/protocol.md §12.5), kept in memory
    so ``haven recv`` through the daemon prints each once per reader, as the direct path does.
    A notice is not a history row: the newest :data:`MOVED_KEEP` stay while the daemon runs."""

    def __init__(self) -> None:
        self._seq = 0
        self._kept: list[tuple[int, Any]] = []  # (seq, ReceivedMessage of kind "moved")
        self._cursor: dict[str, int] = {}

    def add(self, notice: Any) -> None:
        """Keep one followed notice (a ``ReceivedMessage`` of kind ``moved``)."""
        self._seq += 1
        self._kept = [*self._kept, (self._seq, notice)][-MOVED_KEEP:]

    def take(self, client: str) -> list[Any]:
        """The notices ``client`` has not been given yet, oldest first."""
        after = self._cursor.get(client, 0)
        self._cursor[client] = self._seq
        return [m for seq, m in self._kept if seq > after]


MOVED_KEEP = 64
