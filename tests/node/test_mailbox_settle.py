"""A stopping node commits what is queued first (real SqliteStore, no network)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from federation.clock import FakeClock
from federation.wire import Envelope
from node.atrest import EpochKeys
from node.mailbox import Mailboxes
from node.sqlite_store import SqliteStore


async def test_settle_commits_queued_deletes_before_the_committer_stops(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteStore(str(tmp_path / "s.db"), EpochKeys(str(tmp_path / "e.key")))
    await store.open()
    mailboxes = Mailboxes(store, clock, on_outbox=lambda dest: None)
    committer = asyncio.create_task(mailboxes.run())
    try:
        assert await mailboxes.settle(1.0)  # nothing queued: settled at once
        envs = [
            Envelope(os.urandom(16), os.urandom(32), clock.now_ms() + 60_000, b"x")
            for _ in range(5)
        ]
        await asyncio.gather(*mailboxes.submit_outbox([("peer", e) for e in envs]))
        assert await store.outbox_counts() == {"peer": 5}
        # a peer accepted them: the deletes are queued, nobody waits for them (as the outbox
        # sender does), and the node is told to stop right away
        mailboxes.delete_outbox([e.id for e in envs[:3]])
        assert await mailboxes.settle(5.0)
        assert await store.outbox_counts() == {"peer": 2}
    finally:
        committer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await committer
        await store.close()
