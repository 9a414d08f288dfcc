"""Full store / full disk, unit level: the real SQLite error, acks independent of inserts, and
the ballast state machine (the full-disk integration test is tests/integration/test_disk_full.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from federation.clock import FakeClock
from federation.errors import StorageError
from federation.wire import Envelope
from node.atrest import EpochKeys
from node.ballast import BALLAST_NAME, DiskFull, DiskGuard
from node.mailbox import Mailboxes
from node.sqlite_store import SqliteStore
from node.store import WriteBatch

MB = b"m" * 16


def env(size: int = 3000) -> Envelope:
    return Envelope(os.urandom(16), MB, 10**14, os.urandom(size))


async def full_store(tmp_path: Path) -> tuple[SqliteStore, list[Envelope]]:
    """A store at its 1 MiB cap; returns it and the envelopes it holds."""
    store = SqliteStore(str(tmp_path / "s.db"), EpochKeys(str(tmp_path / "e.key")), max_db_mb=1)
    await store.open()
    held: list[Envelope] = []
    for _ in range(1000):
        batch = [env() for _ in range(10)]
        try:
            await store.write(WriteBatch(envelopes=tuple(batch)), 1)
        except DiskFull:
            return store, held
        held += batch
    raise AssertionError("a 1 MiB store should fill up")


async def test_full_store_raises_the_real_error_and_stays_usable(tmp_path: Path) -> None:
    store, held = await full_store(tmp_path)
    try:
        with pytest.raises(DiskFull) as info:
            await store.write(WriteBatch(envelopes=tuple(env() for _ in range(10))), 1)
        assert "database or disk is full" in str(info.value)
        assert "cannot rollback" not in str(info.value)
        assert info.value.code == "storage_error"
        # the same connection reads and deletes afterwards, no reopen
        assert len(await store.pending_for(MB, 10_000)) == len(held)
        await store.write(WriteBatch(delete_envelopes=tuple(e.id for e in held[:50])), 1)
        assert len(await store.pending_for(MB, 10_000)) == len(held) - 50
        await store.write(WriteBatch(envelopes=(env(),)), 1)  # room again
    finally:
        await store.close()


async def test_acks_commit_even_when_the_inserts_of_the_batch_do_not_fit(tmp_path: Path) -> None:
    store, held = await full_store(tmp_path)
    mailboxes = Mailboxes(store, FakeClock(), on_outbox=lambda d: None)
    try:
        acked = [e.id for e in held[:20]]
        mailboxes.acked(acked)
        futs = mailboxes.submit_local([env(200_000 // 4) for _ in range(40)])  # ~2 MB: no room
        assert mailboxes.deleting >= set(acked)
        await mailboxes._commit_once()
        for fut in futs:
            assert isinstance(fut.exception(), StorageError)
        left = {e.id for e in await store.pending_for(MB, 10_000)}
        assert left == {e.id for e in held[20:]}  # every ack deleted, nothing else lost
        assert not mailboxes.deleting & set(acked)
        assert not mailboxes._del_env  # nothing left to retry
    finally:
        await store.close()


def test_a_capped_store_on_a_roomy_disk_releases_nothing(tmp_path: Path) -> None:
    guard = DiskGuard(str(tmp_path), 1)
    guard.start()
    assert (tmp_path / BALLAST_NAME).stat().st_size == 1 << 20
    assert guard.on_full() is False  # SQLITE_FULL from max_db_mb: the disk has room
    assert not guard.full and guard.held


def test_ballast_released_once_then_restored_when_space_is_back(tmp_path: Path) -> None:
    guard = DiskGuard(str(tmp_path), 1, margin=1 << 62)  # "the disk is low" whatever its size
    guard._create()
    assert guard.on_full() is True
    assert guard.full and not (tmp_path / BALLAST_NAME).exists()
    assert guard.on_full() is True  # already full: no second release, no second log line
    assert guard.check() is False and guard.full  # space not back yet
    guard.margin = 0  # space is back
    assert guard.check() is True
    assert not guard.full and (tmp_path / BALLAST_NAME).stat().st_size == 1 << 20


def test_ballast_zero_disables_it(tmp_path: Path) -> None:
    (tmp_path / BALLAST_NAME).write_bytes(b"\0" * 10)
    guard = DiskGuard(str(tmp_path), 0)
    guard.start()
    assert not (tmp_path / BALLAST_NAME).exists()
    assert guard.check() is False
