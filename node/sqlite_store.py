"""SQLite backend of :class:`node.store.Store` (the embedded default).

Settings follow the measured remnant study (docs/threat-model.md): WAL, ``synchronous=FULL``
(nothing acknowledged is lost on power loss), ``secure_delete=ON`` (not FAST),
``temp_store=MEMORY``. The WAL is never truncated (truncation frees its blocks without overwriting
them; a positive ``journal_size_limit`` and ``wal_checkpoint(TRUNCATE)`` both truncate), so:
``journal_size_limit=-1`` and ``wal_checkpoint(RESTART)``, driven by the sweeper's idle timer
rather than per delete. RESTART makes the next writer
start again at the WAL's beginning, so the WAL stays bounded. The WAL is pre-sized at open
(:data:`WAL_RESERVE_BYTES`, real blocks) so that a disk which fills later still has room in it
for a delete transaction.

At rest (schema v3, docs/operations.md §5 "At rest"): every byte about an envelope or outbox row
(id, mailbox, destination, exact expiry, body) is sealed under an epoch key (:mod:`node.atrest`)
in one blob padded to a size bucket. In clear, each row keeps only: keyed hashes (under a subkey
of the epoch key that sealed it) of its id (primary key: random order, dedupe), its mailbox and,
in the outbox, its destination (lookups, re-keyed whenever the row is re-sealed); an order key
``ord`` that increases within one mailbox by random steps from a random start (arrival order for
delivery, unrelated across mailboxes); and a coarse expiry ``exp`` (rounded down to
:data:`EXPIRY_GRAIN_MS`, minus a per-row random jitter below the grain) that the sweeper uses to
find candidates before it checks the sealed exact expiry. No column is equal across the rows of
one send, and each row sits at a random rowid (inserted in shuffled order), so neither rowid order
nor page adjacency groups them (a random-rowid table measured 2x faster than ``WITHOUT ROWID`` for
these kilobyte rows).

Errors: every ``sqlite3.Error`` becomes a :class:`StorageError` carrying SQLite's own message
(SQLITE_FULL becomes :class:`node.ballast.DiskFull`); the connection stays usable afterwards.

The schema is versioned: :data:`MIGRATIONS` holds one entry per version, applied in order.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import platform
import random
import secrets
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any, TypeVar, cast

import aiosqlite

from federation.clock import Clock, SystemClock
from federation.errors import StorageError
from federation.wire import Envelope

from .atrest import EpochKeys
from .ballast import DiskFull
from .sealed_rows import (
    ENV_ID,
    ENV_MB,
    OBX_DEST,
    OBX_ID,
    OBX_MB,
    ORD_START,
    ORD_STEP,
    PagedReads,
    coarse_expiry,
    plan_reseal,
)
from .sealed_rows import EXPIRY_GRAIN_MS as EXPIRY_GRAIN_MS  # re-exported
from .sealed_rows import random_words as _random_words
from .sealed_rows import record as _record
from .sealed_rows import unrecord as _unrecord
from .store import (
    ACCOUNTS_SQL,
    AccountInfo,
    DeviceRecord,
    InviteInfo,
    PeerRecord,
    WriteBatch,
    account_infos,
    day,
    invite_infos,
    revoke_prefix,
)

log = logging.getLogger("haven.store")

T = TypeVar("T")

WAL_RESERVE_BYTES = 8 * 2**20  # the WAL is pre-sized to this at open and never truncated
SQLITE_FULL = 13

MAX_CHAINS = 200_000  # in-memory order floors kept (one per mailbox written to)
RESEAL_CHUNK = 256  # rows per re-sealing transaction (writes interleave between chunks)
# While live writes are waiting, a re-seal takes smaller steps and at most this share of the
# store's time (it sleeps between chunks), so a big backlog's rotation does not slow delivery
# (bench ``growth``) ...
RESEAL_BUSY_CHUNK = 64
RESEAL_BUSY_SHARE = 0.15
# ... but only for this long; then it runs at full speed so the old key still dies within
# about one epoch (10 min) even under constant load.
RESEAL_PACED_FOR_S = 300.0
# After a delivery, if at most this many rows are still pending, the next sweep re-seals them
# under a fresh key and destroys the one the delivered rows were sealed under (their remnants
# then die within seconds, not at the end of the epoch). Above it, the epoch's end does it.
RESEAL_AFTER_DELIVERY = 1000


def _is_full(exc: sqlite3.Error) -> bool:
    code = int(getattr(exc, "sqlite_errorcode", 0) or 0) & 0xFF
    return code == SQLITE_FULL or "disk is full" in str(exc)


def storage_error(what: str, exc: sqlite3.Error) -> StorageError:
    """The real SQLite message, as :class:`DiskFull` when it is a lack of space."""
    cls = DiskFull if _is_full(exc) else StorageError
    name = getattr(exc, "sqlite_errorname", "")
    return cls(f"{what}: {exc} [{name}]" if name else f"{what}: {exc}")


MIGRATIONS: list[str] = [
    # version 1
    """
    CREATE TABLE accounts (name TEXT PRIMARY KEY, created INTEGER NOT NULL);
    CREATE TABLE invites (token_hash BLOB PRIMARY KEY, name TEXT NOT NULL,
                          expires INTEGER NOT NULL);
    CREATE TABLE devices (mailbox BLOB PRIMARY KEY, account TEXT NOT NULL,
                          auth_key BLOB NOT NULL);
    CREATE INDEX devices_account ON devices(account);
    CREATE TABLE device_lists (account TEXT PRIMARY KEY, version INTEGER NOT NULL,
                               blob BLOB NOT NULL, sig BLOB NOT NULL);
    CREATE TABLE otks (mailbox BLOB NOT NULL, key_id TEXT NOT NULL, key TEXT NOT NULL,
                       PRIMARY KEY (mailbox, key_id));
    CREATE TABLE fallback (mailbox BLOB PRIMARY KEY, key_id TEXT NOT NULL, key TEXT NOT NULL);
    CREATE TABLE envelopes (id BLOB NOT NULL UNIQUE, mailbox BLOB NOT NULL,
                            expires INTEGER NOT NULL, epoch INTEGER NOT NULL, sealed BLOB NOT NULL);
    CREATE INDEX envelopes_mailbox ON envelopes(mailbox);
    CREATE INDEX envelopes_expires ON envelopes(expires);
    CREATE TABLE outbox (id BLOB NOT NULL UNIQUE, dest TEXT NOT NULL, mailbox BLOB NOT NULL,
                         expires INTEGER NOT NULL, epoch INTEGER NOT NULL, sealed BLOB NOT NULL);
    CREATE INDEX outbox_dest ON outbox(dest);
    CREATE INDEX outbox_expires ON outbox(expires);
    CREATE TABLE peers (node_id TEXT PRIMARY KEY, url TEXT NOT NULL, host TEXT NOT NULL,
                        last_seen INTEGER NOT NULL);
    CREATE INDEX peers_host ON peers(host);
    """,
    # version 2: invites minted by a signed-in device to link another device ("link" kind)
    """
    ALTER TABLE invites ADD COLUMN kind TEXT NOT NULL DEFAULT 'invite';
    """,
    # version 3: nothing linkable in clear (module docstring); rows copied and re-sealed by
    # SqliteStore._migrate_v3 between V3_CREATE and V3_SWAP
    "v3",
    # version 4: operator tools (docs/cli.md "Accounts and invites"): disabled accounts,
    # per-account mailbox quotas, invites good for several uses
    """
    ALTER TABLE accounts ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE accounts ADD COLUMN quota INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE invites ADD COLUMN uses INTEGER NOT NULL DEFAULT 1;
    """,
    # version 5: relay service (node/relay.py): one row per label; ``client`` is "" until the
    # invite's token (only its hash is kept) is used, then the bound client node id
    """
    CREATE TABLE relay_clients (label TEXT PRIMARY KEY, token_hash BLOB NOT NULL,
                                client TEXT NOT NULL DEFAULT '', quota INTEGER NOT NULL,
                                expires INTEGER NOT NULL, created INTEGER NOT NULL);
    """,
    # version 6: hosts a peer had before a signed locator change (docs/protocol.md §12.5)
    """
    CREATE TABLE peer_hosts (host TEXT PRIMARY KEY, node_id TEXT NOT NULL);
    """,
    # version 7: a relay client's latest authorisation statement (docs/protocol.md §12.4), kept
    # so held mode works after a relay restart before the client links again; x'' for none
    """
    ALTER TABLE relay_clients ADD COLUMN auth BLOB NOT NULL DEFAULT x'';
    """,
    # version 8: ``created`` of the last locator change followed for the peer (0: none), so an
    # older statement replayed later cannot move the pin back (docs/protocol.md §12.5)
    """
    ALTER TABLE peers ADD COLUMN moved INTEGER NOT NULL DEFAULT 0;
    """,
]

V3_CREATE = """
CREATE TABLE envelopes_v3 (k INTEGER PRIMARY KEY, idh BLOB NOT NULL UNIQUE, mbh BLOB NOT NULL,
                           ord INTEGER NOT NULL, exp INTEGER NOT NULL, sealed BLOB NOT NULL);
CREATE TABLE outbox_v3 (k INTEGER PRIMARY KEY, idh BLOB NOT NULL UNIQUE, dh BLOB NOT NULL,
                        mbh BLOB NOT NULL, ord INTEGER NOT NULL, exp INTEGER NOT NULL,
                        sealed BLOB NOT NULL);
"""
V3_SWAP = """
DROP TABLE envelopes;
DROP TABLE outbox;
ALTER TABLE envelopes_v3 RENAME TO envelopes;
ALTER TABLE outbox_v3 RENAME TO outbox;
CREATE INDEX envelopes_mailbox ON envelopes(mbh, ord);
CREATE INDEX envelopes_expiry ON envelopes(exp);
CREATE INDEX outbox_dest ON outbox(dh, ord);
CREATE INDEX outbox_mailbox ON outbox(mbh, ord);
CREATE INDEX outbox_expiry ON outbox(exp);
"""


SQLITE_FCNTL_PERSIST_WAL = 10


def _persist_wal(conn: object, path: str) -> bool:
    """Ask SQLite to keep the WAL file when the last connection closes (it deletes it by
    default, which frees its blocks without overwriting them). Python's sqlite3 has no
    ``file_control``, so this calls the C API through ctypes on the ``sqlite3*`` handle, which
    CPython keeps right after the object header of a connection (3.8 to 3.13). The handle is
    checked against this store's file name first; anywhere else this is a no-op returning False
    and the node relies on the WAL's stale frames being sealed noise."""
    if conn is None or platform.python_implementation() != "CPython":
        return False
    if not (3, 8) <= sys.version_info[:2] <= (3, 13):
        return False
    try:
        import _sqlite3

        lib = ctypes.CDLL(_sqlite3.__file__)
        file_control = lib.sqlite3_file_control
        file_control.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p]
        db_filename = lib.sqlite3_db_filename
        db_filename.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        db_filename.restype = ctypes.c_char_p
        handle = ctypes.c_void_p.from_address(id(conn) + object.__basicsize__).value
        if not handle:
            return False
        name = db_filename(handle, b"main")
        if name is None or os.path.realpath(name.decode()) != os.path.realpath(path):
            return False
        on = ctypes.c_int(1)
        if file_control(handle, b"main", SQLITE_FCNTL_PERSIST_WAL, ctypes.byref(on)) != 0:
            return False
        check = ctypes.c_int(-1)
        file_control(handle, b"main", SQLITE_FCNTL_PERSIST_WAL, ctypes.byref(check))
        return check.value == 1
    except (OSError, AttributeError, ValueError, ImportError) as exc:
        log.debug("WAL not kept persistent: %s", exc)
        return False


# ---- on the connection's thread ----------------------------------------------------------
# Every statement runs to its end (or is reset) in the hop that stepped it, and no cursor leaves
# the thread. A statement stepped but not reset stays "in progress": if it writes (the
# wal_checkpoint and journal_mode pragmas, INSERT .. RETURNING) every COMMIT on the connection
# fails with "SQL statements in progress" [SQLITE_BUSY]; if it reads, a checkpoint fails with
# "database table is locked" [SQLITE_LOCKED]. A cursor handed back to the event loop is not
# enough to avoid it: aiosqlite's worker keeps the last result alive until its next job is done,
# and the event loop drops its own reference whenever it gets to it.


def _run(conn: sqlite3.Connection, sql: str, args: tuple[Any, ...]) -> tuple[list[Any], int]:
    """One statement to its end: its rows and its rowcount (its cursor closed)."""
    cur = conn.execute(sql, args)
    try:
        return cur.fetchall(), cur.rowcount
    finally:
        cur.close()


def _run_script(conn: sqlite3.Connection, sql: str) -> None:
    """Each statement of ``sql`` (no transaction of its own: the caller's holds)."""
    for stmt in sql.split(";"):
        if stmt.strip():
            _run(conn, stmt, ())


def _run_many(conn: sqlite3.Connection, sql: str, rows: list[tuple[Any, ...]]) -> None:
    conn.executemany(sql, rows).close()


def _run_tx(
    conn: sqlite3.Connection, statements: list[tuple[str, list[tuple[Any, ...]]]], check: bool
) -> bool:
    """BEGIN IMMEDIATE, the statements, COMMIT (fsynced: synchronous=FULL), on the store's
    thread. On an error the transaction is rolled back if SQLite has not done so itself; a
    failed ROLLBACK never hides the error that caused it."""
    _run(conn, "BEGIN IMMEDIATE", ())
    try:
        for sql, rows in statements:
            if rows:
                _run_many(conn, sql, rows)
        _run(conn, "COMMIT", ())
    except BaseException:
        try:
            if conn.in_transaction:
                _run(conn, "ROLLBACK", ())
        except sqlite3.Error as exc:
            log.warning("rollback failed: %s", exc)
        raise
    if not check:
        return False
    rows, _ = _run(conn, _EMPTY_SQL, ())
    return not (rows and rows[0][0])


def _redeem_tx(conn: sqlite3.Connection, token_hash: bytes, now: int) -> tuple[Any, ...] | None:
    """One use of an invite, in one transaction: decrement, delete at zero or once expired
    (the caller refuses it then), return ``(name, expires, kind)`` or None."""
    _run(conn, "BEGIN IMMEDIATE", ())
    try:
        rows, _ = _run(
            conn,
            "UPDATE invites SET uses = uses - 1 WHERE token_hash=? RETURNING name, expires, kind",
            (token_hash,),
        )
        if rows:
            _run(
                conn,
                "DELETE FROM invites WHERE token_hash=? AND (uses <= 0 OR expires <= ?)",
                (token_hash, now),
            )
        _run(conn, "COMMIT", ())
    except BaseException:
        if conn.in_transaction:
            _run(conn, "ROLLBACK", ())
        raise
    return tuple(rows[0]) if rows else None


_EMPTY_SQL = "SELECT EXISTS(SELECT 1 FROM envelopes) OR EXISTS(SELECT 1 FROM outbox)"


async def _on_thread(db: aiosqlite.Connection, fn: Callable[..., T], *args: Any) -> T:
    """``fn(conn, *args)`` on ``db``'s thread, in one hop (one wake-up of the event loop).
    aiosqlite's worker runs it as it runs its own calls (``_conn`` is its sqlite3 connection)."""
    run = cast(Callable[..., Awaitable[T]], db._execute)
    return await run(fn, db._conn, *args)


def _chunks(items: list[Any], n: int = 500) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


class SqliteStore(PagedReads):
    """Store on one aiosqlite connection (one writer thread; the event loop never blocks)."""

    def __init__(
        self, path: str, keys: EpochKeys, max_db_mb: int = 0, clock: Clock | None = None
    ) -> None:
        self.path = path
        self.keys = keys
        self.max_db_mb = max_db_mb
        self.clock: Clock = clock or SystemClock()
        self._db: aiosqlite.Connection | None = None
        # One aiosqlite connection is shared by every coroutine: writes must not interleave
        # inside another coroutine's open transaction.
        self._write_lock = asyncio.Lock()
        self._rotate_lock = asyncio.Lock()
        self._serving = False  # begin() was called: close() re-seals for shutdown
        self._rotating = False
        self._delivered = False  # rows were deleted since the last rotation
        self._writes = 0  # write() calls so far (a re-seal yields to them, RESEAL_BUSY_SHARE)
        self._activity: Callable[[], int] = lambda: self._writes
        # Highest order key handed out per (table, mailbox) in this process, so that a row is
        # always above any cursor a reader holds even after its mailbox emptied (memory only).
        self._ord_floor: dict[tuple[str, bytes], int] = {}
        self._dest_of: dict[bytes, str] = {}  # outbox destination hash -> destination
        # Per destination, the highest order key outbox_page has returned in this process: a
        # new row is put above it, so a reader resuming after its last row never misses it.
        # While a peer is down nobody reads, the frontier stays put and rows of successive
        # sends interleave at random above it (memory only).
        self._read_frontier: dict[str, int] = {}
        self.wal_persistent = False  # SQLITE_FCNTL_PERSIST_WAL took effect (see _persist_wal)

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StorageError("store is not open")
        return self._db

    async def open(self) -> None:
        try:
            self._db = await aiosqlite.connect(self.path, isolation_level=None)
            for pragma in (
                "PRAGMA journal_mode=WAL",
                "PRAGMA journal_size_limit=-1",  # never truncate the WAL (remnant policy)
                "PRAGMA synchronous=FULL",
                "PRAGMA secure_delete=ON",
                "PRAGMA temp_store=MEMORY",
                "PRAGMA foreign_keys=ON",
            ):
                await self._run(pragma)
            await self._migrate()
            if self.max_db_mb:  # caps store.db only: the WAL and the ballast come on top
                rows, _ = await self._run("PRAGMA page_size")
                page = int(rows[0][0]) if rows else 4096
                await self._run(f"PRAGMA max_page_count={self.max_db_mb * 2**20 // page}")
        except sqlite3.Error as exc:
            await self._abandon()
            raise storage_error("cannot open store", exc) from exc
        except BaseException:
            await self._abandon()
            raise
        self.wal_persistent = _persist_wal(getattr(self._db, "_conn", None), self.path)
        await asyncio.to_thread(self._presize_wal)

    async def _abandon(self) -> None:
        """Close a connection whose open failed (its thread must not outlive the command)."""
        db, self._db = self._db, None
        if db is not None:
            try:
                await db.close()
            except sqlite3.Error:
                pass

    def _presize_wal(self) -> None:
        """Give the WAL real blocks up to :data:`WAL_RESERVE_BYTES` (existing frames untouched;
        zeros past the last frame fail the frame checksum, so recovery ignores them). A disk
        that fills later can then still hold a delete transaction in the WAL."""
        wal = self.path + "-wal"
        try:
            fd = os.open(wal, os.O_RDWR)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("WAL not pre-sized: %s", exc.strerror or exc)
            return
        try:
            if os.fstat(fd).st_size < WAL_RESERVE_BYTES:
                os.posix_fallocate(fd, 0, WAL_RESERVE_BYTES)
                os.fsync(fd)
        except OSError as exc:  # no room: the write that needs it fails and says so
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                log.debug("WAL not pre-sized: %s", exc.strerror or exc)
        finally:
            os.close(fd)

    async def _migrate(self) -> None:
        rows, _ = await self._run("PRAGMA user_version")
        version = int(rows[0][0]) if rows else 0
        if version > len(MIGRATIONS):
            raise StorageError(f"store schema {version} is newer than this software")
        for i in range(version, len(MIGRATIONS)):
            await self._run("BEGIN IMMEDIATE")
            try:
                if MIGRATIONS[i] == "v3":
                    await self._migrate_v3()
                else:
                    await self._script(MIGRATIONS[i])
                await self._run(f"PRAGMA user_version={i + 1}")
                await self._run("COMMIT")
            except BaseException:
                await self._rollback()
                raise
        if version < 3 <= len(MIGRATIONS):  # every row is under the newest key now
            self._destroy([k for k in self.keys.ids if k != self.keys.newest()])

    async def _script(self, sql: str) -> None:
        await _on_thread(self.db, _run_script, sql)

    async def _migrate_v3(self) -> None:
        """Copy v2 rows (clear id, mailbox, destination, exact expiry; body sealed under the
        key of its ``epoch`` column) into the v3 tables, everything sealed under one current
        key, in arrival order. A row whose key is already destroyed could never be opened: it
        is dropped (and counted in the log)."""
        await self._script(V3_CREATE)
        row = await self._one(
            "SELECT EXISTS(SELECT 1 FROM envelopes) OR EXISTS(SELECT 1 FROM outbox)"
        )
        if row and row[0]:
            await self._copy_v2_rows(self.keys.current(self.clock.now_ms()))
        await self._script(V3_SWAP)

    async def _copy_v2_rows(self, kid: int) -> None:
        by_epoch = {self.keys.born(k): k for k in self.keys.ids}
        lost = 0
        for table, cols in (
            ("envelopes", "id, mailbox, expires, epoch, sealed, NULL"),
            ("outbox", "id, mailbox, expires, epoch, sealed, dest"),
        ):
            # pages by rowid, each read to its end in one hop (no cursor held across awaits)
            last = -(2**63)
            while batch := await self._all(
                f"SELECT rowid, {cols} FROM {table} WHERE rowid > ? ORDER BY rowid LIMIT 500",
                (last,),
            ):
                last = int(batch[-1][0])
                items: list[tuple[str | None, Envelope]] = []
                for _, eid, to, expires, epoch, sealed, dest in batch:
                    old = by_epoch.get(int(epoch))
                    if old is None:
                        lost += 1
                        continue
                    body = self.keys.open(old, bytes(sealed))
                    items.append((dest, Envelope(bytes(eid), bytes(to), int(expires), body)))
                if table == "envelopes":
                    sql = "INSERT INTO envelopes_v3 VALUES (?, ?, ?, ?, ?, ?)"
                    rows = await self._envelope_rows(kid, [e for _, e in items], False)
                else:
                    sql = "INSERT INTO outbox_v3 VALUES (?, ?, ?, ?, ?, ?, ?)"
                    pairs = [(str(d), e) for d, e in items]
                    rows = await self._outbox_rows(kid, pairs, False)
                if rows:
                    await _on_thread(self.db, _run_many, sql + " ON CONFLICT(idh) DO NOTHING", rows)
        if lost:
            log.warning("schema v3: %d stored rows were sealed under destroyed keys", lost)

    async def _rollback(self) -> None:
        """Roll back if a transaction is still open. SQLite may already have rolled back (e.g. on
        SQLITE_FULL); a failed ROLLBACK must never hide the error that caused it."""
        try:
            if self.db.in_transaction:
                await self._run("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("rollback failed: %s", exc)

    async def close(self) -> None:
        """Checkpoint (RESTART: never truncates) and close. Never raises: a checkpoint that fails
        (e.g. on a full disk) leaves the frames in the WAL, where the next open finds them.

        On a serving node (after :meth:`begin`), first re-seal everything pending under a fresh
        key and destroy every other key (a stopped node holds one key, and only if something is
        pending). If that fails, every key is kept: nothing pending is ever lost to a key."""
        if self._db is None:
            return
        if self._serving:
            self._serving = False
            try:
                await self._reseal_for_shutdown()
            except StorageError as exc:
                log.warning("keys kept at shutdown: %s", exc)
        async with self._write_lock:  # let a transaction in progress finish first
            db, self._db = self._db, None
            if db is None:
                return
            try:
                await _on_thread(db, _run, "PRAGMA wal_checkpoint(RESTART)", ())
            except sqlite3.Error as exc:
                log.debug("checkpoint at close failed: %s", exc)
            try:
                await db.close()
            except sqlite3.Error as exc:
                log.debug("close failed: %s", exc)

    async def _tx(self, statements: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        """Run ``executemany`` statements in one IMMEDIATE transaction."""
        async with self._write_lock:
            await self._tx_locked(statements)

    async def _tx_locked(
        self, statements: list[tuple[str, list[tuple[Any, ...]]]], check_empty: bool = False
    ) -> bool:
        """The transaction in one hop to the connection's thread, not one per statement.

        Returns, with ``check_empty``, whether both envelope tables are empty after the commit
        (read in the same hop); else False."""
        try:
            # BEGIN..COMMIT in one hop: one wake-up of the event loop instead of 3-6.
            return await _on_thread(self.db, _run_tx, statements, check_empty)
        except sqlite3.Error as exc:
            raise storage_error("write failed", exc) from exc

    async def _run(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[list[Any], int]:
        """One statement run to its end in one hop: its rows and its rowcount. Every statement
        on the connection goes through here or another ``_run*`` function (see :func:`_run`)."""
        return await _on_thread(self.db, _run, sql, args)

    async def _one(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        rows = await self._all(sql, args)
        return rows[0] if rows else None

    async def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        # One hop: execute and fetch together. With a separate fetch, other coroutines' writes
        # on this connection ran between the two steps, and a GROUP BY read rows the writes
        # were changing (a NULL from a NOT NULL column).
        try:
            rows, _ = await self._run(sql, args)
        except sqlite3.Error as exc:
            raise storage_error("read failed", exc) from exc
        return [tuple(r) for r in rows]

    async def _write_one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """A single write statement with RETURNING (atomic claim/redeem), under the lock."""
        async with self._write_lock:
            try:
                rows, _ = await self._run(sql, args)
            except sqlite3.Error as exc:
                raise storage_error("write failed", exc) from exc
        return tuple(rows[0]) if rows else None

    async def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        async with self._write_lock:
            try:
                _, n = await self._run(sql, args)
            except sqlite3.Error as exc:
                raise storage_error("write failed", exc) from exc
        return int(n)

    # ---- relay clients (node/relay.py) ---------------------------------------------------------

    async def add_relay_client(
        self, label: str, token_hash: bytes, quota: int, expires: int, created_day: int
    ) -> None:
        """A new relay invite: ``label`` reserved for whoever first links with the token."""
        await self._exec(
            "INSERT INTO relay_clients (label, token_hash, quota, expires, created) "
            "VALUES (?, ?, ?, ?, ?)",
            (label, token_hash, quota, expires, created_day),
        )

    async def relay_clients(self) -> list[tuple[str, bytes, str, int, int]]:
        """Every relay row: ``(label, token hash, client id or "", quota, expires)``."""
        rows = await self._all(
            "SELECT label, token_hash, client, quota, expires FROM relay_clients ORDER BY label"
        )
        return [(str(r[0]), bytes(r[1]), str(r[2]), int(r[3]), int(r[4])) for r in rows]

    async def bind_relay_client(self, label: str, token_hash: bytes, client: str, now: int) -> bool:
        """Bind an unbound, unexpired label to ``client`` if ``token_hash`` matches (once)."""
        n = await self._exec(
            "UPDATE relay_clients SET client = ?, token_hash = x'' WHERE label = ? "
            "AND client = '' AND token_hash = ? AND expires > ?",
            (client, label, token_hash, now),
        )
        return n == 1

    async def set_relay_auth(self, client: str, auth: bytes) -> None:
        """Keep ``auth``, the latest valid statement of the bound ``client`` (§12.4)."""
        await self._exec(
            "UPDATE relay_clients SET auth = ? WHERE client = ? AND client != ''", (auth, client)
        )

    async def relay_auths(self) -> dict[str, bytes]:
        """The kept statements: bound client id -> encoded statement (none: absent)."""
        rows = await self._all(
            "SELECT client, auth FROM relay_clients WHERE client != '' AND length(auth) > 0"
        )
        return {str(r[0]): bytes(r[1]) for r in rows}

    # ---- accounts, invites, devices ----------------------------------------------------------

    async def create_account(self, name: str, now: int) -> bool:
        # Stored as the UTC day (docs/threat-model.md: coarse metadata at rest).
        n = await self._exec(
            "INSERT OR IGNORE INTO accounts (name, created) VALUES (?, ?)", (name, day(now))
        )
        return n == 1

    async def account_exists(self, name: str) -> bool:
        return await self._one("SELECT 1 FROM accounts WHERE name=?", (name,)) is not None

    async def remove_account(self, name: str) -> int:
        rows = await self._all("SELECT mailbox FROM devices WHERE account=?", (name,))
        mbs = [(r[0],) for r in rows]
        hashes = [(h,) for (mb,) in mbs for h in self._hashes(ENV_MB, bytes(mb))]
        await self._tx(
            [
                ("DELETE FROM envelopes WHERE mbh=?", hashes),
                ("DELETE FROM otks WHERE mailbox=?", mbs),
                ("DELETE FROM fallback WHERE mailbox=?", mbs),
                ("DELETE FROM devices WHERE mailbox=?", mbs),
                ("DELETE FROM device_lists WHERE account=?", [(name,)]),
                ("DELETE FROM invites WHERE name=?", [(name,)]),
                ("DELETE FROM accounts WHERE name=?", [(name,)]),
            ]
        )
        return len(mbs)

    async def add_invite(
        self, token_hash: bytes, name: str, expires: int, kind: str = "invite", uses: int = 1
    ) -> None:
        await self._exec(
            "INSERT INTO invites (token_hash, name, expires, kind, uses) VALUES (?, ?, ?, ?, ?)",
            (token_hash, name, expires, kind, max(1, uses)),
        )

    async def redeem_invite(self, token_hash: bytes, now: int) -> tuple[str, str] | None:
        """Atomically use a token once: ``(account, kind)``, or None if unknown or expired.
        The decrement and the delete at zero are one transaction under the write lock."""
        async with self._write_lock:
            try:
                row = await _on_thread(self.db, _redeem_tx, token_hash, now)
            except sqlite3.Error as exc:
                raise storage_error("write failed", exc) from exc
        if row is None or int(row[1]) <= now:
            return None
        return str(row[0]), str(row[2])

    # ---- operator tools ----------------------------------------------------------------------

    async def list_accounts(self) -> list[AccountInfo]:
        rows = await self._all(ACCOUNTS_SQL)
        counts = await self.pending_counts()
        devices = await self._all("SELECT mailbox, account FROM devices") if counts else []
        return account_infos(rows, devices, counts)

    async def account_status(self, name: str) -> str | None:
        row = await self._one("SELECT disabled FROM accounts WHERE name=?", (name,))
        if row is None:
            return None
        return "disabled" if row[0] else "active"

    async def set_account_disabled(self, name: str, disabled: bool) -> bool:
        n = await self._exec("UPDATE accounts SET disabled=? WHERE name=?", (int(disabled), name))
        return n == 1

    async def set_account_quota(self, name: str, quota: int) -> bool:
        n = await self._exec("UPDATE accounts SET quota=? WHERE name=?", (max(0, quota), name))
        return n == 1

    async def list_invites(self, now: int) -> list[InviteInfo]:
        rows = await self._all(
            "SELECT token_hash, name, kind, expires, uses FROM invites WHERE expires > ? "
            "ORDER BY expires, name",
            (now,),
        )
        return invite_infos(rows)

    async def revoke_invite(self, ref: str) -> int:
        prefix = revoke_prefix(ref)
        if prefix is None:
            return 0
        # hex() is upper case; the prefix has no LIKE wildcards (hex digits only)
        return await self._exec(
            "DELETE FROM invites WHERE substr(hex(token_hash), 1, ?) = ?",
            (len(prefix), prefix.upper()),
        )

    async def add_device(self, account: str, mailbox: bytes, auth_key: bytes) -> None:
        await self._exec("INSERT INTO devices VALUES (?, ?, ?)", (mailbox, account, auth_key))

    async def get_device(self, mailbox: bytes) -> DeviceRecord | None:
        row = await self._one("SELECT account, auth_key FROM devices WHERE mailbox=?", (mailbox,))
        return None if row is None else DeviceRecord(str(row[0]), mailbox, bytes(row[1]))

    async def devices_of(self, account: str) -> list[bytes]:
        rows = await self._all("SELECT mailbox FROM devices WHERE account=?", (account,))
        return [bytes(r[0]) for r in rows]

    async def remove_device(self, mailbox: bytes) -> None:
        mb = [(mailbox,)]
        await self._tx(
            [
                (
                    "DELETE FROM envelopes WHERE mbh=?",
                    [(h,) for h in self._hashes(ENV_MB, mailbox)],
                ),
                ("DELETE FROM otks WHERE mailbox=?", mb),
                ("DELETE FROM fallback WHERE mailbox=?", mb),
                ("DELETE FROM devices WHERE mailbox=?", mb),
            ]
        )

    async def set_device_list(self, account: str, version: int, blob: bytes, sig: bytes) -> bool:
        """Store a newer signed list; refuse a version rollback."""
        n = await self._exec(
            "INSERT INTO device_lists VALUES (?, ?, ?, ?) ON CONFLICT(account) DO UPDATE SET "
            "version=excluded.version, blob=excluded.blob, sig=excluded.sig "
            "WHERE excluded.version >= device_lists.version",
            (account, version, blob, sig),
        )
        return n == 1

    async def get_device_list(self, account: str) -> tuple[bytes, bytes] | None:
        row = await self._one("SELECT blob, sig FROM device_lists WHERE account=?", (account,))
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    # ---- keys --------------------------------------------------------------------------------

    async def add_otks(self, mailbox: bytes, keys: list[tuple[str, str]]) -> int:
        await self._tx(
            [("INSERT OR IGNORE INTO otks VALUES (?, ?, ?)", [(mailbox, k, v) for k, v in keys])]
        )
        return await self.count_otks(mailbox)

    async def set_fallback(self, mailbox: bytes, key_id: str, key: str) -> None:
        await self._exec("INSERT OR REPLACE INTO fallback VALUES (?, ?, ?)", (mailbox, key_id, key))

    async def claim_otk(self, mailbox: bytes) -> tuple[str, str] | None:
        # One statement, so two concurrent claims can never get the same key.
        row = await self._write_one(
            "DELETE FROM otks WHERE rowid = (SELECT rowid FROM otks WHERE mailbox=? LIMIT 1) "
            "RETURNING key_id, key",
            (mailbox,),
        )
        if row is None:
            row = await self._one("SELECT key_id, key FROM fallback WHERE mailbox=?", (mailbox,))
        return None if row is None else (str(row[0]), str(row[1]))

    async def count_otks(self, mailbox: bytes) -> int:
        row = await self._one("SELECT count(*) FROM otks WHERE mailbox=?", (mailbox,))
        return int(row[0]) if row else 0

    # ---- envelopes and outbox ----------------------------------------------------------------

    def _hashes(self, purpose: bytes, value: bytes) -> dict[bytes, int]:
        """``value``'s index hash under every live key -> that key."""
        return {self.keys.index(k, purpose, value): k for k in self.keys.ids}

    async def _next_ords(
        self,
        table: str,
        purpose: bytes,
        mailboxes: list[bytes],
        stored: bool = True,
        above: list[int] | None = None,
    ) -> list[int]:
        """Order keys for new rows to ``mailboxes`` (in order): above the mailbox's stored rows
        and above anything handed out before, by a random step; a random start otherwise.
        ``stored=False``: ``table`` is known to be empty (the v3 migration fills new tables).
        ``above``: per row, a value its key must also exceed (the outbox's read frontier)."""
        unknown = list({mb for mb in mailboxes if (table, mb) not in self._ord_floor})
        if unknown and not stored:
            for mb in unknown:
                self._ord_floor[(table, mb)] = secrets.randbelow(ORD_START)
        elif unknown:
            if len(self._ord_floor) + len(unknown) > MAX_CHAINS:
                self._ord_floor.clear()  # bounded memory; a stale cursor then waits a pass
                unknown = list(set(mailboxes))
            owner = {h: mb for mb in unknown for h in self._hashes(purpose, mb)}
            top: dict[bytes, int] = {}
            for chunk in _chunks(list(owner)):
                marks = ",".join("?" * len(chunk))
                for h, m in await self._all(
                    f"SELECT mbh, max(ord) FROM {table} WHERE mbh IN ({marks}) GROUP BY mbh",
                    tuple(chunk),
                ):
                    mb = owner[bytes(h)]
                    top[mb] = max(top.get(mb, 0), int(m))
            for mb in unknown:
                self._ord_floor[(table, mb)] = top.get(mb, secrets.randbelow(ORD_START))
        out = []
        floors = above or [0] * len(mailboxes)
        for mb, r, low in zip(mailboxes, _random_words(len(mailboxes)), floors, strict=True):
            o = max(self._ord_floor[(table, mb)], low) + 1 + r % ORD_STEP
            self._ord_floor[(table, mb)] = o
            out.append(o)
        return out

    async def _envelope_rows(
        self, kid: int, envs: list[Envelope], stored: bool = True
    ) -> list[tuple[Any, ...]]:
        ix, seal = self.keys.index, self.keys.seal
        ords = await self._next_ords("envelopes", ENV_MB, [e.to for e in envs], stored)
        rand = _random_words(3 * len(envs))
        rows = [
            (
                (rand[3 * i] << 31) ^ rand[3 * i + 1],  # a random rowid below 2**63
                ix(kid, ENV_ID, e.id),
                ix(kid, ENV_MB, e.to),
                o,
                coarse_expiry(e.expires, rand[3 * i + 2]),
                seal(kid, _record(e, None)),
            )
            for i, (e, o) in enumerate(zip(envs, ords, strict=True))
        ]
        random.shuffle(rows)  # insertion order says nothing either
        return rows

    async def _outbox_rows(
        self, kid: int, items: list[tuple[str, Envelope]], stored: bool = True
    ) -> list[tuple[Any, ...]]:
        ix, seal = self.keys.index, self.keys.seal
        frontier = [self._read_frontier.get(dest, 0) for dest, _ in items]
        ords = await self._next_ords("outbox", OBX_MB, [e.to for _, e in items], stored, frontier)
        rand = _random_words(3 * len(items))
        rows = []
        dest_hash: dict[str, bytes] = {}  # one index hash per destination, not per row
        for i, ((dest, e), o) in enumerate(zip(items, ords, strict=True)):
            dh = dest_hash.get(dest)
            if dh is None:
                dh = dest_hash[dest] = ix(kid, OBX_DEST, dest.encode())
                self._dest_of[dh] = dest
            rows.append(
                (
                    (rand[3 * i] << 31) ^ rand[3 * i + 1],
                    ix(kid, OBX_ID, e.id),
                    dh,
                    ix(kid, OBX_MB, e.to),
                    o,
                    coarse_expiry(e.expires, rand[3 * i + 2]),
                    seal(kid, _record(e, dest)),
                )
            )
        random.shuffle(rows)
        return rows

    async def _present(self, table: str, purpose: bytes, ids: list[bytes]) -> set[bytes]:
        """Which of ``ids`` are stored in ``table`` (under any live key)."""
        owner = {self.keys.index(k, purpose, i): i for i in set(ids) for k in self.keys.ids}
        found: set[bytes] = set()
        for chunk in _chunks(list(owner)):
            marks = ",".join("?" * len(chunk))
            rows = await self._all(f"SELECT idh FROM {table} WHERE idh IN ({marks})", tuple(chunk))
            found.update(owner[bytes(r[0])] for r in rows)
        return found

    async def _empty(self) -> bool:
        row = await self._one(_EMPTY_SQL)
        return not (row and row[0])

    def _destroy(self, kids: list[int]) -> None:
        if kids:
            self.keys.destroy_many(kids)
            self._dest_of.clear()

    async def write(self, batch: WriteBatch, now: int) -> None:
        """One group-commit transaction (fsynced: synchronous=FULL). Rows already stored (under
        any live key) are not stored again. A batch that leaves nothing pending destroys every
        key at once (the next write makes a fresh one)."""
        self._writes += 1  # before the lock: a writer waiting for a re-seal chunk counts
        async with self._write_lock:
            envs, outbox = list(batch.envelopes), list(batch.outbox)
            env_rows: list[tuple[Any, ...]] = []
            obx_rows: list[tuple[Any, ...]] = []
            if envs or outbox:
                kid = self._sealing_key(now)
                if len(self.keys.ids) > 1:  # a copy may be stored under an older key
                    if envs:
                        dup = await self._present("envelopes", ENV_ID, [e.id for e in envs])
                        envs = [e for e in envs if e.id not in dup]
                    if outbox:
                        dup = await self._present("outbox", OBX_ID, [e.id for _, e in outbox])
                        outbox = [(d, e) for d, e in outbox if e.id not in dup]
                env_rows = await self._envelope_rows(kid, envs)
                obx_rows = await self._outbox_rows(kid, outbox)
            ix, kids = self.keys.index, self.keys.ids
            deleting = bool(batch.delete_envelopes or batch.delete_outbox)
            check = deleting and not self._rotating and bool(self.keys.ids)
            empty = await self._tx_locked(
                [
                    # a random rowid collision fails the batch (never drops a row silently)
                    (
                        "INSERT INTO envelopes VALUES (?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT(idh) DO NOTHING",
                        env_rows,
                    ),
                    (
                        "INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?) "
                        "ON CONFLICT(idh) DO NOTHING",
                        obx_rows,
                    ),
                    (
                        "DELETE FROM envelopes WHERE idh=?",
                        [(ix(k, ENV_ID, i),) for i in batch.delete_envelopes for k in kids],
                    ),
                    (
                        "DELETE FROM outbox WHERE idh=?",
                        [(ix(k, OBX_ID, i),) for i in batch.delete_outbox for k in kids],
                    ),
                ],
                check_empty=check,
            )
            if deleting:
                self._delivered = True
                if empty and self.keys.ids:  # nothing pending: no key needs to live
                    self._destroy(self.keys.ids)

    async def _destroy_if_empty(self) -> bool:
        """Nothing pending: no key needs to live (write lock held)."""
        if self.keys.ids and await self._empty():
            self._destroy(self.keys.ids)
            return True
        return False

    async def existing_ids(self, ids: list[bytes]) -> set[bytes]:
        return await self._present("envelopes", ENV_ID, ids) if ids else set()

    def _open_rows(
        self, rows: list[tuple[Any, ...]], owner: dict[bytes, int]
    ) -> list[tuple[int, Envelope]]:
        """``(ord, hash, sealed)`` rows -> ``(ord, envelope)``; ``owner`` maps hash -> key."""
        return [
            (int(o), _unrecord(self.keys.open(owner[bytes(h)], bytes(sealed)))[0])
            for o, h, sealed in rows
        ]

    async def _page(
        self, table: str, column: str, purpose: bytes, value: bytes, after: int, limit: int
    ) -> list[tuple[int, Envelope]]:
        """One page by index hash. If a key was made or destroyed while the query ran (a
        re-seal moving rows to new hashes), the page is read again, so no row is skipped."""
        while True:
            generation = self.keys.generation
            owner = self._hashes(purpose, value)
            if not owner:
                return []
            marks = ",".join("?" * len(owner))
            rows = await self._all(
                f"SELECT ord, {column}, sealed FROM {table} WHERE {column} IN ({marks}) "
                "AND ord>? ORDER BY ord LIMIT ?",
                (*owner, after, limit),
            )
            if self.keys.generation == generation:
                return self._open_rows(rows, owner)

    async def outbox_page(
        self, dest: str, after_seq: int, limit: int
    ) -> list[tuple[int, Envelope]]:
        """Ordered by ``ord``: arrival order per remote mailbox (different mailboxes interleave
        in an order unrelated to arrival, so one send's rows are not adjacent). A row written
        later is above the highest seq returned so far, so resuming after the last row seen
        finds it. The read and the frontier update hold the write lock: a row committed while
        the query ran (its order key drawn from its mailbox's chain, below the frontier still
        to be raised) would otherwise sit below the cursor, and the worker, whose wake for it
        came before its next pass, would not see it until some later row woke it again."""
        async with self._write_lock:
            page = await self._page("outbox", "dh", OBX_DEST, dest.encode(), after_seq, limit)
            if page and page[-1][0] > self._read_frontier.get(dest, 0):
                self._read_frontier[dest] = page[-1][0]
        return page

    async def _resolve(
        self, table: str, column: str, counts: list[tuple[Any, ...]], known: dict[bytes, bytes]
    ) -> dict[bytes, int]:
        """Per-hash counts -> per-value counts: via ``known`` (hash -> value), else by opening
        one row of that hash (its sealed record names it)."""
        out: dict[bytes, int] = {}
        for h, n in counts:
            if h is None:
                continue
            h = bytes(h)
            value = known.get(h)
            if value is None:
                row = await self._one(f"SELECT sealed FROM {table} WHERE {column}=? LIMIT 1", (h,))
                got = self.keys.try_open(bytes(row[0])) if row else None
                if got is None:
                    continue  # sealed under a destroyed key: unreadable, swept at its expiry
                env, dest = _unrecord(got[1])
                value = dest.encode() if column == "dh" and dest is not None else env.to
            out[value] = out.get(value, 0) + int(n)
        return out

    async def outbox_counts(self) -> dict[str, int]:
        counts = await self._all("SELECT dh, count(*) FROM outbox GROUP BY dh")
        known = {h: d.encode() for h, d in self._dest_of.items()}
        resolved = await self._resolve("outbox", "dh", counts, known)
        for value in resolved:
            for h in self._hashes(OBX_DEST, value):
                self._dest_of[h] = value.decode()
        return {v.decode(): n for v, n in resolved.items()}

    async def outbox_destinations(self) -> list[str]:
        return list(await self.outbox_counts())

    async def sweep_expired(self, now: int) -> int:
        """Delete rows whose sealed exact expiry has passed. The clear ``exp`` is a lower bound
        (up to two grains early), so it only selects the candidates to open."""
        n = 0
        for table in ("envelopes", "outbox"):
            rows = await self._all(f"SELECT idh, sealed FROM {table} WHERE exp <= ?", (now,))
            gone = []
            for idh, sealed in rows:
                got = self.keys.try_open(bytes(sealed))
                if got is None or _unrecord(got[1])[0].expires <= now:
                    gone.append((bytes(idh),))  # expired, or under no live key (unreadable)
            if gone:
                async with self._write_lock:
                    await self._tx_locked([(f"DELETE FROM {table} WHERE idh=?", gone)])
                n += len(gone)
                self._delivered = True
        await self._exec("DELETE FROM invites WHERE expires <= ?", (now,))
        return n

    async def begin(self, clock: Clock) -> int:
        """The node starts serving: from now on time comes from ``clock``, and :meth:`close`
        re-seals for shutdown. Destroy every key that seals nothing; re-seal leftovers under
        this epoch's key if theirs has passed. Returns the number of rows re-sealed."""
        self.clock = clock
        self._serving = True
        return await self.rotate_epochs(clock.now_ms())

    async def rotate_epochs(self, now: int) -> int:
        """Nothing pending: destroy every key. Otherwise re-seal rows under older keys (or a key
        whose epoch has passed) under the current key, then destroy the old keys. And if rows
        were delivered since the last call and at most :data:`RESEAL_AFTER_DELIVERY` are still
        pending, re-seal those under a fresh key (the delivered rows' key dies now)."""
        async with self._rotate_lock:
            async with self._write_lock:
                if await self._destroy_if_empty() or not self.keys.ids:
                    self._delivered = False
                    return 0
                current = self.keys.current(now)
                old = [k for k in self.keys.ids if k != current]
                if not old and self._delivered and await self._pending_at_most():
                    current = self.keys.fresh(now)
                    old = [k for k in self.keys.ids if k != current]
                self._delivered = False
            if not old:
                return 0
            return await self._reseal_into(current, old)

    def _sealing_key(self, now: int) -> int:
        """The key a write seals new rows under: the newest live key, even once its epoch has
        passed; a new key only when none is live (write lock held).

        Only :meth:`rotate_epochs` moves to a new epoch's key, and it re-seals every row the
        old key holds in the same step. A write that made that key itself left every pending row
        under a live key of a passed epoch next to it until the next sweep (up to 10 s): a disk
        seized then opens them with that old key (tests/forensics ``pending_old_key``). The old
        key is destroyed at that same sweep either way, so rows sealed under it meanwhile live
        no longer; they are re-sealed with the rest."""
        newest = self.keys.newest()
        return self.keys.current(now) if newest is None else newest

    async def _pending_at_most(self, n: int = RESEAL_AFTER_DELIVERY) -> bool:
        row = await self._one(
            "SELECT (SELECT count(*) FROM (SELECT 1 FROM envelopes LIMIT ?)) + "
            "(SELECT count(*) FROM (SELECT 1 FROM outbox LIMIT ?))",
            (n + 1, n + 1),
        )
        return row is not None and int(row[0]) <= n

    async def _reseal_for_shutdown(self) -> None:
        async with self._rotate_lock:
            async with self._write_lock:
                if await self._destroy_if_empty() or not self.keys.ids:
                    return
                fresh = self.keys.fresh(self.clock.now_ms())
                old = [k for k in self.keys.ids if k != fresh]
            await self._reseal_into(fresh, old)

    async def _reseal_into(self, target: int, old: list[int]) -> int:
        """Re-seal every row not under ``target`` (re-keying its index hashes), in chunks; then
        checkpoint and destroy ``old``. Rows under no live key are deleted (never readable)."""
        self._rotating = True
        try:
            moved = 0
            for table in ("envelopes", "outbox"):
                moved += await self._reseal_table(table, target)
            # The old ciphertexts may survive in the WAL (it is never truncated, and a reused
            # WAL keeps stale tail frames); destroying the key makes every such remnant noise.
            await self.checkpoint()
            async with self._write_lock:
                self._destroy(old)
                # deletions committed during the re-seal skipped this check (``_rotating``)
                await self._destroy_if_empty()
            return moved
        finally:
            self._rotating = False

    async def _reseal_table(self, table: str, target: int) -> int:
        """Re-seal every row of ``table`` not under ``target``, in rowid order (the table's own
        order: each chunk reads and rewrites neighbouring rows, not one random page per row),
        :data:`RESEAL_CHUNK` rows per transaction; writes and deliveries take turns with the
        chunks (the write lock is fair). Rows written meanwhile are sealed under ``target``
        already; rows deleted meanwhile are simply not found. Returns the rows rewritten."""
        after, moved, busy = -(2**63), 0, False
        began = time.monotonic()
        while True:
            work, t0 = self._activity(), time.monotonic()
            async with self._write_lock:
                rows = await self._all(
                    f"SELECT k, sealed FROM {table} WHERE k > ? ORDER BY k LIMIT ?",
                    (after, RESEAL_BUSY_CHUNK if busy else RESEAL_CHUNK),
                )
                if not rows:
                    return moved
                after = int(rows[-1][0])
                updates, dead = self._resealed(table, rows, target, None)
                await self._store_resealed(table, "k", updates, dead)
                moved += len(updates)
            t1 = time.monotonic()
            busy = self._activity() != work and t1 - began < RESEAL_PACED_FOR_S
            if busy:  # live work went on meanwhile: give it the node for a while
                await asyncio.sleep((t1 - t0) * (1 / RESEAL_BUSY_SHARE - 1))

    async def _rewrite(
        self, table: str, pks: list[bytes], target: int | None, dest: str | None = None
    ) -> int:
        """Re-seal the rows ``pks`` of ``table`` under ``target`` (None: each under its own
        key), optionally with a new outbox destination. Returns the rows rewritten."""
        async with self._write_lock:
            marks = ",".join("?" * len(pks))
            rows = await self._all(
                f"SELECT idh, sealed FROM {table} WHERE idh IN ({marks})", tuple(pks)
            )
            updates, dead = self._resealed(table, rows, target, dest)
            await self._store_resealed(table, "idh", updates, dead)
            return len(updates)

    def _resealed(
        self,
        table: str,
        rows: list[tuple[Any, ...]],
        target: int | None,
        dest: str | None,
    ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """``(key, sealed)`` rows -> the updates (new index hashes, new blob, key) and the keys
        of rows no live key opens (never readable: deleted)."""
        planned, gone = plan_reseal(self.keys, table, rows, target, dest)
        for _, values, _, d in planned:
            if d is not None:
                self._dest_of[values[1]] = d
        updates = [(*values, blob, key) for key, values, blob, _ in planned]
        return updates, [(key,) for key in gone]

    async def _store_resealed(
        self,
        table: str,
        by: str,
        updates: list[tuple[Any, ...]],
        dead: list[tuple[Any, ...]],
    ) -> None:
        cols = "idh=?, mbh=?" if table == "envelopes" else "idh=?, dh=?, mbh=?"
        await self._tx_locked(
            [
                (f"UPDATE OR REPLACE {table} SET {cols}, sealed=? WHERE {by}=?", updates),
                (f"DELETE FROM {table} WHERE {by}=?", dead),
            ]
        )

    def set_activity(self, counter: Callable[[], int]) -> None:
        self._activity = counter

    async def checkpoint(self) -> None:
        """RESTART, never TRUNCATE: the next writer starts again at the WAL's beginning."""
        async with self._write_lock:
            try:
                await self._run("PRAGMA wal_checkpoint(RESTART)")  # its result row read too
            except sqlite3.Error as exc:
                raise storage_error("checkpoint failed", exc) from exc

    # ---- peers -------------------------------------------------------------------------------

    async def get_peer(self, node_id: str) -> PeerRecord | None:
        row = await self._one(
            "SELECT node_id, url, host, last_seen FROM peers WHERE node_id=?", (node_id,)
        )
        return (
            None if row is None else PeerRecord(str(row[0]), str(row[1]), str(row[2]), int(row[3]))
        )

    async def peer_by_host(self, host: str) -> PeerRecord | None:
        row = await self._one(
            "SELECT node_id, url, host, last_seen FROM peers WHERE host=? UNION ALL "
            "SELECT p.node_id, p.url, p.host, p.last_seen FROM peer_hosts a "
            "JOIN peers p ON p.node_id = a.node_id WHERE a.host=? LIMIT 1",
            (host, host),
        )
        return (
            None if row is None else PeerRecord(str(row[0]), str(row[1]), str(row[2]), int(row[3]))
        )

    async def upsert_peer(self, peer: PeerRecord) -> None:
        """Pin (or update) a peer; ``last_seen`` is stored as its UTC day."""
        await self._exec(
            "INSERT INTO peers (node_id, url, host, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(node_id) DO UPDATE SET "
            "url=excluded.url, host=excluded.host, last_seen=excluded.last_seen",
            (peer.node_id, peer.url, peer.host, day(peer.last_seen)),
        )

    async def add_peer_host(self, host: str, node_id: str) -> None:
        """Keep ``host`` (a peer's former host) routed to ``node_id`` (§12.5)."""
        await self._exec(
            "INSERT INTO peer_hosts VALUES (?, ?) ON CONFLICT(host) DO UPDATE SET "
            "node_id=excluded.node_id",
            (host, node_id),
        )

    async def peer_moved_at(self, node_id: str) -> int:
        """``created`` of the last locator change followed for ``node_id`` (0: none)."""
        row = await self._one("SELECT moved FROM peers WHERE node_id=?", (node_id,))
        return 0 if row is None else int(row[0])

    async def set_peer_moved_at(self, node_id: str, created: int) -> None:
        """Note the last locator change followed for ``node_id`` (never lowered)."""
        await self._exec(
            "UPDATE peers SET moved=? WHERE node_id=? AND moved < ?", (created, node_id, created)
        )

    async def drop_stale_peers(self, before: int, keep: Collection[str] = ()) -> list[str]:
        """Delete pins last seen before ``before`` (ms), except ``keep``; the ids dropped."""
        async with self._write_lock:
            rows = await self._all("SELECT node_id FROM peers WHERE last_seen < ?", (before,))
            stale = [str(r[0]) for r in rows if str(r[0]) not in keep]
            if stale:
                sql = "DELETE FROM peers WHERE node_id=? AND last_seen < ?"
                aliases = "DELETE FROM peer_hosts WHERE node_id=?"
                await self._tx_locked(
                    [(sql, [(n, before) for n in stale]), (aliases, [(n,) for n in stale])]
                )
        return stale

    async def rename_peer(self, old_id: str, new: PeerRecord) -> None:
        """Follow a signed key rotation: move the pin and the queued envelopes to the new id
        (their sealed records name the destination: they are re-sealed)."""
        await self._tx(
            [
                ("DELETE FROM peers WHERE node_id=?", [(old_id,)]),
                (
                    "INSERT OR REPLACE INTO peers (node_id, url, host, last_seen) "
                    "VALUES (?, ?, ?, ?)",
                    [(new.node_id, new.url, new.host, day(new.last_seen))],
                ),
                ("UPDATE peer_hosts SET node_id=? WHERE node_id=?", [(new.node_id, old_id)]),
            ]
        )
        owner = self._hashes(OBX_DEST, old_id.encode())
        if owner:
            marks = ",".join("?" * len(owner))
            rows = await self._all(f"SELECT idh FROM outbox WHERE dh IN ({marks})", tuple(owner))
            for chunk in _chunks([bytes(r[0]) for r in rows], RESEAL_CHUNK):
                await self._rewrite("outbox", chunk, None, new.node_id)

    async def all_mailboxes(self) -> list[bytes]:
        return [bytes(r[0]) for r in await self._all("SELECT mailbox FROM devices")]

    async def pending_counts(self) -> dict[bytes, int]:
        counts = await self._all("SELECT mbh, count(*) FROM envelopes GROUP BY mbh")
        if not counts:
            return {}
        known = {h: mb for mb in await self.all_mailboxes() for h in self._hashes(ENV_MB, mb)}
        return await self._resolve("envelopes", "mbh", counts, known)

    async def all_peers(self) -> list[PeerRecord]:
        rows = await self._all("SELECT node_id, url, host, last_seen FROM peers")
        return [PeerRecord(str(a), str(b), str(c), int(d)) for a, b, c, d in rows]

    async def counts(self) -> dict[str, int]:
        out = {}
        for key, sql in (
            ("accounts", "SELECT count(*) FROM accounts"),
            ("pending_envelopes", "SELECT count(*) FROM envelopes"),
            ("outbox_envelopes", "SELECT count(*) FROM outbox"),
            ("peers", "SELECT count(*) FROM peers"),
        ):
            row = await self._one(sql)
            out[key] = int(row[0]) if row else 0
        return out
