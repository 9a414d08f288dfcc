"""One worker's part in a node served by several processes (node/workers.py, node/pg_bus.py).

A :class:`WorkerRole` is handed to a :class:`node.app.Node` before it runs. It says which
worker this is (worker 0 is the leader: sweeper, epoch rotation and key destruction, mDNS),
and it turns the bus's notifications into what a single process does by itself:

* ``haven_env`` names a mailbox another worker committed envelopes for: if its device is
  connected here, the device reads its mailbox from the store (the path a device that connects
  with a backlog takes: :meth:`node.client_api.ClientSession.stored_elsewhere`).
* ``haven_obx`` names a destination another worker queued rows for: its sender here wakes and
  tries the destination's lock (node/outbox.py).
* ``haven_dev`` names a mailbox attached anew somewhere: a connection here that is not the
  newest one for it (the registry row says which is) is closed.
* ``haven_seen`` names a peer node that contacted another worker: the sender here resets its
  backoff for that peer, as one process does when a peer is seen again (node/outbox.py).

Notifications are handled in order by one task (:meth:`WorkerRole.run`); what they trigger
that may take a while (a device's store read) runs in tasks owned by the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from federation.errors import HavenError

from .pg_bus import CH_ENV, CH_OBX, CH_SEEN, PgBus

if TYPE_CHECKING:
    from .mailbox import Mailboxes
    from .outbox import OutboxSender
    from .store import Store

log = logging.getLogger("haven.worker")
SEEN_EVERY_S = 1.0  # a worker tells the others a peer is back at most this often per peer


class Attached(Protocol):
    """A device connection, as the role sees it (node/client_api.py)."""

    mailbox: bytes

    def stored_elsewhere(self) -> None: ...
    async def replaced(self) -> None: ...


@dataclass
class WorkerRole:
    """Which worker this process is, and its end of the bus."""

    index: int
    count: int
    bus: PgBus
    started_ms: int  # the supervisor's start (or PostgreSQL's, if later): §4.3 "not before"
    worker_port: int = 0  # also listen on 127.0.0.1:worker_port (reverse-proxy layout)
    # tag -> (connection, serial of its registry row; 0 while the claim is under way)
    _by_tag: dict[bytes, tuple[Attached, int]] = field(default_factory=dict)
    _queue: asyncio.Queue[Callable[[], object]] = field(default_factory=asyncio.Queue)
    _outbox: OutboxSender | None = None
    _store: Store | None = None
    _dest_by_tag: dict[bytes, str] = field(default_factory=dict)
    _tagged: set[str] = field(default_factory=set)
    _notify_self: bool = False  # the store does not NOTIFY: this role does, after each commit
    # per mailbox tag: inserts of this worker committing or committed whose notification has
    # not come back yet (its devices got those envelopes in process: nothing to read)
    _own: Counter[bytes] = field(default_factory=Counter)
    _closing: set[asyncio.Task[None]] = field(default_factory=set)  # replaced connections
    _seen_at: dict[str, float] = field(default_factory=dict)  # peer -> last haven_seen sent

    @property
    def leader(self) -> bool:
        return self.index == 0

    # ---- wiring (node/app.py) ------------------------------------------------------------

    def bind(self, store: Store, mailboxes: Mailboxes, outbox: OutboxSender) -> None:
        """Connect the bus to the node's parts once they exist (the node is starting)."""
        self._store, self._outbox = store, outbox
        outbox.locks = self.bus
        if hasattr(store, "bus_key"):  # PgStore notifies in the commit's own transaction
            store.bus_key = self.bus.key
        else:  # notify after the commit (a lost notification only delays, never loses)
            self._notify_self = True
            mailboxes.on_committed = self._committed
        mailboxes.on_writing = self._writing
        self.bus.on_env = lambda tags: self._queue.put_nowait(lambda: self._env(tags))
        self.bus.on_obx = lambda tags: self._queue.put_nowait(lambda: self._obx(tags))
        self.bus.on_dev = lambda tags: self._queue.put_nowait(lambda: self._dev(tags))
        self.bus.on_seen = lambda tags: self._queue.put_nowait(lambda: self._seen(tags))
        self.bus.on_reconnect = lambda: self._queue.put_nowait(self._recheck_all)

    def mailbox_tag(self, mailbox: bytes) -> bytes:
        """The tag naming ``mailbox`` in notifications: the store's, if it notifies itself."""
        tagger = getattr(self._store, "mailbox_tag", None)
        if tagger is not None and not self._notify_self:
            return bytes(tagger(mailbox))
        return self.bus.mailbox_tag(mailbox)

    def dest_tags(self, dest: str) -> set[bytes]:
        tags = {self.bus.dest_tag(dest)}
        tagger = getattr(self._store, "dest_tag", None)
        if tagger is not None:
            tags.add(bytes(tagger(dest)))
        return tags

    def _committed(self, mailboxes: set[bytes], dests: set[str]) -> None:
        env = [self.mailbox_tag(m) for m in mailboxes]
        obx = [self.bus.dest_tag(d) for d in dests]
        self._queue.put_nowait(lambda: self._notify(env, obx))

    async def _notify(self, env: list[bytes], obx: list[bytes]) -> None:
        if env:
            await self.bus.notify(CH_ENV, env)
        if obx:
            await self.bus.notify(CH_OBX, obx)

    # ---- device connections (node/client_api.py) -----------------------------------------

    async def attached(self, conn: Attached) -> None:
        """``conn`` is the newest connection of its device: older ones elsewhere close."""
        tag = self.mailbox_tag(conn.mailbox)
        self._by_tag[tag] = (conn, 0)  # 0: claim under way; notifications wait for it
        serial = await self.bus.claim_device(tag)
        if self._by_tag.get(tag, (None, 0))[0] is conn:
            self._by_tag[tag] = (conn, serial)
            # a newer claim elsewhere may have been announced while ours was under way
            self._queue.put_nowait(lambda: self._dev([tag]))

    def detached(self, conn: Attached) -> None:
        tag = self.mailbox_tag(conn.mailbox)
        entry = self._by_tag.get(tag)
        if entry is None or entry[0] is not conn:
            return
        del self._by_tag[tag]
        if entry[1]:
            self._queue.put_nowait(lambda: self.bus.release_device(tag, entry[1]))

    # ---- notifications -------------------------------------------------------------------

    async def run(self) -> None:
        """Handle notifications in order (cancelled with the node)."""
        try:
            await self._handle()
        finally:
            for task in self._closing:
                task.cancel()

    async def _handle(self) -> None:
        while True:
            job = self._queue.get_nowait() if not self._queue.empty() else await self._queue.get()
            try:
                result = job()
                if asyncio.iscoroutine(result):
                    await result
            except HavenError as exc:  # one failed lookup must not stop the others
                log.error("worker notification failed (%s)", exc.code)

    def _writing(self, mailboxes: set[bytes], started: bool) -> None:
        """An insert for ``mailboxes`` starts (or failed: no notification will come)."""
        for mailbox in mailboxes:
            tag = self.mailbox_tag(mailbox)
            if started:
                self._own[tag] += 1
            elif self._own[tag] > 1:
                self._own[tag] -= 1
            else:
                del self._own[tag]

    def _env(self, tags: list[bytes]) -> None:
        """PostgreSQL delivers notifications in commit order, and a commit's notification
        names each mailbox once. Skipping one for a mailbox with an insert of ours still
        unanswered is safe even when the one skipped was another worker's: ours then comes
        later, and the read it starts finds the other worker's rows, committed before."""
        own = self._own
        for tag in tags:
            if own[tag] > 0:
                own[tag] -= 1
                if not own[tag]:
                    del own[tag]
                continue
            own.pop(tag, None)  # (a Counter lookup inserts nothing; keep it small anyway)
            entry = self._by_tag.get(tag)
            if entry is not None:
                entry[0].stored_elsewhere()

    async def _obx(self, tags: list[bytes]) -> None:
        outbox = self._outbox
        if outbox is None:
            return
        by_tag = self._dest_by_tag
        if len(self._tagged) != len(outbox.dests):  # destinations new to this worker
            for dest in outbox.dests.keys() - self._tagged:
                for tag in self.dest_tags(dest):
                    by_tag[tag] = dest
            self._tagged = set(outbox.dests)
        unknown = False
        for tag in tags:
            known = by_tag.get(tag)
            if known is None:
                unknown = True
            else:
                outbox.wake(known)
        if unknown and self._store is not None:  # a destination new to this worker
            for dest in await self._store.outbox_destinations():
                if dest not in outbox.dests:
                    outbox.wake(dest)

    def peer_seen(self, dest: str, now_s: float) -> None:
        """A peer node contacted this worker: tell the others, whose sender for it may be
        backing off (the holder of its lock may be another worker). At most once a second per
        peer, so a busy peer costs no notification per request."""
        if now_s - self._seen_at.get(dest, -SEEN_EVERY_S) < SEEN_EVERY_S:
            return
        if len(self._seen_at) > 10_000:
            self._seen_at.clear()
        self._seen_at[dest] = now_s
        tags = [self.bus.dest_tag(dest)]
        self._queue.put_nowait(lambda: self.bus.notify(CH_SEEN, tags))

    def _seen(self, tags: list[bytes]) -> None:
        outbox = self._outbox
        if outbox is None:
            return
        wanted = set(tags)
        for dest in list(outbox.dests):
            if self.bus.dest_tag(dest) in wanted:
                outbox.peer_seen(dest)

    async def _dev(self, tags: list[bytes]) -> None:
        for tag in tags:
            entry = self._by_tag.get(tag)
            if entry is None or not entry[1]:
                continue  # not here, or our own claim still under way
            owner = await self.bus.device_owner(tag)
            current = self._by_tag.get(tag)
            if current is entry and owner != (self.index, entry[1]):
                del self._by_tag[tag]
                # not awaited here: a slow close must not hold up the notifications behind it
                closing = asyncio.get_running_loop().create_task(entry[0].replaced())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    async def _recheck_all(self) -> None:
        """Notifications were lost while the bus reconnected: re-check everything."""
        for conn, _ in list(self._by_tag.values()):
            conn.stored_elsewhere()
        if self._outbox is not None and self._store is not None:
            for dest in {*self._outbox.dests, *await self._store.outbox_destinations()}:
                self._outbox.wake(dest)
