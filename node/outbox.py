"""Per-destination federation sender (ARCHITECTURE §4 "Federation sender").

One worker per destination node: it reads committed outbox rows in bounded batches, posts one
signed request at a time, and deletes rows only once the peer has durably accepted them (or
refused them for good). Failures back off exponentially with jitter, capped at 5 minutes; the
backoff resets as soon as the peer is seen again (:meth:`OutboxSender.peer_seen`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from federation.backoff import Backoff
from federation.clock import Clock
from federation.errors import ClockSkew, HavenError, RateLimited, TransportError
from federation.transport import PeerTransport, RemoteError
from federation.wire import MAX_BATCH_BYTES, Batch, BatchResult, Envelope

from .mailbox import Mailboxes
from .metrics import Metrics
from .peers import PeerDirectory
from .store import Store

log = logging.getLogger("haven.outbox")

BATCH_SIZE = 200
# Refusals that will never succeed: drop those envelopes from the outbox.
PERMANENT = {"not_found", "expired", "malformed", "too_large", "unsupported_version"}


BATCH_BYTES = MAX_BATCH_BYTES - 64 * 1024  # headroom for msgpack framing


def _fit(envs: list[Envelope]) -> list[Envelope]:
    """Trim a batch so its encoding stays under the receiver's body limit (§8)."""
    total = 0
    for i, env in enumerate(envs):
        total += len(env.body) + 64
        if total > BATCH_BYTES and i > 0:
            return envs[:i]
    return envs


@dataclass
class _Dest:
    backoff: Backoff = field(default_factory=Backoff)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class OutboxSender:
    def __init__(
        self,
        store: Store,
        mailboxes: Mailboxes,
        peers: PeerDirectory,
        transport: PeerTransport,
        clock: Clock,
        metrics: Metrics,
    ) -> None:
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
            if self._tg is not None:
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
            for dest in await self.store.outbox_destinations():
                self.wake(dest)
            await asyncio.Event().wait()  # run until cancelled with the node

    async def _worker(self, dest: str, d: _Dest) -> None:
        while True:
            d.wake.clear()
            envs = _fit(await self.store.outbox_batch(dest, BATCH_SIZE))
            if not envs:
                await d.wake.wait()
                continue
            try:
                await self._send(dest, envs)
                d.backoff.succeeded()
            except HavenError as exc:
                # rate_limited: a budget that refills within a second (§4.4), not a dead peer
                limited = exc.code == RateLimited.code
                delay = (
                    d.backoff.rng.randint(250, 1000)
                    if limited
                    else d.backoff.failed(self.clock.now_ms())
                )
                self.metrics.error("outbox", exc.code)
                log.info(
                    "delivery to %s failed (%s); retry in %.1f s", dest, exc.code, delay / 1000
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay / 1000):
                        d.wake.clear()
                        await d.wake.wait()

    async def _send(self, dest: str, envs: list[Envelope]) -> None:
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
                await self.mailboxes.delete_outbox([envs[0].id])
                return
            half = len(envs) // 2
            await self._send(dest, envs[:half])
            await self._send(dest, envs[half:])
            return
        done = list(result.accepted) + [i for i, code in result.rejected if code in PERMANENT]
        for _, code in result.rejected:
            self.metrics.error("outbox_rejected", code)
        if done:
            await self.mailboxes.delete_outbox(done)
        self.metrics.event("federation.envelopes_out", len(result.accepted))
        if len(done) < len(envs):
            raise TransportError("peer refused part of the batch for now")

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
