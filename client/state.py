"""The device's local state: keys, contacts, Olm sessions and history, in one SQLite file.

Secret values (identity seed, sealing key, vodozemac pickles) and message texts are sealed with
a local storage key kept in ``device.key`` (mode 0600). Every change that must survive together
(an Olm session and the history row it produced) is one transaction.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import nacl.secret
import nacl.utils

from federation.errors import StorageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS contacts (address TEXT PRIMARY KEY, identity_key BLOB NOT NULL,
    node_id TEXT NOT NULL, device_list BLOB NOT NULL, sig BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (peer_key TEXT NOT NULL, session_id TEXT NOT NULL,
    pickle BLOB NOT NULL, last_used INTEGER NOT NULL, PRIMARY KEY (peer_key, session_id));
CREATE TABLE IF NOT EXISTS history (seq INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id BLOB NOT NULL UNIQUE, peer TEXT NOT NULL, outgoing INTEGER NOT NULL,
    sender TEXT NOT NULL, text BLOB NOT NULL, sent_at INTEGER NOT NULL,
    received_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS history_peer ON history(peer, seq);
"""


@dataclass(frozen=True, slots=True)
class Contact:
    address: str
    identity_key: bytes
    node_id: str
    device_list: bytes
    sig: bytes


@dataclass(frozen=True, slots=True)
class HistoryRow:
    msg_id: bytes
    peer: str
    outgoing: bool
    sender: str
    text: str
    sent_at: int
    received_at: int


class DeviceState:
    def __init__(self, home: str) -> None:
        os.makedirs(home, mode=0o700, exist_ok=True)
        key_path = os.path.join(home, "device.key")
        if not os.path.exists(key_path):
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(nacl.utils.random(32))
                f.flush()
                os.fsync(f.fileno())
        with open(key_path, "rb") as f:
            self.storage_key = f.read()
        self._box = nacl.secret.SecretBox(self.storage_key)
        self.db = sqlite3.connect(os.path.join(home, "device.db"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA secure_delete=ON")
        self.db.executescript(SCHEMA)

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

    # ---- key/value (sealed) ------------------------------------------------------------------

    def get(self, k: str) -> bytes | None:
        row = self.db.execute("SELECT v FROM kv WHERE k=?", (k,)).fetchone()
        return None if row is None else self.open(row[0])

    def put(self, db: sqlite3.Connection, k: str, v: bytes) -> None:
        db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (k, self.seal(v)))

    # ---- contacts ----------------------------------------------------------------------------

    def contact(self, address: str) -> Contact | None:
        row = self.db.execute(
            "SELECT address, identity_key, node_id, device_list, sig FROM contacts WHERE address=?",
            (address,),
        ).fetchone()
        return None if row is None else Contact(*row)

    def save_contact(self, db: sqlite3.Connection, c: Contact) -> None:
        db.execute(
            "INSERT OR REPLACE INTO contacts VALUES (?, ?, ?, ?, ?)",
            (c.address, c.identity_key, c.node_id, c.device_list, c.sig),
        )

    # ---- sessions ----------------------------------------------------------------------------

    def sessions(self, peer_key: str) -> list[tuple[str, str]]:
        """``(session_id, pickle)`` for a peer device, most recently used first."""
        rows = self.db.execute(
            "SELECT session_id, pickle FROM sessions WHERE peer_key=? ORDER BY last_used DESC",
            (peer_key,),
        ).fetchall()
        return [(r[0], self.open(r[1]).decode()) for r in rows]

    def save_session(
        self, db: sqlite3.Connection, peer_key: str, session_id: str, pickle: str, now: int
    ) -> None:
        db.execute(
            "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
            (peer_key, session_id, self.seal(pickle.encode()), now),
        )

    # ---- history -----------------------------------------------------------------------------

    def has_message(self, msg_id: bytes) -> bool:
        return (
            self.db.execute("SELECT 1 FROM history WHERE msg_id=?", (msg_id,)).fetchone()
            is not None
        )

    def add_history(self, db: sqlite3.Connection, row: HistoryRow) -> bool:
        cur = db.execute(
            "INSERT OR IGNORE INTO history (msg_id, peer, outgoing, sender, text, sent_at, "
            "received_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                row.msg_id,
                row.peer,
                int(row.outgoing),
                row.sender,
                self.seal(row.text.encode()),
                row.sent_at,
                row.received_at,
            ),
        )
        return cur.rowcount == 1

    def history(self, peer: str) -> list[HistoryRow]:
        rows = self.db.execute(
            "SELECT msg_id, peer, outgoing, sender, text, sent_at, received_at FROM history "
            "WHERE peer=? ORDER BY seq",
            (peer,),
        ).fetchall()
        return [
            HistoryRow(r[0], r[1], bool(r[2]), r[3], self.open(r[4]).decode(), r[5], r[6])
            for r in rows
        ]
