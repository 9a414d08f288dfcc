"""Mailboxes: group commit, the delivery fast path, and acks (ARCHITECTURE §4).

* Envelopes from devices and peers are queued in memory and written by one committer task,
  many per transaction (``synchronous=FULL``); each submitter's future resolves when its
  transaction commits. Only then is ``accepted`` sent.
* If the recipient device is connected, the envelope is pushed at once. If the device acks it
  before the commit, the row is dropped from the pending write and never touches the disk; the
  sender's future resolves then (acked by the recipient device counts as durable).
* An ack from a device deletes only envelopes pushed to *that* connection.
* Envelopes for another node go the same way ("send before store"): unless the destination
  is backing off, its sender takes them in memory (:class:`HotLane`) and posts them as soon as
  nothing older for it is left, while the committer holds their insert back for
  :data:`OUTBOX_GRACE_S`. If the peer durably accepts them within it, they are dropped from
  the pending write and the submitter's future resolves then (accepted by the peer counts as
  durable); otherwise they are committed as usual, and deleted once the peer's acceptance
  comes in. Every envelope the sender takes ends with :meth:`Mailboxes.hot_accepted` or
  :meth:`Mailboxes.hot_unsent` (then it is committed and goes the stored way). While the
  sender holds any for a destination, every new envelope for it is taken too, and one it gives
  up keeps its place in the pending write: the commit order for a destination stays the
  submission order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from typing import Protocol

from federation.clock import Clock
from federation.errors import StorageError
from federation.wire import Envelope

from .ballast import DiskFull, DiskGuard
from .store import Store, WriteBatch

log = logging.getLogger("haven.mailbox")

MAX_TX_ROWS = 1000
# How long the committer waits before writing envelopes whose recipient is connected: the
# device's ack usually arrives within it, and an acked envelope never touches the disk (no
# sealed insert, no fsync, no delete). Senders still get ``accepted`` only once the envelope
# is committed or acked; this only trades a few ms of their answer for that write.
ACK_GRACE_S = 0.005
# How long an outbox envelope handed to its destination's sender in memory waits before it is
# committed anyway: a peer's durable acceptance (its own group commit) usually arrives within
# it, and then the envelope never touches our disk. scripts/bench_node.py --sections federated
# on a 2-core machine: 10 ms 18.1k msgs/s, sender 41.7 us/msg; 15 ms 19.9k, 32.8 us;
# 20 ms 19.9k, 32.0 us (the peer's answer to a full batch takes a few ms under load).
OUTBOX_GRACE_S = 0.015


class HotLane(Protocol):
    """The federation sender, as the committer sees it (node/outbox.py)."""

    def take(self, dest: str, env: Envelope) -> bool:
        """Take ``env`` to post from memory. True: the sender ends it with ``hot_accepted``
        or ``hot_unsent``, and posts it only once :meth:`Mailboxes.cold_for` is false."""
        ...


class DeviceLink(Protocol):
    """A connected device, as the mailbox sees it."""

    mailbox: bytes

    def push(self, envs: list[Envelope]) -> None: ...


@dataclass
class _Pending:
    env: Envelope
    waiters: list[asyncio.Future[None]] = field(default_factory=list)


class Mailboxes:
    """The committer and the registry of connected devices."""

    def __init__(self, store: Store, clock: Clock, on_outbox: Callable[[str], None]) -> None:
        self.store = store
        self.clock = clock
        self.on_outbox = on_outbox
        self.links: dict[bytes, DeviceLink] = {}
        self._env: dict[bytes, _Pending] = {}
        self._out: dict[bytes, tuple[str, _Pending]] = {}
        self.hot_lane: HotLane | None = None
        # Several workers, with a store that does not notify itself (node/pg_bus.py): told the
        # mailboxes and destinations of every committed insert, to notify the other workers.
        self.on_committed: Callable[[set[bytes], set[str]], None] | None = None
        # Several workers: told the recipient mailboxes of an insert before it is tried, and
        # again if it failed (so a worker tells its own notifications from the others').
        self.on_writing: Callable[[set[bytes], bool], None] | None = None
        # ids in ``_out`` the sender holds in memory -> loop time they are committed anyway
        # (insertion order is deadline order)
        self._hot: dict[bytes, float] = {}
        self._hot_stored: set[bytes] = set()  # held by the sender, committed or committing
        self._cold: Counter[str] = Counter()  # per dest: not hot, in ``_out`` or committing
        self._del_env: set[bytes] = set()
        self.activity = 0  # grows with every submission and ack (Store.set_activity)
        self.deleting: set[bytes] = set()  # acked, delete not committed yet: never redeliver
        self._del_out: set[bytes] = set()
        self._del_waiters: list[asyncio.Future[None]] = []
        self._inflight: dict[bytes, Envelope] = {}  # being committed right now
        self._wake = asyncio.Event()
        self._quiet = asyncio.Event()  # set while nothing is queued or committing
        self._quiet.set()
        self.last_write_ms = 0
        self.writes_since_checkpoint = 0
        self.disk: DiskGuard | None = None  # the disk-full guard of a serving node
        self._write_error: str | None = None  # last failure logged (one line per state change)
        self.on_store_error: Callable[[str], None] | None = None  # a failed commit's code

    # ---- submission --------------------------------------------------------------------------

    def submit_local(self, envs: list[Envelope]) -> list[asyncio.Future[None]]:
        """Queue envelopes for local mailboxes; push to connected devices at once."""
        self.activity += 1
        futs = []
        pushes: dict[bytes, list[Envelope]] = {}
        for env in envs:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            futs.append(fut)
            p = self._env.get(env.id)
            if p is not None:  # duplicate of a not-yet-committed envelope
                p.waiters.append(fut)
                continue
            self._env[env.id] = _Pending(env, [fut])
            if env.to in self.links:
                pushes.setdefault(env.to, []).append(env)
        for mailbox, batch in pushes.items():
            self.links[mailbox].push(batch)
        self._kick()
        return futs

    def submit_outbox(self, items: list[tuple[str, Envelope]]) -> list[asyncio.Future[None]]:
        self.activity += 1
        futs = []
        for dest, env in items:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            futs.append(fut)
            if env.id in self._out:
                self._out[env.id][1].waiters.append(fut)
                continue
            self._out[env.id] = (dest, _Pending(env, [fut]))
            lane = self.hot_lane
            if lane is not None and lane.take(dest, env):
                self._hot[env.id] = asyncio.get_running_loop().time() + OUTBOX_GRACE_S
            else:
                self._cold[dest] += 1
        self._kick()
        return futs

    def cold_for(self, dest: str) -> bool:
        """Whether envelopes for ``dest`` that the sender does not hold are still queued or
        being committed (not yet readable from the store): a hot run must not overtake them.
        When the last of them is committed, ``on_outbox(dest)`` is called."""
        return self._cold[dest] > 0

    def hot_accepted(self, ids: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        """The peer durably accepted these envelopes the sender took (:class:`HotLane`).

        Returns the ids dropped from the pending write (their futures resolve now) and the
        ids already committed or being committed (the sender deletes those rows)."""
        resolved, stored = [], []
        for eid in ids:
            if self._hot.pop(eid, None) is not None:
                _ok(self._out.pop(eid)[1].waiters)
                resolved.append(eid)
            if eid in self._hot_stored:
                self._hot_stored.discard(eid)
                stored.append(eid)
        if resolved:
            self._kick()  # the committer may have nothing left to wait for
        return resolved, stored

    def hot_unsent(self, ids: list[bytes]) -> None:
        """The sender gives these up unaccepted: commit them now (the stored way)."""
        for eid in ids:
            if self._hot.pop(eid, None) is not None:
                self._cold[self._out[eid][0]] += 1
            self._hot_stored.discard(eid)
        self._kick()

    def uncommitted(self) -> list[Envelope]:
        return [*self._inflight.values(), *(p.env for p in self._env.values())]

    def outbox_load(self) -> dict[str, int]:
        """Outbox envelopes not yet committed, per destination (for the outbox quota)."""
        load: dict[str, int] = {}
        for dest, _ in self._out.values():
            load[dest] = load.get(dest, 0) + 1
        return load

    def uncommitted_for(self, mailbox: bytes) -> list[Envelope]:
        """Envelopes for ``mailbox`` not yet readable from the store (queued or committing)."""
        committing = [e for e in self._inflight.values() if e.to == mailbox]
        return committing + [p.env for p in self._env.values() if p.env.to == mailbox]

    # ---- acks and deletions ------------------------------------------------------------------

    def acked(self, ids: list[bytes]) -> None:
        """The device holds these now. Drop uncommitted copies; delete committed rows."""
        self.activity += 1
        for eid in ids:
            p = self._env.pop(eid, None)
            if p is not None:
                for fut in p.waiters:
                    if not fut.done():
                        fut.set_result(None)
            else:
                self._del_env.add(eid)
                self.deleting.add(eid)
        self._kick()

    def delete_outbox(self, ids: list[bytes]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._del_out.update(ids)
        self._del_waiters.append(fut)
        self._kick()
        return fut

    # ---- the committer -----------------------------------------------------------------------

    def _kick(self) -> None:
        self._quiet.clear()
        self._wake.set()

    async def settle(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until everything queued is committed, so a stopping
        node leaves no settled delete behind (a peer's acceptance not yet deleted would be
        sent again after the restart). Returns whether it settled."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._quiet.wait()
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Commit loop: one transaction at a time, up to :data:`MAX_TX_ROWS` rows each."""
        while True:
            self._quiet.set()
            await self._wake.wait()
            self._wake.clear()
            while self._env or self._out or self._del_env or self._del_out:
                if self._awaiting_acks():
                    await asyncio.sleep(ACK_GRACE_S)
                elif (wait := self._hot_wait()) > 0:
                    self._wake.clear()  # new work ends the wait early
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                    continue
                await self._commit_once()

    def _awaiting_acks(self) -> bool:
        """Only envelopes pushed to connected devices wait (few enough for one transaction)."""
        if len(self._out) > len(self._hot) or self._del_out:
            return False
        if not self._env or len(self._env) >= MAX_TX_ROWS:
            return False
        links = self.links
        return all(p.env.to in links for p in self._env.values())

    def _hot_wait(self) -> float:
        """Seconds until the next commit is due: > 0 only while everything queued is outbox
        envelopes the sender holds, none of them past its grace."""
        if self._env or self._del_env or self._del_out or len(self._out) > len(self._hot):
            return 0.0
        first = next(iter(self._hot.values()), None)
        return 0.0 if first is None else first - asyncio.get_running_loop().time()

    async def _commit_once(self) -> None:
        """One group commit. Deletions (acks) never depend on the inserts of the same batch:
        if the combined transaction fails, the deletions are retried alone. While the disk is
        full (:mod:`node.ballast`), new envelopes are refused without being tried, so the space
        the released ballast gave back goes to deletions and checkpoints."""
        env_items = list(self._env.items())[:MAX_TX_ROWS]
        out_items = self._due_outbox(max(0, MAX_TX_ROWS - len(env_items)))
        if not (env_items or out_items or self._del_env or self._del_out):
            return  # only envelopes the sender holds, within their grace
        del_env, self._del_env = self._del_env, set()
        del_out, self._del_out = self._del_out, set()
        del_waiters, self._del_waiters = self._del_waiters, []
        for eid, p in env_items:
            del self._env[eid]
            self._inflight[eid] = p.env
        cold = []  # destinations of the rows the sender does not hold
        for eid, (dest, _) in out_items:
            del self._out[eid]
            if self._hot.pop(eid, None) is not None:  # past its grace, still held by the sender
                self._hot_stored.add(eid)
            else:
                cold.append(dest)
        full = self.disk is not None and self.disk.full
        inserts = WriteBatch(
            envelopes=tuple(p.env for _, p in env_items),
            outbox=tuple((dest, p.env) for _, (dest, p) in out_items),
        )
        deletes = WriteBatch(delete_envelopes=tuple(del_env), delete_outbox=tuple(del_out))
        has_inserts = bool(env_items or out_items)
        has_deletes = bool(del_env or del_out)
        inserted = deleted = False
        if has_inserts and not full:
            combined = WriteBatch(
                inserts.envelopes, inserts.outbox, deletes.delete_envelopes, deletes.delete_outbox
            )
            writing = {e.to for e in inserts.envelopes} if self.on_writing is not None else set()
            if self.on_writing is not None:
                self.on_writing(writing, True)
            try:
                await self.store.write(combined, self.clock.now_ms())
                inserted = deleted = True
            except StorageError as exc:
                if self.on_writing is not None:
                    self.on_writing(writing, False)
                self._write_failed(exc)
        if not deleted and has_deletes:
            try:
                await self.store.write(deletes, self.clock.now_ms())
                deleted = True
            except StorageError as exc:
                self._write_failed(exc)
        if (inserted or not has_inserts) and (deleted or not has_deletes):
            self._write_ok()
        if has_inserts and not inserted:
            err = StorageError("store write failed")
            for _, p in env_items:
                _fail(p.waiters, err)
            for _, (_, p) in out_items:
                _fail(p.waiters, err)
            for eid, _ in env_items:
                self._inflight.pop(eid, None)
            for eid, _ in out_items:
                self._hot_stored.discard(eid)
            self._uncount(cold)
        if has_deletes and not deleted:
            _fail(del_waiters, StorageError("store write failed"))
            self._del_env |= del_env  # retry deletions next time
            self._del_out |= del_out
        if not (inserted or deleted):
            await asyncio.sleep(0.05)  # back off so a full disk doesn't spin the loop
            return
        self.last_write_ms = self.clock.now_ms()
        self.writes_since_checkpoint += 1
        if deleted:
            self.deleting -= del_env
            _ok(del_waiters)
        if not inserted:
            return
        if self.on_committed is not None:
            self.on_committed({p.env.to for _, p in env_items}, {d for _, (d, _) in out_items})
        for eid, p in env_items:
            self._inflight.pop(eid, None)
            _ok(p.waiters)
            # A device that attached while this row was being written may have missed it in
            # both places its refill looks; push it now (push() skips what it already has).
            link = self.links.get(p.env.to)
            if link is not None:
                link.push([p.env])
        for _, (_, p) in out_items:
            _ok(p.waiters)
        # Rows the sender still holds need no wake: it sends them itself, or, if it gives them
        # up, starts its next pass at the head of the queue (node/outbox.py).
        for dest in set(cold):
            self.on_outbox(dest)
        self._uncount(cold, woken=True)  # now readable, and the sender has been woken

    def _due_outbox(self, limit: int) -> list[tuple[bytes, tuple[str, _Pending]]]:
        """Outbox envelopes to commit now, in submission order: all but those the sender holds
        within their grace (for one destination those are the newest: order is kept)."""
        if not self._hot:
            return list(islice(self._out.items(), limit))
        now = asyncio.get_running_loop().time()
        hot = self._hot
        due = (item for item in self._out.items() if hot.get(item[0], now) <= now)
        return list(islice(due, limit))

    def _uncount(self, dests: list[str], woken: bool = False) -> None:
        """These rows are committed (or failed): a sender waiting on :meth:`cold_for` is
        woken when the last one for its destination is done."""
        for dest in dests:
            n = self._cold[dest] - 1
            if n > 0:
                self._cold[dest] = n
            else:
                del self._cold[dest]
                if not woken:
                    self.on_outbox(dest)

    def _write_failed(self, exc: StorageError) -> None:
        """Log SQLite's own message once per state change, not once per batch."""
        if isinstance(exc, DiskFull) and self.disk is not None:
            self.disk.on_full()
        if self.on_store_error is not None:
            self.on_store_error(exc.code)
        msg = str(exc)
        if msg != self._write_error:
            self._write_error = msg
            log.error("group commit failed: %s", msg)

    def _write_ok(self) -> None:
        if self._write_error is not None:
            self._write_error = None
            log.info("group commit succeeds again")


def _ok(futs: list[asyncio.Future[None]]) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_result(None)


def _fail(futs: list[asyncio.Future[None]], exc: BaseException) -> None:
    for fut in futs:
        if not fut.done():
            fut.set_exception(exc)
