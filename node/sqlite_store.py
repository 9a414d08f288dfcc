"""SQLite backend of :class:`node.store.Store` (the embedded default).

Settings follow the measured remnant study (docs/threat-model.md): WAL, ``synchronous=FULL``
(nothing acknowledged is lost on power loss), ``secure_delete=ON`` (not FAST),
``temp_store=MEMORY``. The WAL is never truncated (truncation frees its blocks without overwriting
them; a positive ``journal_size_limit`` and ``wal_checkpoint(TRUNCATE)`` both truncate), so:
``journal_size_limit=-1`` and ``wal_checkpoint(RESTART)``, driven by the sweeper's idle timer
rather than per delete. RESTART makes the next writer
start again at the WAL's beginning, so the WAL stays bounded. The WAL is pre-sized at open
(:data:`WAL_RESERVE_BYTES`, real blocks) so that a disk which fills later still has room in it
for a delete transaction. Envelope bodies are sealed under epoch keys (:mod:`node.atrest`).

Errors: every ``sqlite3.Error`` becomes a :class:`StorageError` carrying SQLite's own message
(SQLITE_FULL becomes :class:`node.ballast.DiskFull`); the connection stays usable afterwards.

The schema is versioned: :data:`MIGRATIONS` holds one entry per version, applied in order.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import sqlite3
from collections.abc import Collection
from typing import Any

import aiosqlite

from federation.errors import StorageError
from federation.wire import Envelope

from .atrest import EpochKeys
from .ballast import DiskFull
from .store import DeviceRecord, PeerRecord, WriteBatch, day

log = logging.getLogger("haven.store")

WAL_RESERVE_BYTES = 8 * 2**20  # the WAL is pre-sized to this at open and never truncated
SQLITE_FULL = 13


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
]


class SqliteStore:
    """Store on one aiosqlite connection (one writer thread; the event loop never blocks)."""

    def __init__(self, path: str, keys: EpochKeys, max_db_mb: int = 0) -> None:
        self.path = path
        self.keys = keys
        self.max_db_mb = max_db_mb
        self._db: aiosqlite.Connection | None = None
        # One aiosqlite connection is shared by every coroutine: writes must not interleave
        # inside another coroutine's open transaction.
        self._write_lock = asyncio.Lock()

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
                await self.db.execute(pragma)
            await self._migrate()
            if self.max_db_mb:  # caps store.db only: the WAL and the ballast come on top
                async with self.db.execute("PRAGMA page_size") as cur:
                    row = await cur.fetchone()
                page = int(row[0]) if row else 4096
                await self.db.execute(f"PRAGMA max_page_count={self.max_db_mb * 2**20 // page}")
        except sqlite3.Error as exc:
            await self._abandon()
            raise storage_error("cannot open store", exc) from exc
        except BaseException:
            await self._abandon()
            raise
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
        async with self.db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > len(MIGRATIONS):
            raise StorageError(f"store schema {version} is newer than this software")
        for i in range(version, len(MIGRATIONS)):
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in MIGRATIONS[i].split(";"):
                    if stmt.strip():
                        await self.db.execute(stmt)
                await self.db.execute(f"PRAGMA user_version={i + 1}")
                await self.db.execute("COMMIT")
            except BaseException:
                await self._rollback()
                raise

    async def _rollback(self) -> None:
        """Roll back if a transaction is still open. SQLite may already have rolled back (e.g. on
        SQLITE_FULL); a failed ROLLBACK must never hide the error that caused it."""
        try:
            if self.db.in_transaction:
                await self.db.execute("ROLLBACK")
        except sqlite3.Error as exc:
            log.warning("rollback failed: %s", exc)

    async def close(self) -> None:
        """Checkpoint (RESTART: never truncates) and close. Never raises: a checkpoint that fails
        (e.g. on a full disk) leaves the frames in the WAL, where the next open finds them."""
        if self._db is None:
            return
        async with self._write_lock:  # let a transaction in progress finish first
            db, self._db = self._db, None
            if db is None:
                return
            try:
                await db.execute("PRAGMA wal_checkpoint(RESTART)")
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

    async def _tx_locked(self, statements: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
        try:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                for sql, rows in statements:
                    if rows:
                        await self.db.executemany(sql, rows)
                await self.db.execute("COMMIT")
            except BaseException:
                await self._rollback()
                raise
        except sqlite3.Error as exc:
            raise storage_error("write failed", exc) from exc

    async def _one(self, sql: str, args: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        try:
            async with self.db.execute(sql, args) as cur:
                row = await cur.fetchone()
        except sqlite3.Error as exc:
            raise storage_error("read failed", exc) from exc
        return tuple(row) if row is not None else None

    async def _all(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            async with self.db.execute(sql, args) as cur:
                rows = await cur.fetchall()
        except sqlite3.Error as exc:
            raise storage_error("read failed", exc) from exc
        return [tuple(r) for r in rows]

    async def _write_one(self, sql: str, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """A single write statement with RETURNING (atomic claim/redeem), under the lock."""
        async with self._write_lock:
            return await self._one(sql, args)

    async def _exec(self, sql: str, args: tuple[Any, ...] = ()) -> int:
        async with self._write_lock:
            try:
                cur = await self.db.execute(sql, args)
                return int(cur.rowcount)
            except sqlite3.Error as exc:
                raise storage_error("write failed", exc) from exc

    # ---- accounts, invites, devices ----------------------------------------------------------

    async def create_account(self, name: str, now: int) -> bool:
        # Stored as the UTC day (docs/threat-model.md: coarse metadata at rest).
        n = await self._exec("INSERT OR IGNORE INTO accounts VALUES (?, ?)", (name, day(now)))
        return n == 1

    async def account_exists(self, name: str) -> bool:
        return await self._one("SELECT 1 FROM accounts WHERE name=?", (name,)) is not None

    async def remove_account(self, name: str) -> int:
        rows = await self._all("SELECT mailbox FROM devices WHERE account=?", (name,))
        mbs = [(r[0],) for r in rows]
        await self._tx(
            [
                ("DELETE FROM envelopes WHERE mailbox=?", mbs),
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
        self, token_hash: bytes, name: str, expires: int, kind: str = "invite"
    ) -> None:
        await self._exec(
            "INSERT INTO invites (token_hash, name, expires, kind) VALUES (?, ?, ?, ?)",
            (token_hash, name, expires, kind),
        )

    async def redeem_invite(self, token_hash: bytes, now: int) -> tuple[str, str] | None:
        """Atomically consume a token: ``(account, kind)``, or None if unknown or expired."""
        row = await self._write_one(
            "DELETE FROM invites WHERE token_hash=? RETURNING name, expires, kind", (token_hash,)
        )
        if row is None or int(row[1]) <= now:
            return None
        return str(row[0]), str(row[2])

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
                ("DELETE FROM envelopes WHERE mailbox=?", mb),
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

    async def write(self, batch: WriteBatch, now: int) -> None:
        """One group-commit transaction (fsynced: synchronous=FULL)."""
        epoch = self.keys.current(now)
        seal = self.keys.seal
        await self._tx(
            [
                (
                    "INSERT OR IGNORE INTO envelopes VALUES (?, ?, ?, ?, ?)",
                    [(e.id, e.to, e.expires, epoch, seal(epoch, e.body)) for e in batch.envelopes],
                ),
                (
                    "INSERT OR IGNORE INTO outbox VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (e.id, dest, e.to, e.expires, epoch, seal(epoch, e.body))
                        for dest, e in batch.outbox
                    ],
                ),
                ("DELETE FROM envelopes WHERE id=?", [(i,) for i in batch.delete_envelopes]),
                ("DELETE FROM outbox WHERE id=?", [(i,) for i in batch.delete_outbox]),
            ]
        )

    async def existing_ids(self, ids: list[bytes]) -> set[bytes]:
        if not ids:
            return set()
        found: set[bytes] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            rows = await self._all(f"SELECT id FROM envelopes WHERE id IN ({marks})", tuple(chunk))
            found.update(bytes(r[0]) for r in rows)
        return found

    def _open_rows(self, rows: list[tuple[Any, ...]]) -> list[Envelope]:
        out = []
        for eid, to, expires, epoch, sealed in rows:
            body = self.keys.open(int(epoch), bytes(sealed))
            out.append(Envelope(bytes(eid), bytes(to), int(expires), body))
        return out

    async def pending_for(self, mailbox: bytes, limit: int) -> list[Envelope]:
        rows = await self._all(
            "SELECT id, mailbox, expires, epoch, sealed FROM envelopes WHERE mailbox=? "
            "ORDER BY rowid LIMIT ?",
            (mailbox, limit),
        )
        return self._open_rows(rows)

    async def outbox_batch(self, dest: str, limit: int) -> list[Envelope]:
        rows = await self._all(
            "SELECT id, mailbox, expires, epoch, sealed FROM outbox WHERE dest=? "
            "ORDER BY rowid LIMIT ?",
            (dest, limit),
        )
        return self._open_rows(rows)

    def _open_seq_rows(self, rows: list[tuple[Any, ...]]) -> list[tuple[int, Envelope]]:
        return [
            (int(r[0]), e)
            for r, e in zip(rows, self._open_rows([r[1:] for r in rows]), strict=True)
        ]

    async def pending_page(
        self, mailbox: bytes, after_seq: int, limit: int
    ) -> list[tuple[int, Envelope]]:
        rows = await self._all(
            "SELECT rowid, id, mailbox, expires, epoch, sealed FROM envelopes "
            "WHERE mailbox=? AND rowid>? ORDER BY rowid LIMIT ?",
            (mailbox, after_seq, limit),
        )
        return self._open_seq_rows(rows)

    async def outbox_page(
        self, dest: str, after_seq: int, limit: int
    ) -> list[tuple[int, Envelope]]:
        rows = await self._all(
            "SELECT rowid, id, mailbox, expires, epoch, sealed FROM outbox "
            "WHERE dest=? AND rowid>? ORDER BY rowid LIMIT ?",
            (dest, after_seq, limit),
        )
        return self._open_seq_rows(rows)

    async def outbox_counts(self) -> dict[str, int]:
        rows = await self._all("SELECT dest, count(*) FROM outbox GROUP BY dest")
        return {str(r[0]): int(r[1]) for r in rows}

    async def outbox_destinations(self) -> list[str]:
        return [str(r[0]) for r in await self._all("SELECT DISTINCT dest FROM outbox")]

    async def sweep_expired(self, now: int) -> int:
        a = await self._exec("DELETE FROM envelopes WHERE expires <= ?", (now,))
        b = await self._exec("DELETE FROM outbox WHERE expires <= ?", (now,))
        c = await self._exec("DELETE FROM invites WHERE expires <= ?", (now,))
        del c
        return a + b

    async def rotate_epochs(self, now: int) -> int:
        """Re-seal rows of older epochs under the current key, then destroy the old keys."""
        current = self.keys.current(now)
        old = [e for e in self.keys.epochs if e != current]
        if not old:
            return 0
        moved = 0
        for table in ("envelopes", "outbox"):
            rows = await self._all(
                f"SELECT rowid, epoch, sealed FROM {table} WHERE epoch != ?", (current,)
            )
            updates = [
                (current, self.keys.seal(current, self.keys.open(int(ep), bytes(s))), rid)
                for rid, ep, s in rows
            ]
            await self._tx([(f"UPDATE {table} SET epoch=?, sealed=? WHERE rowid=?", updates)])
            moved += len(updates)
        # The old ciphertexts may survive in the WAL (it is never truncated, and a reused WAL
        # keeps stale tail frames); destroying the key makes every such remnant unreadable.
        await self.checkpoint()
        for epoch in old:
            self.keys.destroy(epoch)
        return moved

    async def checkpoint(self) -> None:
        """RESTART, never TRUNCATE: the next writer starts again at the WAL's beginning."""
        async with self._write_lock:
            try:
                await self.db.execute("PRAGMA wal_checkpoint(RESTART)")
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
            "SELECT node_id, url, host, last_seen FROM peers WHERE host=?", (host,)
        )
        return (
            None if row is None else PeerRecord(str(row[0]), str(row[1]), str(row[2]), int(row[3]))
        )

    async def upsert_peer(self, peer: PeerRecord) -> None:
        """Pin (or update) a peer; ``last_seen`` is stored as its UTC day."""
        await self._exec(
            "INSERT INTO peers VALUES (?, ?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET "
            "url=excluded.url, host=excluded.host, last_seen=excluded.last_seen",
            (peer.node_id, peer.url, peer.host, day(peer.last_seen)),
        )

    async def drop_stale_peers(self, before: int, keep: Collection[str] = ()) -> list[str]:
        """Delete pins last seen before ``before`` (ms), except ``keep``; the ids dropped."""
        async with self._write_lock:
            rows = await self._all("SELECT node_id FROM peers WHERE last_seen < ?", (before,))
            stale = [str(r[0]) for r in rows if str(r[0]) not in keep]
            if stale:
                sql = "DELETE FROM peers WHERE node_id=? AND last_seen < ?"
                await self._tx_locked([(sql, [(n, before) for n in stale])])
        return stale

    async def rename_peer(self, old_id: str, new: PeerRecord) -> None:
        """Follow a signed key rotation: move the pin and the queued envelopes to the new id."""
        await self._tx(
            [
                ("DELETE FROM peers WHERE node_id=?", [(old_id,)]),
                (
                    "INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?)",
                    [(new.node_id, new.url, new.host, day(new.last_seen))],
                ),
                ("UPDATE outbox SET dest=? WHERE dest=?", [(new.node_id, old_id)]),
            ]
        )

    async def all_mailboxes(self) -> list[bytes]:
        return [bytes(r[0]) for r in await self._all("SELECT mailbox FROM devices")]

    async def pending_counts(self) -> dict[bytes, int]:
        rows = await self._all("SELECT mailbox, count(*) FROM envelopes GROUP BY mailbox")
        return {bytes(r[0]): int(r[1]) for r in rows}

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
