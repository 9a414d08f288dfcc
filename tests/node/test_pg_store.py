"""PostgreSQL backend specifics (node/pg_store.py): migrations, error translation, several
processes sharing one database and one key file, NOTIFY hooks.

The whole store contract (tests/node/test_store_contract.py) and the operator methods
(tests/node/test_store_accounts.py) run on PostgreSQL too, through the ``store`` fixture.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from federation.clock import FakeClock
from federation.errors import StorageError
from federation.wire import Envelope
from node.atrest import EpochKeys
from node.ballast import DiskFull
from node.pg_store import MIGRATIONS, PgStore, pg_error, prepare_database
from node.store import WriteBatch

EPOCH = 600_000


def env(to: bytes, body: bytes = b"x" * 100) -> Envelope:
    return Envelope(os.urandom(16), to, 10**14, body)


@pytest.fixture
async def pair(pg_dsn: str, tmp_path: Path) -> AsyncIterator[tuple[PgStore, PgStore]]:
    """A leader and a follower: two processes' stores on one database and one key file."""
    path = str(tmp_path / "epochs.key")
    leader = PgStore(pg_dsn, EpochKeys(path, EPOCH), leader=True)
    follower = PgStore(pg_dsn, EpochKeys(path, EPOCH), leader=False)
    await leader.open()
    await follower.open()
    yield leader, follower
    await follower.close()
    await leader.close()


async def test_migrations_fresh_reopen_and_newer(pg_dsn: str, tmp_path: Path) -> None:
    keys = EpochKeys(str(tmp_path / "e.key"))
    assert await prepare_database(pg_dsn) == len(MIGRATIONS)
    store = PgStore(pg_dsn, keys)
    await store.open()  # already migrated: nothing to do, no error
    try:
        assert await store.schema_version() == len(MIGRATIONS)
        await store.create_account("alice", 1)
        await store._exec("INSERT INTO schema_version VALUES ($1)", len(MIGRATIONS) + 1)
    finally:
        await store.close()
    again = PgStore(pg_dsn, keys)
    with pytest.raises(StorageError, match="newer than this software"):
        await again.open()
    with pytest.raises(StorageError, match="newer"):
        await prepare_database(pg_dsn)


async def test_errors_carry_postgres_message_and_sqlstate_and_the_pool_stays_usable(
    pair: tuple[PgStore, PgStore],
) -> None:
    store = pair[0]
    mb = os.urandom(16)
    await store.add_device("alice", mb, b"k" * 32)
    with pytest.raises(StorageError, match=r"duplicate key.*\[SQLSTATE 23505\]"):
        await store.add_device("alice", mb, b"k" * 32)
    assert (await store.get_device(mb)) is not None  # usable afterwards
    full = pg_error("write failed", asyncpg.exceptions.DiskFullError("could not extend file"))
    assert isinstance(full, DiskFull) and "53100" in str(full)


async def test_a_lost_connection_is_retried(pg_dsn: str, tmp_path: Path) -> None:
    store = PgStore(pg_dsn, EpochKeys(str(tmp_path / "e.key")))
    await store.open()
    try:
        mb = os.urandom(16)
        await store.write(WriteBatch(envelopes=(env(mb),)), 1)
        admin = await asyncpg.connect(pg_dsn)
        try:  # the server ends every connection of the store's pool
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'haven' AND pid <> pg_backend_pid()"
            )
        finally:
            await admin.close()
        assert len(await store.pending_for(mb, 10)) == 1
        await store.write(WriteBatch(envelopes=(env(mb),)), 2)
        assert (await store.counts())["pending_envelopes"] == 2
    finally:
        await store.close()


async def test_a_bad_login_fails_in_one_line_without_the_password(pg_dsn: str) -> None:
    bad = pg_dsn.replace("postgres@", "nobody:s3cret@", 1)
    with pytest.raises(StorageError) as info:
        await prepare_database(bad)
    assert "s3cret" not in str(info.value) and "SQLSTATE" in str(info.value)
    port_closed = pg_dsn.rsplit(":", 1)[0] + ":1/x"
    with pytest.raises(StorageError, match="connection failed") as info:
        await prepare_database(port_closed)
    assert "127.0.0.1" not in str(info.value)


async def test_follower_writes_stay_readable_across_the_leaders_rotations(
    pair: tuple[PgStore, PgStore], tmp_path: Path
) -> None:
    leader, follower = pair
    clock = FakeClock()
    key_file = tmp_path / "epochs.key"
    mb = os.urandom(16)
    written: list[Envelope] = []
    seen_keys: set[bytes] = set()
    for _ in range(4):
        batch = [env(mb, os.urandom(200)) for _ in range(3)]
        await follower.write(WriteBatch(envelopes=tuple(batch)), clock.now_ms())
        written += batch
        data = key_file.read_bytes()
        seen_keys |= {data[i + 8 : i + 40] for i in range(0, len(data), 40) if any(data[i : i + 8])}
        clock.advance(EPOCH)
        await leader.rotate_epochs(clock.now_ms())  # re-seals under this epoch's key
        assert len(leader.keys.ids) == 1
        assert await follower.pending_for(mb, 100) == written  # follower reloads the keys
        assert await leader.pending_for(mb, 100) == written
    # every key but the live one is gone from the file
    data = key_file.read_bytes()
    live = {data[i + 8 : i + 40] for i in range(0, len(data), 40) if any(data[i : i + 8])}
    assert len(live) == 1 and len(seen_keys - live) >= 3
    assert not (seen_keys - live) & {data[i : i + 32] for i in range(len(data) - 31)}
    # the follower never destroys keys; the leader does once nothing is pending
    await follower.write(WriteBatch(delete_envelopes=tuple(e.id for e in written)), 1)
    assert follower.keys.ids and any(key_file.read_bytes())
    await leader.rotate_epochs(clock.now_ms())
    assert not any(key_file.read_bytes())
    # with every key gone, a follower's write makes one (under the lock) that the leader reads
    later = env(mb)
    await follower.write(WriteBatch(envelopes=(later,)), clock.now_ms())
    assert await leader.pending_for(mb, 10) == [later]


async def test_writes_during_a_rotation_by_another_process_lose_nothing(
    pair: tuple[PgStore, PgStore],
) -> None:
    leader, follower = pair
    clock = FakeClock()
    mb = os.urandom(16)
    first = [env(mb, i.to_bytes(2, "big") * 8) for i in range(600)]
    await leader.write(WriteBatch(envelopes=tuple(first)), clock.now_ms())
    clock.advance(EPOCH)

    async def keep_writing() -> list[Envelope]:
        out = []
        for _ in range(20):
            e = env(mb)
            await follower.write(WriteBatch(envelopes=(e,)), clock.now_ms())
            out.append(e)
        return out

    moved, more = await asyncio.gather(leader.rotate_epochs(clock.now_ms()), keep_writing())
    assert moved >= 600 and len(leader.keys.ids) == 1
    got = await follower.pending_for(mb, 1000)
    assert sorted(e.id for e in got) == sorted(e.id for e in first + more)


async def test_concurrent_writers_order_keys_stay_above_every_cursor(
    pair: tuple[PgStore, PgStore],
) -> None:
    """Two processes write one mailbox and one destination; a reader resuming after the last
    seq it saw finds every new row, also after the rows it saw were deleted."""
    a, b = pair
    mb, cursor = os.urandom(16), 0
    dest_cursor = 0
    for i in range(15):
        ea, eb = env(mb), env(mb)
        oa, ob = env(os.urandom(16)), env(os.urandom(16))  # new remote mailboxes each time
        await asyncio.gather(
            a.write(WriteBatch(envelopes=(ea,), outbox=(("peer", oa),)), i),
            b.write(WriteBatch(envelopes=(eb,), outbox=(("peer", ob),)), i),
        )
        page = await a.pending_page(mb, cursor, 100)
        assert {e.id for _, e in page} == {ea.id, eb.id}
        cursor = page[-1][0]
        reader = a if i % 2 else b
        opage = await reader.outbox_page("peer", dest_cursor, 100)
        assert {e.id for _, e in opage} == {oa.id, ob.id}
        dest_cursor = opage[-1][0]
        # delivered: the rows the cursors passed are deleted; the chains must not fall back
        await b.write(WriteBatch(delete_outbox=(oa.id, ob.id)), i)


async def test_writes_notify_mailbox_and_destination_tags(pair: tuple[PgStore, PgStore]) -> None:
    leader, follower = pair
    key = os.urandom(32)
    leader.bus_key = follower.bus_key = key
    got: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    listener = await asyncpg.connect(follower.dsn)
    try:
        for channel in ("haven_env", "haven_obx"):
            await listener.add_listener(
                channel, lambda _c, _p, ch, payload: got.put_nowait((ch, payload))
            )
        mbs = [os.urandom(16) for _ in range(3)]
        await leader.write(
            WriteBatch(
                envelopes=tuple(env(mb) for mb in mbs + mbs),
                outbox=(("peer-a", env(os.urandom(16))), ("peer-b", env(os.urandom(16)))),
            ),
            1,
        )
        messages = [await asyncio.wait_for(got.get(), 10) for _ in range(2)]
        by_channel = dict(messages)
        assert set(by_channel["haven_env"].split()) == {leader.mailbox_tag(m).hex() for m in mbs}
        assert set(by_channel["haven_obx"].split()) == {
            leader.dest_tag(d).hex() for d in ("peer-a", "peer-b")
        }
        assert all(len(p) <= 7900 for p in by_channel.values())
        assert not any(m.hex() in " ".join(by_channel.values()) for m in mbs)  # tags only
        # many mailboxes: several payloads, each within the limit
        many = [os.urandom(16) for _ in range(450)]
        await follower.write(WriteBatch(envelopes=tuple(env(m) for m in many)), 2)
        tags: set[str] = set()
        while len(tags) < 450:
            ch, payload = await asyncio.wait_for(got.get(), 10)
            assert ch == "haven_env" and len(payload) <= 7900
            tags |= set(payload.split())
        assert tags == {follower.mailbox_tag(m).hex() for m in many}
    finally:
        await listener.close()
