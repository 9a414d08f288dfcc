"""The bus the workers of one node share (node/pg_bus.py), against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable

import pytest

from federation.errors import Replay, StorageError
from node import pg_bus
from node.pg_bus import CH_ENV, PgBus, lock_key, parse_tags, payloads

KEY = os.urandom(32)


async def until(pred: Callable[[], object], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def buses(pg_dsn: str) -> AsyncIterator[tuple[PgBus, PgBus]]:
    lease, _ = await pg_bus.prepare(pg_dsn)
    a = PgBus(pg_dsn, KEY, 0, leader=True)
    b = PgBus(pg_dsn, KEY, 1, leader=False)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()
        await lease.close()


async def test_a_second_supervisor_on_one_store_is_refused(
    pg_dsn: str, buses: tuple[PgBus, PgBus]
) -> None:
    with pytest.raises(StorageError, match="already serves"):
        await pg_bus.prepare(pg_dsn)


def test_payloads_stay_under_the_notify_limit_and_parse_back() -> None:
    tags = [os.urandom(16) for _ in range(1000)]
    out = payloads(tags)
    assert all(len(p) < 8000 for p in out)
    assert sorted(t for p in out for t in parse_tags(p)) == sorted(tags)
    assert parse_tags("not a tag, " + "ab" * 8) == []  # too short: ignored
    assert lock_key(KEY, "x") != lock_key(os.urandom(32), "x")


async def test_one_lock_holder_per_destination(buses: tuple[PgBus, PgBus]) -> None:
    a, b = buses
    assert await a.try_lock("peer1") and a.held("peer1")
    assert not await b.try_lock("peer1") and not b.held("peer1")
    assert await b.try_lock("peer2")  # other destinations are independent
    await a.unlock("peer1")
    assert not a.held("peer1")
    assert await b.try_lock("peer1")


async def test_a_dead_holders_locks_are_released(pg_dsn: str, buses: tuple[PgBus, PgBus]) -> None:
    _, b = buses
    c = PgBus(pg_dsn, KEY, 2, leader=False)
    await c.open()
    assert await c.try_lock("peer")
    assert not await b.try_lock("peer")
    await c.close()  # its session ends, as when PostgreSQL sees a killed worker's socket close
    deadline = time.monotonic() + 10
    while not await b.try_lock("peer"):
        assert time.monotonic() < deadline, "lock not released"
        await asyncio.sleep(0.05)


async def test_a_replay_is_refused_by_the_other_worker(buses: tuple[PgBus, PgBus]) -> None:
    a, b = buses
    nonce = os.urandom(16)
    await a.remember_nonce("origin", nonce, 10**13)
    with pytest.raises(Replay):
        await b.remember_nonce("origin", nonce, 10**13)
    await b.remember_nonce("other-origin", nonce, 10**13)  # keyed by (origin, nonce)


async def test_notifications_carry_tags_to_every_worker(buses: tuple[PgBus, PgBus]) -> None:
    a, b = buses
    got: list[bytes] = []
    b.on_env = got.extend
    tags = [a.mailbox_tag(os.urandom(32)) for _ in range(300)]
    await a.notify(CH_ENV, tags)
    await until(lambda: len(got) == 300, what="notifications")
    assert sorted(got) == sorted(tags)


async def test_newest_device_claim_wins(buses: tuple[PgBus, PgBus]) -> None:
    a, b = buses
    seen: list[bytes] = []
    a.on_dev = seen.extend
    tag = a.mailbox_tag(b"mailbox")
    first = await a.claim_device(tag)
    second = await b.claim_device(tag)
    await until(lambda: seen.count(tag) >= 2, what="device notifications")
    assert await a.device_owner(tag) == (1, second)
    await a.release_device(tag, first)  # an older connection's end leaves the newer row
    assert await a.device_owner(tag) == (1, second)
    await b.release_device(tag, second)
    assert await a.device_owner(tag) is None


async def test_lost_notification_connection_reconnects_and_rechecks(
    pg_dsn: str, buses: tuple[PgBus, PgBus]
) -> None:
    a, b = buses
    rechecks: list[int] = []
    b.on_reconnect = lambda: rechecks.append(1)
    runner = asyncio.create_task(b.run())
    try:
        import asyncpg

        conn = await asyncpg.connect(pg_dsn)
        try:  # kill b's listening backend, as a network cut or a server restart would
            await conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
            )
        finally:
            await conn.close()
        await until(lambda: rechecks, what="reconnect")
        got: list[bytes] = []
        b.on_env = got.extend
        tag = os.urandom(16)
        await a.notify(CH_ENV, [tag])
        await until(lambda: got == [tag], what="notification after reconnect")
    finally:
        runner.cancel()


async def test_a_link_token_minted_on_one_worker_is_redeemed_once_on_another(
    buses: tuple[PgBus, PgBus],
) -> None:
    a, b = buses
    token = os.urandom(32)
    await a.share_link(token, "alice", expires=2_000)
    assert await b.redeem_link(token, now=1_000) == "alice"
    assert await a.redeem_link(token, now=1_000) is None  # single use, across workers
    await a.share_link(token, "alice", expires=2_000)
    assert await b.redeem_link(token, now=2_000) is None  # expired
    assert await b.redeem_link(os.urandom(32), now=0) is None


async def test_a_peer_seen_by_one_worker_resets_the_others_backoff(
    buses: tuple[PgBus, PgBus],
) -> None:
    """Worker 1 holds peer1's queue and backs off; peer1 contacts worker 0: worker 1's sender
    hears of it (``haven_seen``) and retries at once, as one process does (node/outbox.py)."""
    from types import SimpleNamespace

    from node.worker_role import WorkerRole

    a, b = buses
    seen: list[str] = []
    roles, tasks = [], []
    for i, bus in enumerate((a, b)):
        outbox = SimpleNamespace(dests={"peer1": None, "peer2": None}, peer_seen=seen.append)
        role = WorkerRole(index=i, count=2, bus=bus, started_ms=0)
        role.bind(SimpleNamespace(), SimpleNamespace(), outbox)  # type: ignore[arg-type]
        roles.append(role)
        tasks.append(asyncio.create_task(role.run()))
    try:
        roles[0].peer_seen("peer1", now_s=100.0)
        await until(lambda: "peer1" in seen, what="worker 1 to hear that peer1 is back")
        roles[0].peer_seen("peer1", now_s=100.5)  # within a second: not sent again
        roles[0].peer_seen("peer2", now_s=100.5)
        await until(lambda: "peer2" in seen, what="peer2 too")
        assert seen.count("peer1") == 2  # once per worker (the sender's own hears it too)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
