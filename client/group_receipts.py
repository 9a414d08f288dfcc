"""The "1" counter of a group message: how many members have not read it yet
(docs/protocol.md, group receipts).

A reader does not send one receipt per message. It sends a **watermark** per sender: "I have
read every message of this sender up to this ``sent_at``" (payload key ``wm``), in one group
upload per reading. Every member keeps, per (reader, sender), the greatest watermark it has
seen (:class:`Watermarks`; a lower or repeated one changes nothing, so order and duplicates do
not matter). A reader whose receipts are off says so (``hide``) and is counted as hidden rather
than as unread.

For a message by sender ``s`` at ``sent_at`` ``t`` (:func:`count_unread`): the unread members are
the current members, minus ``s``, minus those whose watermark for ``s`` is at least ``t``, minus
hidden members, minus members who joined after ``t`` (they never get it). ``receipts_hidden`` is
the number of hidden members among the others who could have read it.

Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from federation.errors import MalformedEnvelope, MalformedFrame
from federation.wire import packb, unpackb

from .group_state import MAX_MEMBERS, GroupError

MAX_WM_ENTRIES = MAX_MEMBERS  # senders per watermark payload (payload key ``wm``)


@dataclass(frozen=True, slots=True)
class Unread:
    """The counter of one message."""

    unread_members: tuple[str, ...]  # sorted addresses
    receipts_hidden: int

    @property
    def unread_by(self) -> int:
        return len(self.unread_members)


@dataclass(slots=True)
class Watermarks:
    """Per (reader, sender): the greatest ``sent_at`` the reader says it has read; and which
    readers have their receipts off."""

    marks: dict[str, dict[str, int]] = field(default_factory=dict)  # reader -> sender -> ms
    hidden: set[str] = field(default_factory=set)

    def get(self, reader: str, sender: str) -> int:
        """The watermark of ``reader`` for ``sender`` (0: nothing read)."""
        return self.marks.get(reader, {}).get(sender, 0)

    def update(self, reader: str, wm: Mapping[str, int], *, hide: bool | None = None) -> bool:
        """Merge one reader's watermarks (max per sender); ``hide`` sets its receipts-off flag
        when given. Returns True when anything changed. At most MAX_WM_ENTRIES senders are taken
        from one call (the payload bound); the rest are ignored."""
        changed = False
        if hide is not None and (reader in self.hidden) != hide:
            (self.hidden.add if hide else self.hidden.discard)(reader)
            changed = True
        mine = self.marks.setdefault(reader, {})
        for n, (sender, at) in enumerate(wm.items()):
            if n >= MAX_WM_ENTRIES:
                break
            if isinstance(at, int) and not isinstance(at, bool) and at > mine.get(sender, 0):
                mine[sender] = at
                changed = True
        if not mine:
            del self.marks[reader]
        return changed

    def merge(self, other: Watermarks) -> bool:
        """Take every watermark of ``other`` (max per pair). Hidden flags are not merged: the
        latest flag a reader sent wins, which only its own :meth:`update` knows."""
        changed = False
        for reader, wm in other.marks.items():
            changed = self.update(reader, wm) or changed
        return changed

    def forget(self, readers: Iterable[str]) -> None:
        """Drop what removed members said (they no longer count)."""
        for r in readers:
            self.marks.pop(r, None)
            self.hidden.discard(r)

    def dump(self) -> bytes:
        """Bytes for local storage (the caller seals them)."""
        return packb({"m": self.marks, "h": sorted(self.hidden)})

    @classmethod
    def load(cls, raw: bytes) -> Watermarks:
        """The inverse of :meth:`dump`; raises GroupError ``malformed``."""
        try:
            obj: Any = unpackb(raw, max_len=len(raw))
            marks = {str(r): {str(s): int(t) for s, t in wm.items()} for r, wm in obj["m"].items()}
            return cls(marks, {str(h) for h in obj["h"]})
        except (MalformedEnvelope, MalformedFrame, KeyError, TypeError, AttributeError) as exc:
            raise GroupError("bad stored watermarks", code="malformed") from exc


def count_unread(
    sender: str,
    sent_at: int,
    members: Iterable[str],
    marks: Watermarks,
    joined_at: Mapping[str, int] | None = None,
) -> Unread:
    """The counter of a message by ``sender`` at ``sent_at`` among the current ``members``.

    ``joined_at`` maps a member to when it joined (ms; missing: from the start); members who
    joined after ``sent_at`` are neither unread nor hidden.
    """
    joined = joined_at or {}
    unread: list[str] = []
    hidden = 0
    for m in members:
        if m == sender or joined.get(m, 0) > sent_at:
            continue
        if m in marks.hidden:
            hidden += 1
        elif marks.get(m, sender) < sent_at:
            unread.append(m)
    return Unread(tuple(sorted(unread)), hidden)


def watermarks_for(rows: Iterable[tuple[str, int]]) -> dict[str, int]:
    """A reader's ``wm`` payload from the (sender, sent_at) of the messages it has read: the
    greatest ``sent_at`` per sender, at most MAX_WM_ENTRIES senders (the most recent ones)."""
    wm: dict[str, int] = {}
    for sender, at in rows:
        if at > wm.get(sender, 0):
            wm[sender] = at
    if len(wm) > MAX_WM_ENTRIES:
        keep = sorted(wm.items(), key=lambda kv: kv[1], reverse=True)[:MAX_WM_ENTRIES]
        wm = dict(keep)
    return wm


__all__ = ["MAX_WM_ENTRIES", "Unread", "Watermarks", "count_unread", "watermarks_for"]
