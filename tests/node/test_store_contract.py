"""Storage contract: every backend of node.store.Store must pass these.

Every test runs on SQLite and on PostgreSQL (the ``store`` / ``make_store`` fixtures of
tests/node/conftest.py), except three about SQLite itself: the v2 -> v3 migration, the kept
WAL file, and a race provoked through SqliteStore's internals (``_all``, ``_ord_floor``)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from federation.clock import FakeClock
from federation.wire import Envelope
from node.atrest import EpochKeys
from node.pg_store import PgStore
from node.sqlite_store import EXPIRY_GRAIN_MS, MIGRATIONS, WAL_RESERVE_BYTES, SqliteStore
from node.store import PeerRecord, Store, WriteBatch
from tests.node.conftest import MakeStore


def env(to: bytes, expires: int, body: bytes = b"x" * 100) -> Envelope:
    return Envelope(os.urandom(16), to, expires, body)


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


async def test_epoch_rotation_reseals_then_destroys_old_key(
    tmp_path: Path, make_store: MakeStore
) -> None:
    clock = FakeClock()
    keys = EpochKeys(str(tmp_path / "epochs.key"))
    store = make_store(keys)
    await store.open()
    try:
        mb = os.urandom(16)
        pending = env(mb, 10**14, b"still pending")
        await store.write(WriteBatch(envelopes=(pending,)), clock.now_ms())
        first_epoch = keys.epochs[0]
        old_key = (tmp_path / "epochs.key").read_bytes()
        clock.advance(keys.epoch_ms)
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
        store = make_store(keys2)
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
    same = os.urandom(16)  # three rows for one remote mailbox: their order is kept
    chain = [env(same, 10**13, bytes([i]) * 20) for i in range(3)]
    other = env(os.urandom(16), 10**13)
    await store.write(WriteBatch(outbox=(*(("p1", e) for e in envs), ("p2", other))), 1)
    await store.write(WriteBatch(outbox=tuple(("p1", e) for e in chain)), 2)
    assert await store.outbox_counts() == {"p1": 8, "p2": 1}
    first = await store.outbox_page("p1", 0, 3)
    rest = await store.outbox_page("p1", first[-1][0], 10)
    assert await store.outbox_page("p1", rest[-1][0], 10) == []
    walked = [e for _, e in first + rest]
    # every row once, seq increasing; arrival order within one remote mailbox
    assert sorted(walked, key=lambda e: e.id) == sorted(envs + chain, key=lambda e: e.id)
    assert [s for s, _ in first + rest] == sorted(s for s, _ in first + rest)
    assert [e for e in walked if e.to == same] == chain
    await store.write(WriteBatch(delete_outbox=(envs[0].id, other.id)), 2)
    assert await store.outbox_counts() == {"p1": 7}
    assert sorted(await store.outbox_destinations()) == ["p1"]


async def test_account_created_is_stored_as_its_day(store: Store) -> None:
    now = 1_795_376_903_268  # some millisecond in a day
    assert await store.create_account("carol", now)
    rows = await store._all("SELECT created FROM accounts WHERE name='carol'")  # type: ignore[attr-defined]
    created = int(rows[0][0])
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


async def test_the_last_locator_change_followed_is_kept_with_the_pin_and_never_lowered(
    store: Store,
) -> None:
    await store.upsert_peer(PeerRecord("n", "http://a", "a", 1))
    assert await store.peer_moved_at("n") == 0
    await store.set_peer_moved_at("n", 20)
    await store.upsert_peer(PeerRecord("n", "http://b", "b", 2))  # a re-pin keeps it
    await store.set_peer_moved_at("n", 10)  # never lowered
    assert await store.peer_moved_at("n") == 20
    await store.set_peer_moved_at("unpinned", 5)
    assert await store.peer_moved_at("unpinned") == 0


# ---- at rest (schema v3) ---------------------------------------------------------------------


async def test_rotation_rekeys_the_index_and_lookups_still_work(
    tmp_path: Path, make_store: MakeStore
) -> None:
    clock = FakeClock()
    keys = EpochKeys(str(tmp_path / "epochs.key"), 600_000)
    store = make_store(keys)
    await store.open()
    try:
        mb = os.urandom(16)
        await store.add_device("alice", mb, b"k" * 32)
        local = [env(mb, 10**14, bytes([i]) * 30) for i in range(4)]
        remote = [env(os.urandom(16), 10**14) for _ in range(3)]
        await store.write(
            WriteBatch(envelopes=tuple(local), outbox=tuple(("peer", e) for e in remote)),
            clock.now_ms(),
        )
        before = await raw_rows(store)
        clock.advance(600_000)
        assert await store.rotate_epochs(clock.now_ms()) == 7
        after = await raw_rows(store)
        assert len(keys.ids) == 1
        # every index hash and every sealed blob changed; the order keys did not
        for table in ("envelopes", "outbox"):
            for col in ("idh", "mbh", "sealed") + (("dh",) if table == "outbox" else ()):
                assert not {r[col] for r in before[table]} & {r[col] for r in after[table]}
            assert {r["ord"] for r in before[table]} == {r["ord"] for r in after[table]}
        assert await store.pending_for(mb, 10) == local
        assert await store.pending_counts() == {mb: 4}
        assert await store.outbox_counts() == {"peer": 3}
        assert await store.existing_ids([local[0].id, b"n" * 16]) == {local[0].id}
        await store.write(WriteBatch(envelopes=(local[0],)), clock.now_ms())  # a duplicate
        assert (await store.counts())["pending_envelopes"] == 4
        await store.rename_peer("peer", PeerRecord("peer2", "http://h", "h", 1))
        assert await store.outbox_counts() == {"peer2": 3}
        assert sorted(e.id for e in await store.outbox_batch("peer2", 10)) == sorted(
            e.id for e in remote
        )
        await store.write(WriteBatch(delete_envelopes=(local[1].id,)), clock.now_ms())
        assert await store.pending_for(mb, 10) == [local[0], *local[2:]]
    finally:
        await store.close()


async def test_duplicate_under_an_older_key_is_not_stored_twice(
    tmp_path: Path, make_store: MakeStore
) -> None:
    clock = FakeClock()
    keys = EpochKeys(str(tmp_path / "epochs.key"), 600_000)
    store = make_store(keys)
    await store.open()
    try:
        e = env(os.urandom(16), 10**14)
        await store.write(WriteBatch(envelopes=(e,), outbox=(("p", e),)), clock.now_ms())
        clock.advance(600_000)  # a re-seal has made this epoch's key; the old one still seals e
        keys.current(clock.now_ms())
        await store.write(WriteBatch(envelopes=(e,), outbox=(("p", e),)), clock.now_ms())
        assert len(keys.ids) == 2
        counts = await store.counts()
        assert (counts["pending_envelopes"], counts["outbox_envelopes"]) == (1, 1)
    finally:
        await store.close()


async def test_key_destroyed_as_soon_as_nothing_is_pending(
    tmp_path: Path, make_store: MakeStore
) -> None:
    key_file = tmp_path / "epochs.key"
    store = make_store(EpochKeys(str(key_file)))
    await store.open()
    try:
        a, b = env(os.urandom(16), 10**14), env(os.urandom(16), 10**14)
        await store.write(WriteBatch(envelopes=(a,), outbox=(("p", b),)), 1)
        assert any(key_file.read_bytes())
        await store.write(WriteBatch(delete_envelopes=(a.id,)), 2)
        assert any(key_file.read_bytes())  # b still pending under it
        await store.write(WriteBatch(delete_outbox=(b.id,)), 3)
        assert not any(key_file.read_bytes())  # every slot overwritten with zeros
        assert store.keys.ids == []
        c = env(os.urandom(16), 10**14)
        await store.write(WriteBatch(envelopes=(c,)), 4)  # a fresh key for the next row
        assert len(store.keys.ids) == 1 and await store.pending_for(c.to, 10) == [c]
    finally:
        await store.close()


async def test_shutdown_reseals_under_a_fresh_key_and_start_destroys_the_rest(
    tmp_path: Path, make_store: MakeStore
) -> None:
    clock = FakeClock()
    key_file = tmp_path / "epochs.key"
    keys = EpochKeys(str(key_file), 600_000)
    store = make_store(keys)
    await store.open()
    await store.begin(clock)
    mb = os.urandom(16)
    pending = [env(mb, 10**14, bytes([i]) * 10) for i in range(3)]
    await store.write(WriteBatch(envelopes=tuple(pending)), clock.now_ms())
    await store.write(WriteBatch(outbox=(("p", env(os.urandom(16), 10**14)),)), clock.now_ms())
    live = slot_keys(key_file.read_bytes())
    assert len(live) == 1
    await store.close()  # clean shutdown: re-sealed under a fresh key, the old one destroyed
    stopped = slot_keys(key_file.read_bytes())
    assert len(stopped) == 1 and not stopped & live

    # stopped for longer than an epoch: the start re-seals under this epoch's key
    clock.advance(3 * 600_000)
    keys = EpochKeys(str(key_file), 600_000)
    store = make_store(keys)
    await store.open()
    assert await store.begin(clock) == 4
    started = slot_keys(key_file.read_bytes())
    assert len(started) == 1 and not started & stopped
    assert await store.pending_for(mb, 10) == pending  # nothing lost to a key
    assert await store.outbox_counts() == {"p": 1}

    # a started node with nothing pending: at shutdown no key survives
    await store.write(WriteBatch(delete_envelopes=tuple(e.id for e in pending)), clock.now_ms())
    assert len(keys.ids) == 1  # the outbox row is still pending
    await store.close()
    assert len(slot_keys(key_file.read_bytes())) == 1
    store = make_store(EpochKeys(str(key_file), 600_000))
    await store.open()
    await store.begin(clock)
    await store.write(WriteBatch(delete_outbox=tuple(await store_ids(store, "p"))), 1)
    await store.close()
    assert not any(key_file.read_bytes())


async def test_start_destroys_keys_that_seal_nothing(tmp_path: Path, make_store: MakeStore) -> None:
    """A crash mid-rotation leaves two keys; the start keeps only the one that seals rows."""
    clock = FakeClock()
    key_file = tmp_path / "epochs.key"
    keys = EpochKeys(str(key_file), 600_000)
    store = make_store(keys)
    await store.open()
    e = env(os.urandom(16), 10**14)
    await store.write(WriteBatch(envelopes=(e,)), clock.now_ms())
    keys.fresh(clock.now_ms())  # as if the process died right after making a key
    await store.close()
    assert len(slot_keys(key_file.read_bytes())) == 2
    store = make_store(EpochKeys(str(key_file), 600_000))
    await store.open()
    try:
        await store.begin(clock)
        assert len(slot_keys(key_file.read_bytes())) == 1
        assert await store.pending_for(e.to, 10) == [e]
    finally:
        await store.close()


async def test_no_stored_field_is_equal_across_one_send(
    tmp_path: Path, make_store: MakeStore, request: pytest.FixtureRequest
) -> None:
    """One send: the same expiry and body size to a recipient's devices, the sender's own
    other devices (local) and two devices on another node (outbox)."""
    store = make_store(EpochKeys(str(tmp_path / "epochs.key")))
    await store.open()
    try:
        expires = 1_700_000_000_000 + 7 * 86_400_000
        local = [env(os.urandom(16), expires, os.urandom(1024)) for _ in range(6)]
        remote = [
            (f"peer-{i % 2}", env(os.urandom(16), expires, os.urandom(1024))) for i in range(4)
        ]
        await store.write(WriteBatch(envelopes=tuple(local), outbox=tuple(remote)), 1)
        raw = await raw_rows(store)
        for table, n in (("envelopes", 6), ("outbox", 4)):
            rows = raw[table]
            assert len(rows) == n
            for col in rows[0]:
                values = [r[col] for r in rows]
                if col == "dh":  # the destination's hash: shared by every row to that node
                    assert len(set(values)) == 2
                    continue
                assert len(set(values)) == n, f"{table}.{col} repeats within one send"
            # the sealed size is one bucket (shared by every row of that size, not linking)
            assert {len(r["sealed"]) for r in rows} == {1024 + 256}
            # the clear expiry is a lower bound within two grains of the exact one
            assert all(expires - 2 * EXPIRY_GRAIN_MS < r["exp"] <= expires for r in rows)
        # nothing about the envelopes is in clear anywhere in the files
        await store.checkpoint()
        data = await backend_files(store, tmp_path, request)
        for e in local + [e for _, e in remote]:
            assert e.id not in data and e.to not in data and e.body not in data
        assert b"peer-0" not in data and b"peer-1" not in data
        assert expires.to_bytes(8, "big") not in data
    finally:
        await store.close()


async def test_v2_store_migrates_resealing_what_is_pending(tmp_path: Path) -> None:
    path, key_path = str(tmp_path / "store.db"), str(tmp_path / "epochs.key")
    old_keys = EpochKeys(key_path, 3_600_000)
    epoch = old_keys.epoch_of(1_700_000_000_000)
    old_kid = old_keys.current(1_700_000_000_000)
    mb = os.urandom(16)
    local = [env(mb, 10**14, bytes([i]) * 40) for i in range(5)]
    remote = env(os.urandom(16), 10**14)
    db = sqlite3.connect(path)
    for script in MIGRATIONS[:2]:
        db.executescript(script)
    db.executemany(
        "INSERT INTO envelopes VALUES (?, ?, ?, ?, ?)",
        [(e.id, e.to, e.expires, epoch, old_keys.seal(old_kid, e.body)) for e in local],
    )
    db.execute(
        "INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?)",
        (remote.id, "peer", remote.to, remote.expires, epoch, old_keys.seal(old_kid, remote.body)),
    )
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    old_key = old_keys._slots[old_kid].raw  # type: ignore[union-attr]

    keys = EpochKeys(key_path, 600_000)
    store = SqliteStore(path, keys, clock=FakeClock())
    await store.open()
    try:
        assert await store.pending_for(mb, 10) == local  # arrival order kept
        assert await store.outbox_batch("peer", 10) == [remote]
        assert await store.pending_counts() == {mb: 5}
        assert len(keys.ids) == 1 and old_key not in (tmp_path / "epochs.key").read_bytes()
        cols = {r[1] for r in await store._all("PRAGMA table_info(envelopes)")}
        assert cols == {"k", "idh", "mbh", "ord", "exp", "sealed"}
    finally:
        await store.close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)
    db.close()


# ---- helpers -----------------------------------------------------------------------------------


async def raw_rows(store: Store) -> dict[str, list[dict[str, Any]]]:
    """Every stored column of the envelope tables, as the disk holds them."""
    out: dict[str, list[dict[str, Any]]] = {}
    for table in ("envelopes", "outbox"):
        if isinstance(store, PgStore):
            out[table] = [dict(r) for r in await store._all(f"SELECT * FROM {table}")]
            continue
        assert isinstance(store, SqliteStore)
        cols = [r[1] for r in await store._all(f"PRAGMA table_info({table})")]
        rows = await store._all(f"SELECT {', '.join(cols)} FROM {table}")
        out[table] = [dict(zip(cols, r, strict=True)) for r in rows]
    return out


def slot_keys(data: bytes) -> set[bytes]:
    """The live keys in an epochs.key file (40-byte slots: 8-byte epoch + 32-byte key)."""
    return {data[i + 8 : i + 40] for i in range(0, len(data), 40) if any(data[i : i + 8])}


def wal_file(db: Path) -> tuple[int, int]:
    """Size and inode of the WAL (FileNotFoundError if SQLite deleted it)."""
    st = os.stat(str(db) + "-wal")
    return st.st_size, st.st_ino


async def backend_files(store: Store, home: Path, request: pytest.FixtureRequest) -> bytes:
    """What the store's files hold: SQLite's store files, or PostgreSQL's WAL and the files
    of this test's database (after a CHECKPOINT, so the heap pages are on disk too)."""
    if not isinstance(store, PgStore):
        return store_files(home)
    cluster = request.getfixturevalue("pg_cluster")
    await store._exec("CHECKPOINT")
    oid = await store._val("SELECT oid FROM pg_database WHERE datname = current_database()")
    chunks = []
    for sub in ("pg_wal", f"base/{oid}"):
        root = Path(cluster.data) / sub
        chunks += [p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()]
    return b"".join(chunks)


def store_files(home: Path) -> bytes:
    """store.db, its WAL and its index, concatenated."""
    return b"".join(p.read_bytes() for p in sorted(home.iterdir()) if p.name.startswith("store"))


async def store_ids(store: Store, dest: str) -> list[bytes]:
    return [e.id for e in await store.outbox_batch(dest, 1000)]


async def test_wal_is_kept_after_close(tmp_path: Path) -> None:
    """SQLite would delete the WAL at the last close (freeing its blocks unoverwritten); the
    store asks it to keep the file, so the next open reuses the same blocks."""
    path = tmp_path / "store.db"
    store = SqliteStore(str(path), EpochKeys(str(tmp_path / "epochs.key")))
    await store.open()
    assert store.wal_persistent
    await store.write(WriteBatch(envelopes=(env(os.urandom(16), 10**14),)), 1)
    inode = os.stat(str(path) + "-wal").st_ino
    await store.close()
    size, ino = wal_file(path)
    assert size >= WAL_RESERVE_BYTES and ino == inode
    store = SqliteStore(str(path), EpochKeys(str(tmp_path / "epochs.key")))
    await store.open()
    try:
        assert (await store.counts())["pending_envelopes"] == 1
        assert os.stat(str(path) + "-wal").st_ino == inode
    finally:
        await store.close()


async def test_after_a_delivery_the_few_still_pending_move_to_a_fresh_key(
    tmp_path: Path, make_store: MakeStore
) -> None:
    """A delivered row's remnant must not open with a key that stays alive for the pending."""
    store = make_store(EpochKeys(str(tmp_path / "epochs.key")))
    await store.open()
    try:
        mb = os.urandom(16)
        envs = [env(mb, 10**14, bytes([i]) * 30) for i in range(5)]
        await store.write(WriteBatch(envelopes=tuple(envs)), 1)
        remnants = [r["sealed"] for r in (await raw_rows(store))["envelopes"]]
        assert await store.rotate_epochs(2) == 0  # nothing delivered yet: nothing to do
        await store.write(WriteBatch(delete_envelopes=(envs[0].id,)), 3)  # one delivered
        assert await store.rotate_epochs(4) == 4
        assert all(store.keys.try_open(blob) is None for blob in remnants)
        assert len(store.keys.ids) == 1
        assert await store.pending_for(mb, 10) == envs[1:]
    finally:
        await store.close()


async def test_page_walks_during_a_reseal_miss_nothing(
    tmp_path: Path, make_store: MakeStore
) -> None:
    clock = FakeClock()
    store = make_store(EpochKeys(str(tmp_path / "e.key"), 600_000))
    await store.open()
    try:
        mb = os.urandom(16)
        envs = [env(mb, 10**14, i.to_bytes(2, "big") * 8) for i in range(600)]
        await store.write(WriteBatch(envelopes=tuple(envs)), clock.now_ms())
        clock.advance(600_000)

        async def walk() -> list[Envelope]:
            got: list[Envelope] = []
            seq = 0
            while page := await store.pending_page(mb, seq, 40):
                seq = page[-1][0]
                got += [e for _, e in page]
            return got

        walks = [asyncio.create_task(walk()) for _ in range(6)]
        moved = await store.rotate_epochs(clock.now_ms())  # three chunks, writes in between
        assert moved == 600
        for got in await asyncio.gather(*walks, walk()):
            assert got == envs
    finally:
        await store.close()


async def test_outbox_row_written_while_a_page_is_read_lands_after_the_cursor(
    tmp_path: Path,
) -> None:
    """A row committed while the page query runs (its mailbox's chain starting low) must not
    land below the cursor the page returns: the outbox worker's wake for it may come before
    its next pass, which resumes after that cursor (a stalled queue, seen in the raw-disk
    test)."""
    store = SqliteStore(str(tmp_path / "store.db"), EpochKeys(str(tmp_path / "epochs.key")))
    await store.open()
    try:
        first = env(os.urandom(16), 10**13)
        await store.write(WriteBatch(outbox=(("p", first),)), 1)
        later = env(os.urandom(16), 10**13)
        store._ord_floor[("outbox", later.to)] = 0  # its chain starts below the first row
        real_all = store._all
        writer: list[asyncio.Task[None]] = []

        async def racing_all(sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
            rows = await real_all(sql, args)
            if "FROM outbox WHERE dh" in sql and not writer:
                # the query has its rows; a write commits before the page is returned (or, with
                # the page read under the write lock, waits until the frontier is raised)
                task = asyncio.create_task(store.write(WriteBatch(outbox=(("p", later),)), 2))
                writer.append(task)
                await asyncio.wait({task}, timeout=0.5)
            return rows

        store._all = racing_all  # type: ignore[method-assign]
        page = await store.outbox_page("p", 0, 10)
        store._all = real_all  # type: ignore[method-assign]
        await writer[0]
        seen = [e for _, e in page]
        rest = [e for _, e in await store.outbox_page("p", page[-1][0], 10)]
        assert sorted(e.id for e in seen + rest) == sorted([first.id, later.id])
    finally:
        await store.close()


async def test_outbox_row_for_a_new_mailbox_lands_after_the_read_cursor(store: Store) -> None:
    """The outbox sender resumes a pass after the last row it saw: nothing written later may
    land below it, whichever remote mailbox it is for."""
    for _ in range(20):
        first = env(os.urandom(16), 10**13)
        await store.write(WriteBatch(outbox=(("p", first),)), 1)
        page = await store.outbox_page("p", 0, 10)
        assert [e for _, e in page] == [first]
        later = env(os.urandom(16), 10**13)  # another mailbox: a chain of its own
        await store.write(WriteBatch(outbox=(("p", later),)), 2)
        assert [e for _, e in await store.outbox_page("p", page[-1][0], 10)] == [later]
        await store.write(WriteBatch(delete_outbox=(first.id, later.id)), 3)
