"""Group chats in the app: the group list entries, the group conversation, its "1" counters,
members and admin actions, invite codes and "who can read this".

:class:`Groups` is a base of :class:`client.app.core.AppCore` (like
:class:`client.app.actions.Actions`), thin over the Device's group API (``group_create`` …
``group_readers``, docs/protocol.md, group sections). A group is addressed in the local API by
its ref ``group:<32 hex>`` wherever a 1:1 chat takes an address, so the page's store and
routes are the same for both kinds; its ``Chat`` carries ``"kind": "group"``.

Every member sees each message's counter: ``unread_by`` (how many members have not read it),
``unread_members`` and ``receipts_hidden`` (members whose read receipts are off: they are never
counted as having read). When receipts arrive the daemon compares each message's counter with
what it last showed and sends an ``update`` event for those that changed, so the number falls
without a reload.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from client.state import HistoryRow
from federation.clock import Clock
from federation.errors import LocalProtocolError

from .events import Obj, event, message_obj
from .files import CoreParts, with_file

log = logging.getLogger("haven.app.groups")

REF_PREFIX = "group:"
GROUP_NAME_MAX = 64
MAX_CREATE_MEMBERS = 1000


def is_group_ref(value: Any) -> bool:
    """Whether ``value`` is a group ref ``group:<32 hex>`` (what the API uses as a chat id)."""
    if not isinstance(value, str) or not value.startswith(REF_PREFIX):
        return False
    hexpart = value[len(REF_PREFIX) :]
    return len(hexpart) == 32 and all(c in "0123456789abcdef" for c in hexpart)


def group_id(ref: Any) -> bytes:
    """The 16-byte group id of a ref (``bad_request`` if it is not one)."""
    if not is_group_ref(ref):
        raise LocalProtocolError("not a group", code="bad_request")
    return bytes.fromhex(str(ref)[len(REF_PREFIX) :])


def counter_fields(counts: tuple[tuple[str, ...], int] | None) -> Obj:
    """The counter part of a group ``Message``: ``unread_by``, ``unread_members``,
    ``receipts_hidden`` (zeros when the device has no count for it)."""
    members, hidden = counts if counts is not None else ((), 0)
    return {
        "unread_by": len(members),
        "unread_members": list(members),
        "receipts_hidden": int(hidden),
    }


class Groups(CoreParts):
    """The app's group operations (a base of :class:`~client.app.core.AppCore`)."""

    clock: Clock
    lock: asyncio.Lock
    _kick: asyncio.Event
    # per group message last shown: (unread_by, receipts_hidden, status, read)
    _gshown: dict[bytes, tuple[int, int, int, bool]]

    # provided by AppCore / Actions (besides those of CoreParts)
    def _address(self, address: Any) -> str:
        raise NotImplementedError

    def _names(self) -> dict[str, str]:
        raise NotImplementedError

    # ---- objects -------------------------------------------------------------------------------

    def _group_message(
        self, row: HistoryRow, counts: tuple[tuple[str, ...], int] | None, names: dict[str, str]
    ) -> Obj:
        dev = self.require()
        msg = with_file(message_obj(row, self.clock.now_ms()), dev.state)
        msg |= counter_fields(counts)
        # no delivery receipts in groups (the counter says more): only a failure is shown
        msg["not_delivered"] = bool(row.outgoing and row.error)
        msg["group"] = True
        msg["sender_name"] = names.get(row.sender, "")
        msg["unread_names"] = [names.get(a, "") for a in msg["unread_members"]]
        self._gshown[row.msg_id] = (msg["unread_by"], msg["receipts_hidden"], row.status, row.read)
        return msg

    def group_obj(self, gid: bytes) -> Obj:
        """A ``Group``: name, members (admins marked), version, whether we are an admin."""
        dev = self.require()
        info = dev.group(gid)
        if info is None:
            raise LocalProtocolError("no such group", code="unknown_group")
        names = self._names()
        admins = set(info.admins)
        return {
            "ref": info.ref,
            "id": info.gid.hex(),
            "name": info.name,
            "version": info.version,
            "active": info.active,
            "am_admin": info.active and dev.address in admins,
            "members": [
                {
                    "address": a,
                    "name": names.get(a, ""),
                    "admin": a in admins,
                    "me": a == dev.address,
                }
                for a in sorted(info.members, key=lambda a: (a not in admins, a != dev.address, a))
            ],
            "superseded": [dict(s) for s in info.superseded],
            "joined_at": info.joined_at,
        }

    def group_chat(self, gid: bytes) -> Obj:
        """The group's ``Chat`` (``kind: group``) for the chat list and the header."""
        dev = self.require()
        info = dev.group(gid)
        if info is None:
            raise LocalProtocolError("no such group", code="unknown_group")
        # the plain columns only: the chat list must not open every text of every group
        st = dev.state
        r = st.db.execute(
            "SELECT msg_id FROM history WHERE peer=? ORDER BY seq DESC LIMIT 1", (info.ref,)
        ).fetchone()
        last = None if r is None else st.message(bytes(r[0]))
        (unread,) = st.db.execute(
            "SELECT count(*) FROM history WHERE peer=? AND outgoing=0 AND read=0", (info.ref,)
        ).fetchone()
        last_obj = None
        if last is not None:
            last_obj = with_file(message_obj(last, self.clock.now_ms()), dev.state)
            last_obj["sender_name"] = self._names().get(last.sender, "")
        return {
            "kind": "group",
            "address": info.ref,
            "display_name": info.name,
            "nickname": "",
            "verified": False,
            "last": last_obj,
            "unread": int(unread),
            "timer_ms": 0,
            "member_count": len(info.members),
            "active": info.active,
        }

    def group_chats(self) -> list[Obj]:
        """Every group we know (also those we left: their history stays readable)."""
        return [self.group_chat(g.gid) for g in self.require().groups()]

    def group_messages(self, ref: Any) -> list[Obj]:
        """A group conversation, oldest first, each message with its counter."""
        dev = self.require()
        gid = group_id(ref)
        if dev.group(gid) is None:
            raise LocalProtocolError("no such group", code="unknown_group")
        counts = dev.group_counts(gid)
        names = self._names()
        return [self._group_message(r, counts.get(r.msg_id), names) for r in dev.group_history(gid)]

    # ---- live updates --------------------------------------------------------------------------

    def publish_group_changed(self, gid: bytes) -> None:
        """``update`` for every message of the group whose counter (or status, or read state)
        differs from what was last shown, then the group's ``chat``."""
        dev = self.require()
        if dev.group(gid) is None:
            return
        counts = dev.group_counts(gid)
        names = self._names()
        st = dev.state
        for msg_id, status, read in st.db.execute(
            "SELECT msg_id, status, read FROM history WHERE peer=?", ("group:" + gid.hex(),)
        ).fetchall():
            mid = bytes(msg_id)
            c = counts.get(mid)
            now = (len(c[0]) if c else 0, c[1] if c else 0, int(status), bool(read))
            if self._gshown.get(mid) == now:
                continue
            row = st.message(mid)  # only the changed ones are opened
            if row is not None:
                self._publish(event("update", message=self._group_message(row, c, names)))
        self._publish(event("chat", chat=self.group_chat(gid)))

    def publish_group_messages(self, gid: bytes, msg_ids: list[bytes]) -> None:
        """A ``message`` event for each new row of a group conversation (one count for all)."""
        dev = self.require()
        counts = dev.group_counts(gid)
        names = self._names()
        for msg_id in msg_ids:
            row = dev.state.message(msg_id)
            if row is not None:
                msg = self._group_message(row, counts.get(msg_id), names)
                self._publish(event("message", message=msg))

    def group_versions(self) -> dict[bytes, tuple[int, bool]]:
        """``gid -> (version, active)`` of every group here (to notice what a batch changed)."""
        return {g.gid: (g.version, g.active) for g in self.require().groups()}

    def refresh_groups(self) -> None:
        """After a CLI command ran in the daemon (``haven group …``, ``haven send GROUP``):
        publish what it changed — group states and new or changed messages."""
        if not getattr(self, "joined", False):
            return
        for g in self.require().groups():
            self.publish_group(g.gid)
            self.publish_group_changed(g.gid)

    def publish_group(self, gid: bytes) -> None:
        """``group`` (its state: name, members, admins) and ``chat`` events."""
        if self.require().group(gid) is None:
            return
        self._publish(event("group", group=self.group_obj(gid)))
        self._publish(event("chat", chat=self.group_chat(gid)))

    # ---- operations ----------------------------------------------------------------------------

    def _group_name(self, name: Any) -> str:
        if not isinstance(name, str):
            raise LocalProtocolError("name must be a string", code="bad_request")
        clean = "".join(ch for ch in name if ch.isprintable()).strip()
        if not clean:
            raise LocalProtocolError("give the group a name", code="bad_request")
        if len(clean) > GROUP_NAME_MAX:
            raise LocalProtocolError("the name is too long", code="bad_request")
        return clean

    async def group_create(self, name: Any, members: Any) -> Obj:
        """Create a group (we are its admin) with ``members`` (addresses); its ``Group``."""
        dev = self.require()
        clean = self._group_name(name)
        if not isinstance(members, list) or len(members) > MAX_CREATE_MEMBERS:
            raise LocalProtocolError("members must be a list of addresses", code="bad_request")
        addrs = sorted({self._address(a.strip() if isinstance(a, str) else a) for a in members})
        addrs = [a for a in addrs if a != dev.address]
        conn = await self.conn()
        async with self.lock:
            info = await dev.group_create(clean, addrs, conn=conn)
        log.info("group created (%d members)", len(info.members))
        self.publish_group(info.gid)
        return self.group_obj(info.gid)

    async def group_change(self, ref: Any, op: str, body: dict[str, Any]) -> Obj:
        """An admin action (``add``, ``remove``, ``admin``, ``rename``) or ``leave``; the new
        ``Group``."""
        dev = self.require()
        gid = group_id(ref)
        conn = await self.conn()
        async with self.lock:
            if op == "add":
                await dev.group_add(gid, self._address(body.get("address")), conn=conn)
            elif op == "remove":
                await dev.group_remove(gid, self._address(body.get("address")), conn=conn)
            elif op == "admin":
                on = body.get("on")
                if not isinstance(on, bool):
                    raise LocalProtocolError("on must be true or false", code="bad_request")
                await dev.group_set_admin(gid, self._address(body.get("address")), on, conn=conn)
            elif op == "rename":
                await dev.group_rename(gid, self._group_name(body.get("name")), conn=conn)
            elif op == "leave":
                await dev.group_leave(gid, conn=conn)
            else:
                raise LocalProtocolError("unknown group action", code="bad_request")
        self.publish_group(gid)
        return self.group_obj(gid)

    async def group_invite(self, ref: Any, uses: Any = 1) -> Obj:
        """A new invite code for the group (admins only): ``{"code", "qr"}``."""
        from .actions import qr_matrix

        dev = self.require()
        gid = group_id(ref)
        if not isinstance(uses, int) or isinstance(uses, bool) or not 1 <= uses <= 1000:
            raise LocalProtocolError("uses must be 1..1000", code="bad_request")
        async with self.lock:
            code = await dev.group_invite(gid, uses=uses)
        return {"code": code, "qr": qr_matrix(code)}

    async def group_join(self, code: Any) -> Obj:
        """Ask the inviting admin to add us: ``{"group_id", "name", "status": "requested"}``."""
        dev = self.require()
        if not isinstance(code, str) or not code.strip():
            raise LocalProtocolError("give the group's invite code", code="bad_request")
        conn = await self.conn()
        async with self.lock:
            res = await dev.group_join(code.strip(), conn=conn)
        return {"group_id": res.get("group_id"), "name": res.get("name"), "status": "requested"}

    async def group_send(self, ref: Any, text: Any) -> Obj:
        """Queue a text to the group durably (``pending``), as a 1:1 text: the daemon's flush
        Megolm-encrypts and submits it once the link allows (one upload; the nodes fan it
        out), and its ``update`` event brings ``sent``. Its ``Message``."""
        dev = self.require()
        gid = group_id(ref)
        if not isinstance(text, str) or not text.strip():
            raise LocalProtocolError("the message is empty", code="bad_request")
        async with self.lock:
            row = dev.queue_group_text(gid, text)
        msg = self._group_message(row, None, self._names())
        self._publish(event("message", message=msg))
        self._publish(event("chat", chat=self.group_chat(gid)))
        self._kick.set()
        return msg

    async def group_mark_read(self, ref: Any) -> int:
        """Mark the group read here and send our watermark (one upload, fanned out by the
        nodes; with read receipts off only to our own devices). How many became read."""
        dev = self.require()
        gid = group_id(ref)
        conn = await self.conn()
        async with self.lock:
            n = await dev.group_mark_read(gid, conn=conn)
        if n:
            self.publish_group_changed(gid)
        return n

    async def group_readers(self, ref: Any) -> list[Obj]:
        """ "Who can read this": the member devices group messages are encrypted to, each
        verified or not, ``changed`` when its account's devices or identity changed since it
        was verified."""
        dev = self.require()
        gid = group_id(ref)
        conn = await self.conn()
        async with self.lock:
            found = await dev.group_readers(gid, conn=conn)
        names = self._names()
        return [
            {
                "address": str(d.get("address", "")),
                "id": str(d.get("device_id", "")),
                "name": names.get(str(d.get("address", "")), "") or str(d.get("device_id", ""))[:8],
                "verified": bool(d.get("verified")),
                "changed": bool(d.get("changed")),
            }
            for d in found
        ]
