"""Outbox sender against a fake peer transport (unit test: fakes for the network only)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from federation.clock import FakeClock
from federation.transport import RemoteError
from federation.wire import Batch, BatchResult, Envelope
from node.atrest import EpochKeys
from node.mailbox import Mailboxes
from node.metrics import Metrics
from node.outbox import OutboxSender
from node.sqlite_store import SqliteStore


class FakePeers:
    def __init__(self) -> None:
        self.calls = 0

    def stamp(self, node_id: str) -> int:
        return 0

    async def call(self, node_id: str, fn: Callable[[str], Awaitable[Any]]) -> Any:
        self.calls += 1
        return await fn("http://peer.invalid")


class RefusingTransport:
    """Refuses a whole batch when any envelope is "too large"; accepts everything else."""

    def __init__(self) -> None:
        self.accepted: list[bytes] = []

    async def post_batch(self, url: str, dest: str, created: int, batch: Batch) -> BatchResult:
        if any(len(e.body) > 100 for e in batch.envelopes):
            raise RemoteError("too_large", "batch refused")
        self.accepted += [e.id for e in batch.envelopes]
        return BatchResult(tuple(e.id for e in batch.envelopes))


async def test_one_bad_envelope_does_not_block_the_queue(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteStore(str(tmp_path / "s.db"), EpochKeys(str(tmp_path / "e.key")))
    await store.open()
    sender: OutboxSender | None = None
    mailboxes = Mailboxes(store, clock, on_outbox=lambda d: sender.wake(d) if sender else None)
    transport = RefusingTransport()
    sender = OutboxSender(store, mailboxes, FakePeers(), transport, clock, Metrics())  # type: ignore[arg-type]
    good = [Envelope(os.urandom(16), os.urandom(16), 10**14, b"ok") for _ in range(7)]
    bad = Envelope(os.urandom(16), os.urandom(16), 10**14, b"x" * 500)
    tasks = [asyncio.create_task(mailboxes.run()), asyncio.create_task(sender.run())]
    try:
        futs = mailboxes.submit_outbox([("peer", e) for e in [*good[:3], bad, *good[3:]]])
        await asyncio.gather(*futs)
        async with asyncio.timeout(20):
            while (await store.counts())["outbox_envelopes"]:
                await asyncio.sleep(0.01)
        assert sorted(transport.accepted) == sorted(e.id for e in good)
        assert sender.metrics.errors["outbox_rejected.too_large"] == 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()
