"""How a verified payload changes a device's local state: one applier per payload kind.

:meth:`client.device.Device.process` opens, authenticates and decrypts each envelope, then calls
the applier of its payload's kind inside the batch's transaction (docs/protocol.md §3.1). A new
kind (groups, attachments) is one more function here and one more entry in :data:`APPLIERS`; a
kind with no entry is a newer device's and is ignored. An applier validates before it writes
and raises a :class:`federation.errors.HavenError` to drop the payload.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import vodozemac as vz

from federation.errors import MalformedEnvelope, UntrustedKey

from .attachments import padded_size, safe_mime, safe_name
from .payload import Payload
from .state import (
    FILE_PENDING,
    STATUS_DELIVERED,
    STATUS_READ,
    Attachment,
    DeviceState,
    HistoryRow,
    clean_name,
)


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """What one applied payload changed, for the caller (the CLI prints it, the daemon emits
    events): ``kind`` is the payload's; ``text`` is the new display name for ``profile`` and
    the timer in ms for ``timer``; ``peer`` is the conversation."""

    sender: str
    text: str
    sent_at: int
    msg_id: bytes
    kind: str = "text"
    peer: str = ""
    target: bytes = b""
    forwarded: bool = False  # relayed by one of our own devices (a ``sync`` payload)
    chat: str = ""  # a group message or state change: "group:<hex>" (and ``peer`` the same)


Applier = Callable[[DeviceState, Any, str, bool, Payload, int], "ReceivedMessage | None"]


def apply_text(
    state: DeviceState, db: Any, sender: str, own: bool, p: Payload, now: int
) -> ReceivedMessage | None:
    peer = p.to if own else sender
    start = p.sent_at if own else now  # sender's devices: timer starts at sending
    row = HistoryRow(
        p.id,
        peer,
        own,
        sender,
        p.text,
        p.sent_at,
        now,
        read=own,
        expires_in=p.expires_in,
        expire_at=start + p.expires_in if p.expires_in else None,
    )
    if not state.add_history(db, row):
        return None  # a duplicate (e.g. a re-delivered pre-key message, a retried send)
    return ReceivedMessage(sender, p.text, p.sent_at, p.id, p.kind, peer)


def apply_file(
    state: DeviceState, db: Any, sender: str, own: bool, p: Payload, now: int
) -> ReceivedMessage | None:
    """A file: a history row (the caption as its text) and its attachment, ``pending`` until
    downloaded. The name and MIME type are made safe here, before anything uses them."""
    ref = p.file
    if ref is None or len(ref.token) != 32 or ref.padded != padded_size(ref.size):
        raise MalformedEnvelope("a file payload without a usable reference")
    ref = replace(ref, name=safe_name(ref.name), mime=safe_mime(ref.mime))
    msg = apply_text(state, db, sender, own, p, now)
    if msg is None:
        return None
    state.add_attachment(db, Attachment(p.id, ref, FILE_PENDING))
    return msg


def apply_change(
    state: DeviceState, db: Any, sender: str, own: bool, p: Payload, now: int
) -> ReceivedMessage | None:
    target = state.message(p.target)
    if target is None or target.sender != sender:
        raise UntrustedKey("edit or delete of someone else's message")
    if p.kind == "edit":
        state.edit_history(db, p.target, p.text)
    else:
        state.delete_history(db, p.target)
    return ReceivedMessage(
        sender, p.text, p.sent_at, p.id, p.kind, p.to if own else sender, p.target
    )


def apply_receipt(
    state: DeviceState, db: Any, sender: str, own: bool, p: Payload, now: int
) -> ReceivedMessage | None:
    status = STATUS_DELIVERED if p.kind == "delivered" else STATUS_READ
    for mid in p.ids:
        if own and p.kind == "read":  # we read it on another device
            db.execute("UPDATE history SET read=1 WHERE msg_id=? AND outgoing=0", (mid,))
        else:
            db.execute(
                "UPDATE history SET status=max(status, ?) WHERE msg_id=? AND outgoing=1 AND peer=?",
                (status, mid, sender),
            )
    return ReceivedMessage(sender, p.text, p.sent_at, p.id, p.kind, p.to if own else sender)


def apply_profile(
    state: DeviceState, db: Any, sender: str, own: bool, p: Payload, now: int
) -> ReceivedMessage | None:
    """A display name: a contact's (their row), or ours set on another of our devices."""
    name = clean_name(p.name)
    if own:
        if p.to != sender:
            return None  # our profile as sent to a contact: nothing to do here
        state.put(db, "display_name", name.encode())
    elif not state.update_contact(db, sender, display_name=name):
        return None
    return ReceivedMessage(sender, name, p.sent_at, p.id, p.kind, sender)


def apply_timer(
    state: DeviceState, db: Any, sender: str, own: bool, p: Payload, now: int
) -> ReceivedMessage | None:
    """A conversation's timer, set by either side on any device: the latest ``sent_at``
    wins, so two devices that change it at once end up agreeing."""
    peer = p.to if own else sender
    c = state.contact(peer)
    if c is None or p.sent_at <= c.timer_at:
        return None
    state.update_contact(db, peer, timer_ms=p.expires_in, timer_at=p.sent_at)
    return ReceivedMessage(sender, str(p.expires_in), p.sent_at, p.id, p.kind, peer)


APPLIERS: dict[str, Applier] = {
    "text": apply_text,
    "file": apply_file,
    "edit": apply_change,
    "delete": apply_change,
    "delivered": apply_receipt,
    "read": apply_receipt,
    "profile": apply_profile,
    "timer": apply_timer,
}


class SessionCache:
    """The Olm sessions one delivered batch uses: unpickled once, pickled and saved once.

    Unpickling and pickling a session costs ten times its decryption, so a backlog drained
    envelope by envelope spent most of its time there (and on one fsync each).
    """

    def __init__(self, state: DeviceState) -> None:
        self._state = state
        self._by_peer: dict[str, list[vz.Session]] = {}  # most recently used first
        self._touched: dict[str, list[vz.Session]] = {}
        self.account_changed = False

    def sessions(self, peer: str) -> list[vz.Session]:
        got = self._by_peer.get(peer)
        if got is None:
            key = self._state.storage_key
            got = [vz.Session.from_pickle(p, key) for _, p in self._state.sessions(peer)]
            self._by_peer[peer] = got
        return list(got)

    def touch(self, peer: str, session: vz.Session) -> None:
        """``session`` decrypted a message (or was just created): try it first next time."""
        for table in (self._by_peer, self._touched):
            rest = [s for s in table.get(peer, []) if s is not session]
            table[peer] = [session, *rest]

    def save(self, db: Any, now: int) -> None:
        key = self._state.storage_key
        for peer, sessions in self._touched.items():
            for age, s in enumerate(sessions):  # keep the most recently used one first
                self._state.save_session(db, peer, s.session_id, s.pickle(key), now - age)
