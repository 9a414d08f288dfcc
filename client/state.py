"""The device's local state: keys, contacts, Olm sessions and history, in one SQLite file.

Secret values (identity seed, sealing key, vodozemac pickles) and message texts are sealed with
a local storage key kept in ``device.key`` (mode 0600, optionally wrapped by a passphrase via
Argon2id). Every change that must survive together (an Olm session and the history row it
produced) is one transaction. Deleted and expired messages are removed with
``secure_delete=ON`` and a ``wal_checkpoint(TRUNCATE)``, so no remnant stays in the files.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from federation.errors import LocalProtocolError, StorageError

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS contacts (address TEXT PRIMARY KEY, identity_key BLOB NOT NULL,
    node_id TEXT NOT NULL, device_list BLOB NOT NULL, sig BLOB NOT NULL,
    verified INTEGER NOT NULL DEFAULT 0, timer_ms INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS sessions (peer_key TEXT NOT NULL, session_id TEXT NOT NULL,
    pickle BLOB NOT NULL, last_used INTEGER NOT NULL, PRIMARY KEY (peer_key, session_id));
CREATE TABLE IF NOT EXISTS history (seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id BLOB NOT NULL UNIQUE, peer TEXT NOT NULL, outgoing INTEGER NOT NULL,
    sender TEXT NOT NULL, text BLOB NOT NULL, sent_at INTEGER NOT NULL,
    received_at INTEGER NOT NULL, status INTEGER NOT NULL DEFAULT 0,
    read INTEGER NOT NULL DEFAULT 0, edited INTEGER NOT NULL DEFAULT 0,
    expires_in INTEGER NOT NULL DEFAULT 0, expire_at INTEGER,
    devices_total INTEGER NOT NULL DEFAULT 0, devices_verified INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS history_peer ON history(peer, seq);
CREATE INDEX IF NOT EXISTS history_expire ON history(expire_at);
CREATE TABLE IF NOT EXISTS device_names (device_id TEXT PRIMARY KEY, name BLOB NOT NULL);
"""
KEY_FILE = "device.key"
_WRAPPED = b"HVPW1"

STATUS_SENT, STATUS_DELIVERED, STATUS_READ = 0, 1, 2
STATUS_NAMES = {STATUS_SENT: "sent", STATUS_DELIVERED: "delivered", STATUS_READ: "read"}


@dataclass(frozen=True, slots=True)
class Contact:
    address: str
    identity_key: bytes
    node_id: str
    device_list: bytes
    sig: bytes
    verified: bool = False
    timer_ms: int = 0


@dataclass(frozen=True, slots=True)
class HistoryRow:
    msg_id: bytes
    peer: str
    outgoing: bool
    sender: str
    text: str
    sent_at: int
    received_at: int
    status: int = STATUS_SENT
    read: bool = False
    edited: bool = False
    expires_in: int = 0
    expire_at: int | None = None
    devices_total: int = 0
    devices_verified: int = 0


def _load_storage_key(home: str, passphrase: str | None) -> bytes:
    """Read (or create) the local storage key; unwrap it with the passphrase if it has one."""
    path = os.path.join(home, KEY_FILE)
    if not os.path.exists(path):
        key = nacl.utils.random(32)
        data = key
        if passphrase:
            salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
            kek = nacl.pwhash.argon2id.kdf(32, passphrase.encode(), salt)
            data = _WRAPPED + salt + nacl.secret.SecretBox(kek).encrypt(key)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return key
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(_WRAPPED):
        return data
    if not passphrase:
        raise LocalProtocolError(
            "this device's history is passphrase-protected: set HAVEN_PASSPHRASE"
        )
    salt_end = len(_WRAPPED) + nacl.pwhash.argon2id.SALTBYTES
    kek = nacl.pwhash.argon2id.kdf(32, passphrase.encode(), data[len(_WRAPPED) : salt_end])
    try:
        return bytes(nacl.secret.SecretBox(kek).decrypt(data[salt_end:]))
    except nacl.exceptions.CryptoError as exc:
        raise LocalProtocolError("wrong passphrase") from exc


class DeviceState:
    def __init__(self, home: str, passphrase: str | None = None) -> None:
        os.makedirs(home, mode=0o700, exist_ok=True)
        self.storage_key = _load_storage_key(home, passphrase)
        self._box = nacl.secret.SecretBox(self.storage_key)
        self.db = sqlite3.connect(os.path.join(home, "device.db"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA secure_delete=ON")
        self.db.execute("PRAGMA temp_store=MEMORY")
        self.db.executescript(SCHEMA)
        self.db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.db.close()

    def seal(self, data: bytes) -> bytes:
        return bytes(self._box.encrypt(data))

    def open(self, data: bytes) -> bytes:
        return bytes(self._box.decrypt(data))

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StorageError(f"device store: {exc}") from exc

    def scrub(self) -> None:
        """Push deleted pages out of the WAL (secure_delete already zeroed them in the db)."""
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # ---- key/value (sealed) ------------------------------------------------------------------

    def get(self, k: str) -> bytes | None:
        row = self.db.execute("SELECT v FROM kv WHERE k=?", (k,)).fetchone()
        return None if row is None else self.open(row[0])

    def put(self, db: sqlite3.Connection, k: str, v: bytes) -> None:
        db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (k, self.seal(v)))

    # ---- contacts ----------------------------------------------------------------------------

    def contact(self, address: str) -> Contact | None:
        row = self.db.execute(
            "SELECT address, identity_key, node_id, device_list, sig, verified, timer_ms "
            "FROM contacts WHERE address=?",
            (address,),
        ).fetchone()
        if row is None:
            return None
        return Contact(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6])

    def save_contact(self, db: sqlite3.Connection, c: Contact) -> None:
        db.execute(
            "INSERT OR REPLACE INTO contacts VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                c.address,
                c.identity_key,
                c.node_id,
                c.device_list,
                c.sig,
                int(c.verified),
                c.timer_ms,
            ),
        )

    # ---- sessions ----------------------------------------------------------------------------

    def sessions(self, peer_key: str) -> list[tuple[str, str]]:
        """``(session_id, pickle)`` for a peer device, most recently used first."""
        rows = self.db.execute(
            "SELECT session_id, pickle FROM sessions WHERE peer_key=? ORDER BY last_used DESC",
            (peer_key,),
        ).fetchall()
        return [(r[0], self.open(r[1]).decode()) for r in rows]

    def has_session(self, peer_key: str) -> bool:
        row = self.db.execute("SELECT 1 FROM sessions WHERE peer_key=?", (peer_key,)).fetchone()
        return row is not None

    def save_session(
        self, db: sqlite3.Connection, peer_key: str, session_id: str, pickle: str, now: int
    ) -> None:
        db.execute(
            "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
            (peer_key, session_id, self.seal(pickle.encode()), now),
        )

    # ---- history -----------------------------------------------------------------------------

    _COLS = (
        "msg_id, peer, outgoing, sender, text, sent_at, received_at, status, read, edited, "
        "expires_in, expire_at, devices_total, devices_verified"
    )

    def add_history(self, db: sqlite3.Connection, row: HistoryRow) -> bool:
        cur = db.execute(
            f"INSERT OR IGNORE INTO history ({self._COLS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.msg_id,
                row.peer,
                int(row.outgoing),
                row.sender,
                self.seal(row.text.encode()),
                row.sent_at,
                row.received_at,
                row.status,
                int(row.read),
                int(row.edited),
                row.expires_in,
                row.expire_at,
                row.devices_total,
                row.devices_verified,
            ),
        )
        return cur.rowcount == 1

    def _row(self, r: tuple[Any, ...]) -> HistoryRow:
        return HistoryRow(
            r[0],
            r[1],
            bool(r[2]),
            r[3],
            self.open(r[4]).decode(),
            r[5],
            r[6],
            r[7],
            bool(r[8]),
            bool(r[9]),
            r[10],
            r[11],
            r[12],
            r[13],
        )

    def message(self, msg_id: bytes) -> HistoryRow | None:
        r = self.db.execute(
            f"SELECT {self._COLS} FROM history WHERE msg_id=?", (msg_id,)
        ).fetchone()
        return None if r is None else self._row(r)

    def history(self, peer: str) -> list[HistoryRow]:
        rows = self.db.execute(
            f"SELECT {self._COLS} FROM history WHERE peer=? ORDER BY seq", (peer,)
        ).fetchall()
        return [self._row(r) for r in rows]

    def all_history(self) -> list[HistoryRow]:
        rows = self.db.execute(f"SELECT {self._COLS} FROM history ORDER BY seq").fetchall()
        return [self._row(r) for r in rows]

    def chats(self) -> list[tuple[str, int, int, int]]:
        """``(peer, messages, unread, last_at)`` per conversation, most recent first."""
        return list(
            self.db.execute(
                "SELECT peer, count(*), sum(CASE WHEN outgoing=0 AND read=0 THEN 1 ELSE 0 END), "
                "max(sent_at) FROM history GROUP BY peer ORDER BY max(seq) DESC"
            ).fetchall()
        )

    def purge_expired(self, now: int) -> int:
        with self.tx() as db:
            n = db.execute(
                "DELETE FROM history WHERE expire_at IS NOT NULL AND expire_at <= ?", (now,)
            ).rowcount
        if n:
            self.scrub()
        return int(n)
