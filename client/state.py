"""The device's local state: keys, contacts, Olm sessions and history, in one SQLCipher file.

``device.db`` is encrypted as a whole under a random database key that only ``device.keys``
holds, wrapped by the passphrase or the OS keyring (:mod:`client.devicedb`,
:mod:`client.keyslots`). Inside it, secret values (identity seed, sealing key, vodozemac pickles)
are sealed once more under a storage key derived from the database key, and each message text is
sealed under its own key in a slot of ``device.keys``. Deleting, expiring or editing a text zeroes
its slot in the same batch as the history transaction (one fsync per transaction), so the old
ciphertext left in freed pages or WAL frames opens for nobody, not even with the passphrase.
Every change that must survive together (an Olm session and the history row it produced) is one
transaction.

The outbox holds payloads typed while the home node was unreachable. A queued text is sealed
under its history row's key slot, not the storage key, so deleting, editing or expiring the
message shreds the queued copy with it.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import nacl.exceptions
import nacl.secret
import sqlcipher3

from federation.errors import LocalProtocolError, StorageError
from federation.wire import packb, unpackb

from . import devicedb
from .payload import FileRef

SCHEMA_VERSION = devicedb.SCHEMA_VERSION
KEY_FILE = devicedb.KEYS_FILE

STATUS_PENDING = -1  # queued on this device (the outbox), not yet accepted by the home node
STATUS_SENT, STATUS_DELIVERED, STATUS_READ = 0, 1, 2
STATUS_NAMES = {
    STATUS_PENDING: "pending",
    STATUS_SENT: "sent",
    STATUS_DELIVERED: "delivered",
    STATUS_READ: "read",
}
NAME_MAX = 64  # display names and nicknames, in characters


@dataclass(frozen=True, slots=True)
class Contact:
    address: str
    identity_key: bytes
    node_id: str
    device_list: bytes
    sig: bytes
    verified: bool = False
    timer_ms: int = 0
    display_name: str = ""  # the contact's own choice, received end to end (a profile payload)
    nickname: str = ""  # ours for them; never leaves this device
    timer_at: int = 0  # sent_at of the timer setting in force (the latest wins)
    profile_sent: int = 0  # the version of our profile this contact last received from us


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
    ttl_at: int | None = None  # outgoing: until when the nodes may hold it undelivered
    error: str = ""  # outgoing: a permanent send failure (a stable code)
    seq: int = 0  # the row's local order (filled on read)

    def not_delivered(self, now: int) -> bool:
        """An outgoing message that failed for good, or whose TTL passed with no receipt."""
        if not self.outgoing or self.status >= STATUS_DELIVERED:
            return False
        return bool(self.error) or (self.ttl_at is not None and self.ttl_at <= now)


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """A payload queued on this device until the home node accepts it (oldest first)."""

    msg_id: bytes
    peer: str
    payload: bytes  # an encoded :class:`client.payload.Payload`
    ttl_ms: int
    created: int


FILE_PENDING, FILE_DOWNLOADED, FILE_FAILED, FILE_SENT = "pending", "downloaded", "failed", "sent"


@dataclass(frozen=True, slots=True)
class Attachment:
    """The file of one history row: its reference (as received, or as sent) and its local
    copy. ``state``: ``pending`` (not downloaded yet), ``downloaded``, ``failed`` (``error``
    says why; ``haven download`` tries again), or ``sent`` (ours: ``path`` is the source)."""

    msg_id: bytes
    ref: FileRef
    state: str
    path: str = ""  # where the file is on this device ("" until downloaded)
    plain_sha256: bytes = b""  # SHA-256 of the file itself (known once encrypted or decrypted)
    error: str = ""


def clean_name(name: str) -> str:
    """A display name or nickname as stored: no control characters, at most 64 characters."""
    kept = "".join(ch if _printable(ch) else " " for ch in name)
    return " ".join(kept.split())[:NAME_MAX]


def _printable(ch: str) -> bool:
    cat = unicodedata.category(ch)
    # Format characters go too (bidi overrides can disguise a name), except the joiners that
    # emoji sequences and some scripts need.
    return cat[0] != "C" or ch in "\u200c\u200d"


def exists(home: str) -> bool:
    """Whether ``home`` holds a device store (joined or not yet)."""
    return os.path.isfile(os.path.join(home, devicedb.DB_FILE)) or os.path.isfile(
        os.path.join(home, KEY_FILE)
    )


class DeviceState:
    """One device home's store.

    Args:
        home: the device home (created with mode 0700 if missing).
        passphrase: wraps the database key of a new home; needed to open a protected one.
        keyring: keep the database key of a new home wrapped by the OS keyring (default: the
            ``HAVEN_KEYRING`` environment variable is ``1``). Ignored with a passphrase.
        create: make a new, empty device home if there is none. Only ``join`` (and the app's
            onboarding) pass True; everything else must not turn a mistyped path into a device.

    Raises:
        LocalProtocolError: ``passphrase_required``, ``wrong_passphrase``,
            ``keyring_unavailable``, ``no_device`` (no device home at ``home`` and not
            ``create``), ``not_a_directory`` (``home`` is a file).
        StorageError: the key file is missing or damaged, or the database does not open.
    """

    def __init__(
        self,
        home: str,
        passphrase: str | None = None,
        keyring: bool | None = None,
        create: bool = True,
    ) -> None:
        if os.path.exists(home) and not os.path.isdir(home):
            raise LocalProtocolError(f"{home} is a file, not a device home", code="not_a_directory")
        if not create and not exists(home):
            raise LocalProtocolError(f"no device here ({home})", code="no_device")
        os.makedirs(home, mode=0o700, exist_ok=True)
        if keyring is None:
            keyring = os.environ.get("HAVEN_KEYRING") == "1"
        self.home = home
        self.notices: list[str] = []  # one-line messages for the user (e.g. after migrating)
        self.db, self.keys, self._db_key = devicedb.open_home(
            home, passphrase, keyring, self.notices
        )
        self.storage_key = devicedb.storage_key_for(self._db_key)
        self._box = nacl.secret.SecretBox(self.storage_key)

    def close(self) -> None:
        try:
            self.db.execute("PRAGMA wal_checkpoint(RESTART)")  # never TRUNCATE
        except sqlcipher3.Error:
            pass  # the frames stay in the WAL, where the next open finds them
        self.db.close()

    @property
    def protected(self) -> bool:
        """Whether the database key is wrapped (passphrase or keyring), not stored in clear."""
        return self.keys.protected

    @property
    def protection(self) -> str:
        """``"passphrase"``, ``"keyring"`` or ``"none"``."""
        return self.keys.protection

    def change_passphrase(self, new: str | None, keyring: bool = False) -> None:
        """Rewrap the database key (one slot of ``device.keys``); the database is untouched.
        ``new=None`` and not ``keyring`` stores the key in clear (unprotected)."""
        self.keys.rewrap(self._db_key, new, keyring)

    def seal(self, data: bytes) -> bytes:
        return bytes(self._box.encrypt(data))

    def open(self, data: bytes) -> bytes:
        return bytes(self._box.decrypt(data))

    @contextmanager
    def tx(self) -> Iterator[Any]:
        """One transaction. The key slots it allocates or zeroes are written with it, under its
        write lock, with one fsync just before COMMIT (a group commit with the history rows)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.keys.refresh()  # another process on this home may have written slots
                yield self.db
                self.keys.flush()
                self.db.execute("COMMIT")
            except BaseException:
                if not self.db.in_transaction:  # COMMIT failed: retake the lock to restore
                    self.db.execute("BEGIN IMMEDIATE")
                try:
                    self.keys.abort()
                finally:
                    self.db.execute("ROLLBACK")
                raise
            self.keys.committed()
        except sqlcipher3.Error as exc:
            raise StorageError(f"device store: {exc}") from exc

    def scrub(self) -> None:
        """Start the WAL over (RESTART, never TRUNCATE: truncation frees blocks unwritten)."""
        self.db.execute("PRAGMA wal_checkpoint(RESTART)")

    # ---- key/value (sealed) ------------------------------------------------------------------

    def get(self, k: str) -> bytes | None:
        row = self.db.execute("SELECT v FROM kv WHERE k=?", (k,)).fetchone()
        return None if row is None else self.open(row[0])

    def put(self, db: Any, k: str, v: bytes) -> None:
        db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (k, self.seal(v)))

    # ---- contacts ----------------------------------------------------------------------------

    _CONTACT_COLS = (
        "address, identity_key, node_id, device_list, sig, verified, timer_ms, display_name, "
        "nickname, timer_at, profile_sent"
    )

    @staticmethod
    def _contact_row(row: tuple[Any, ...]) -> Contact:
        return Contact(
            row[0],
            row[1],
            row[2],
            row[3],
            row[4],
            bool(row[5]),
            row[6],
            row[7],
            row[8],
            row[9],
            row[10],
        )

    def contact(self, address: str) -> Contact | None:
        row = self.db.execute(
            f"SELECT {self._CONTACT_COLS} FROM contacts WHERE address=?", (address,)
        ).fetchone()
        return None if row is None else self._contact_row(row)

    def contacts(self) -> list[Contact]:
        """Every pinned contact (our own address included), by address."""
        rows = self.db.execute(
            f"SELECT {self._CONTACT_COLS} FROM contacts ORDER BY address"
        ).fetchall()
        return [self._contact_row(r) for r in rows]

    def save_contact(self, db: Any, c: Contact) -> None:
        """Pin a contact's keys, list, verification and timer. The profile fields
        (``display_name``, ``nickname``, ``timer_at``, ``profile_sent``) of an existing row
        are kept: they change only through :meth:`update_contact`, so a caller holding an
        older copy of the row cannot undo them."""
        db.execute(
            f"INSERT INTO contacts ({self._CONTACT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(address) DO UPDATE SET identity_key=excluded.identity_key, "
            "node_id=excluded.node_id, device_list=excluded.device_list, sig=excluded.sig, "
            "verified=excluded.verified, timer_ms=excluded.timer_ms",
            (
                c.address,
                c.identity_key,
                c.node_id,
                c.device_list,
                c.sig,
                int(c.verified),
                c.timer_ms,
                c.display_name,
                c.nickname,
                c.timer_at,
                c.profile_sent,
            ),
        )

    _CONTACT_FIELDS = frozenset(
        {"display_name", "nickname", "timer_ms", "timer_at", "profile_sent", "verified"}
    )

    def update_contact(self, db: Any, address: str, **fields: str | int | bool) -> bool:
        """Set some of a contact's fields; False if there is no such contact."""
        bad = set(fields) - self._CONTACT_FIELDS
        if bad:
            raise LocalProtocolError(f"not a contact field: {', '.join(sorted(bad))}")
        if not fields:
            return self.contact(address) is not None
        sets = ", ".join(f"{k}=?" for k in fields)
        values = [int(v) if isinstance(v, bool) else v for v in fields.values()]
        cur = db.execute(f"UPDATE contacts SET {sets} WHERE address=?", (*values, address))
        return bool(cur.rowcount == 1)

    def rename_contact(self, db: Any, old: str, new: str) -> None:
        """A contact moved to address ``new`` (docs/protocol.md §12.5; its row for ``new`` is
        pinned already): it keeps the old row's verification, timer and profile fields, the
        conversation (history rows and queued payloads) moves to ``new``, the old row goes."""
        c = self.contact(old)
        if c is None:
            return
        self.update_contact(
            db,
            new,
            verified=c.verified,
            timer_ms=c.timer_ms,
            timer_at=c.timer_at,
            display_name=c.display_name,
            nickname=c.nickname,
            profile_sent=c.profile_sent,
        )
        db.execute("UPDATE history SET peer=? WHERE peer=?", (new, old))
        db.execute("UPDATE history SET sender=? WHERE sender=?", (new, old))
        db.execute("UPDATE outbox SET peer=? WHERE peer=?", (new, old))
        db.execute("DELETE FROM contacts WHERE address=?", (old,))

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

    def save_session(self, db: Any, peer_key: str, session_id: str, pickle: str, now: int) -> None:
        db.execute(
            "INSERT OR REPLACE INTO sessions VALUES (?, ?, ?, ?)",
            (peer_key, session_id, self.seal(pickle.encode()), now),
        )

    # ---- history ---------------------------------------------------------------------------

    _COLS = (
        "msg_id, peer, outgoing, sender, text, sent_at, received_at, status, read, edited, "
        "expires_in, expire_at, devices_total, devices_verified, slot, ttl_at, error"
    )
    _READ_COLS = _COLS + ", seq"

    def _seal_text(self, text: str) -> tuple[int, bytes]:
        slot, key = self.keys.allocate()
        return slot, bytes(nacl.secret.SecretBox(key).encrypt(text.encode()))

    def add_history(self, db: Any, row: HistoryRow) -> bool:
        """Insert a row (its text under a new per-message key); False if the id exists."""
        slot, sealed = self._seal_text(row.text)
        cur = db.execute(
            f"INSERT OR IGNORE INTO history ({self._COLS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                row.msg_id,
                row.peer,
                int(row.outgoing),
                row.sender,
                sealed,
                row.sent_at,
                row.received_at,
                row.status,
                int(row.read),
                int(row.edited),
                row.expires_in,
                row.expire_at,
                row.devices_total,
                row.devices_verified,
                slot,
                row.ttl_at,
                row.error,
            ),
        )
        if cur.rowcount != 1:
            self.keys.release(slot)
            return False
        return True

    def edit_history(self, db: Any, msg_id: bytes, text: str) -> bool:
        """Replace a text: sealed under a fresh key; the old key is zeroed at commit."""
        r = db.execute("SELECT slot FROM history WHERE msg_id=?", (msg_id,)).fetchone()
        if r is None:
            return False
        att = self.attachment(msg_id)
        slot, sealed = self._seal_text(text)
        db.execute(
            "UPDATE history SET text=?, slot=?, edited=1 WHERE msg_id=?", (sealed, slot, msg_id)
        )
        self.keys.shred(r[0])
        if att is not None:  # its file reference was sealed under the old key: re-seal
            self._write_attachment(db, att)
        return True

    def delete_history(self, db: Any, msg_id: bytes) -> bool:
        """Delete a row; its key is zeroed at commit (crypto-shredding the text)."""
        r = db.execute("SELECT slot FROM history WHERE msg_id=?", (msg_id,)).fetchone()
        if r is None:
            return False
        db.execute("DELETE FROM history WHERE msg_id=?", (msg_id,))
        db.execute("DELETE FROM outbox WHERE msg_id=?", (msg_id,))
        db.execute("DELETE FROM attachments WHERE msg_id=?", (msg_id,))
        self.keys.shred(r[0])
        return True

    def _text(self, slot: int, sealed: bytes) -> str:
        key = self.keys.key(slot)
        if key is None:
            raise nacl.exceptions.CryptoError("no key in that slot")
        return bytes(nacl.secret.SecretBox(key).decrypt(sealed)).decode()

    def _row(self, r: tuple[Any, ...]) -> HistoryRow:
        try:
            text = self._text(r[14], r[4])
        except nacl.exceptions.CryptoError:
            self.keys.refresh()  # a row another process on this home wrote since
            try:
                text = self._text(r[14], r[4])
            except nacl.exceptions.CryptoError as exc:
                raise StorageError("a stored message does not open with its key") from exc
        return HistoryRow(
            r[0],
            r[1],
            bool(r[2]),
            r[3],
            text,
            r[5],
            r[6],
            r[7],
            bool(r[8]),
            bool(r[9]),
            r[10],
            r[11],
            r[12],
            r[13],
            r[15],
            r[16],
            r[17],
        )

    def message(self, msg_id: bytes) -> HistoryRow | None:
        r = self.db.execute(
            f"SELECT {self._READ_COLS} FROM history WHERE msg_id=?", (msg_id,)
        ).fetchone()
        return None if r is None else self._row(r)

    def history(self, peer: str) -> list[HistoryRow]:
        rows = self.db.execute(
            f"SELECT {self._READ_COLS} FROM history WHERE peer=? ORDER BY seq", (peer,)
        ).fetchall()
        return [self._row(r) for r in rows]

    def history_keys(self, peer: str) -> list[tuple[bytes, str, int]]:
        """``(msg_id, sender, sent_at)`` of a conversation's rows in local order, without
        opening any text (what the group counter needs)."""
        rows = self.db.execute(
            "SELECT msg_id, sender, sent_at FROM history WHERE peer=? ORDER BY seq", (peer,)
        ).fetchall()
        return [(bytes(r[0]), str(r[1]), int(r[2])) for r in rows]

    def all_history(self) -> list[HistoryRow]:
        rows = self.db.execute(f"SELECT {self._READ_COLS} FROM history ORDER BY seq").fetchall()
        return [self._row(r) for r in rows]

    def history_after(self, seq: int, limit: int = 500) -> list[HistoryRow]:
        """Rows with ``seq`` greater than ``seq`` (of every conversation), in local order."""
        rows = self.db.execute(
            f"SELECT {self._READ_COLS} FROM history WHERE seq>? ORDER BY seq LIMIT ?",
            (seq, limit),
        ).fetchall()
        return [self._row(r) for r in rows]

    def set_status(
        self, db: Any, msg_id: bytes, status: int, *, ttl_at: int | None = None, error: str = ""
    ) -> None:
        """Record an outgoing message's send outcome (pending → sent, or a failure code)."""
        db.execute(
            "UPDATE history SET status=?, ttl_at=coalesce(?, ttl_at), error=? "
            "WHERE msg_id=? AND outgoing=1",
            (status, ttl_at, error, msg_id),
        )

    # ---- per-client cursors (what a CLI client attached to the daemon has printed) ----------

    def cursor(self, client: str) -> int:
        """The last history ``seq`` ``client`` has seen (0: none)."""
        row = self.db.execute("SELECT seq FROM cursors WHERE client=?", (client,)).fetchone()
        return 0 if row is None else int(row[0])

    def set_cursor(self, db: Any, client: str, seq: int) -> None:
        db.execute("INSERT OR REPLACE INTO cursors VALUES (?, ?)", (client, seq))

    # ---- the outbox --------------------------------------------------------------------------

    # ---- attachments and uploads (client/transfers.py) --------------------------------------

    def _write_attachment(self, db: Any, a: Attachment) -> None:
        box = self._outbox_box(a.msg_id)  # the history row's key: shredded with the row
        meta = bytes(box.encrypt(packb(a.ref.to_obj())))
        local = bytes(box.encrypt(packb({"path": a.path, "sha256": a.plain_sha256})))
        db.execute(
            "INSERT OR REPLACE INTO attachments (msg_id, meta, local, state, error) "
            "VALUES (?, ?, ?, ?, ?)",
            (a.msg_id, meta, local, a.state, a.error),
        )

    def add_attachment(self, db: Any, a: Attachment) -> None:
        """Store a history row's file (after the row, in the same transaction)."""
        self._write_attachment(db, a)

    def set_attachment(self, db: Any, a: Attachment) -> None:
        """Record a changed state, path or error of a row's file."""
        self._write_attachment(db, a)

    def attachment(self, msg_id: bytes) -> Attachment | None:
        """The file of a history row, or None (not a file, or its key is gone)."""
        r = self.db.execute(
            "SELECT meta, local, state, error FROM attachments WHERE msg_id=?", (msg_id,)
        ).fetchone()
        if r is None:
            return None
        try:
            box = self._outbox_box(msg_id)
            meta, local = bytes(box.decrypt(r[0])), bytes(box.decrypt(r[1]))
        except nacl.exceptions.CryptoError:
            self.keys.refresh()  # written by another process on this home since
            try:
                box = self._outbox_box(msg_id)
                meta, local = bytes(box.decrypt(r[0])), bytes(box.decrypt(r[1]))
            except nacl.exceptions.CryptoError:
                return None
        loc = unpackb(local, max_len=len(local))
        return Attachment(
            msg_id,
            FileRef.from_obj(unpackb(meta, max_len=len(meta))),
            str(r[2]),
            str(loc.get("path", "")),
            bytes(loc.get("sha256", b"")),
            str(r[3]),
        )

    def attachment_ids(self, state: str) -> list[bytes]:
        """Message ids of the files in ``state``, oldest first."""
        rows = self.db.execute(
            "SELECT a.msg_id FROM attachments a JOIN history h ON h.msg_id=a.msg_id "
            "WHERE a.state=? ORDER BY h.seq",
            (state,),
        ).fetchall()
        return [bytes(r[0]) for r in rows]

    def save_upload(self, db: Any, blob: bytes, record: bytes, now: int) -> None:
        """Remember an upload in progress, ``record`` sealed under a key slot of its own."""
        slot, key = self.keys.allocate()
        sealed = bytes(nacl.secret.SecretBox(key).encrypt(record))
        db.execute(
            "INSERT INTO uploads (blob, record, slot, created) VALUES (?, ?, ?, ?)",
            (blob, sealed, slot, now),
        )

    def uploads(self) -> list[tuple[bytes, bytes]]:
        """``(blob, record)`` of every upload in progress, oldest first."""
        out = []
        rows = self.db.execute("SELECT blob, record, slot FROM uploads ORDER BY created")
        for blob, sealed, slot in rows.fetchall():
            try:
                out.append((bytes(blob), self._slot_open(slot, sealed)))
            except nacl.exceptions.CryptoError:
                self.keys.refresh()  # saved by another process on this home since
                try:
                    out.append((bytes(blob), self._slot_open(slot, sealed)))
                except nacl.exceptions.CryptoError:
                    continue
        return out

    def drop_upload(self, db: Any, blob: bytes) -> None:
        """Forget an upload; its key slot is zeroed at commit."""
        r = db.execute("SELECT slot FROM uploads WHERE blob=?", (blob,)).fetchone()
        if r is None:
            return
        db.execute("DELETE FROM uploads WHERE blob=?", (blob,))
        self.keys.shred(r[0])

    def _slot_open(self, slot: int, sealed: bytes) -> bytes:
        key = self.keys.key(slot)
        if key is None:
            raise nacl.exceptions.CryptoError("no key in that slot")
        return bytes(nacl.secret.SecretBox(key).decrypt(sealed))

    def _outbox_box(self, msg_id: bytes) -> nacl.secret.SecretBox:
        """What seals a queued payload: the key slot of its history row (a text), so that
        deleting, editing or expiring the message shreds the queued copy with it; the storage
        key for a payload with no row (a timer setting, which holds no text)."""
        r = self.db.execute("SELECT slot FROM history WHERE msg_id=?", (msg_id,)).fetchone()
        if r is None:
            return self._box
        key = self.keys.key(r[0])
        if key is None:
            raise nacl.exceptions.CryptoError("no key in that slot")
        return nacl.secret.SecretBox(key)

    def queue(self, db: Any, item: OutboxItem) -> None:
        """Queue a payload (after adding its history row, in the same transaction); queueing
        one again replaces its payload (an edit before sending) and keeps its place."""
        sealed = bytes(self._outbox_box(item.msg_id).encrypt(item.payload))
        db.execute(
            "INSERT INTO outbox (msg_id, peer, payload, ttl_ms, created) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(msg_id) DO UPDATE SET payload=excluded.payload",  # keeps its place
            (item.msg_id, item.peer, sealed, item.ttl_ms, item.created),
        )

    def has_queued(self, peer: str | None = None) -> bool:
        """Whether anything (or anything to ``peer``) is queued, without opening the queue."""
        if peer is None:
            r = self.db.execute("SELECT 1 FROM outbox LIMIT 1").fetchone()
        else:
            r = self.db.execute("SELECT 1 FROM outbox WHERE peer=? LIMIT 1", (peer,)).fetchone()
        return r is not None

    def unqueue(self, db: Any, msg_id: bytes) -> None:
        db.execute("DELETE FROM outbox WHERE msg_id=?", (msg_id,))

    def outbox(self) -> list[OutboxItem]:
        """Every queued payload, oldest first. One whose key is gone (its message was deleted
        or expired meanwhile) is left out; :meth:`purge_expired` and deletes remove them."""
        out = []
        rows = self.db.execute(
            "SELECT msg_id, peer, payload, ttl_ms, created FROM outbox ORDER BY seq"
        ).fetchall()
        for msg_id, peer, sealed, ttl_ms, created in rows:
            try:
                plain = bytes(self._outbox_box(msg_id).decrypt(sealed))
            except nacl.exceptions.CryptoError:
                self.keys.refresh()  # queued by another process on this home since
                try:
                    plain = bytes(self._outbox_box(msg_id).decrypt(sealed))
                except nacl.exceptions.CryptoError:
                    continue
            out.append(OutboxItem(msg_id, peer, plain, ttl_ms, created))
        return out

    def chats(self) -> list[tuple[str, int, int, int]]:
        """``(peer, messages, unread, last_at)`` per conversation, most recent first."""
        return list(
            self.db.execute(
                "SELECT peer, count(*), sum(CASE WHEN outgoing=0 AND read=0 THEN 1 ELSE 0 END), "
                "max(sent_at) FROM history GROUP BY peer ORDER BY max(seq) DESC"
            ).fetchall()
        )

    def purge_expired(self, now: int) -> int:
        """Delete expired rows and zero their keys: one transaction, one key-file fsync."""
        due = "SELECT 1 FROM history WHERE expire_at IS NOT NULL AND expire_at <= ? LIMIT 1"
        if self.db.execute(due, (now,)).fetchone() is None:
            return 0
        with self.tx() as db:
            slots = [
                r[0]
                for r in db.execute(
                    "SELECT slot FROM history WHERE expire_at IS NOT NULL AND expire_at <= ?",
                    (now,),
                ).fetchall()
            ]
            if slots:
                db.execute(
                    "DELETE FROM outbox WHERE msg_id IN (SELECT msg_id FROM history "
                    "WHERE expire_at IS NOT NULL AND expire_at <= ?)",
                    (now,),
                )
                db.execute(
                    "DELETE FROM attachments WHERE msg_id IN (SELECT msg_id FROM history "
                    "WHERE expire_at IS NOT NULL AND expire_at <= ?)",
                    (now,),
                )
                db.execute(
                    "DELETE FROM history WHERE expire_at IS NOT NULL AND expire_at <= ?", (now,)
                )
            for slot in slots:
                self.keys.shred(slot)
        if slots:
            self.scrub()
        return len(slots)
