"""What the workers of one node share through PostgreSQL (``haven node serve --workers N``).

Several node processes serve one node identity on one host (node/workers.py). They share the
store, and through this module four more things, all keyed under the *bus key*: 32 random
bytes the supervisor makes at start and hands to its workers through a pipe. It is never
written anywhere, so every tag, lock key and hash below is noise once the node stops.

* **Notifications** (``LISTEN``/``NOTIFY``). A commit that writes envelopes for a mailbox
  notifies ``haven_env`` with the mailbox's keyed tag; one that writes outbox rows notifies
  ``haven_obx`` with the destination's keyed tag. Payloads carry tags only (hex, at most
  :data:`MAX_TAGS_PER_NOTIFY` per payload: PostgreSQL's limit is 8,000 bytes); the envelope
  itself goes through the table. Each worker listens on its own connection; when that
  connection is lost, notifications sent meanwhile are lost, so a reconnect re-checks every
  connected device and every destination (``on_reconnect``).
* **A device registry**: the UNLOGGED table ``haven_device_conns`` maps a mailbox tag to the
  worker and connection serial that attached it last; ``haven_dev`` names the tag. A worker
  holding an older connection for that tag closes it, so a device's newer connection replaces
  its older one across workers as it does within one.
* **One sender per destination**: a worker posts to a destination only while it holds a
  session-level advisory lock on a key derived from the destination, taken on a dedicated
  connection. ``SKIP LOCKED`` claims rows, not destinations: two workers could otherwise post
  one mailbox's envelopes out of order. PostgreSQL releases the locks of a worker that dies
  with its connection; if that connection is lost while the worker lives, the worker can no
  longer prove what it holds, so :meth:`PgBus.run` fails and the supervisor restarts it.
* **Device-link tokens** (node/linktokens.py keeps them in memory in a single process): a
  token minted through one worker may be redeemed through another, so workers keep them in
  the UNLOGGED table ``haven_links`` instead: a keyed hash of the token hash, the account and
  exact expiry sealed under a subkey of the bus key, and the expiry rounded up to the minute
  in clear (for the purge). Redeeming deletes the row (one use, across workers).
* **Replays across workers**: the UNLOGGED table ``haven_replay`` holds a keyed hash of each
  (origin node id, nonce) of a federation request until the end of the skew window;
  ``INSERT … ON CONFLICT DO NOTHING`` inserting nothing means the request was seen by some
  worker (``replay``, as for the in-memory window). The leader purges expired rows.

UNLOGGED tables are not written to the WAL (nor to replicas or archives) and are emptied by
crash recovery; they hold keyed hashes only. The supervisor creates and empties them at every
start (:func:`prepare`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import asyncpg
import nacl.exceptions
import nacl.secret

from federation.errors import Replay, StorageError

log = logging.getLogger("haven.bus")

CH_ENV = "haven_env"
CH_OBX = "haven_obx"
CH_DEV = "haven_dev"
CH_SEEN = "haven_seen"  # a peer node contacted one worker: every worker resets its backoff
TAG_BYTES = 16
MAX_TAGS_PER_NOTIFY = 200  # 200 x 33 hex characters: well below the 8,000-byte payload limit
PURGE_EVERY_S = 10.0
RECONNECT_MAX_S = 5.0
_HEX_TAG = re.compile(f"[0-9a-f]{{{2 * TAG_BYTES}}}")

SCHEMA = (
    "CREATE UNLOGGED TABLE IF NOT EXISTS haven_replay"
    " (h bytea PRIMARY KEY, expires bigint NOT NULL)",
    "CREATE UNLOGGED TABLE IF NOT EXISTS haven_device_conns"
    " (tag bytea PRIMARY KEY, worker int NOT NULL, serial bigint NOT NULL)",
    "CREATE UNLOGGED TABLE IF NOT EXISTS haven_links"
    " (h bytea PRIMARY KEY, sealed bytea NOT NULL, expires bigint NOT NULL)",
)
# the supervisor's lease: an unkeyed constant (it names no peer or device)
SUPERVISOR_LOCK = int.from_bytes(
    hashlib.blake2b(b"haven-supervisor", digest_size=8).digest(), "big", signed=True
)
LINK_GRAIN_MS = 60_000  # a link row's clear expiry: rounded up to the minute


def keyed(key: bytes, purpose: bytes, value: bytes, size: int = TAG_BYTES) -> bytes:
    """BLAKE2b of ``value`` keyed with the bus key, separated by ``purpose``."""
    return hashlib.blake2b(value, digest_size=size, key=key, person=purpose).digest()


def lock_key(key: bytes, dest: str) -> int:
    """The advisory lock key of a destination: a signed 64-bit keyed hash of its node id."""
    return int.from_bytes(keyed(key, b"haven-dest-lock", dest.encode(), 8), "big", signed=True)


def parse_tags(payload: str) -> list[bytes]:
    """The tags in a notification payload (hex, any separator); anything else is ignored."""
    return [bytes.fromhex(m) for m in _HEX_TAG.findall(payload.lower())]


def payloads(tags: Iterable[bytes]) -> list[str]:
    """Notification payloads for ``tags``: space-separated hex, bounded per payload."""
    hexes = sorted({t.hex() for t in tags})
    return [
        " ".join(hexes[i : i + MAX_TAGS_PER_NOTIFY])
        for i in range(0, len(hexes), MAX_TAGS_PER_NOTIFY)
    ]


async def pg_started_ms(conn: asyncpg.Connection) -> int:
    """PostgreSQL's own start (ms). Requests created before it cannot be checked against a
    replay table that crash recovery emptied: workers refuse them as from before their start."""
    return int(
        await conn.fetchval(
            "SELECT (extract(epoch FROM pg_postmaster_start_time()) * 1000)::bigint"
        )
    )


async def prepare(dsn: str) -> tuple[asyncpg.Connection, int]:
    """Before the workers start: take the supervisor lease (a session advisory lock: two
    supervisors on one store would each think they hold every lock and key their tables
    apart), create or empty the shared tables. Returns the lease's connection (close it to
    let go) and :func:`pg_started_ms`."""
    try:
        conn = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as exc:
        raise StorageError(f"cannot reach PostgreSQL ({type(exc).__name__})") from exc
    try:
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", SUPERVISOR_LOCK):
            raise StorageError("another supervisor already serves this store")
        for stmt in SCHEMA:
            await conn.execute(stmt)
        await conn.execute("TRUNCATE haven_replay, haven_device_conns, haven_links")
        return conn, await pg_started_ms(conn)
    except BaseException as exc:
        await conn.close()
        if isinstance(exc, asyncpg.PostgresError):
            raise StorageError(f"bus tables: {type(exc).__name__}") from exc
        raise


class PgBus:
    """One worker's side of the bus. Build, set the callbacks, :meth:`open`, then :meth:`run`."""

    def __init__(self, dsn: str, key: bytes, worker: int, *, leader: bool) -> None:
        self.dsn = dsn
        self.key = key
        self.worker = worker
        self.leader = leader
        # called with the tags of a notification (on the event loop, never blocking)
        self.on_env: Callable[[list[bytes]], None] = lambda tags: None
        self.on_obx: Callable[[list[bytes]], None] = lambda tags: None
        self.on_dev: Callable[[list[bytes]], None] = lambda tags: None
        self.on_seen: Callable[[list[bytes]], None] = lambda tags: None
        self.on_reconnect: Callable[[], None] = lambda: None
        self.now_ms: Callable[[], int] = lambda: 0
        self._listen: asyncpg.Connection | None = None
        self._locks: asyncpg.Connection | None = None
        self._pool: asyncpg.Pool | None = None
        self._lock_mutex = asyncio.Lock()  # one statement at a time on the lock connection
        self._held: set[str] = set()
        self.pg_started_ms = 0  # PostgreSQL's start, read at open()
        self._lost = asyncio.Event()  # the listen connection ended: reconnect
        self._locks_lost = asyncio.Event()

    # ---- tags ----------------------------------------------------------------------------

    def tag(self, purpose: bytes, value: bytes) -> bytes:
        return keyed(self.key, purpose, value)

    def mailbox_tag(self, mailbox: bytes) -> bytes:
        return keyed(self.key, b"haven-mailbox", mailbox)

    def dest_tag(self, dest: str) -> bytes:
        return keyed(self.key, b"haven-dest", dest.encode())

    # ---- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4)
            self._locks = await asyncpg.connect(self.dsn)
            self._locks.add_termination_listener(lambda _c: self._locks_lost.set())
            await self._connect_listener()
            self.pg_started_ms = await pg_started_ms(self._locks)
            # a predecessor of this worker killed with its connections left its rows
            await self._pool.execute(
                "DELETE FROM haven_device_conns WHERE worker = $1", self.worker
            )
        except (OSError, asyncpg.PostgresError) as exc:
            await self.close()
            raise StorageError(f"bus: cannot reach PostgreSQL ({type(exc).__name__})") from exc

    async def _connect_listener(self) -> None:
        conn = await asyncpg.connect(self.dsn)
        self._lost.clear()
        conn.add_termination_listener(lambda _c: self._lost.set())
        for channel in (CH_ENV, CH_OBX, CH_DEV, CH_SEEN):
            await conn.add_listener(channel, self._notified)
        self._listen = conn

    def _notified(self, _conn: Any, _pid: int, channel: str, payload: str) -> None:
        tags = parse_tags(payload)
        if not tags:
            return
        if channel == CH_ENV:
            self.on_env(tags)
        elif channel == CH_OBX:
            self.on_obx(tags)
        elif channel == CH_DEV:
            self.on_dev(tags)
        elif channel == CH_SEEN:
            self.on_seen(tags)

    async def close(self) -> None:
        for conn in (self._listen, self._locks):
            if conn is not None:
                with contextlib.suppress(Exception):  # closing: the server may be gone
                    await asyncio.wait_for(conn.close(), 2)
        self._listen = self._locks = None
        self._held.clear()
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 2)
            self._pool = None

    async def run(self) -> None:
        """Keep the listen connection (reconnecting, then ``on_reconnect``), purge expired
        replay rows (leader). Raises :class:`StorageError` if the lock connection is lost."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._keep_listening())
            if self.leader:
                tg.create_task(self._purge_loop())
            await self._locks_lost.wait()
            raise StorageError("bus: lock connection lost; advisory locks are gone")

    async def _keep_listening(self) -> None:
        while True:
            await self._lost.wait()
            log.warning("bus: notification connection lost; reconnecting")
            delay = 0.1
            while True:
                try:
                    await self._connect_listener()
                    break
                except (OSError, asyncpg.PostgresError):
                    await asyncio.sleep(delay)
                    delay = min(RECONNECT_MAX_S, delay * 2)
            log.info("bus: notifications back; re-checking connected devices and queues")
            self.on_reconnect()

    async def _purge_loop(self) -> None:
        while True:
            await asyncio.sleep(PURGE_EVERY_S)
            try:
                await self._exec("DELETE FROM haven_replay WHERE expires < $1", self.now_ms())
                await self._exec("DELETE FROM haven_links WHERE expires < $1", self.now_ms())
            except StorageError as exc:
                log.error("bus: replay purge failed (%s)", exc.code)

    # ---- statements ----------------------------------------------------------------------

    def _pool_or_fail(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("bus is not open")
        return self._pool

    async def _exec(self, sql: str, *args: Any) -> str:
        try:
            return str(await self._pool_or_fail().execute(sql, *args))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageError(f"bus: {type(exc).__name__}") from exc

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        try:
            return await self._pool_or_fail().fetchrow(sql, *args)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StorageError(f"bus: {type(exc).__name__}") from exc

    async def notify(self, channel: str, tags: Iterable[bytes]) -> None:
        """Notify ``channel`` with ``tags`` (after a commit, when the store does not)."""
        for payload in payloads(tags):
            await self._exec("SELECT pg_notify($1, $2)", channel, payload)

    # ---- device registry -----------------------------------------------------------------

    async def claim_device(self, tag: bytes) -> int:
        """This worker holds the newest connection for ``tag``; returns its serial. Workers
        holding an older one are told through ``haven_dev``."""
        serial = int.from_bytes(os.urandom(8), "big") >> 1
        await self._exec(
            "INSERT INTO haven_device_conns (tag, worker, serial) VALUES ($1, $2, $3)"
            " ON CONFLICT (tag) DO UPDATE SET worker = $2, serial = $3",
            tag,
            self.worker,
            serial,
        )
        await self.notify(CH_DEV, [tag])
        return serial

    async def device_owner(self, tag: bytes) -> tuple[int, int] | None:
        """(worker, serial) of the newest connection for ``tag``, if any."""
        row = await self._fetchrow(
            "SELECT worker, serial FROM haven_device_conns WHERE tag = $1", tag
        )
        return None if row is None else (int(row["worker"]), int(row["serial"]))

    async def release_device(self, tag: bytes, serial: int) -> None:
        """The connection ``serial`` for ``tag`` ended (a newer one elsewhere keeps its row)."""
        await self._exec(
            "DELETE FROM haven_device_conns WHERE tag = $1 AND worker = $2 AND serial = $3",
            tag,
            self.worker,
            serial,
        )

    # ---- one sender per destination ------------------------------------------------------

    def held(self, dest: str) -> bool:
        """Whether this worker holds ``dest``'s lock (no I/O: the hot lane asks per envelope)."""
        return dest in self._held

    async def try_lock(self, dest: str) -> bool:
        """Take ``dest``'s advisory lock if no other worker holds it."""
        if dest in self._held:
            return True
        got = await self._lock_call("SELECT pg_try_advisory_lock($1)", lock_key(self.key, dest))
        if got:
            self._held.add(dest)
        return bool(got)

    async def unlock(self, dest: str) -> None:
        """Let ``dest`` go. :meth:`held` is false from the call on, before the round trip."""
        if dest not in self._held:
            return
        self._held.discard(dest)
        await self._lock_call("SELECT pg_advisory_unlock($1)", lock_key(self.key, dest))

    async def _lock_call(self, sql: str, key: int) -> Any:
        async with self._lock_mutex:
            conn = self._locks
            if conn is None or self._locks_lost.is_set():
                raise StorageError("bus: lock connection lost")
            try:
                return await conn.fetchval(sql, key)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                self._locks_lost.set()
                raise StorageError(f"bus: lock call failed ({type(exc).__name__})") from exc

    # ---- replays -------------------------------------------------------------------------

    async def remember_nonce(self, origin: str, nonce: bytes, until: int) -> None:
        """Record (origin, nonce) for every worker until ``until`` (ms); raise
        :class:`Replay` if some worker already did."""
        h = keyed(self.key, b"haven-replay", origin.encode() + b"\x00" + nonce)
        status = await self._exec(
            "INSERT INTO haven_replay (h, expires) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            h,
            until,
        )
        if status.endswith(" 0"):
            raise Replay("request nonce already used")

    # ---- device-link tokens --------------------------------------------------------------

    def _link_box(self) -> nacl.secret.SecretBox:
        return nacl.secret.SecretBox(keyed(self.key, b"haven-link-box", b"", 32))

    async def share_link(self, token_hash: bytes, account: str, expires: int) -> None:
        """Make a minted link token redeemable through every worker (once)."""
        sealed = self._link_box().encrypt(expires.to_bytes(8, "big") + account.encode())
        clear = -(-expires // LINK_GRAIN_MS) * LINK_GRAIN_MS
        await self._exec(
            "INSERT INTO haven_links (h, sealed, expires) VALUES ($1, $2, $3)"
            " ON CONFLICT (h) DO NOTHING",
            keyed(self.key, b"haven-link", token_hash),
            bytes(sealed),
            clear,
        )

    async def redeem_link(self, token_hash: bytes, now: int) -> str | None:
        """Consume a link token minted through any worker: its account, or None."""
        row = await self._fetchrow(
            "DELETE FROM haven_links WHERE h = $1 RETURNING sealed",
            keyed(self.key, b"haven-link", token_hash),
        )
        if row is None:
            return None
        try:
            opened = self._link_box().decrypt(bytes(row["sealed"]))
        except nacl.exceptions.CryptoError:
            return None
        if int.from_bytes(opened[:8], "big") <= now:
            return None
        return opened[8:].decode()
