"""Per-destination federation sender (ARCHITECTURE §4 "Federation sender").

One worker per destination node: it walks the committed outbox rows for that node with a
cursor, posts bounded batches one signed request at a time, and deletes rows only once the peer
has durably accepted them (or refused them for good). Whole-request failures back off the
destination exponentially with jitter, capped at 5 minutes; the backoff resets as soon as the
peer is seen again (:meth:`OutboxSender.peer_seen`). An envelope the peer refuses *for now*
(its mailbox is full, ...) waits on its own schedule (:class:`federation.backoff.EnvelopeHolds`)
and the cursor moves past it, so it never blocks the rest of the queue (docs/protocol.md §6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from federation.backoff import Backoff, EnvelopeHolds
from federation.clock import Clock
from federation.errors import ClockSkew, HavenError, RateLimited
from federation.transport import PeerTransport, RemoteError
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


def _select(
    page: list[tuple[int, Envelope]], holds: EnvelopeHolds, now: int
) -> tuple[list[Envelope], int]:
    """The next batch from a page: rows not held back, bounded by count and bytes (§8).

    Returns the batch and how many leading rows of the page it consumed (sent or skipped).
    """
    batch: list[Envelope] = []
    total = 0
    for i, (_, env) in enumerate(page):
        if holds.held(env.id, now):
            continue
        size = len(env.body) + 64
        if batch and (total + size > BATCH_BYTES or len(batch) >= BATCH_SIZE):
            return batch, i
        batch.append(env)
        total += size
    return batch, len(page)


@dataclass
class _Dest:
    backoff: Backoff = field(default_factory=Backoff)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    holds: EnvelopeHolds = field(default_factory=EnvelopeHolds)
    started: bool = False
    failing: bool = False  # for logging state changes only


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

    def wake(self, dest: str) -> None:
        """New committed rows for ``dest``: start or nudge its worker."""
        d = self.dests.get(dest)
        if d is None:
            d = self.dests[dest] = _Dest()
        if self._tg is not None and not d.started:  # woken before run(): start it now
            d.started = True
            self._tg.create_task(self._worker(dest, d))
        d.wake.set()

    def peer_seen(self, dest: str) -> None:
        """The peer is reachable again (or its queue moved here after a key rotation)."""
        d = self.dests.get(dest)
        if d is None:
            self.wake(dest)
            return
        d.backoff.reset()
        d.wake.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            for dest in [*self.dests, *await self.store.outbox_destinations()]:
                self.wake(dest)
            await asyncio.Event().wait()  # run until cancelled with the node

    async def _worker(self, dest: str, d: _Dest) -> None:
        """Walk the queue in passes. A *full* pass starts at the head; when it ends with rows
        held back, the worker sleeps until the first hold is due (then a full pass) or until
        woken by new rows (then a pass over the rows after the last one seen)."""
        cursor, last_seen, full = 0, 0, True
        present: set[bytes] = set()  # ids seen in this full pass
        while True:
            d.wake.clear()
            now = self.clock.now_ms()
            page = await self.store.outbox_page(dest, cursor, BATCH_SIZE)
            if page:
                envs, consumed = _select(page, d.holds, now)
                if full:
                    present.update(e.id for _, e in page[:consumed])
                if envs and not await self._attempt(dest, d, envs):
                    continue  # failed: retry from the same cursor after the backoff
                cursor = last_seen = page[consumed - 1][0]
                continue
            if full:  # holds of rows that left the queue (expired) are forgotten
                d.holds.keep_only(present)
            present = set()
            due = d.holds.next_due()
            if due is None:  # nothing held: the queue is empty; a seq may be reused later
                cursor, full = 0, True
                await d.wake.wait()
                continue
            woken = False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0, due - now) / 1000):
                    await d.wake.wait()
                    woken = True
            cursor, full = (last_seen, False) if woken else (0, True)

    async def _attempt(self, dest: str, d: _Dest, envs: list[Envelope]) -> bool:
        """One request; False (after waiting out the destination's backoff) if it failed."""
        try:
            await self._send(dest, envs, d.holds)
            d.backoff.succeeded()
            if d.failing:  # state change only: never a line per envelope or per retry
                d.failing = False
                log.info("peer %s reachable again", dest)
            return True
        except HavenError as exc:
            # rate_limited: a budget that refills within a second (§4.4), not a dead peer
            if exc.code == RateLimited.code:
                delay = d.backoff.rng.randint(250, 1000)
            else:
                delay = d.backoff.failed(self.clock.now_ms())
                if not d.failing:
                    d.failing = True
                    queued = self.quotas.by_dest.get(dest, 0) if self.quotas else 0
                    log.info("peer %s unreachable (%s); %d queued", dest, exc.code, queued)
            self.metrics.error("outbox", exc.code)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay / 1000):
                    d.wake.clear()
                    await d.wake.wait()
            return False

    async def _send(self, dest: str, envs: list[Envelope], holds: EnvelopeHolds) -> None:
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
                await self._leave([envs[0].id], holds)
                return
            half = len(envs) // 2
            await self._send(dest, envs[:half], holds)
            await self._send(dest, envs[half:], holds)
            return
        now = self.clock.now_ms()
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
            await self._leave(done, holds)
        self.metrics.event("federation.envelopes_out", len(result.accepted))

    async def _leave(self, ids: list[bytes], holds: EnvelopeHolds) -> None:
        """These rows are done (accepted, or refused for good): delete them, free quotas."""
        await self.mailboxes.delete_outbox(ids)
        holds.forget(ids)
        if self.quotas is not None:
            self.quotas.left(ids)

    async def _post(self, dest: str, envs: list[Envelope]) -> BatchResult:
        """POST one signed batch through the peer's locators; re-measure its clock once."""
        batch = Batch(tuple(envs))

        async def post(url: str) -> BatchResult:
            return await self.transport.post_batch(url, dest, self.peers.stamp(dest), batch)

        try:
            return await self.peers.call(dest, post)
        except RemoteError as exc:
            if exc.code == ClockSkew.code and exc.peer_now is not None:
                self.peers.correct_clock(dest, exc.peer_now)  # re-measured; retry at once
                return await self.peers.call(dest, post)
            if exc.code == "wrong_destination":
                self.peers.invalidate(dest)  # someone else answers there: re-check the key
            raise
