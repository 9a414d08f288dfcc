"""Storage contract: every backend of node.store.Store must pass these."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from federation.clock import FakeClock
from federation.wire import Envelope
from node.atrest import EpochKeys
from node.sqlite_store import SqliteStore
from node.store import PeerRecord, Store, WriteBatch


def env(to: bytes, expires: int, body: bytes = b"x" * 100) -> Envelope:
    return Envelope(os.urandom(16), to, expires, body)


@pytest.fixture(params=["sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s = SqliteStore(str(tmp_path / "store.db"), EpochKeys(str(tmp_path / "epochs.key")))
    await s.open()
    yield s
    await s.close()


async def test_envelopes_round_trip_in_order_and_delete(store: Store) -> None:
    mb = os.urandom(16)
    envs = [env(mb, 10**13, bytes([i]) * 50) for i in range(10)]
    await store.write(WriteBatch(envelopes=tuple(envs)), 1)
    got = await store.pending_for(mb, 100)
    assert got == envs
    await store.write(WriteBatch(delete_envelopes=tuple(e.id for e in envs[:4])), 2)
    assert await store.pending_for(mb, 100) == envs[4:]
    assert (await store.counts())["pending_envelopes"] == 6


async def test_duplicate_envelope_is_stored_once(store: Store) -> None:
    e = env(os.urandom(16), 10**13)
    await store.write(WriteBatch(envelopes=(e,)), 1)
    await store.write(WriteBatch(envelopes=(e,)), 2)
    assert (await store.counts())["pending_envelopes"] == 1


async def test_outbox_per_destination(store: Store) -> None:
    e1, e2 = env(os.urandom(16), 10**13), env(os.urandom(16), 10**13)
    await store.write(WriteBatch(outbox=(("peer1", e1), ("peer2", e2))), 1)
    assert sorted(await store.outbox_destinations()) == ["peer1", "peer2"]
    assert await store.outbox_batch("peer1", 10) == [e1]
    await store.write(WriteBatch(delete_outbox=(e1.id,)), 2)
    assert await store.outbox_batch("peer1", 10) == []
    assert (await store.counts())["outbox_envelopes"] == 1


async def test_sweep_expired(store: Store) -> None:
    mb = os.urandom(16)
    old, new = env(mb, 1000), env(mb, 5000)
    await store.write(WriteBatch(envelopes=(old, new), outbox=(("p", env(mb, 1000)),)), 1)
    assert await store.sweep_expired(2000) == 2
    assert await store.pending_for(mb, 10) == [new]


async def test_invites_single_use_and_expiring(store: Store) -> None:
    await store.create_account("alice", 1)
    await store.add_invite(b"h1", "alice", 1000)
    await store.add_invite(b"h2", "alice", 1000)
    assert await store.redeem_invite(b"h1", 10) == ("alice", "invite")
    assert await store.redeem_invite(b"h1", 10) is None
    assert await store.redeem_invite(b"h2", 2000) is None  # expired
    assert await store.redeem_invite(b"nope", 10) is None


async def test_one_time_keys_claimed_once_then_fallback(store: Store) -> None:
    mb = os.urandom(16)
    await store.add_device("alice", mb, b"k" * 32)
    await store.add_otks(mb, [(f"k{i}", f"v{i}") for i in range(20)])
    claims = await asyncio.gather(*(store.claim_otk(mb) for _ in range(20)))
    assert len({c for c in claims if c}) == 20  # atomic: never the same key twice
    assert await store.claim_otk(mb) is None
    await store.set_fallback(mb, "fb", "fbkey")
    assert await store.claim_otk(mb) == ("fb", "fbkey")
    assert await store.count_otks(mb) == 0


async def test_device_list_never_rolls_back(store: Store) -> None:
    assert await store.set_device_list("alice", 2, b"v2", b"s2")
    assert not await store.set_device_list("alice", 1, b"v1", b"s1")
    assert await store.get_device_list("alice") == (b"v2", b"s2")


async def test_remove_account_purges_mailboxes(store: Store) -> None:
    mb = os.urandom(16)
    await store.create_account("bob", 1)
    await store.add_device("bob", mb, b"k" * 32)
    await store.write(WriteBatch(envelopes=(env(mb, 10**13),)), 1)
    assert await store.remove_account("bob") == 1
    assert await store.get_device(mb) is None
    assert await store.pending_for(mb, 10) == []
    assert not await store.account_exists("bob")


async def test_peer_rename_moves_outbox(store: Store) -> None:
    await store.upsert_peer(PeerRecord("old", "http://h", "h", 1))
    e = env(os.urandom(16), 10**13)
    await store.write(WriteBatch(outbox=(("old", e),)), 1)
    await store.rename_peer("old", PeerRecord("new", "http://h", "h", 2))
    assert (await store.peer_by_host("h")).node_id == "new"  # type: ignore[union-attr]
    assert await store.outbox_batch("new", 10) == [e]


async def test_epoch_rotation_reseals_then_destroys_old_key(tmp_path: Path) -> None:
    clock = FakeClock()
    keys = EpochKeys(str(tmp_path / "epochs.key"))
    store = SqliteStore(str(tmp_path / "store.db"), keys)
    await store.open()
    try:
        mb = os.urandom(16)
        pending = env(mb, 10**14, b"still pending")
        await store.write(WriteBatch(envelopes=(pending,)), clock.now_ms())
        first_epoch = keys.epochs[0]
        old_key = (tmp_path / "epochs.key").read_bytes()
        clock.advance(3_600_000)
        assert await store.rotate_epochs(clock.now_ms()) == 1
        assert keys.epochs == [first_epoch + 1]
        # the old key's bytes are gone from the key file; the pending row still opens
        new_file = (tmp_path / "epochs.key").read_bytes()
        assert old_key[8:40] not in new_file
        assert await store.pending_for(mb, 10) == [pending]
        # a fresh process sees only the new key, and can still read the re-sealed row
        await store.close()
        keys2 = EpochKeys(str(tmp_path / "epochs.key"))
        assert keys2.epochs == [first_epoch + 1]
        store = SqliteStore(str(tmp_path / "store.db"), keys2)
        await store.open()
        assert await store.pending_for(mb, 10) == [pending]
    finally:
        await store.close()


async def test_pending_page_streams_a_mailbox_by_cursor(store: Store) -> None:
    mb, other = os.urandom(16), os.urandom(16)
    envs = [env(mb, 10**13, bytes([i]) * 10) for i in range(7)]
    await store.write(WriteBatch(envelopes=(*envs[:3], env(other, 10**13), *envs[3:])), 1)
    got: list[Envelope] = []
    seq = 0
    while page := await store.pending_page(mb, seq, 3):
        assert len(page) <= 3
        assert [s for s, _ in page] == sorted(s for s, _ in page) and page[0][0] > seq
        seq = page[-1][0]
        got += [e for _, e in page]
    assert got == envs  # every envelope once, in arrival order, none of the other mailbox
    await store.write(WriteBatch(delete_envelopes=(envs[0].id,)), 2)
    assert [e for _, e in await store.pending_page(mb, 0, 10)] == envs[1:]


async def test_outbox_page_and_counts(store: Store) -> None:
    envs = [env(os.urandom(16), 10**13) for _ in range(5)]
    other = env(os.urandom(16), 10**13)
    await store.write(WriteBatch(outbox=(*(("p1", e) for e in envs), ("p2", other))), 1)
    assert await store.outbox_counts() == {"p1": 5, "p2": 1}
    first = await store.outbox_page("p1", 0, 2)
    assert [e for _, e in first] == envs[:2]
    rest = await store.outbox_page("p1", first[-1][0], 10)
    assert [e for _, e in rest] == envs[2:]
    assert await store.outbox_page("p1", rest[-1][0], 10) == []
    await store.write(WriteBatch(delete_outbox=(envs[0].id, other.id)), 2)
    assert await store.outbox_counts() == {"p1": 4}


async def test_account_created_is_stored_as_its_day(store: Store, tmp_path: Path) -> None:
    import sqlite3

    now = 1_795_376_903_268  # some millisecond in a day
    assert await store.create_account("carol", now)
    await store.close()
    with sqlite3.connect(tmp_path / "store.db") as db:
        (created,) = db.execute("SELECT created FROM accounts WHERE name='carol'").fetchone()
    await store.open()
    assert created == now - now % 86_400_000 and created % 86_400_000 == 0


async def test_peer_last_seen_is_a_day_and_stale_pins_drop(store: Store) -> None:
    day = 86_400_000
    t0 = 20_000 * day + 12_345_678
    await store.upsert_peer(PeerRecord("old", "http://o", "o", t0))
    await store.upsert_peer(PeerRecord("queued", "http://q", "q", t0))
    await store.upsert_peer(PeerRecord("fresh", "http://f", "f", t0 + 29 * day))
    assert (await store.get_peer("old")).last_seen == 20_000 * day  # type: ignore[union-attr]
    cutoff = t0  # e.g. "now - pin_ttl" with now = t0 + 30 days: "old" is 30 days old
    dropped = await store.drop_stale_peers(cutoff, keep={"queued"})
    assert dropped == ["old"]
    assert sorted(p.node_id for p in await store.all_peers()) == ["fresh", "queued"]
    assert await store.drop_stale_peers(cutoff, keep={"queued"}) == []
    await store.rename_peer("fresh", PeerRecord("fresh2", "http://f", "f", t0 + 29 * day + 5))
    assert (await store.get_peer("fresh2")).last_seen == 20_029 * day  # type: ignore[union-attr]
