"""PostgreSQL backend of :class:`node.store.Store` (asyncpg), for organisation nodes.

The at-rest design is SQLite's (docs/operations.md §5 "At rest", :mod:`node.sealed_rows`):
every byte about an envelope or outbox row is sealed under an epoch key in one padded blob;
in clear only keyed hashes (re-keyed on re-seal), the per-mailbox random-step order key and the
coarse jittered expiry. Dead tuples, WAL segments, archives and replicas of these tables thus
hold noise once the key that sealed them is destroyed.

**The epoch keys never go into PostgreSQL** (MVCC would keep a "destroyed" key in dead tuples,
the WAL and every replica): they stay in the key file (:class:`node.atrest.EpochKeys`),
overwritten in place, shared by the node processes of one host. Only the *leader* process
rotates, re-seals and destroys keys. Every transaction that seals or re-seals rows takes the
advisory lock :data:`KEYS_LOCK` shared and then re-reads the key file; the leader changes the
file only holding that lock exclusively, so no process seals under a key being destroyed and
each sees the keys another made. A follower that finds no live key makes one under the
exclusive lock too (it never destroys one).

**Order keys across processes**: a write takes a transaction-level advisory lock per order chain
it extends (a recipient mailbox, a remote mailbox, a destination; lock ids are unkeyed hashes
that exist only in the server's memory) and reads the chain's highest stored key, so a row
written later by any process is above every stored row's key. The outbox read frontier (the
highest key ``outbox_page`` returned per destination) is kept in the UNLOGGED table
``outbox_frontier`` under the destination's index hash, so a writer in another process puts new
rows above it too; it is re-keyed at re-seal and emptied when the keys die.

Errors: every asyncpg/PostgreSQL error becomes :class:`StorageError` with PostgreSQL's message
and SQLSTATE (53100, disk full, becomes :class:`node.ballast.DiskFull`); a lost connection is
retried once for idempotent work and otherwise reported as one line. ``synchronous_commit`` is
on: a write acknowledged is on the server's disk. The schema is versioned (``schema_version``,
:data:`MIGRATIONS`). :meth:`PgStore.checkpoint` is a no-op (PostgreSQL checkpoints itself) and
``max_db_mb`` does not apply (quotas in the database are the operator's: docs/operations.md).

Layout: :mod:`node.pg_base` (pool, schema, error translation), :mod:`node.pg_accounts` (the
plain tables), this module (sealed rows, order chains, epoch keys, NOTIFY).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import secrets
import time
from collections.abc import Callable, Collection
from typing import Any

import asyncpg

from federation.clock import Clock
from federation.errors import StorageError
from federation.wire import Envelope

from .atrest import EpochKeys
from .pg_accounts import PgAccounts
from .pg_base import _LOST
from .pg_base import KEYS_LOCK as KEYS_LOCK  # re-exported
from .pg_base import MIGRATIONS as MIGRATIONS
from .pg_base import pg_error as pg_error
from .pg_base import prepare_database as prepare_database
from .sealed_rows import (
    ENV_ID,
    ENV_MB,
    OBX_DEST,
    OBX_ID,
    OBX_MB,
    ORD_START,
    PagedReads,
    coarse_expiry,
    hashes,
    next_ord,
    plan_reseal,
    random_words,
    record,
    unrecord,
)
from .store import (
    ACCOUNTS_SQL,
    AccountInfo,
    PeerRecord,
    WriteBatch,
    account_infos,
    day,
)

log = logging.getLogger("haven.store")

RESEAL_CHUNK = 256
RESEAL_BUSY_SHARE = 0.15  # as SqliteStore: a re-seal yields to live work ...
RESEAL_PACED_FOR_S = 300.0  # ... for at most this long
RESEAL_AFTER_DELIVERY = 1000
NOTIFY_TAGS = 200  # hex tags per NOTIFY payload (200 x 33 bytes < 7,900)
ENV_CHANNEL, OBX_CHANNEL = "haven_env", "haven_obx"

_EMPTY_SQL = "SELECT NOT (EXISTS(SELECT 1 FROM envelopes) OR EXISTS(SELECT 1 FROM outbox))"


def _lock_id(purpose: bytes, value: bytes) -> int:
    """The advisory lock id of one order chain: the same in every process, never stored."""
    digest = hashlib.blake2b(value, digest_size=8, person=purpose).digest()
    return int.from_bytes(digest, "big", signed=True)


def _tags_payloads(tags: Collection[bytes]) -> list[str]:
    """NOTIFY payloads: space-separated hex tags, :data:`NOTIFY_TAGS` at most per payload."""
    hexes = sorted({t.hex() for t in tags})
    return [" ".join(hexes[i : i + NOTIFY_TAGS]) for i in range(0, len(hexes), NOTIFY_TAGS)]


class _NoKey(Exception):
    """A write found no live key under the shared lock (the leader destroyed them all)."""


class PgStore(PagedReads, PgAccounts):
    """Store on an asyncpg pool. ``leader``: this process rotates, re-seals and destroys the
    epoch keys (one leader per key file); the others only seal under them."""

    bus_key: bytes | None = None  # set by the worker supervisor (memory only): NOTIFY tags

    def __init__(
        self,
        dsn: str,
        keys: EpochKeys,
        *,
        leader: bool = True,
        clock: Clock | None = None,
        pool_size: int = 8,
    ) -> None:
        super().__init__(dsn, keys, leader=leader, clock=clock, pool_size=pool_size)
        self._rotate_lock = asyncio.Lock()
        self._serving = False
        self._delivered = False
        self._writes = 0
        self._activity: Callable[[], int] = lambda: self._writes
        # highest order key handed out per (table, chain) in this process: a floor above rows
        # of this process that were deleted since (the table's own maximum covers the others)
        self._ord_floor: dict[tuple[str, bytes], int] = {}
        self._dest_of: dict[bytes, str] = {}  # outbox destination hash -> destination

    async def close(self) -> None:
        """On a serving leader, re-seal what is pending under a fresh key and destroy every
        other key first (as :meth:`SqliteStore.close`); then close the pool. Never raises."""
        if self._pool is None:
            return
        if self._serving:
            self._serving = False
            if self.leader:
                try:
                    await self._reseal_for_shutdown()
                except StorageError as exc:
                    log.warning("keys kept at shutdown: %s", exc)
        await self._close_pool()

    # ---- envelopes and outbox ----------------------------------------------------------------

    def mailbox_tag(self, mailbox: bytes) -> bytes:
        """The mailbox's NOTIFY tag: 16-byte BLAKE2b keyed with :attr:`bus_key`."""
        if self.bus_key is None:
            raise StorageError("no bus key")
        return hashlib.blake2b(
            mailbox, digest_size=16, key=self.bus_key, person=b"haven-mailbox"
        ).digest()

    def dest_tag(self, dest: str) -> bytes:
        """A destination's NOTIFY tag (16-byte BLAKE2b keyed with :attr:`bus_key`)."""
        if self.bus_key is None:
            raise StorageError("no bus key")
        return hashlib.blake2b(
            dest.encode(), digest_size=16, key=self.bus_key, person=b"haven-dest"
        ).digest()

    async def write(self, batch: WriteBatch, now: int) -> None:
        """One group-commit transaction. Rows already stored (under any live key) are not
        stored again (``ON CONFLICT DO NOTHING`` on the id hash). On the leader, a batch that
        leaves nothing pending destroys every key (the next write makes a fresh one)."""
        self._writes += 1
        sealing = bool(batch.envelopes or batch.outbox)
        for attempt in range(5):
            if (sealing and not self.keys.ids) or attempt:
                await self._ensure_key(now)
            try:
                for retry in (0, 1):
                    try:
                        empty = await self._write_tx(batch, now)
                        break
                    except StorageError as exc:
                        if retry or not isinstance(exc.__cause__, _LOST):
                            raise
                        log.info("write: PostgreSQL connection lost, retrying once")
            except _NoKey:
                continue
            if batch.delete_envelopes or batch.delete_outbox:
                self._delivered = True
                if empty and self.leader:
                    await self._destroy_if_empty()
            return
        raise StorageError("write failed: no epoch key stayed live")

    async def _ensure_key(self, now: int) -> None:
        """Make a key if none is live (the exclusive lock: never two processes at once)."""
        async with self._tx(exclusive=True):
            if not self.keys.ids:
                self.keys.current(now)

    async def _write_tx(self, batch: WriteBatch, now: int) -> bool:
        envs, outbox = list(batch.envelopes), list(batch.outbox)
        deleting = bool(batch.delete_envelopes or batch.delete_outbox)
        async with self._tx(exclusive=False) as conn:
            kid = self.keys.newest()
            if (envs or outbox) and kid is None:
                raise _NoKey
            if kid is not None and len(self.keys.ids) > 1:  # a copy may be under an older key
                if envs:
                    dup = await self._present(conn, "envelopes", ENV_ID, [e.id for e in envs])
                    envs = [e for e in envs if e.id not in dup]
                if outbox:
                    dup = await self._present(conn, "outbox", OBX_ID, [e.id for _, e in outbox])
                    outbox = [(d, e) for d, e in outbox if e.id not in dup]
            args: list[Any] = []
            if kid is not None and (envs or outbox):
                args += await self._new_rows(conn, kid, envs, outbox)
            else:
                args += [[]] * 11
            kids = self.keys.ids
            ix = self.keys.index
            args.append([ix(k, ENV_ID, i) for i in batch.delete_envelopes for k in kids])
            args.append([ix(k, OBX_ID, i) for i in batch.delete_outbox for k in kids])
            channels, payloads = self._notifications(envs, outbox)
            args += [channels, payloads, deleting and self.leader]
            return bool(await conn.fetchval(_WRITE_SQL, *args))

    def _notifications(
        self, envs: list[Envelope], outbox: list[tuple[str, Envelope]]
    ) -> tuple[list[str], list[str]]:
        if self.bus_key is None:
            return [], []
        channels, payloads = [], []
        for channel, tags in (
            (ENV_CHANNEL, {self.mailbox_tag(e.to) for e in envs}),
            (OBX_CHANNEL, {self.dest_tag(d) for d, _ in outbox}),
        ):
            for p in _tags_payloads(tags):
                channels.append(channel)
                payloads.append(p)
        return channels, payloads

    async def _new_rows(
        self,
        conn: asyncpg.Connection,
        kid: int,
        envs: list[Envelope],
        outbox: list[tuple[str, Envelope]],
    ) -> list[Any]:
        """Lock the order chains, read their tops, seal: the 11 array arguments of the insert
        part of :data:`_WRITE_SQL` (envelope columns, then outbox columns)."""
        ix, seal, keys = self.keys.index, self.keys.seal, self.keys
        env_mbs = {e.to for e in envs}
        obx_mbs = {e.to for _, e in outbox}
        dests = {d for d, _ in outbox}
        locks = sorted(
            {_lock_id(b"haven-lk-env", mb) for mb in env_mbs}
            | {_lock_id(b"haven-lk-obx", mb) for mb in obx_mbs}
            | {_lock_id(b"haven-lk-dest", d.encode()) for d in dests}
        )
        env_owner = {h: mb for mb in env_mbs for h in hashes(keys, ENV_MB, mb)}
        obx_owner = {h: mb for mb in obx_mbs for h in hashes(keys, OBX_MB, mb)}
        dest_owner = {h: d for d in dests for h in hashes(keys, OBX_DEST, d.encode())}
        tops = await conn.fetch(
            "SELECT * FROM haven_chain_tops($1, $2, $3, $4)",
            locks,
            list(env_owner),
            list(obx_owner),
            list(dest_owner),
        )
        env_top: dict[bytes, int] = {}
        obx_top: dict[bytes, int] = {}
        frontier: dict[str, int] = {}
        for t, h, m in tops:
            if t == 0:
                mb = env_owner[bytes(h)]
                env_top[mb] = max(env_top.get(mb, 0), int(m))
            elif t == 1:
                mb = obx_owner[bytes(h)]
                obx_top[mb] = max(obx_top.get(mb, 0), int(m))
            else:
                d = dest_owner[bytes(h)]
                frontier[d] = max(frontier.get(d, 0), int(m))
        env_ords = self._ords("envelopes", [e.to for e in envs], env_top, [0] * len(envs))
        obx_ords = self._ords(
            "outbox", [e.to for _, e in outbox], obx_top, [frontier.get(d, 0) for d, _ in outbox]
        )
        rand = random_words(len(envs) + len(outbox))
        env_rows = [
            (
                ix(kid, ENV_ID, e.id),
                ix(kid, ENV_MB, e.to),
                o,
                coarse_expiry(e.expires, r),
                seal(kid, record(e, None)),
            )
            for e, o, r in zip(envs, env_ords, rand[: len(envs)], strict=True)
        ]
        dh: dict[str, bytes] = {d: ix(kid, OBX_DEST, d.encode()) for d in dests}
        for d, h in dh.items():
            self._dest_of[h] = d
        obx_rows = [
            (
                ix(kid, OBX_ID, e.id),
                dh[d],
                ix(kid, OBX_MB, e.to),
                o,
                coarse_expiry(e.expires, r),
                seal(kid, record(e, d)),
            )
            for (d, e), o, r in zip(outbox, obx_ords, rand[len(envs) :], strict=True)
        ]
        random.shuffle(env_rows)  # insertion (heap) order says nothing either
        random.shuffle(obx_rows)
        return [list(c) for c in _columns(env_rows, 5)] + [list(c) for c in _columns(obx_rows, 6)]

    def _ords(
        self, table: str, chains: list[bytes], top: dict[bytes, int], low: list[int]
    ) -> list[int]:
        """Order keys for new rows on ``chains`` (in order), each above its chain's stored top,
        this process's floor and ``low`` (the read frontier), by a random step."""
        out = []
        for mb, r, lo in zip(chains, random_words(len(chains)), low, strict=True):
            floor = max(self._ord_floor.get((table, mb), 0), top.get(mb, 0))
            if not floor:
                floor = secrets.randbelow(ORD_START)
            o = next_ord(floor, lo, r)
            self._ord_floor[(table, mb)] = o
            out.append(o)
        if len(self._ord_floor) > 200_000:
            self._ord_floor.clear()  # bounded memory: the stored tops still order the chains
        return out

    async def _present(
        self, conn: asyncpg.Connection, table: str, purpose: bytes, ids: list[bytes]
    ) -> set[bytes]:
        owner = {self.keys.index(k, purpose, i): i for i in set(ids) for k in self.keys.ids}
        rows = await conn.fetch(
            f"SELECT idh FROM {table} WHERE idh = ANY($1::bytea[])", list(owner)
        )
        return {owner[bytes(r[0])] for r in rows}

    async def existing_ids(self, ids: list[bytes]) -> set[bytes]:
        """Which of ``ids`` are stored (under any live key; read again if another process
        changed the keys meanwhile, as :meth:`_page`)."""
        while ids:
            self.keys.reload()
            generation = self.keys.generation
            found = await self._call(
                "read failed", lambda c: self._present(c, "envelopes", ENV_ID, ids)
            )
            self.keys.reload()
            if self.keys.generation == generation:
                return found
        return set()

    async def _page(
        self, table: str, column: str, purpose: bytes, value: bytes, after: int, limit: int
    ) -> list[tuple[int, Envelope]]:
        """One page by index hash; read again if the key file changed meanwhile (another
        process re-sealing rows under hashes this one did not know yet)."""
        while True:
            self.keys.reload()
            generation = self.keys.generation
            owner = hashes(self.keys, purpose, value)
            if not owner:
                return []
            rows = await self._all(
                f"SELECT ord, {column}, sealed FROM {table} WHERE {column} = ANY($1::bytea[]) "
                "AND ord > $2 ORDER BY ord LIMIT $3",
                list(owner),
                after,
                limit,
            )
            self.keys.reload()
            if self.keys.generation == generation:
                return [
                    (int(o), unrecord(self.keys.open(owner[bytes(h)], bytes(s)))[0])
                    for o, h, s in rows
                ]

    async def outbox_page(
        self, dest: str, after_seq: int, limit: int
    ) -> list[tuple[int, Envelope]]:
        """Ordered by ``ord`` (arrival order per remote mailbox). The read and the raise of the
        destination's frontier hold its chain lock, so a row any process writes later goes
        above the last seq returned (a reader resuming after it misses nothing)."""
        lock = _lock_id(b"haven-lk-dest", dest.encode())
        while True:
            async with self._tx() as conn:
                await conn.execute("SET LOCAL synchronous_commit = off")  # UNLOGGED: no fsync
                await conn.execute("SELECT pg_advisory_xact_lock($1)", lock)
                self.keys.reload()
                generation = self.keys.generation
                kid = self.keys.newest()
                if kid is None:
                    return []
                owner = hashes(self.keys, OBX_DEST, dest.encode())
                rows = await conn.fetch(
                    "SELECT ord, dh, sealed FROM outbox WHERE dh = ANY($1::bytea[]) "
                    "AND ord > $2 ORDER BY ord LIMIT $3",
                    list(owner),
                    after_seq,
                    limit,
                )
                self.keys.reload()
                if self.keys.generation != generation:
                    continue
                page = [
                    (int(o), unrecord(self.keys.open(owner[bytes(h)], bytes(s)))[0])
                    for o, h, s in rows
                ]
                if page:
                    dh = self.keys.index(kid, OBX_DEST, dest.encode())
                    self._dest_of[dh] = dest
                    await conn.execute(
                        "INSERT INTO outbox_frontier VALUES ($1, $2) ON CONFLICT (dh) DO UPDATE "
                        "SET ord = greatest(outbox_frontier.ord, excluded.ord)",
                        dh,
                        page[-1][0],
                    )
                return page

    def _open_any(self, sealed: bytes) -> tuple[int, bytes] | None:
        """Open under whichever live key sealed it; a row under a key this process does not
        have yet re-reads the key file once before it counts as undecryptable."""
        got = self.keys.try_open(sealed)
        if got is None and self.keys.reload():
            got = self.keys.try_open(sealed)
        return got

    async def _resolve(
        self, table: str, column: str, counts: list[asyncpg.Record], known: dict[bytes, bytes]
    ) -> dict[bytes, int]:
        """Per-hash counts -> per-value counts: via ``known`` (hash -> value), else by opening
        one row of that hash (its sealed record names it)."""
        out: dict[bytes, int] = {}
        for h, n in counts:
            value = known.get(bytes(h))
            if value is None:
                row = await self._one(f"SELECT sealed FROM {table} WHERE {column}=$1 LIMIT 1", h)
                got = self._open_any(bytes(row[0])) if row else None
                if got is None:
                    continue  # sealed under a destroyed key: unreadable, swept at its expiry
                env, dest = unrecord(got[1])
                value = dest.encode() if column == "dh" and dest is not None else env.to
            out[value] = out.get(value, 0) + int(n)
        return out

    async def list_accounts(self) -> list[AccountInfo]:
        rows = await self._all(ACCOUNTS_SQL)
        counts = await self.pending_counts()
        devices = await self._all("SELECT mailbox, account FROM devices") if counts else []
        return account_infos(rows, devices, counts)

    async def outbox_counts(self) -> dict[str, int]:
        counts = await self._all("SELECT dh, count(*) FROM outbox GROUP BY dh")
        known = {h: d.encode() for h, d in self._dest_of.items()}
        resolved = await self._resolve("outbox", "dh", counts, known)
        for value in resolved:
            for h in hashes(self.keys, OBX_DEST, value):
                self._dest_of[h] = value.decode()
        return {v.decode(): n for v, n in resolved.items()}

    async def outbox_destinations(self) -> list[str]:
        return list(await self.outbox_counts())

    async def pending_counts(self) -> dict[bytes, int]:
        counts = await self._all("SELECT mbh, count(*) FROM envelopes GROUP BY mbh")
        if not counts:
            return {}
        self.keys.reload()
        known = {h: mb for mb in await self.all_mailboxes() for h in hashes(self.keys, ENV_MB, mb)}
        return await self._resolve("envelopes", "mbh", counts, known)

    async def sweep_expired(self, now: int) -> int:
        """Delete rows whose sealed exact expiry has passed (the clear ``exp`` only selects
        candidates). A row no live key opens is deleted only by the leader: a follower may
        just not have the key yet."""
        n = 0
        for table in ("envelopes", "outbox"):
            rows = await self._all(f"SELECT idh, sealed FROM {table} WHERE exp <= $1", now)
            gone = []
            for idh, sealed in rows:
                got = self._open_any(bytes(sealed))
                if (got is None and self.leader) or (
                    got is not None and unrecord(got[1])[0].expires <= now
                ):
                    gone.append(bytes(idh))
            if gone:
                n += await self._exec(f"DELETE FROM {table} WHERE idh = ANY($1::bytea[])", gone)
                self._delivered = True
        await self._exec("DELETE FROM invites WHERE expires <= $1", now)
        return n

    # ---- epoch keys (leader only) ------------------------------------------------------------

    async def begin(self, clock: Clock) -> int:
        """The node starts serving. On the leader as :meth:`SqliteStore.begin`; a follower
        only takes the clock (it never rotates or destroys keys)."""
        self.clock = clock
        self._serving = True
        return await self.rotate_epochs(clock.now_ms())

    async def rotate_epochs(self, now: int) -> int:
        """As :meth:`SqliteStore.rotate_epochs`, on the leader; a follower re-reads the key
        file and returns 0."""
        if not self.leader:
            self.keys.reload()
            return 0
        async with self._rotate_lock:
            async with self._tx(exclusive=True) as conn:
                if await self._destroy_if_empty_locked(conn) or not self.keys.ids:
                    self._delivered = False
                    return 0
                current = self.keys.current(now)
                old = [k for k in self.keys.ids if k != current]
                if not old and self._delivered and await self._pending_at_most(conn):
                    current = self.keys.fresh(now)
                    old = [k for k in self.keys.ids if k != current]
                self._delivered = False
            if not old:
                return 0
            return await self._reseal_into(current, old)

    async def _pending_at_most(self, conn: asyncpg.Connection) -> bool:
        n = RESEAL_AFTER_DELIVERY
        total = await conn.fetchval(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM envelopes LIMIT $1) a) + "
            "(SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT $1) b)",
            n + 1,
        )
        return int(total) <= n

    async def _destroy_if_empty(self) -> bool:
        async with self._tx(exclusive=True) as conn:
            return await self._destroy_if_empty_locked(conn)

    async def _destroy_if_empty_locked(self, conn: asyncpg.Connection) -> bool:
        """Nothing pending: no key needs to live (KEYS_LOCK held exclusively)."""
        if self.keys.ids and await conn.fetchval(_EMPTY_SQL):
            await conn.execute("DELETE FROM outbox_frontier")
            self.keys.destroy_many(self.keys.ids)
            self._dest_of.clear()
            return True
        return False

    async def _reseal_for_shutdown(self) -> None:
        async with self._rotate_lock:
            async with self._tx(exclusive=True) as conn:
                if await self._destroy_if_empty_locked(conn) or not self.keys.ids:
                    return
                fresh = self.keys.fresh(self.clock.now_ms())
                old = [k for k in self.keys.ids if k != fresh]
            await self._reseal_into(fresh, old)

    async def _reseal_into(self, target: int, old: list[int]) -> int:
        """Re-seal every row not under ``target`` in chunks (every process seals new rows under
        ``target`` already: it was made under the exclusive lock), then, holding the lock
        exclusively, re-key the outbox frontier and destroy ``old``."""
        moved = 0
        for table in ("envelopes", "outbox"):
            moved += await self._reseal_table(table, target)
        async with self._tx(exclusive=True) as conn:
            marks = await conn.fetch("SELECT dh, ord FROM outbox_frontier")
            await conn.execute("DELETE FROM outbox_frontier")
            keep = [
                (self.keys.index(target, OBX_DEST, self._dest_of[bytes(h)].encode()), int(o))
                for h, o in marks
                if bytes(h) in self._dest_of
            ]
            if keep:
                await conn.execute(
                    "INSERT INTO outbox_frontier SELECT * FROM unnest($1::bytea[], $2::bigint[]) "
                    "ON CONFLICT (dh) DO UPDATE "
                    "SET ord = greatest(outbox_frontier.ord, excluded.ord)",
                    [h for h, _ in keep],
                    [o for _, o in keep],
                )
            self.keys.destroy_many([k for k in old if k in self.keys.ids])
            self._dest_of = {h: d for h, d in self._dest_of.items() if h in {k[0] for k in keep}}
            await self._destroy_if_empty_locked(conn)
        return moved

    async def _reseal_table(self, table: str, target: int) -> int:
        """Every row of ``table`` not under ``target``, by id hash, :data:`RESEAL_CHUNK` rows
        per transaction; while live work goes on, at most :data:`RESEAL_BUSY_SHARE` of the
        time (as SqliteStore). Rows re-sealed get new id hashes and may be met again further
        on: they are under ``target`` by then and skipped."""
        after, moved, began = b"", 0, time.monotonic()
        while True:
            work, t0 = self._activity(), time.monotonic()
            async with self._tx(exclusive=False) as conn:
                rows = await conn.fetch(
                    f"SELECT idh, sealed FROM {table} WHERE idh > $1 ORDER BY idh LIMIT $2 "
                    "FOR UPDATE",
                    after,
                    RESEAL_CHUNK,
                )
                if not rows:
                    return moved
                after = bytes(rows[-1][0])
                moved += await self._store_resealed(
                    conn, table, [(bytes(a), bytes(b)) for a, b in rows], target, None
                )
            t1 = time.monotonic()
            if self._activity() != work and t1 - began < RESEAL_PACED_FOR_S:
                await asyncio.sleep((t1 - t0) * (1 / RESEAL_BUSY_SHARE - 1))

    async def _store_resealed(
        self,
        conn: asyncpg.Connection,
        table: str,
        rows: list[tuple[bytes, bytes]],
        target: int | None,
        dest: str | None,
    ) -> int:
        """Rewrite ``(idh, sealed)`` rows under ``target`` (or each under its own key) with
        new index hashes; delete those no live key opens. Returns the rows rewritten."""
        planned, dead = plan_reseal(self.keys, table, rows, target, dest)
        for _, values, _, d in planned:
            if d is not None:
                self._dest_of[values[1]] = d
        if dead:
            await conn.execute(f"DELETE FROM {table} WHERE idh = ANY($1::bytea[])", dead)
        if not planned:
            return 0
        olds = [k for k, _, _, _ in planned]
        cols = list(_columns([(*v, blob) for _, v, blob, _ in planned], len(planned[0][1]) + 1))
        # a copy of the same envelope already under the new hash: the re-sealed row replaces it
        await conn.execute(
            f"DELETE FROM {table} WHERE idh = ANY($1::bytea[]) AND NOT idh = ANY($2::bytea[])",
            cols[0],
            olds,
        )
        if table == "envelopes":
            sql = (
                "UPDATE envelopes AS t SET idh=u.idh, mbh=u.mbh, sealed=u.sealed FROM "
                "unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::bytea[]) "
                "AS u(old, idh, mbh, sealed) "
                "WHERE t.idh = u.old"
            )
        else:
            sql = (
                "UPDATE outbox AS t SET idh=u.idh, dh=u.dh, mbh=u.mbh, sealed=u.sealed FROM "
                "unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::bytea[], $5::bytea[]) "
                "AS u(old, idh, dh, mbh, sealed) WHERE t.idh = u.old"
            )
        await conn.execute(sql, olds, *cols)
        return len(planned)

    def set_activity(self, counter: Callable[[], int]) -> None:
        self._activity = counter

    async def checkpoint(self) -> None:
        """A no-op: PostgreSQL checkpoints on its own (docs/operations.md)."""

    async def rename_peer(self, old_id: str, new: PeerRecord) -> None:
        """Follow a signed key rotation: move the pin and re-seal the queued envelopes for the
        new id (under the newest key: a rotation in progress then has nothing to miss)."""
        async with self._tx(exclusive=False) as conn:
            await conn.execute("DELETE FROM peers WHERE node_id=$1", old_id)
            await conn.execute(
                "INSERT INTO peers (node_id, url, host, last_seen) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (node_id) DO UPDATE SET "
                "url=excluded.url, host=excluded.host, last_seen=excluded.last_seen",
                new.node_id,
                new.url,
                new.host,
                day(new.last_seen),
            )
            await conn.execute(
                "UPDATE peer_hosts SET node_id=$1 WHERE node_id=$2", new.node_id, old_id
            )
            owner = list(hashes(self.keys, OBX_DEST, old_id.encode()))
            rows = await conn.fetch(
                "SELECT idh, sealed FROM outbox WHERE dh = ANY($1::bytea[]) FOR UPDATE", owner
            )
            if rows:
                await self._store_resealed(
                    conn,
                    "outbox",
                    [(bytes(a), bytes(b)) for a, b in rows],
                    self.keys.newest(),
                    new.node_id,
                )


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows -> one list per column (``width`` columns; empty lists for no rows)."""
    return [[r[i] for r in rows] for i in range(width)]


# One group commit in one statement: inserts (deduped by id hash), deletes, notifications,
# and (leader) whether the tables are empty afterwards.
_WRITE_SQL = """
WITH e AS (
  INSERT INTO envelopes (idh, mbh, ord, exp, sealed)
  SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bigint[], $4::bigint[], $5::bytea[])
  ON CONFLICT (idh) DO NOTHING RETURNING 1
), o AS (
  INSERT INTO outbox (idh, dh, mbh, ord, exp, sealed)
  SELECT * FROM unnest($6::bytea[], $7::bytea[], $8::bytea[], $9::bigint[], $10::bigint[],
                       $11::bytea[])
  ON CONFLICT (idh) DO NOTHING RETURNING 1
), de AS (
  DELETE FROM envelopes WHERE idh = ANY($12::bytea[]) RETURNING 1
), dob AS (
  DELETE FROM outbox WHERE idh = ANY($13::bytea[]) RETURNING 1
)
SELECT
  -- $16: whether nothing is pending after this commit (the statement sees the tables as
  -- before it: empty = nothing inserted and every row left is one this commit deletes)
  $16::boolean AND (SELECT count(*) FROM e) = 0 AND (SELECT count(*) FROM o) = 0
    AND NOT EXISTS (SELECT 1 FROM envelopes WHERE NOT idh = ANY($12::bytea[]))
    AND NOT EXISTS (SELECT 1 FROM outbox WHERE NOT idh = ANY($13::bytea[])),
  (SELECT count(*) FROM de), (SELECT count(*) FROM dob),
  (SELECT count(pg_notify(c, p)) FROM unnest($14::text[], $15::text[]) AS n(c, p))
"""
