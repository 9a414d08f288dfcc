"""No store call leaves a statement in progress on the shared connection.

SQLite refuses a COMMIT while another statement that writes (a ``wal_checkpoint`` or
``journal_mode`` pragma, an ``INSERT .. RETURNING`` with rows left) is stepped but not yet reset:
"cannot commit transaction - SQL statements in progress" [SQLITE_BUSY]. aiosqlite's worker thread
keeps the previous call's result (a cursor) alive until the next call on that thread returns, so a
group commit that came right after a checkpoint failed every time; under load, in the flood test,
only when the two happened to be queued back to back. Each test here puts a group commit right
after the call under test, then a concurrent mix of everything the node does to one store.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from federation.errors import StorageError
from federation.wire import Envelope
from node.atrest import EpochKeys
from node.sqlite_store import SqliteStore
from node.store import PeerRecord, WriteBatch

FAR = 10**13  # an expiry that never passes


@pytest.fixture
def store(sqlite_store: SqliteStore) -> SqliteStore:
    """SQLite only: this file is about SQLite's statements in progress (see above)."""
    return sqlite_store


def env(to: bytes, expires: int = FAR) -> Envelope:
    return Envelope(os.urandom(16), to, expires, b"x" * 64)


async def _checkpoint(s: SqliteStore) -> None:
    await s.checkpoint()


async def _invite(s: SqliteStore) -> None:
    await s.add_invite(os.urandom(8), "alice", FAR)


async def _redeem(s: SqliteStore) -> None:
    token = os.urandom(8)
    await s.add_invite(token, "alice", FAR)
    assert await s.redeem_invite(token, 1) == ("alice", "invite")


async def _claim(s: SqliteStore) -> None:
    mb = os.urandom(16)
    await s.add_otks(mb, [("k1", "v1"), ("k2", "v2")])
    assert await s.claim_otk(mb) is not None


async def _rotate(s: SqliteStore) -> None:
    await s.write(WriteBatch(envelopes=(env(os.urandom(16)),)), 1)
    await s.rotate_epochs(3 * s.keys.epoch_ms)  # a new epoch: re-seal, checkpoint, destroy


async def _sweep(s: SqliteStore) -> None:
    await s.write(WriteBatch(envelopes=(env(os.urandom(16), 5),)), 1)
    assert await s.sweep_expired(10) == 1


CALLS: dict[str, Callable[[SqliteStore], Awaitable[None]]] = {
    "checkpoint": _checkpoint,
    "exec": _invite,
    "write_returning": _redeem,
    "claim_otk": _claim,
    "rotate_epochs": _rotate,
    "sweep_expired": _sweep,
}


@pytest.mark.parametrize("name", list(CALLS))
async def test_a_group_commit_right_after_each_call_succeeds(store: SqliteStore, name: str) -> None:
    await store.create_account("alice", 1)
    mb = os.urandom(16)
    first = env(mb)
    await store.write(WriteBatch(envelopes=(first,)), 1)  # mb's order floor is now in memory
    await CALLS[name](store)
    e = env(mb)
    # mb known, one live key: the commit is the very next job on the SQLite thread
    await store.write(WriteBatch(envelopes=(e,)), 2)
    assert await store.pending_for(mb, 10) == [first, e]
    await store.write(WriteBatch(delete_envelopes=(first.id, e.id)), 3)
    assert await store.pending_for(mb, 10) == []


async def test_a_group_commit_right_after_open_succeeds(tmp_path: Path) -> None:
    s = SqliteStore(str(tmp_path / "store.db"), EpochKeys(str(tmp_path / "e.key")), max_db_mb=64)
    await s.open()
    try:
        e = env(os.urandom(16))
        await s.write(WriteBatch(envelopes=(e,)), 1)
        assert await s.existing_ids([e.id]) == {e.id}
    finally:
        await s.close()


async def test_concurrent_commits_reads_checkpoints_and_rotations_never_fail(
    tmp_path: Path,
) -> None:
    """Many tasks on one store, as a loaded node runs them: group commits (appends and
    deletes), reads, checkpoints, single-statement writes, epoch rotation and the sweeper.
    Every call succeeds, and every envelope written and not deleted is still there."""
    keys = EpochKeys(str(tmp_path / "epochs.key"), epoch_ms=1000)
    s = SqliteStore(str(tmp_path / "store.db"), keys)
    await s.open()
    rng = random.Random(7)
    mailboxes = [os.urandom(16) for _ in range(8)]
    kept: dict[bytes, Envelope] = {}
    now = [1]

    def tick() -> int:
        now[0] += 250  # a new epoch every 4 housekeeping passes: re-seals run amid commits
        return now[0]

    async def writer() -> None:
        for _ in range(60):
            envs = [env(rng.choice(mailboxes)) for _ in range(rng.randint(1, 4))]
            gone = rng.sample(sorted(kept), min(len(kept), rng.randint(0, 3)))
            for i in gone:
                del kept[i]
            kept.update((e.id, e) for e in envs)
            outbox = (("peer", env(rng.choice(mailboxes))),)
            batch = WriteBatch(envelopes=tuple(envs), outbox=outbox, delete_envelopes=tuple(gone))
            await s.write(batch, now[0])

    async def reader() -> None:
        for _ in range(40):
            await s.pending_for(rng.choice(mailboxes), 50)
            await s.counts()
            await s.pending_counts()
            await s.outbox_counts()
            await s.outbox_page("peer", 0, 20)

    async def housekeeping() -> None:
        for i in range(40):
            await s.checkpoint()
            await s.add_invite(os.urandom(8), "alice", 100)
            await s.upsert_peer(PeerRecord(f"n{i % 3}", "http://x", f"h{i % 3}", 86_400_000))
            await s.claim_otk(rng.choice(mailboxes))
            await s.rotate_epochs(tick())
            await s.sweep_expired(now[0])

    try:
        await s.create_account("alice", 1)
        for mb in mailboxes:
            await s.add_otks(mb, [(f"k{i}", "v") for i in range(20)])
        tasks = [writer] * 3 + [reader] * 2 + [housekeeping] * 2
        results = await asyncio.gather(*(t() for t in tasks), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        assert not failures, failures
        stored = await s.existing_ids(list(kept))
        assert stored == set(kept)
        pending = [e for mb in mailboxes for e in await s.pending_for(mb, 10_000)]
        assert sorted(e.id for e in pending) == sorted(kept)
    finally:
        await s.close()


async def test_a_failed_group_commit_leaves_the_connection_usable(store: SqliteStore) -> None:
    """A rowid collision fails the batch; the next commit (and read) works."""
    mb = os.urandom(16)
    e = env(mb)
    await store.write(WriteBatch(envelopes=(e,)), 1)
    with pytest.raises(StorageError):
        # the same key twice: a UNIQUE failure in the middle of a transaction
        await store._tx(
            [("INSERT INTO accounts (name, created) VALUES (?, ?)", [("bob", 1), ("bob", 1)])]
        )
    await store.checkpoint()
    f = env(mb)
    await store.write(WriteBatch(envelopes=(f,)), 2)
    assert await store.pending_for(mb, 10) == [e, f]
