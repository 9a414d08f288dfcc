"""The daemon's state: the unlocked device, its one link to the home node, and the event feed.

One :class:`AppCore` per process. It moves through three states: *unjoined* (the home holds
no device; :meth:`AppCore.join` creates one — onboarding), *locked* (the home is
passphrase-protected; :meth:`AppCore.unlock`) and *open*. Once open, a supervisor task keeps
ONE authenticated connection to the home node and hands it to every operation of the device
(``Device.use_connection``), so no command opens a second connection that would kick the
first. When the node goes away (``NodeConnection.wait_closed``) the state goes ``connecting``,
then ``offline`` once an attempt failed, and it redials with exponential backoff and jitter
(0.25 s doubling to a 10 s cap, reset once a link lasted 5 s): the daemon never silently stops
receiving. The API's operations themselves are in :mod:`client.app.actions`.

Sending is durable first: a text (1:1 or group) is queued on the device (``Device.queue_text``,
``Device.queue_group_text``; one transaction) and shown ``pending``; the flusher sends the
queue on every (re)connect and on each new text, one flush at a time. Every change is
published to subscribers (the WebSocket clients) as the events of docs/app.md. Every
background task belongs to one TaskGroup that :meth:`AppCore.close` cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from client import linking
from client.connection import NodeConnection
from client.device import DEFAULT_TTL_MS, Device, ReceivedMessage
from client.state import STATUS_DELIVERED, HistoryRow
from federation.clock import Clock, SystemClock
from federation.errors import (
    HavenError,
    IdentityChanged,
    LocalProtocolError,
    TransportError,
)

from .actions import Actions, clean_name, qr_matrix
from .events import MovedNotices, Obj, event
from .files import AUTO_DOWNLOAD_MB, Files, default_save_dir
from .groups import group_id, is_group_ref

log = logging.getLogger("haven.app")

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.25, 10.0
DIAL_TIMEOUT_S = 5.0
STABLE_S = 5.0  # a link that lasted this long resets the backoff
CONN_WAIT_S = 2.0  # an operation waits this long for the link before "node unreachable"
TICK_S = 30.0
SUBSCRIBER_BACKLOG = 512  # events a slow client may fall behind before it is dropped
UNLOCK_FREE_ATTEMPTS = 5
LINK_TIMEOUT_S = 300.0


def _version() -> str:
    try:
        from importlib.metadata import version

        return str(version("haven"))
    except Exception:  # noqa: BLE001 - not installed as a distribution (a checkout)
        return "0"


class AppCore(Actions, Files):
    """The daemon's device, link and events.

    Args:
        home: the device home (may hold no device yet).
        clock: injected time (tests); the system clock otherwise.
    """

    def __init__(
        self,
        home: str,
        clock: Clock | None = None,
        *,
        save_dir: str | None = None,
        auto_download_mb: float = AUTO_DOWNLOAD_MB,
    ) -> None:
        self.home = home
        self.save_dir = os.path.abspath(os.path.expanduser(save_dir or default_save_dir()))
        self.auto_download_bytes = int(auto_download_mb * 1_000_000)
        self._downloads: dict[bytes, asyncio.Task[None]] = {}
        self._file_locks: dict[bytes, asyncio.Lock] = {}
        self.clock = clock or SystemClock()
        self.device: Device | None = None
        self.locked = False
        self.connection = "connecting"
        self.url = ""  # the UI's URL, for ``haven app --url`` (set by main)
        self.version = _version()
        self.lock = asyncio.Lock()  # Device operations that span awaits, one at a time
        self._flush_lock = asyncio.Lock()
        self._subs: set[asyncio.Queue[Obj | None]] = set()
        self._conn: NodeConnection | None = None
        self._online = asyncio.Event()
        self._kick = asyncio.Event()
        self._link_active = asyncio.Event()
        self._link_idle = asyncio.Event()
        self._link_idle.set()
        self._tg: asyncio.TaskGroup | None = None
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None
        self._device_ready = asyncio.Event()
        self._failed_unlocks = 0
        self._unlock_after = 0.0
        self._key_changed: set[str] = set()
        # per message last shown: (status, read, edited, not_delivered)
        self._shown: dict[bytes, tuple[int, bool, bool, bool]] = {}
        self._gshown: dict[bytes, tuple[int, int, int, bool]] = {}
        self.moved = MovedNotices()  # for ``haven recv`` through the daemon (client/app/ipc.py)
        self._profile_due = False

    # ---- lifecycle -----------------------------------------------------------------------------

    async def start(self, passphrase: str | None = None) -> None:
        """Open the device if it can be (else stay unjoined or locked); start the tasks."""
        self.clean_uploads()
        try:
            self._open(passphrase, create=False)
        except LocalProtocolError as exc:
            if exc.code == "no_device":
                pass
            elif exc.code in ("passphrase_required", "wrong_passphrase"):
                self.locked = True
            else:
                raise
        self._runner = asyncio.create_task(self._run())

    async def close(self) -> None:
        """Cancel every task, close the link and the device store."""
        self._stop.set()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for task in list(self._downloads.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.device is not None:
            self.device.close()
            self.device = None
        for q in list(self._subs):
            self._drop(q)

    async def _run(self) -> None:
        """The owner of every background task: they start once a device is open."""
        await self._device_ready.wait()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for name, loop in (
                ("link", self._supervise),
                ("flusher", self._flusher),
                ("ticker", self._ticker),
            ):
                tg.create_task(_keep_running(name, loop))
            await self._stop.wait()
            raise asyncio.CancelledError

    def _open(self, passphrase: str | None, *, create: bool) -> None:
        dev = Device(self.home, self.clock, passphrase=passphrase, create=create)
        self.device = dev
        self.locked = False
        dev.use_connection(self.conn)
        if dev.joined:
            self._device_ready.set()

    @property
    def joined(self) -> bool:
        """Whether the open device has joined its home node."""
        return self.device is not None and self.device.joined

    def require(self) -> Device:
        """The open, joined device, or ``locked`` / ``not_joined``."""
        if self.locked:
            raise LocalProtocolError("the device is locked: unlock it first", code="locked")
        if self.device is None or not self.device.joined:
            raise LocalProtocolError("this device has not joined yet", code="not_joined")
        return self.device

    # ---- unlock and onboarding -----------------------------------------------------------------

    async def unlock(self, passphrase: Any) -> Obj:
        """Open a passphrase-protected home. After 5 wrong attempts each further one waits
        (doubling from 1 s, at most 5 min) — ``too_many_attempts`` until then."""
        if not self.locked:
            return self.state()
        if not isinstance(passphrase, str) or not passphrase:
            raise LocalProtocolError("give the passphrase", code="bad_request")
        loop = asyncio.get_running_loop()
        if loop.time() < self._unlock_after:
            wait = int(self._unlock_after - loop.time()) + 1
            raise LocalProtocolError(f"too many attempts: wait {wait} s", code="too_many_attempts")
        try:
            self._open(passphrase, create=False)
        except LocalProtocolError as exc:
            if exc.code == "wrong_passphrase":
                self._failed_unlocks += 1
                extra = self._failed_unlocks - UNLOCK_FREE_ATTEMPTS
                if extra >= 0:
                    self._unlock_after = loop.time() + min(300.0, 2.0**extra)
            raise
        self._failed_unlocks = 0
        log.info("device unlocked")
        self._publish(event("state", state=self.state()))
        return self.state()

    async def join(self, body: dict[str, Any]) -> Obj:
        """Onboarding: create the device and redeem an invite (or a device-link code)."""
        if self.locked:
            raise LocalProtocolError("the device is locked: unlock it first", code="locked")
        if self.joined:
            raise LocalProtocolError("this device has already joined", code="already_joined")
        code = body.get("invite") or body.get("link")
        if not isinstance(code, str) or not code.strip():
            raise LocalProtocolError("give an invite or a link code", code="bad_request")
        display = clean_name(body.get("display_name", ""), "display_name")
        passphrase = body.get("passphrase") or None
        if passphrase is not None and not isinstance(passphrase, str):
            raise LocalProtocolError("passphrase must be a string", code="bad_request")
        async with self.lock:
            if self.device is None:
                self._open(passphrase, create=True)
            dev = self.device
            assert dev is not None
            dev.use_connection(None)  # joining opens its own connection to the invite's node
            try:
                await dev.join(code.strip(), name="app")
            finally:
                dev.use_connection(self.conn)
            if display:
                dev.set_display_name(display)
        log.info("device joined its home node")
        self._device_ready.set()
        self._publish(event("state", state=self.state()))
        return self.state()

    # ---- the State object ----------------------------------------------------------------------

    def state(self) -> Obj:
        """The ``State`` object of docs/app.md."""
        dev = self.device
        joined = self.joined and not self.locked
        me = None
        settings = {"read_receipts": "on", "delivery_receipts": "on", "language": ""}
        protection = "passphrase" if self.locked else "none"
        if dev is not None and not self.locked:
            protection = dev.state.protection
            settings = {
                "read_receipts": dev.setting("read_receipts", "on"),
                "delivery_receipts": dev.setting("delivery_receipts", "on"),
                "language": dev.setting("language", ""),
            }
            if joined:
                me = {
                    "address": dev.address,
                    "device_id": dev.curve_key,
                    "node_url": dev.node_url,
                    "display_name": dev.display_name,
                }
        return {
            "locked": self.locked,
            "joined": joined,
            "connection": self.connection if joined else "offline",
            "me": me,
            "settings": settings,
            "protection": protection,
            "version": self.version,
            "auto_download": self.auto_download_bytes,
        }

    # ---- the link ------------------------------------------------------------------------------

    async def conn(self) -> NodeConnection:
        """The one connection to the home node. ``node_unreachable`` at once when an attempt
        already failed (offline), within ~2 s while a first attempt is under way."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        if self.connection != "offline":  # connecting: give the attempt a moment
            try:
                async with asyncio.timeout(CONN_WAIT_S):
                    await self._online.wait()
            except TimeoutError:
                pass
        if self._conn is None or self._conn.closed:
            url = self.device.node_url if self.joined and self.device else "?"
            raise TransportError(f"home node unreachable: {url}", code="node_unreachable")
        return self._conn

    def _set_connection(self, value: str) -> None:
        if value != self.connection:
            self.connection = value
            log.info("home node link: %s", value)
            self._publish(event("state", state=self.state()))

    async def _dial(self) -> NodeConnection:
        """Open the link. Under the device lock: while the provider is unset, no other
        operation may call ``connect()`` (it would open a second connection and be kicked)."""
        async with self.lock:
            dev = self.require()
            dev.use_connection(None)  # connect() opens a real connection only without one
            try:
                return await dev.connect()
            finally:
                dev.use_connection(self.conn)

    async def _supervise(self) -> None:
        """Connect, receive, notice the loss, reconnect with backoff: forever."""
        delay = BACKOFF_MIN_S
        while True:
            try:
                async with asyncio.timeout(DIAL_TIMEOUT_S):
                    conn = await self._dial()
            except (HavenError, TimeoutError, OSError) as exc:
                code = exc.code if isinstance(exc, HavenError) else "timeout"
                log.info("home node not reachable (%s); retrying", code)
                self._set_connection("offline")
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            self._conn = conn
            self._online.set()
            self._set_connection("online")
            self._kick.set()
            async with self.lock:  # contacts' address changes kept from an earlier try
                kept = await self.require().retry_moves(conn)
            self._publish_received(kept)
            loop = asyncio.get_running_loop()
            up_since = loop.time()
            try:
                await self._pump(conn)
            except Exception as exc:  # noqa: BLE001 - never go deaf: log the kind, reconnect
                log.warning("receive loop stopped (%s); reconnecting", _code(exc))
            finally:
                self._online.clear()
                self._conn = None
                with contextlib.suppress(Exception):
                    await conn.__aexit__(None, None, None)
            self._set_connection("connecting")
            if loop.time() - up_since >= STABLE_S:
                delay = BACKOFF_MIN_S  # it worked for a while: retry at once
            else:  # dropped right after connecting: do not hammer the node
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, BACKOFF_MAX_S)

    async def _pump(self, conn: NodeConnection) -> None:
        """Process pushed deliveries until the connection ends (paused while linking)."""
        closed = asyncio.ensure_future(conn.wait_closed())
        try:
            while not closed.done():
                if self._link_active.is_set():
                    idle = asyncio.ensure_future(self._link_idle.wait())
                    await asyncio.wait({idle, closed}, return_when=asyncio.FIRST_COMPLETED)
                    idle.cancel()
                    continue
                get = asyncio.ensure_future(conn.deliveries.get())
                pause = asyncio.ensure_future(self._link_active.wait())
                await asyncio.wait({get, closed, pause}, return_when=asyncio.FIRST_COMPLETED)
                pause.cancel()
                if not get.done():
                    get.cancel()
                    continue
                envs = get.result()
                async with self.lock:
                    dev = self.require()
                    before = self.group_versions()
                    new = await dev.process(conn, envs)
                self._publish_received(new)
                # a change the batch caused without a message of its own (an invited member
                # added by this admin device once the join request was stored)
                for gid, version in self.group_versions().items():
                    if before.get(gid) != version:
                        self.publish_group(gid)
        finally:
            closed.cancel()

    # ---- sending -------------------------------------------------------------------------------

    async def _flusher(self) -> None:
        """Send the durable queue on each kick (new text, reconnect), one flush at a time."""
        while True:
            await self._kick.wait()
            self._kick.clear()
            if self._conn is None:
                continue
            try:
                await self.flush()
            except HavenError as exc:
                log.info("outbox not flushed (%s)", exc.code)

    async def flush(self) -> None:
        """Send what is queued now (and our profile, if it changed while offline)."""
        async with self._flush_lock:
            conn = await self.conn()
            async with self.lock:
                rows = await self.require().flush_outbox(conn)
            self._publish_rows(rows, "update")
            for row in rows:
                if row.error == IdentityChanged.code and row.peer not in self._key_changed:
                    self._key_changed.add(row.peer)
                    c = self.require().state.contact(row.peer)
                    if c is not None:
                        self._publish(event("contact", contact=self._contact(c)))
            if self._profile_due:
                self._profile_due = False
                await self._share_profile()

    async def send_text(
        self,
        address: Any,
        text: Any,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        expires_in: int | None = None,
    ) -> Obj:
        """Queue a text durably (``pending``), then send it when the link allows.

        ``ttl_ms`` and ``expires_in`` are ``haven send --ttl/--expires`` (client/app/ipc.py)."""
        dev = self.require()
        if is_group_ref(address):
            return await self.group_send(address, text)
        if not isinstance(text, str) or not text.strip():
            raise LocalProtocolError("the message is empty", code="bad_request")
        address = self._address(address)
        if dev.state.contact(address) is None:
            await self.open_chat(address)
        row = dev.queue_text(address, text, ttl_ms=ttl_ms, expires_in=expires_in)
        msg = self._message(row)
        self._publish(event("message", message=msg))
        self._publish_chat(address)
        self._kick.set()
        return msg

    # ---- received messages → events -------------------------------------------------------------

    def _publish_received(self, new: Iterable[ReceivedMessage]) -> None:
        dev = self.require()
        chats: set[str] = set()
        groups: dict[bytes, bool] = {}  # gid -> its state changed
        texts: dict[bytes, list[bytes]] = {}  # gid -> new message ids
        for m in new:
            if is_group_ref(m.chat):
                gid = group_id(m.chat)
                if m.kind in ("text", "file"):
                    texts.setdefault(gid, []).append(m.msg_id)
                groups[gid] = groups.get(gid, False) or m.kind == "group_state"
                continue
            if m.kind in (
                "text",
                "file",
            ):  # a file's row: its caption and its file (the page asks for small ones at once)
                row = dev.state.message(m.msg_id)
                if row is not None:
                    self._publish(event("message", message=self._message(row)))
                chats.add(m.peer)
            elif m.kind in ("delivered", "read"):
                self._publish_changed(m.peer)
                chats.add(m.peer)
            elif m.kind == "edit":
                row = dev.state.message(m.target)
                if row is not None:
                    self._publish(event("update", message=self._message(row)))
                chats.add(m.peer)
            elif m.kind == "delete":
                self._shown.pop(m.target, None)
                self._publish(event("delete", chat=m.peer, id=m.target.hex()))
                chats.add(m.peer)
            elif m.kind == "profile" and m.peer == dev.address:
                self._publish(event("state", state=self.state()))  # our other device's name
            elif m.kind == "profile":
                c = dev.state.contact(m.peer)
                if c is not None:
                    self._publish(event("contact", contact=self._contact(c)))
                chats.add(m.peer)
            elif m.kind == "timer":
                chats.add(m.peer)
            elif m.kind == "moved":  # a contact's new address: its chat, and ``recv`` prints it
                self.moved.add(m)
                self._publish(event("moved", old=m.sender, new=m.peer))
                chats.add(m.peer)
        for address in chats:
            self._publish_chat(address)
        for gid, state_changed in groups.items():
            if state_changed:
                self.publish_group(gid)
            if gid in texts:
                self.publish_group_messages(gid, texts[gid])
            self.publish_group_changed(gid)  # receipts: counters fall; and the chat summary

    def _publish_changed(self, address: str) -> None:
        """``update`` for every message of a chat whose status or read state changed since it
        was last shown (compared on the plain columns: only changed texts are opened)."""
        if is_group_ref(address):
            self.publish_group_changed(group_id(address))
            return
        st = self.require().state
        for msg_id, status, read, edited in st.db.execute(
            "SELECT msg_id, status, read, edited FROM history WHERE peer=?", (address,)
        ).fetchall():
            seen = self._shown.get(bytes(msg_id))
            if seen is not None and seen[:3] == (status, bool(read), bool(edited)):
                continue
            row = st.message(bytes(msg_id))
            if row is not None:
                self._publish(event("update", message=self._message(row)))

    def _publish_rows(self, rows: Iterable[HistoryRow], kind: str) -> None:
        chats = set()
        for row in rows:
            self._publish(event(kind, message=self._message(row)))
            chats.add(row.peer)
        for address in chats:
            self._publish_chat(address)

    def _publish_chat(self, address: str) -> None:
        if is_group_ref(address) and self.require().group(group_id(address)) is None:
            return
        self._publish(event("chat", chat=self.chat(address)))

    async def _ticker(self) -> None:
        """Every ~30 s: purge what disappeared, mark what was not delivered in time."""
        while True:
            await asyncio.sleep(TICK_S)
            self.tick()

    def tick(self) -> None:
        """One tick (public for tests that advance the clock)."""
        if self.locked or not self.joined:
            return
        self._purge()
        now = self.clock.now_ms()
        st = self.require().state
        for (msg_id,) in st.db.execute(
            "SELECT msg_id FROM history WHERE outgoing=1 AND status < ? "
            "AND (error != '' OR (ttl_at IS NOT NULL AND ttl_at <= ?))",
            (STATUS_DELIVERED, now),
        ).fetchall():
            seen = self._shown.get(bytes(msg_id))
            if seen is not None and seen[3]:
                continue  # already shown as not delivered
            row = st.message(bytes(msg_id))
            if row is not None:
                self._publish(event("update", message=self._message(row)))

    def _purge(self) -> None:
        """Delete expired messages, publishing a ``delete`` for each."""
        dev = self.require()
        now = self.clock.now_ms()
        due = dev.state.db.execute(
            "SELECT msg_id, peer FROM history WHERE expire_at IS NOT NULL AND expire_at <= ?",
            (now,),
        ).fetchall()
        if not due:
            return
        dev.state.purge_expired(now)
        for msg_id, peer in due:
            self._shown.pop(bytes(msg_id), None)
            self._publish(event("delete", chat=peer, id=bytes(msg_id).hex()))
        for peer in {p for _, p in due}:
            self._publish_chat(peer)

    # ---- subscribers ---------------------------------------------------------------------------

    def subscribe(self) -> asyncio.Queue[Obj | None]:
        """A queue of events for one client; ``None`` in it means "you fell behind: reconnect"."""
        q: asyncio.Queue[Obj | None] = asyncio.Queue()
        self._subs.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Obj | None]) -> None:
        """Stop sending events to ``q`` (its WebSocket closed)."""
        self._subs.discard(q)

    def _drop(self, q: asyncio.Queue[Obj | None]) -> None:
        self._subs.discard(q)
        q.put_nowait(None)

    def _publish(self, ev: Obj) -> None:
        for q in list(self._subs):
            if q.qsize() >= SUBSCRIBER_BACKLOG:
                log.info("an event client fell behind; dropped it")
                self._drop(q)
            else:
                q.put_nowait(ev)

    async def link_device(self) -> Obj:
        """Start linking a new device; the code is returned, the outcome is a ``link`` event."""
        dev = self.require()
        if self._link_active.is_set():
            raise LocalProtocolError("a device link is already in progress", code="link_busy")
        if self._tg is None:
            raise LocalProtocolError("the daemon is starting", code="not_ready")
        await self.conn()
        code: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._link_active.set()
        self._link_idle.clear()
        self._tg.create_task(self._link(dev, code))
        c = await code
        return {"code": c, "qr": qr_matrix(c)}

    async def _link(self, dev: Device, code: asyncio.Future[str]) -> None:
        def on_code(c: str) -> None:
            if not code.done():
                code.set_result(c)

        try:
            res = await linking.link_device(dev, on_code, timeout_s=LINK_TIMEOUT_S)
            ev = event("link", ok=True, device={"id": res["id"], "name": res["name"]})
        except Exception as exc:  # noqa: BLE001 - reported as a link event, never kills the group
            err = exc if isinstance(exc, HavenError) else HavenError("linking failed")
            if not code.done():
                code.set_exception(err)
            if not isinstance(exc, HavenError):
                log.error("device link failed (%s)", type(exc).__name__)
            ev = event("link", ok=False, error=err.code)
        finally:
            self._link_active.clear()
            self._link_idle.set()
        self._publish(ev)
        with contextlib.suppress(HavenError):
            for c in self.chats():  # what linking received meanwhile was stored, not shown
                self._publish(event("chat", chat=c))


async def _keep_running(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run a forever-loop; if a bug ever escapes it, log its kind and start it again (a dead
    receive loop would make the daemon silently deaf)."""
    while True:
        try:
            await loop()
        except Exception as exc:  # noqa: BLE001 - the loop's last boundary; restarted below
            log.error("the %s task failed (%s); restarting it", name, type(exc).__name__)
            await asyncio.sleep(1.0)


def _code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, HavenError) else "internal"
