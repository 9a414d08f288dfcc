"""Per-destination federation sender (ARCHITECTURE §4 "Federation sender").

One worker per destination node: it walks the committed outbox rows for that node with a
cursor, posts bounded batches as signed requests (several at once only as far as the peer's
descriptor allows, ``max_inflight``, and never two for one mailbox, which keeps each mailbox's
order), and deletes rows only once the peer has durably accepted them (or refused them for
good); it reads the next page while a request is out and does not wait for those deletions.
Whole-request failures back off the destination exponentially with jitter, capped at 5
minutes; the backoff resets as soon as the peer is seen again (:meth:`OutboxSender.peer_seen`).
An envelope the peer refuses *for now* (its mailbox is full, ...) waits on its own schedule
(:class:`federation.backoff.EnvelopeHolds`) and the cursor moves past it, so it never blocks
the rest of the queue (docs/protocol.md §6).

Send before store: unless a destination is backing off or has rows held back, the envelopes
devices send it are handed to its worker in memory (:meth:`OutboxSender.take`, called by
:meth:`Mailboxes.submit_outbox`), ahead of their commit (:data:`node.mailbox.OUTBOX_GRACE_S`).
Such a *hot run* stays open (every new envelope for the destination joins it) until everything
it took was accepted. The worker posts it itself, and only once nothing older for the
destination is left: no stored row (the walk reached the end of the queue) and none still
being committed (:meth:`Mailboxes.cold_for`); so the hot run and the walk never post at the
same time, and each mailbox's order holds across the two. The walk skips rows the run holds
(committed past their grace). Anything a hot request does not get accepted (the request
failed, or the peer refused an envelope), and any backoff or hold before the run posts, ends
the run: what it still holds is committed in submission order and goes the stored way, and
the next pass starts at the head of the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from federation.backoff import Backoff, EnvelopeHolds
from federation.clock import Clock
from federation.errors import ClockSkew, HavenError, RateLimited
from federation.fanout import MultiBatch
from federation.multi import COPY_OVERHEAD, EPH_LEN, FEATURE, MAX_RECIPIENTS
from federation.transport import LINK_URL, PeerTransport, RemoteError
from federation.wire import MAX_BATCH_BYTES, Batch, BatchResult, Envelope

from .mailbox import Mailboxes
from .metrics import Metrics
from .peers import PeerDirectory
from .quotas import OutboxQuotas
from .store import Store

log = logging.getLogger("haven.outbox")

BATCH_SIZE = 200
# Refusals that will never succeed: drop those envelopes from the outbox.
PERMANENT = {"not_found", "expired", "malformed", "too_large", "unsupported_version"}


BATCH_BYTES = MAX_BATCH_BYTES - 64 * 1024  # headroom for msgpack framing
# Several workers (node/workers.py): a destination's lock is let go after this long idle (kept
# meanwhile so the next burst still goes the hot lane), and a worker that found it taken tries
# again after this long while rows are queued (its holder may have died without a word).
LOCK_LINGER_S = 2.0
LOCK_RETRY_S = 2.0
_NO_HOLDS = EnvelopeHolds()  # a hot run opens only with nothing held


def _select(
    page: list[tuple[int, Envelope]], holds: EnvelopeHolds, now: int, leaving: set[bytes]
) -> tuple[list[Envelope], int]:
    """The next batch from a page: rows not held back and not already settled (their deletion
    still committing), bounded by count and bytes (§8).

    Returns the batch and how many leading rows of the page it consumed (sent or skipped).
    """
    batch: list[Envelope] = []
    total = 0
    for i, (_, env) in enumerate(page):
        if env.id in leaving or holds.held(env.id, now):
            continue
        size = len(env.body) + 64
        if batch and (total + size > BATCH_BYTES or len(batch) >= BATCH_SIZE):
            return batch, i
        batch.append(env)
        total += size
    return batch, len(page)


def _plan(
    page: list[tuple[int, Envelope]],
    holds: EnvelopeHolds,
    now: int,
    leaving: set[bytes],
    inflight: int,
) -> tuple[list[list[Envelope]], int]:
    """The requests to post next from a page, and how many leading rows they consume.

    With ``inflight`` > 1 (the peer's descriptor allows that many requests at once:
    docs/protocol.md §4.1 ``max_inflight``), the whole page is split into up to ``inflight``
    batches that share no mailbox, each mailbox's rows in page order; requests in flight
    together may be stored in any order, so per-mailbox order (§6) holds only because no
    mailbox is in two of them. A page that does not split that way within the batch bounds
    (few mailboxes, or large bodies) goes one batch at a time, as with ``inflight`` = 1.
    """
    if inflight > 1:
        lanes = _lanes(page, holds, now, leaving, inflight)
        if lanes is not None:
            return lanes, len(page)
    batch, consumed = _select(page, holds, now, leaving)
    return ([batch] if batch else []), consumed


def _lanes(
    page: list[tuple[int, Envelope]],
    holds: EnvelopeHolds,
    now: int,
    leaving: set[bytes],
    n: int,
) -> list[list[Envelope]] | None:
    by_mailbox: dict[bytes, list[Envelope]] = {}
    for _, env in page:
        if env.id not in leaving and not holds.held(env.id, now):
            by_mailbox.setdefault(env.to, []).append(env)
    if len(by_mailbox) < 2:
        return None
    lanes: list[list[Envelope]] = [[] for _ in range(n)]
    sizes = [0] * n
    for envs in sorted(by_mailbox.values(), key=len, reverse=True):  # largest first, to the
        i = min(range(n), key=lambda j: len(lanes[j]))  # emptiest lane
        lanes[i] += envs
        sizes[i] += sum(len(e.body) + 64 for e in envs)
    if any(
        len(lane) > BATCH_SIZE or size > BATCH_BYTES
        for lane, size in zip(lanes, sizes, strict=True)
    ):
        return None
    return [lane for lane in lanes if lane]


def _page_rows(d: _Dest, inflight: int) -> int:
    """Rows to read at once: enough for ``inflight`` batches while pages split (many
    mailboxes), one batch's worth while they do not (a page read holds the store's lock)."""
    return BATCH_SIZE * inflight if d.wide else BATCH_SIZE


@dataclass(frozen=True, slots=True, eq=False)
class MultiSub:
    """One multi-recipient submission (docs/protocol.md §11.3), as the sender sees it: the
    shared parts of the envelopes composed from it. Compared by identity: the envelopes a
    hot run holds that name the same submission go to their node as one ``/multi`` request."""

    eph: bytes
    body: bytes


@dataclass
class _Dest:
    backoff: Backoff = field(default_factory=Backoff)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    holds: EnvelopeHolds = field(default_factory=EnvelopeHolds)
    # Settled rows (accepted or refused for good) whose deletion is still being committed: the
    # worker goes on without waiting for that commit, and never sends these again.
    leaving: set[bytes] = field(default_factory=set)
    started: bool = False
    kick: asyncio.Event = field(default_factory=asyncio.Event)  # wake, or a hot run opened
    idle: bool = False  # waiting with nothing stored or held
    pausing: bool = False  # waiting out a backoff or a hold: no hot run opens
    rewind: bool = False  # a hot run gave rows up: the next pass starts at the head
    hot_open: bool = False
    hot: dict[bytes, Envelope] = field(default_factory=dict)  # taken, not posted yet
    subs: dict[bytes, MultiSub] = field(default_factory=dict)  # hot ids of a multi submission
    flight: set[bytes] = field(default_factory=set)  # taken, posted, no answer yet
    wide: bool = True  # the last page split into several requests: read k batches' worth
    failing: bool = False  # for logging state changes only


class _LetGo(Exception):
    """Idle for :data:`LOCK_LINGER_S` with the destination's lock: let it go."""


class DestLocks(Protocol):
    """One sender per destination across the workers of a node (node/pg_bus.py)."""

    def held(self, dest: str) -> bool: ...
    async def try_lock(self, dest: str) -> bool: ...
    async def unlock(self, dest: str) -> None: ...


class OutboxSender:
    def __init__(
        self,
        store: Store,
        mailboxes: Mailboxes,
        peers: PeerDirectory,
        transport: PeerTransport,
        clock: Clock,
        metrics: Metrics,
        quotas: OutboxQuotas | None = None,
    ) -> None:
        self.quotas = quotas
        self.store = store
        self.mailboxes = mailboxes
        self.peers = peers
        self.transport = transport
        self.clock = clock
        self.metrics = metrics
        self.dests: dict[str, _Dest] = {}
        self._tg: asyncio.TaskGroup | None = None
        # Several workers: a worker walks (and takes envelopes in memory for) a destination
        # only while it holds that destination's lock; rows other workers commit for it are
        # sent by the holder, woken through its notification (node/pg_bus.py).
        self.locks: DestLocks | None = None
        self._sub: MultiSub | None = None  # the submission take() is called for, if any

    @contextlib.contextmanager
    def multi_submission(self, sub: MultiSub) -> Iterator[None]:
        """Envelopes :meth:`take` takes meanwhile are composed from ``sub``."""
        self._sub = sub
        try:
            yield
        finally:
            self._sub = None

    def wake(self, dest: str) -> None:
        """New committed rows for ``dest``: start or nudge its worker."""
        d = self.dests.get(dest)
        if d is None:
            d = self.dests[dest] = _Dest()
        if self._tg is not None and not d.started:  # woken before run(): start it now
            d.started = True
            self._tg.create_task(self._worker(dest, d))
        d.wake.set()
        d.kick.set()

    def ensure(self, dest: str) -> None:
        """Start ``dest``'s worker if it has none yet, so that envelopes for it can go the hot
        lane from the first one on (a multi submission's ``/multi`` request needs that)."""
        if dest not in self.dests:
            self.wake(dest)

    def take(self, dest: str, env: Envelope) -> bool:
        """Take ``env`` to post from memory (:class:`node.mailbox.HotLane`): into the open hot
        run, or open one unless the destination is backing off or has rows held back. The run
        posts once the stored rows before it are sent (:meth:`_idle`). An envelope already
        held is held once."""
        d = self.dests.get(dest)
        if d is None or self._tg is None:
            return False
        if self.locks is not None and not self.locks.held(dest):
            return False  # committed; the holder is woken by its notification
        if not d.hot_open:
            if not d.started or d.pausing or d.failing or len(d.holds):
                return False
            d.hot_open = True
            d.kick.set()
        if env.id not in d.hot and env.id not in d.flight:
            d.hot[env.id] = env
            if self._sub is not None:
                d.subs[env.id] = self._sub
        return True

    def peer_seen(self, dest: str) -> None:
        """The peer is reachable again (or its queue moved here after a key rotation)."""
        d = self.dests.get(dest)
        if d is None:
            self.wake(dest)
            return
        d.backoff.reset()
        d.wake.set()
        d.kick.set()

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                for dest in [*self.dests, *await self.store.outbox_destinations()]:
                    self.wake(dest)
                await asyncio.Event().wait()  # run until cancelled with the node
        finally:
            self._tg = None  # stopped: no hot run opens (take() refuses)

    async def _worker(self, dest: str, d: _Dest) -> None:
        try:
            if self.locks is None:
                await self._walk(dest, d)
                return
            woken = True  # started by a wake
            while True:  # several workers: walk only while holding the destination's lock
                await self._acquire(dest, d, self.locks, woken)
                woken = False  # let go when idle: wait for the next wake
                try:
                    await self._walk(dest, d)  # returns once idle for LOCK_LINGER_S
                finally:
                    self._hot_close(d)
                    # a failed unlock marks the lock connection lost: the worker restarts
                    with contextlib.suppress(HavenError):
                        await self.locks.unlock(dest)
        finally:  # cancelled with the node: what it still holds is committed
            self._hot_close(d)

    async def _acquire(self, dest: str, d: _Dest, locks: DestLocks, woken: bool) -> None:
        """Wait until this worker holds ``dest``'s lock: try when woken (rows committed here,
        or another worker's notification), at most every :data:`LOCK_RETRY_S` while another
        worker holds it (the holder sends, woken by the same notifications), and again after
        that while rows are queued (a holder that died released the lock without a word)."""
        while True:
            if not woken:
                await d.wake.wait()
            d.wake.clear()
            if await locks.try_lock(dest):
                d.wake.set()  # walk from the head: rows may have come meanwhile
                return
            await asyncio.sleep(LOCK_RETRY_S)
            woken = d.wake.is_set() or bool(await self.store.outbox_page(dest, 0, 1))

    async def _walk(self, dest: str, d: _Dest) -> None:
        """Walk the queue in passes. A *full* pass starts at the head; when it ends with rows
        held back, the worker sleeps until the first hold is due (then a full pass) or until
        woken by new rows (then a pass over the rows after the last one seen)."""
        cursor, last_seen, full = 0, 0, True
        present: set[bytes] = set()  # ids seen in this full pass
        ahead: list[tuple[int, Envelope]] | None = None  # the next page, read during a post
        while True:
            if d.rewind:  # rows a hot run held may lie behind the cursor: from the head
                d.rewind, cursor, full, ahead, present = False, 0, True, None, set()
            now = self.clock.now_ms()
            k = self.peers.max_inflight(dest)
            if ahead is None:
                d.wake.clear()
                page = await self.store.outbox_page(dest, cursor, _page_rows(d, k))
            else:
                page, ahead = ahead, None
            if page:
                # rows a hot run holds are its own to send (committed past their grace)
                skip = d.leaving | d.hot.keys() if d.hot_open else d.leaving
                lanes, consumed = _plan(page, d.holds, now, skip, k)
                d.wide = len(lanes) > 1
                if full:
                    present.update(e.id for _, e in page[:consumed])
                after, rest = page[consumed - 1][0], page[consumed:]
                read: list[tuple[int, Envelope]] | None = None
                if lanes:
                    ok, read = await self._attempt_reading_ahead(dest, d, lanes, after, not rest)
                    if not ok:
                        continue  # failed: retry from the same cursor after the backoff
                # the rest of this page is the next page: rows committed later sort after it
                ahead = rest or read
                cursor = last_seen = after
                continue
            if full:  # holds of rows that left the queue (expired) are forgotten
                d.holds.keep_only(present)
            present = set()
            due = d.holds.next_due()
            if due is None:  # nothing held: the queue is empty; a seq may be reused later
                cursor, full = 0, True
                try:
                    await self._idle(dest, d)
                except _LetGo:  # several workers: idle long enough to let the lock go
                    return
                continue
            self._hot_close(d)  # held rows: the hot run's envelopes go the stored way
            woken = False
            d.pausing = True
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0, due - now) / 1000):
                        await d.wake.wait()
                        woken = True
            finally:
                d.pausing = False
            cursor, full = (last_seen, False) if woken else (0, True)

    async def _idle(self, dest: str, d: _Dest) -> None:
        """Wait, with nothing stored or held, for committed rows (then return), or run the hot
        run (it may have opened while older rows were still being sent) once nothing older for
        ``dest`` is left to commit (:meth:`Mailboxes.cold_for`): only then is it their turn."""
        while not d.wake.is_set():
            if d.hot_open and not self.mailboxes.cold_for(dest):
                if not await self._hot_run(dest, d):
                    return
                continue
            d.kick.clear()
            d.idle = True
            try:
                if self.locks is None:
                    await d.kick.wait()
                    continue
                async with asyncio.timeout(LOCK_LINGER_S):
                    await d.kick.wait()
            except TimeoutError:
                if not d.hot_open and not d.wake.is_set():
                    raise _LetGo() from None
            finally:
                d.idle = False

    async def _hot_run(self, dest: str, d: _Dest) -> bool:
        """Post what :meth:`take` took, as stored rows would go (bounded batches; several at
        once only in lanes that share no mailbox), until nothing is held. The envelopes of one
        multi-recipient submission go as one ``/multi`` request to a peer that lists
        ``"multi"`` (:meth:`_next_requests`). True if the peer accepted all of it; otherwise
        what is still held goes the stored way (``/batch``)."""
        while d.hot:
            if d.subs:  # the peer's features decide how a submission goes: know them first
                with contextlib.suppress(HavenError):
                    await self.peers.ensure_measured(dest)
            if not d.hot:  # given up meanwhile
                break
            requests = self._next_requests(dest, d)
            results = await asyncio.gather(*requests, return_exceptions=True)
            accepted: set[bytes] = set()
            failure: HavenError | None = None
            for res in results:
                if isinstance(res, BatchResult):
                    accepted.update(res.accepted)
                elif isinstance(res, HavenError):
                    failure = res
                else:
                    raise res
            done = [eid for eid in d.flight if eid in accepted]
            d.flight.difference_update(done)
            resolved, stored = self.mailboxes.hot_accepted(done)
            if self.quotas is not None:
                self.quotas.left(resolved)
            if stored:
                self._leave(stored, d)
            self.metrics.event("federation.envelopes_out", len(done))
            if failure is None and not d.flight:
                self._reachable(dest, d)
                continue
            # The peer did not take all of it: the rest is committed in submission order and
            # the walk over stored rows sends it (holds and permanent refusals work as there).
            self._hot_close(d)
            if failure is not None and not (
                isinstance(failure, RemoteError) and failure.code in PERMANENT
            ):
                await self._failed(dest, d, failure)
            return False
        d.hot_open = False
        return True

    def _next_requests(self, dest: str, d: _Dest) -> list[Coroutine[Any, Any, BatchResult]]:
        """The next requests of a hot run, in submission order: the held envelopes of one
        multi submission (a peer with ``"multi"``: one ``/multi`` request), or the batches
        of the envelopes up to the next such submission. Moves them from hot to flight."""
        multi = FEATURE in self.peers.features(dest)
        first = next(iter(d.hot))
        sub = d.subs.get(first) if multi else None
        if sub is not None:
            envs = list(
                itertools.takewhile(
                    lambda e: d.subs.get(e.id) is sub,
                    itertools.islice(d.hot.values(), MAX_RECIPIENTS),
                )
            )
            self._to_flight(d, envs)
            return [self._post_multi(dest, sub, envs)]
        k = self.peers.max_inflight(dest)
        held: Iterable[Envelope] = d.hot.values()
        if multi:
            held = itertools.takewhile(lambda e: e.id not in d.subs, held)
        page = [(0, env) for env in itertools.islice(held, BATCH_SIZE * k)]
        lanes, consumed = _plan(page, _NO_HOLDS, 0, set(), k)
        self._to_flight(d, [env for _, env in page[:consumed]])
        return [self._post(dest, envs) for envs in lanes]

    @staticmethod
    def _to_flight(d: _Dest, envs: list[Envelope]) -> None:
        for env in envs:
            del d.hot[env.id]
            d.subs.pop(env.id, None)
            d.flight.add(env.id)

    def _hot_close(self, d: _Dest) -> None:
        """End the hot run: what it still holds is committed and goes the stored way (from
        the head of the queue: the walk may have passed such rows while the run held them)."""
        d.hot_open = False
        held = [*d.flight, *d.hot]
        d.flight.clear()
        d.hot.clear()
        d.subs.clear()
        if held:
            d.rewind = True
            self.mailboxes.hot_unsent(held)

    async def _attempt_reading_ahead(
        self, dest: str, d: _Dest, lanes: list[list[Envelope]], after: int, read: bool
    ) -> tuple[bool, list[tuple[int, Envelope]] | None]:
        """:meth:`_attempt` for each batch at once (they share no mailbox: :func:`_plan`);
        with ``read``, the page after ``after`` is read from the store meanwhile, so the
        store's latency overlaps the peer's. True only if every batch went through. A failed
        read is not an error here (the next pass reads that page again, in the ordinary way)."""
        pages = [self.store.outbox_page(dest, after, _page_rows(d, len(lanes)))] if read else []
        if read:
            d.wake.clear()  # this read is the next pass's: rows committed after it wake us
        results = await asyncio.gather(
            *(self._attempt(dest, d, envs) for envs in lanes), *pages, return_exceptions=True
        )
        for res in results:
            if isinstance(res, asyncio.CancelledError) or (
                isinstance(res, BaseException) and not isinstance(res, Exception)
            ):
                raise res
        oks, got = results[: len(lanes)], results[len(lanes) :]
        for res in oks:
            if isinstance(res, BaseException):
                raise res
        page = got[0] if got and not isinstance(got[0], BaseException) else None
        return all(oks), page  # type: ignore[return-value]

    async def _attempt(self, dest: str, d: _Dest, envs: list[Envelope]) -> bool:
        """One request; False (after waiting out the destination's backoff) if it failed."""
        try:
            await self._send(dest, envs, d)
        except HavenError as exc:
            await self._failed(dest, d, exc)
            return False
        self._reachable(dest, d)
        return True

    def _reachable(self, dest: str, d: _Dest) -> None:
        d.backoff.succeeded()
        if d.failing:  # state change only: never a line per envelope or per retry
            d.failing = False
            log.info("peer %s reachable again", dest)

    async def _failed(self, dest: str, d: _Dest, exc: HavenError) -> None:
        """A whole request failed: wait out the destination's backoff."""
        # rate_limited: a budget that refills within a second (§4.4), not a dead peer
        now = self.clock.now_ms()
        if exc.code == RateLimited.code:
            delay = d.backoff.rng.randint(250, 1000)
        elif now < d.backoff.next_attempt:
            # an early retry (new rows woke the wait) that failed too: wait out what is left
            # of the same backoff; only a retry when it was due lengthens it, so a dead peer's
            # backoff grows with time, not with the number of messages queued meanwhile
            delay = d.backoff.next_attempt - now
        else:
            delay = d.backoff.failed(now)
            if not d.failing:
                d.failing = True
                queued = self.quotas.by_dest.get(dest, 0) if self.quotas else 0
                log.info("peer %s unreachable (%s); %d queued", dest, exc.code, queued)
        self.metrics.error("outbox", exc.code)
        self._hot_close(d)
        d.pausing = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay / 1000):
                    d.wake.clear()
                    await d.wake.wait()
        finally:
            d.pausing = False

    async def _send(self, dest: str, envs: list[Envelope], d: _Dest) -> None:
        """Post one batch. Per-envelope refusals are settled per envelope: permanent codes
        drop the row, any other code holds it back on its own schedule. Raises only when the
        whole request failed."""
        try:
            result = await self._post(dest, envs)
        except RemoteError as exc:
            if exc.code not in PERMANENT:
                raise
            # The peer refused the whole batch for a reason tied to its content (one envelope
            # too large, or of a version it doesn't speak): split to isolate the culprit, so
            # one bad row can't block the queue; a single refused envelope is dropped.
            if len(envs) == 1:
                self.metrics.error("outbox_rejected", exc.code)
                self._leave([envs[0].id], d)
                return
            half = len(envs) // 2
            await self._send(dest, envs[:half], d)
            await self._send(dest, envs[half:], d)
            return
        now = self.clock.now_ms()
        holds = d.holds
        settled = set(result.accepted)
        done = list(result.accepted)
        for eid, code in result.rejected:
            self.metrics.error("outbox_rejected", code)
            settled.add(eid)
            if code in PERMANENT:
                done.append(eid)
            else:
                holds.refused(eid, now)
        for env in envs:  # neither accepted nor refused: try again later too
            if env.id not in settled:
                holds.refused(env.id, now)
        if done:
            self._leave(done, d)
        self.metrics.event("federation.envelopes_out", len(result.accepted))

    def _leave(self, ids: list[bytes], d: _Dest) -> None:
        """These rows are done (accepted, or refused for good): queue their deletion (one
        group commit for the whole batch) and go on; quotas are freed once it is committed.

        The worker does not wait for that commit: the ids stay in ``d.leaving`` meanwhile, so a
        later pass never sends them again. If the commit fails, the committer retries the
        deletion with its next transaction; we wait for that one in turn."""
        d.holds.forget(ids)
        d.leaving.update(ids)
        self._await_deletion(ids, d)

    def _await_deletion(self, ids: list[bytes], d: _Dest) -> None:
        def committed(f: asyncio.Future[None]) -> None:
            if f.cancelled():
                return
            if f.exception() is not None:  # retried with the next transaction
                self._await_deletion(ids, d)
                return
            d.leaving.difference_update(ids)
            if self.quotas is not None:
                self.quotas.left(ids)

        self.mailboxes.delete_outbox(ids).add_done_callback(committed)

    async def _post_multi(self, dest: str, sub: MultiSub, envs: list[Envelope]) -> BatchResult:
        """POST one submission's envelopes for ``dest`` as one ``/multi`` request (§11.4).
        A peer that answers ``not_found`` no longer serves it: its features are re-read with
        its next descriptor, and meanwhile its envelopes go as batches."""
        multi = MultiBatch(
            sub.eph,
            envs[0].expires,  # admitted together: one expiry for all
            sub.body,
            tuple((e.id, e.to, e.body[EPH_LEN:COPY_OVERHEAD]) for e in envs),
        )
        body = multi.encode()
        try:
            result = await self._call(dest, body, self.transport.post_multi)
        except RemoteError as exc:
            if exc.code == "not_found":
                self.peers.drop_feature(dest, FEATURE)
            raise
        self.metrics.event("multi.requests_out")
        return result

    async def _post(self, dest: str, envs: list[Envelope]) -> BatchResult:
        """POST one signed batch through the peer's locators; re-measure its clock once."""
        body = Batch(tuple(envs)).encode()  # once: every retry below re-signs only (§4.2)
        return await self._call(dest, body, self.transport.post_encoded_batch)

    async def _call(
        self,
        dest: str,
        body: bytes,
        method: Callable[[str, str, int, bytes], Awaitable[BatchResult]],
    ) -> BatchResult:
        """POST ``body`` with ``method`` through the peer's locators; re-measure its clock
        once."""

        async def post(url: str) -> BatchResult:
            return await method(url, dest, self.peers.stamp(dest), body)

        async def over_link(
            node_id: str, fn: Callable[[str], Awaitable[BatchResult]]
        ) -> BatchResult:
            return await fn(LINK_URL)  # a relay's client: its link, not its public host (§12.4)

        try:
            route = getattr(self.transport, "route", None)  # test doubles have none
            # raises TransportError for a relay client without a link: back off until it links
            call = over_link if route is not None and route(dest) is not None else self.peers.call
            try:
                result = await call(dest, post)
            except RemoteError as exc:
                if exc.code == ClockSkew.code and exc.peer_now is not None:
                    self.peers.correct_clock(dest, exc.peer_now)  # re-measured; retry at once
                    self.metrics.request("out", exc.code)
                    result = await call(dest, post)
                else:
                    if exc.code == "wrong_destination":
                        self.peers.invalidate(dest)  # someone else answers there: re-check
                    raise
        except HavenError as exc:
            self.metrics.request("out", exc.code)
            raise
        self.metrics.request("out", "ok")
        return result
