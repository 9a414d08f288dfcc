"""What the local API does on conversations, contacts, verification, settings and devices.

:class:`Actions` is the half of :class:`client.app.core.AppCore` that the web layer (and the
Unix-socket CLI) calls for each request: thin operations over :class:`client.device.Device`,
:mod:`client.trust` and :mod:`client.linking` that return the JSON objects of docs/app.md and
publish the matching events. The other half (``core``: lifecycle, the node link, the outbox
flusher, the event feed) provides what is declared abstract here.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import replace
from typing import Any

from client import linking, prefix
from client.connection import expect
from client.device import DEFAULT_TTL_MS
from client.payload import Payload
from client.safety import safety_number
from client.state import Contact, HistoryRow, OutboxItem
from federation import frames as F
from federation.clock import Clock
from federation.devicelist import SignedDeviceList
from federation.errors import (
    HavenError,
    IdentityChanged,
    KeysUnavailable,
    LocalProtocolError,
    TransportError,
)
from federation.ids import Address

from .events import Obj, chat_obj, contact_obj, event, message_obj
from .files import with_file
from .groups import Groups, group_id, is_group_ref

log = logging.getLogger("haven.app")

NAME_MAX = 64


def clean_name(text: Any, what: str) -> str:
    """A display name or nickname from the API: a string, printable, at most 64 characters."""
    if not isinstance(text, str):
        raise LocalProtocolError(f"{what} must be a string", code="bad_request")
    clean = "".join(ch for ch in text if ch.isprintable()).strip()
    if len(clean) > NAME_MAX:
        raise LocalProtocolError(f"{what} is longer than {NAME_MAX} characters", code="bad_request")
    return clean


class Actions(Groups):
    """The API's operations (a base of :class:`~client.app.core.AppCore`); the group ones
    come from :class:`~client.app.groups.Groups`."""

    clock: Clock
    lock: asyncio.Lock  # Device operations that span awaits, one at a time
    _key_changed: set[str]  # contacts whose node now serves another identity key
    _shown: dict[bytes, tuple[int, bool, bool, bool]]  # (status, read, edited, not_delivered)
    _profile_due: bool
    _kick: asyncio.Event

    # provided by AppCore (besides those of CoreParts)
    def state(self) -> Obj:
        """The ``State`` object."""
        raise NotImplementedError

    def _publish_changed(self, address: str) -> None:
        raise NotImplementedError

    def _purge(self) -> None:
        raise NotImplementedError

    # ---- reading -------------------------------------------------------------------------------

    def _message(self, row: HistoryRow) -> Obj:
        if is_group_ref(row.peer):
            gid = group_id(row.peer)
            counts = self.require().group_counts(gid).get(row.msg_id)
            return self._group_message(row, counts, self._names())
        msg = with_file(message_obj(row, self.clock.now_ms()), self.require().state)
        self._shown[row.msg_id] = (row.status, row.read, row.edited, msg["not_delivered"])
        return msg

    def _message_of(self, msg_id: bytes) -> Obj | None:
        """The ``Message`` of a stored row, or None."""
        row = self.require().state.message(msg_id)
        return None if row is None else self._message(row)

    def _names(self) -> dict[str, str]:
        """Address → the name we show (nickname, else display name) for every contact."""
        return {c.address: c.nickname or c.display_name for c in self.require().state.contacts()}

    def _contact(self, c: Contact) -> Obj:
        return contact_obj(c, c.address in self._key_changed)

    def _address(self, address: Any) -> str:
        if not isinstance(address, str):
            raise LocalProtocolError("give an address name@host", code="bad_request")
        try:
            Address.parse(address)
        except (HavenError, ValueError) as exc:
            raise LocalProtocolError(f"not an address: {address!r}", code="bad_request") from exc
        return address

    def _last(self, address: str) -> HistoryRow | None:
        st = self.require().state
        r = st.db.execute(
            "SELECT msg_id FROM history WHERE peer=? ORDER BY seq DESC LIMIT 1", (address,)
        ).fetchone()
        return None if r is None else st.message(bytes(r[0]))

    def chat(self, address: str) -> Obj:
        """One ``Chat`` (a group's when ``address`` is a group ref)."""
        if is_group_ref(address):
            return self.group_chat(group_id(address))
        dev = self.require()
        last = self._last(address)
        (unread,) = dev.state.db.execute(
            "SELECT count(*) FROM history WHERE peer=? AND outgoing=0 AND read=0", (address,)
        ).fetchone()
        return chat_obj(
            address,
            dev.state.contact(address),
            None if last is None else with_file(message_obj(last, self.clock.now_ms()), dev.state),
            int(unread),
        )

    def chats(self) -> list[Obj]:
        """Every conversation (1:1 and groups), most recent first; contacts without messages
        after them."""
        dev = self.require()
        self._purge()
        seen = [p for p, *_ in dev.state.chats() if not p.startswith("group:")]
        others = [
            c.address
            for c in dev.state.contacts()
            if c.address not in seen and c.address != dev.address
        ]
        direct = [self.chat(a) for a in seen]
        talked = sorted(
            direct + self.group_chats(),
            key=lambda c: -(c["last"]["sent_at"] if c["last"] else 0),
        )
        return talked + [self.chat(a) for a in others]

    def messages(self, address: str) -> list[Obj]:
        """A conversation (1:1 or group), oldest first."""
        dev = self.require()
        self._purge()
        if is_group_ref(address):
            return self.group_messages(address)
        return [self._message(r) for r in dev.state.history(self._address(address))]

    def contacts(self) -> list[Obj]:
        """Every contact (not ourselves), by address."""
        dev = self.require()
        return [self._contact(c) for c in dev.state.contacts() if c.address != dev.address]

    def message_id(self, given: str) -> bytes:
        """A message id from any unique prefix of at least 8 hex characters."""
        return prefix.message_id(self.require().state.db, given)

    # ---- conversation operations ---------------------------------------------------------------

    async def open_chat(self, address: Any) -> Obj:
        """Start a conversation: fetch, verify and pin the contact's keys."""
        dev = self.require()
        address = self._address(address)
        if address == dev.address:
            raise LocalProtocolError("that is your own address", code="bad_request")
        if dev.state.contact(address) is None:
            conn = await self.conn()
            async with self.lock:
                try:
                    await dev.fetch_contact(conn, address, claim=False)
                except KeysUnavailable as exc:
                    if "not_found" in str(exc):
                        raise LocalProtocolError(
                            f"there is no account {address}", code="no_such_account"
                        ) from exc
                    raise
            c = dev.state.contact(address)
            if c is not None:
                self._publish(event("contact", contact=self._contact(c)))
            self._publish_chat(address)
        return self.chat(address)

    async def mark_read(self, address: Any) -> int:
        """Mark a chat read here at once, and queue the ``read`` payload durably (to the
        sender, or with read receipts off only to our other devices) like a text: it is sent
        now if the link is up, else on the next connect. Returns how many became read."""
        dev = self.require()
        if is_group_ref(address):
            return await self.group_mark_read(address)
        address = self._address(address)
        unread = [
            bytes(r[0])
            for r in dev.state.db.execute(
                "SELECT msg_id FROM history WHERE peer=? AND outgoing=0 AND read=0", (address,)
            ).fetchall()
        ]
        if not unread:
            return 0
        now = self.clock.now_ms()
        p = Payload(os.urandom(16), "read", address, now, ids=tuple(unread))
        to = address if dev.setting("read_receipts", "on") == "on" else dev.address
        with dev.state.tx() as db:
            db.executemany("UPDATE history SET read=1 WHERE msg_id=?", [(m,) for m in unread])
            dev.state.queue(db, OutboxItem(p.id, to, p.encode(), DEFAULT_TTL_MS, now))
        self._kick.set()
        self._publish_changed(address)
        self._publish_chat(address)
        return len(unread)

    async def set_timer(self, address: Any, ms: Any) -> Obj:
        """A chat's disappearing timer, shared with the peer end to end."""
        dev = self.require()
        address = self._address(address)
        if not isinstance(ms, int) or isinstance(ms, bool) or ms < 0:
            raise LocalProtocolError("timer_ms must be a whole number >= 0", code="bad_request")
        async with self.lock:
            await dev.set_timer(address, ms)
        self._publish_chat(address)
        return self.chat(address)

    async def edit(self, msg_id: bytes, text: Any) -> Obj:
        """Edit one of our messages for everyone; the updated ``Message``."""
        dev = self.require()
        if not isinstance(text, str) or not text.strip():
            raise LocalProtocolError("the message is empty", code="bad_request")
        row = dev.state.message(msg_id)
        if row is None:
            raise LocalProtocolError("no such message", code="not_found")
        async with self.lock:
            await dev.edit(row.peer, msg_id, text)
        new = dev.state.message(msg_id)
        assert new is not None
        msg = self._message(new)
        self._publish(event("update", message=msg))
        self._publish_chat(row.peer)
        return msg

    async def delete(self, msg_id: bytes) -> None:
        """Delete one of our messages for everyone (a ``delete`` event)."""
        dev = self.require()
        row = dev.state.message(msg_id)
        if row is None:
            raise LocalProtocolError("no such message", code="not_found")
        async with self.lock:
            await dev.delete(row.peer, msg_id)
        self._shown.pop(msg_id, None)
        self._publish(event("delete", chat=row.peer, id=msg_id.hex()))
        self._publish_chat(row.peer)

    async def message_readers(self, msg_id: bytes) -> list[Obj]:
        """ "Who can read this" for any message: a group's member devices, else :meth:`readers`."""
        row = self.require().state.message(msg_id)
        if row is not None and is_group_ref(row.peer):
            return await self.group_readers(row.peer)
        return self.readers(msg_id)

    def readers(self, msg_id: bytes) -> list[Obj]:
        """The devices a message was encrypted for: the contact's devices on its pinned signed
        list and our own, each ``verified`` as the account is (not per device, yet)."""
        dev = self.require()
        row = dev.state.message(msg_id)
        if row is None:
            raise LocalProtocolError("no such message", code="not_found")
        names = dict(linking._names(dev))
        out: list[Obj] = []
        for address in (row.peer, dev.address):
            c = dev.state.contact(address)
            if c is None:
                continue
            dl = SignedDeviceList(c.device_list, c.sig).open(expected_address=address)
            for d in dl.devices:
                out.append(
                    {
                        "address": address,
                        "id": d.device_id,
                        "name": names.get(d.device_id, d.device_id[:8])
                        if address == dev.address
                        else d.device_id[:8],
                        "verified": c.verified,
                    }
                )
        return out

    # ---- contacts and verification -------------------------------------------------------------

    def set_nickname(self, address: Any, nickname: Any) -> Obj:
        """Our own name for a contact (stays on this device); the ``Contact``."""
        dev = self.require()
        address = self._address(address)
        if dev.state.contact(address) is None:
            raise LocalProtocolError(f"{address} is not a contact", code="not_found")
        dev.set_nickname(address, clean_name(nickname, "nickname"))
        c = dev.state.contact(address)
        assert c is not None
        obj = self._contact(c)
        self._publish(event("contact", contact=obj))
        self._publish_chat(address)
        return obj

    async def verify(
        self, address: Any, *, confirm: bool = False, accept_new_key: bool = False
    ) -> Obj:
        """The safety number; ``confirm`` marks verified; ``accept_new_key`` pins a new key."""
        dev = self.require()
        address = self._address(address)
        new_key: bytes | None = None
        async with self.lock:
            if accept_new_key:
                conn = await self.conn()
                await dev.fetch_contact(conn, address, claim=False, accept_new_key=True)
                self._key_changed.discard(address)
            else:
                new_key = await self._check_key(address)
            c = dev.state.contact(address)
            if c is None:
                raise LocalProtocolError(f"{address} is not a contact", code="not_found")
            if confirm and new_key is not None:
                raise IdentityChanged(
                    f"the identity key of {address} changed: compare the new safety number, "
                    "then accept the new key"
                )
            if confirm and not c.verified:
                c = replace(c, verified=True)
                with dev.state.tx() as db:
                    dev.state.save_contact(db, c)
        own = dev.state.contact(dev.address)
        assert own is not None
        number = safety_number(dev.address, own.identity_key, address, c.identity_key)
        new_number = (
            None
            if new_key is None
            else safety_number(dev.address, own.identity_key, address, new_key)
        )
        obj = {
            "safety_number": number,
            "qr": qr_matrix(number.replace(" ", "")),
            "verified": c.verified,
            "key_changed": new_key is not None,
            "new_safety_number": new_number,
        }
        self._publish(event("contact", contact=self._contact(c)))
        return obj

    async def _check_key(self, address: str) -> bytes | None:
        """The contact's new identity key if its node now serves another one (else None)."""
        dev = self.require()
        try:
            conn = await self.conn()
        except TransportError:
            return None
        try:
            await dev.fetch_contact(conn, address, claim=False)
        except IdentityChanged:
            keys = expect(await conn.request(F.QueryKeys(conn.next_rid(), address, False)), F.Keys)
            self._key_changed.add(address)
            return bytes(keys.device_list.open(expected_address=address).identity_key)
        except KeysUnavailable:
            return None
        self._key_changed.discard(address)
        return None

    # ---- profile, settings, passphrase, devices ------------------------------------------------

    async def set_profile(self, display_name: Any) -> Obj:
        """Our display name; sent end to end to every contact by the flusher."""
        dev = self.require()
        dev.set_display_name(clean_name(display_name, "display_name"))
        self._profile_due = True
        self._kick.set()
        self._publish(event("state", state=self.state()))
        return self.state()

    async def _share_profile(self) -> None:
        try:
            conn = await self.conn()
            async with self.lock:
                await self.require().share_profile(conn)
        except HavenError as exc:
            self._profile_due = True
            log.info("profile not shared yet (%s)", exc.code)

    def set_settings(self, body: dict[str, Any]) -> Obj:
        """Receipts and language; unknown keys or values are ``bad_request``."""
        dev = self.require()
        allowed = {
            "read_receipts": ("on", "off"),
            "delivery_receipts": ("on", "off"),
            "language": ("", "en", "ko"),
        }
        for k, v in body.items():
            if k not in allowed or v not in allowed[k]:
                raise LocalProtocolError(f"bad setting {k!r}", code="bad_request")
        for k, v in body.items():
            dev.set_setting(k, v)
        self._publish(event("state", state=self.state()))
        return self.state()

    def set_passphrase(self, new: Any) -> Obj:
        """Rewrap the store's key under a new passphrase (``""``: unprotected)."""
        dev = self.require()
        if not isinstance(new, str):
            raise LocalProtocolError("new must be a string", code="bad_request")
        dev.state.change_passphrase(new or None)
        log.info("storage protection changed")
        self._publish(event("state", state=self.state()))
        return self.state()

    async def devices(self) -> list[Obj]:
        """Our account's devices from its signed list (fetched and verified)."""
        dev = self.require()
        async with self.lock:
            found = await linking.list_devices(dev)
        return [{"id": d["id"], "name": d["name"], "this_device": d["this_device"]} for d in found]

    async def remove_device(self, given: str) -> str:
        """Remove a device (any unique id prefix) from our signed list; its full id."""
        dev = self.require()
        async with self.lock:
            ids = [d["id"] for d in await linking.list_devices(dev)]
            device_id = prefix.device_id(ids, given)
            await linking.remove_device(dev, device_id)
        return device_id


def qr_matrix(text: str) -> list[list[int]]:
    """A QR code as rows of 0/1 modules (the page draws it; no image library there)."""
    import segno

    qr = segno.make(text, error="m")
    return [[int(bool(v)) for v in row] for row in qr.matrix]
