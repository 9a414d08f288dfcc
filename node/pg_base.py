"""Connections, schema and error translation of the PostgreSQL store (node/pg_store.py).

:class:`PgBase` owns the asyncpg pool and the few ways :class:`node.pg_store.PgStore` talks
to it: one statement (:meth:`PgBase._call`, retried once when the connection was lost) or one
transaction (:meth:`PgBase._tx`, optionally holding :data:`KEYS_LOCK`). Every asyncpg or
PostgreSQL error leaves here as :class:`StorageError` with PostgreSQL's message and SQLSTATE
(53100, disk full, as :class:`node.ballast.DiskFull`), never with the DSN or an address.
The schema is versioned: ``schema_version`` holds the version, :data:`MIGRATIONS` one script
per version, applied in order under an advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from federation.clock import Clock, SystemClock
from federation.errors import StorageError

from .atrest import EpochKeys
from .ballast import DiskFull

log = logging.getLogger("haven.store")

T = TypeVar("T")

KEYS_LOCK = int.from_bytes(b"havenkey", "big") & (2**63 - 1)  # advisory lock: the key file
MIGRATE_LOCK = KEYS_LOCK - 1  # advisory lock: one migration at a time
DISK_FULL = "53100"
CONNECT_TIMEOUT_S = 10.0
# A connection lost mid-call: retried once where the work is idempotent.
_LOST = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a connection the server ended, met mid-protocol
    TimeoutError,
)

MIGRATIONS: list[str] = [
    # version 1 (= SQLite schema v4: operator tools included)
    """
    CREATE TABLE accounts (name text PRIMARY KEY, created bigint NOT NULL,
                           disabled boolean NOT NULL DEFAULT false,
                           quota integer NOT NULL DEFAULT 0);
    CREATE TABLE invites (token_hash bytea PRIMARY KEY, name text NOT NULL,
                          expires bigint NOT NULL, kind text NOT NULL DEFAULT 'invite',
                          uses integer NOT NULL DEFAULT 1);
    CREATE INDEX invites_name ON invites(name);
    CREATE TABLE devices (mailbox bytea PRIMARY KEY, account text NOT NULL,
                          auth_key bytea NOT NULL);
    CREATE INDEX devices_account ON devices(account);
    CREATE TABLE device_lists (account text PRIMARY KEY, version bigint NOT NULL,
                               blob bytea NOT NULL, sig bytea NOT NULL);
    CREATE TABLE otks (mailbox bytea NOT NULL, key_id text NOT NULL, key text NOT NULL,
                       PRIMARY KEY (mailbox, key_id));
    CREATE TABLE fallback (mailbox bytea PRIMARY KEY, key_id text NOT NULL, key text NOT NULL);
    CREATE TABLE envelopes (idh bytea PRIMARY KEY, mbh bytea NOT NULL, ord bigint NOT NULL,
                            exp bigint NOT NULL, sealed bytea NOT NULL);
    CREATE INDEX envelopes_mailbox ON envelopes(mbh, ord);
    CREATE INDEX envelopes_expiry ON envelopes(exp);
    CREATE TABLE outbox (idh bytea PRIMARY KEY, dh bytea NOT NULL, mbh bytea NOT NULL,
                         ord bigint NOT NULL, exp bigint NOT NULL, sealed bytea NOT NULL);
    CREATE INDEX outbox_dest ON outbox(dh, ord);
    CREATE INDEX outbox_mailbox ON outbox(mbh, ord);
    CREATE INDEX outbox_expiry ON outbox(exp);
    -- sealed blobs are random: no compression attempt
    ALTER TABLE envelopes ALTER COLUMN sealed SET STORAGE EXTERNAL;
    ALTER TABLE outbox ALTER COLUMN sealed SET STORAGE EXTERNAL;
    CREATE UNLOGGED TABLE outbox_frontier (dh bytea PRIMARY KEY, ord bigint NOT NULL);
    -- a write's order chains in one round trip: lock them (sorted: no deadlock), then read
    -- their tops; VOLATILE, so the read takes a snapshot after the locks are held
    CREATE FUNCTION haven_chain_tops(locks bigint[], env_mbh bytea[], obx_mbh bytea[],
                                     dests bytea[])
    RETURNS TABLE (t integer, h bytea, top bigint) LANGUAGE plpgsql VOLATILE AS $$
    BEGIN
      PERFORM count(pg_advisory_xact_lock(x)) FROM (SELECT x FROM unnest(locks) AS x ORDER BY x) s;
      RETURN QUERY
        SELECT 0, e.mbh, max(e.ord) FROM envelopes e WHERE e.mbh = ANY(env_mbh) GROUP BY e.mbh
        UNION ALL
        SELECT 1, o.mbh, max(o.ord) FROM outbox o WHERE o.mbh = ANY(obx_mbh) GROUP BY o.mbh
        UNION ALL
        SELECT 2, f.dh, f.ord FROM outbox_frontier f WHERE f.dh = ANY(dests);
    END $$;
    CREATE TABLE peers (node_id text PRIMARY KEY, url text NOT NULL, host text NOT NULL,
                        last_seen bigint NOT NULL);
    CREATE INDEX peers_host ON peers(host);
    """,
    # version 2: hosts a peer had before a signed locator change (docs/protocol.md §12.5)
    """
    CREATE TABLE peer_hosts (host text PRIMARY KEY, node_id text NOT NULL);
    """,
    # version 3: ``created`` of the last locator change followed for the peer (0: none), so an
    # older statement replayed later cannot move the pin back (docs/protocol.md §12.5)
    """
    ALTER TABLE peers ADD COLUMN moved bigint NOT NULL DEFAULT 0;
    """,
]


def pg_error(what: str, exc: BaseException) -> StorageError:
    """PostgreSQL's own message and SQLSTATE (:class:`DiskFull` for 53100); a lost or refused
    connection as one line naming its kind. Never the DSN (it may hold a password)."""
    if isinstance(exc, asyncpg.PostgresError) and not isinstance(
        exc, asyncpg.PostgresConnectionError
    ):
        state = str(getattr(exc, "sqlstate", "") or "")
        cls = DiskFull if state == DISK_FULL else StorageError
        message = str(getattr(exc, "message", "") or exc)
        return cls(f"{what}: {message} [SQLSTATE {state}]")
    # an OSError's own text names the address (asyncio: "Connect call failed ('10.0.0.5', 5432)")
    errno_ = getattr(exc, "errno", None)
    detail = os.strerror(errno_) if isinstance(errno_, int) and errno_ else type(exc).__name__
    return StorageError(f"{what}: PostgreSQL connection failed ({detail})")


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the schema to the newest version (one process at a time: an advisory lock);
    returns the version. Raises if the database is newer than this software."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATE_LOCK)
        await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer)")
        version = int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))
        if version > len(MIGRATIONS):
            raise StorageError(f"store schema {version} is newer than this software")
        for i in range(version, len(MIGRATIONS)):
            await conn.execute(MIGRATIONS[i])
            await conn.execute("INSERT INTO schema_version VALUES ($1)", i + 1)
    return len(MIGRATIONS)


async def prepare_database(dsn: str) -> int:
    """Connect once and migrate (``haven node init --store``): a bad DSN, a refused login or an
    unreachable server fails here as one :class:`StorageError` line. Returns the version."""
    try:
        conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT_S)
    except (asyncpg.PostgresError, *_LOST) as exc:
        raise pg_error("cannot open store", exc) from exc
    except ValueError as exc:
        raise StorageError("cannot open store: malformed PostgreSQL DSN") from exc
    try:
        return await migrate(conn)
    except asyncpg.PostgresError as exc:
        raise pg_error("cannot migrate store", exc) from exc
    finally:
        await conn.close()


async def _light_reset(conn: asyncpg.Connection) -> None:
    """What a pooled connection needs on release: a transaction left open rolled back.

    asyncpg's default reset (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``)
    costs a round trip per release, about a fifth of a worker's CPU under load (profiled). The
    store's connections take only transaction-level advisory locks and ``SET LOCAL``
    settings, open no cursors beyond a transaction and never ``LISTEN`` (the bus has its own
    connections), so nothing else can outlive a release."""
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class PgBase:
    """The pool, the schema and the statement/transaction helpers (no envelope logic)."""

    def __init__(
        self,
        dsn: str,
        keys: EpochKeys,
        *,
        leader: bool = True,
        clock: Clock | None = None,
        pool_size: int = 8,
    ) -> None:
        self.dsn = dsn
        self.keys = keys
        self.leader = leader
        self.clock: Clock = clock or SystemClock()
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None

    # ---- plumbing ----------------------------------------------------------------------------

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("store is not open")
        return self._pool

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                timeout=CONNECT_TIMEOUT_S,
                reset=_light_reset,
                server_settings={"synchronous_commit": "on", "application_name": "haven"},
            )
            async with self.pool.acquire() as conn:
                await migrate(conn)
        except (asyncpg.PostgresError, *_LOST) as exc:
            await self._abandon()
            raise pg_error("cannot open store", exc) from exc
        except ValueError as exc:  # asyncpg's DSN parser; its text may quote the DSN
            await self._abandon()
            raise StorageError("cannot open store: malformed PostgreSQL DSN") from exc
        except BaseException:
            await self._abandon()
            raise

    async def _abandon(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    async def schema_version(self) -> int:
        """The schema version stored in the database."""
        return int(await self._val("SELECT max(version) FROM schema_version") or 0)

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), 10)
        except (asyncpg.PostgresError, *_LOST):
            pool.terminate()

    async def _call(self, what: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``fn`` on a pooled connection; errors translated; a lost connection retried once
        (every caller's work is idempotent or a single atomic statement)."""
        for attempt in (0, 1):
            try:
                async with self._conn() as conn:
                    return await fn(conn)
            except asyncpg.PostgresError as exc:
                if attempt or not isinstance(exc, asyncpg.PostgresConnectionError):
                    raise pg_error(what, exc) from exc
            except _LOST as exc:
                if attempt:
                    raise pg_error(what, exc) from exc
            log.info("%s: PostgreSQL connection lost, retrying once", what)
        raise AssertionError("unreachable")

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection. When one turns out lost, every idle connection of the pool is
        replaced (the server may have ended them all: a restart, a failover)."""
        async with self.pool.acquire() as conn:
            try:
                yield conn
            except _LOST:
                conn.terminate()
                await self.pool.expire_connections()
                raise

    async def _all(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._call("read failed", lambda c: c.fetch(sql, *args))

    async def _one(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self._call("read failed", lambda c: c.fetchrow(sql, *args))

    async def _val(self, sql: str, *args: Any) -> Any:
        return await self._call("read failed", lambda c: c.fetchval(sql, *args))

    async def _exec(self, sql: str, *args: Any) -> int:
        """One write statement; the number of rows it touched."""
        status = await self._call("write failed", lambda c: c.execute(sql, *args))
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    @contextlib.asynccontextmanager
    async def _tx(self, exclusive: bool | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A transaction; ``exclusive`` True/False also takes :data:`KEYS_LOCK` exclusive/shared
        and re-reads the key file under it (False: to seal under the keys; True: to change
        them). BEGIN and the lock go in one round trip. Errors are translated (not retried:
        the caller decides)."""
        head = "BEGIN"
        if exclusive is not None:
            fn = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
            head += f"; SELECT {fn}({KEYS_LOCK})"
        try:
            async with self._conn() as conn:
                await conn.execute(head)
                try:
                    if exclusive is not None:
                        self.keys.reload()
                    yield conn
                except BaseException:
                    await _rollback(conn)
                    raise
                await conn.execute("COMMIT")
        except (asyncpg.PostgresError, *_LOST) as exc:
            raise pg_error("write failed", exc) from exc


async def _rollback(conn: asyncpg.Connection) -> None:
    """Roll back; a connection already lost has nothing to roll back (the server did), and a
    failed ROLLBACK never hides the error that caused it."""
    if conn.is_closed():
        return
    try:
        await conn.execute("ROLLBACK")
    except (asyncpg.PostgresError, *_LOST) as exc:
        log.debug("rollback failed: %s", type(exc).__name__)
