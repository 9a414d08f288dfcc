"""Opening the device database: SQLCipher 4 under a random key from ``device.keys``.

``device.db`` is encrypted as a whole (SQLCipher 4, bundled by the ``sqlcipher3`` wheel; raw
256-bit key, so no KDF runs at open): no SQLite header, no readable page, no readable WAL frame
without the database key. That key lives only in the header slot of ``device.keys``
(:mod:`client.keyslots`), wrapped by the passphrase (Argon2id) or the OS keyring, or in clear on
a device created with neither.

A version-1 home (plaintext ``device.db`` plus ``device.key``) is migrated on first open:
``sqlcipher_export`` into ``device.db.new``, every sealed value re-sealed under a fresh storage
key (history texts under per-message keys), then ``device.db`` → ``device.db.old``,
``device.db.new`` → ``device.db``, and the old file and key overwritten with zeros and removed.
Each step is safe to interrupt: the next open finishes or restarts it. Blocks the filesystem
freed before the migration are not overwritten; the caller tells the user so.
"""

from __future__ import annotations

import os
from typing import Any

import nacl.encoding
import nacl.exceptions
import nacl.hash
import nacl.pwhash
import nacl.secret
import nacl.utils
import sqlcipher3
import vodozemac as vz

from federation.errors import LocalProtocolError, StorageError

from .keyslots import KEY_SIZE, KeySlots

DB_FILE = "device.db"
KEYS_FILE = "device.keys"
V1_KEY_FILE = "device.key"
SQLITE_MAGIC = b"SQLite format 3\x00"
SCHEMA_VERSION = 5
# Schema 2 -> 3 (the app): profiles, shared timers, the durable outbox, per-client cursors.
SCHEMA_V3 = (
    "ALTER TABLE contacts ADD COLUMN display_name TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE contacts ADD COLUMN nickname TEXT NOT NULL DEFAULT ''",
    "ALTER TABLE contacts ADD COLUMN timer_at INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE contacts ADD COLUMN profile_sent INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE history ADD COLUMN ttl_at INTEGER",
    "ALTER TABLE history ADD COLUMN error TEXT NOT NULL DEFAULT ''",
    "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, msg_id BLOB NOT NULL UNIQUE, "
    "peer TEXT NOT NULL, payload BLOB NOT NULL, ttl_ms INTEGER NOT NULL, "
    "created INTEGER NOT NULL)",
    "CREATE TABLE cursors (client TEXT PRIMARY KEY, seq INTEGER NOT NULL)",
)
# Schema 3 -> 4 (attachments, client/transfers.py): a received or sent file per history row
# (its reference and local path sealed under that row's key slot, so deleting or expiring the
# message shreds them), and uploads in progress to resume (each sealed under a key slot of its
# own, zeroed when the upload is done: the file key in a remnant of the record opens for nobody).
SCHEMA_V4 = (
    "CREATE TABLE attachments (msg_id BLOB PRIMARY KEY, meta BLOB NOT NULL, "
    "local BLOB NOT NULL, state TEXT NOT NULL, error TEXT NOT NULL DEFAULT '')",
    "CREATE TABLE uploads (blob BLOB PRIMARY KEY, record BLOB NOT NULL, "
    "slot INTEGER NOT NULL, created INTEGER NOT NULL)",
)
# Schema 4 -> 5 (groups, client/groups.py): per group its book of signed states (the chain every
# member device verifies, client/group_state.py), the read watermarks and when each member joined;
# our Megolm sessions (outbound per group, inbound per sender device and session with its window
# of seen indices); hashes of the invite secrets we issued; group copies waiting for their session
# key. Books, watermarks, pickles and waiting copies are sealed under the storage key; group ids
# stay bare (random, and the database is encrypted as a whole).
SCHEMA_V5 = (
    "CREATE TABLE groups (gid BLOB PRIMARY KEY, joined_at INTEGER NOT NULL, "
    "active INTEGER NOT NULL DEFAULT 1, rotate INTEGER NOT NULL DEFAULT 0, "
    "book BLOB NOT NULL, marks BLOB NOT NULL, since BLOB NOT NULL)",
    "CREATE TABLE group_outbound (gid BLOB PRIMARY KEY, pickle BLOB NOT NULL)",
    "CREATE TABLE group_inbound (sender_device TEXT NOT NULL, session_id TEXT NOT NULL, "
    "gid BLOB NOT NULL, sender TEXT NOT NULL, pickle BLOB NOT NULL, "
    "PRIMARY KEY (sender_device, session_id))",
    "CREATE TABLE group_invites (hash BLOB PRIMARY KEY, gid BLOB NOT NULL, "
    "uses INTEGER NOT NULL, expires INTEGER NOT NULL)",
    "CREATE TABLE group_pending (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "sender_device TEXT NOT NULL, session_id TEXT NOT NULL, data BLOB NOT NULL, "
    "expires INTEGER NOT NULL)",
    "CREATE INDEX group_pending_session ON group_pending(sender_device, session_id)",
)
SCHEMA_V1 = """
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
MIGRATED_NOTICE = (
    "notice: this device's database is now encrypted as a whole; text from before may remain "
    "in the disk's free space"
)
_V1_WRAPPED = b"HVPW1"
# version 1 wrapped device.key with pynacl's default Argon2id limits ("sensitive": 4 passes,
# 1 GiB; 12 s on a 2-core test machine, for every command). device.keys uses "interactive".
V1_OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_SENSITIVE
V1_MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_SENSITIVE


def storage_key_for(db_key: bytes) -> bytes:
    """The key sealing secrets inside the database (and vodozemac pickles), from the db key."""
    return bytes(
        nacl.hash.blake2b(
            b"",
            key=db_key,
            person=b"haven-seal-v2",
            digest_size=32,
            encoder=nacl.encoding.RawEncoder,
        )
    )


def connect(path: str, db_key: bytes) -> Any:
    """An open SQLCipher connection to ``path`` under ``db_key`` (verified by a read)."""
    if not os.path.exists(path):  # SQLite would create it with the umask's mode
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    try:
        db = sqlcipher3.connect(path, isolation_level=None)
    except sqlcipher3.Error as exc:
        raise StorageError(f"device store: {exc}") from exc
    try:
        db.execute("PRAGMA cipher_log_level = NONE")  # SQLCipher would log to stderr
        db.execute(f"PRAGMA key = \"x'{db_key.hex()}'\"")
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlcipher3.Error as exc:
        db.close()
        raise StorageError(
            "this device's database does not open with its key (damaged or replaced)",
            code="store_key_mismatch",
        ) from exc
    return db


def is_plaintext(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == SQLITE_MAGIC
    except FileNotFoundError:
        return False


def shred_file(path: str) -> None:
    """Overwrite a file with zeros in place, fsync, and remove it (missing: nothing to do)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        chunk = bytes(1 << 16)
        for off in range(0, size, len(chunk)):
            os.pwrite(fd, chunk[: min(len(chunk), size - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(path)


def _fsync_dir(home: str) -> None:
    fd = os.open(home, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_v1_key(home: str, passphrase: str | None) -> bytes:
    """The version-1 storage key from ``device.key`` (unwrapped with the passphrase)."""
    path = os.path.join(home, V1_KEY_FILE)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise StorageError(
            "this device's old key file (device.key) is missing: its database cannot be migrated",
            code="key_file_missing",
        ) from None
    if not data.startswith(_V1_WRAPPED):
        return data
    if not passphrase:
        raise LocalProtocolError(
            "this device is passphrase-protected: set HAVEN_PASSPHRASE", code="passphrase_required"
        )
    salt_end = len(_V1_WRAPPED) + nacl.pwhash.argon2id.SALTBYTES
    salt = data[len(_V1_WRAPPED) : salt_end]
    kek = nacl.pwhash.argon2id.kdf(32, passphrase.encode(), salt, V1_OPSLIMIT, V1_MEMLIMIT)
    try:
        return bytes(nacl.secret.SecretBox(kek).decrypt(data[salt_end:]))
    except nacl.exceptions.CryptoError:
        raise LocalProtocolError("wrong passphrase", code="wrong_passphrase") from None


def open_home(
    home: str, passphrase: str | None, keyring: bool, notices: list[str]
) -> tuple[Any, KeySlots, bytes]:
    """Open (creating or migrating as needed) a device home: ``(connection, keys, db_key)``."""
    db_path = os.path.join(home, DB_FILE)
    keys_path = os.path.join(home, KEYS_FILE)
    _recover(home)
    old_key: bytes | None = None
    if is_plaintext(db_path):
        old_key = load_v1_key(home, passphrase)  # first: a wrong passphrase changes nothing
    if os.path.exists(keys_path):
        keys = KeySlots(keys_path)
        db_key = keys.unwrap(passphrase)
    elif os.path.exists(db_path) and old_key is None:
        keys = KeySlots(keys_path)  # raises key_file_missing
        db_key = b""
    else:
        db_key = nacl.utils.random(KEY_SIZE)
        keys = KeySlots.create(keys_path, db_key, passphrase, keyring)
    if old_key is not None:
        _migrate_v1(home, keys, db_key, old_key)
        notices.append(MIGRATED_NOTICE)
    db = connect(db_path, db_key)
    try:
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA journal_size_limit=-1",  # never truncate the WAL (remnant policy)
            "PRAGMA synchronous=FULL",
            "PRAGMA secure_delete=ON",
            "PRAGMA temp_store=MEMORY",
        ):
            db.execute(pragma)
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            if version < 2:
                db.executescript(SCHEMA_V1)
            _upgrade(db, keys, None, storage_key_for(db_key))
        elif version > SCHEMA_VERSION:
            raise StorageError("this device's database is from a newer Haven", code="too_new")
        _reconcile(db, keys)
    except sqlcipher3.Error as exc:
        db.close()
        raise StorageError(f"device store: {exc}") from exc
    except BaseException:
        db.close()
        raise
    return db, keys, db_key


def _recover(home: str) -> None:
    """Finish or undo an interrupted v1 migration (see the module docstring)."""
    db_path = os.path.join(home, DB_FILE)
    new, old = db_path + ".new", db_path + ".old"
    if os.path.exists(old):
        if not os.path.exists(db_path) and os.path.exists(new):
            os.replace(new, db_path)
            _fsync_dir(home)
        if os.path.exists(db_path) and not is_plaintext(db_path):
            for p in (old, old + "-wal", old + "-shm", os.path.join(home, V1_KEY_FILE)):
                shred_file(p)
            return
    if os.path.exists(new):
        for p in (new, new + "-journal"):
            shred_file(p)
    if os.path.exists(db_path) and not is_plaintext(db_path):
        shred_file(os.path.join(home, V1_KEY_FILE))


def _migrate_v1(home: str, keys: KeySlots, db_key: bytes, old_key: bytes) -> None:
    db_path = os.path.join(home, DB_FILE)
    new = db_path + ".new"
    try:
        src = sqlcipher3.connect(db_path, isolation_level=None)  # no key: plaintext
        try:
            src.execute("ATTACH DATABASE ? AS enc KEY ?", (new, f"x'{db_key.hex()}'"))
            src.execute("SELECT sqlcipher_export('enc')")
            src.execute("PRAGMA enc.user_version=1")
            src.execute("DETACH DATABASE enc")
        finally:
            src.close()
        enc = connect(new, db_key)
        try:
            enc.execute("PRAGMA synchronous=FULL")
            enc.execute("PRAGMA secure_delete=ON")
            _upgrade(enc, keys, old_key, storage_key_for(db_key))
        finally:
            enc.close()
    except sqlcipher3.Error as exc:
        raise StorageError(f"device store migration: {exc}") from exc
    fd = os.open(new, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(db_path, db_path + ".old")
    _fsync_dir(home)
    os.replace(new, db_path)
    _fsync_dir(home)
    for p in (db_path + ".old", db_path + ".old-wal", db_path + ".old-shm"):
        shred_file(p)
    shred_file(os.path.join(home, V1_KEY_FILE))
    for p in (db_path + "-wal", db_path + "-shm"):  # the old WAL (empty after a clean close)
        shred_file(p)


def _upgrade(db: Any, keys: KeySlots, old_key: bytes | None, new_key: bytes) -> None:
    """Schema 1 → 2: history gets a key slot per row; sealed values move to ``new_key``.
    Schema 2 → 3: the columns and tables of :data:`SCHEMA_V3`; 3 → 4: :data:`SCHEMA_V4`;
    4 → 5: :data:`SCHEMA_V5`.
    One transaction for all."""
    new = nacl.secret.SecretBox(new_key)
    old = None if old_key is None else nacl.secret.SecretBox(old_key)

    db.execute("BEGIN IMMEDIATE")
    try:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            db.execute("COMMIT")  # another process on this home created it meanwhile
            return
        keys.refresh()
        if version < 2:
            db.execute("ALTER TABLE history ADD COLUMN slot INTEGER NOT NULL DEFAULT -1")
        if version < 3:
            for stmt in SCHEMA_V3:
                db.execute(stmt)
        if version < 4:
            for stmt in SCHEMA_V4:
                db.execute(stmt)
        if version < 5:
            for stmt in SCHEMA_V5:
                db.execute(stmt)
        if version < 2 and old is not None and old_key is not None:  # a migrated v1 database
            for seq, text in db.execute("SELECT seq, text FROM history").fetchall():
                slot, key = keys.allocate()
                sealed = nacl.secret.SecretBox(key).encrypt(bytes(old.decrypt(text)))
                db.execute(
                    "UPDATE history SET text=?, slot=? WHERE seq=?", (bytes(sealed), slot, seq)
                )
            for k, v in db.execute("SELECT k, v FROM kv").fetchall():
                plain = bytes(old.decrypt(v))
                if k == "account":
                    plain = vz.Account.from_pickle(plain.decode(), old_key).pickle(new_key).encode()
                db.execute("UPDATE kv SET v=? WHERE k=?", (bytes(new.encrypt(plain)), k))
            for peer, sid, pickle in db.execute(
                "SELECT peer_key, session_id, pickle FROM sessions"
            ).fetchall():
                session = vz.Session.from_pickle(bytes(old.decrypt(pickle)).decode(), old_key)
                db.execute(
                    "UPDATE sessions SET pickle=? WHERE peer_key=? AND session_id=?",
                    (bytes(new.encrypt(session.pickle(new_key).encode())), peer, sid),
                )
            for dev_id, name in db.execute("SELECT device_id, name FROM device_names").fetchall():
                db.execute(
                    "UPDATE device_names SET name=? WHERE device_id=?",
                    (bytes(new.encrypt(bytes(old.decrypt(name)))), dev_id),
                )
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        keys.flush()
        db.execute("COMMIT")
        keys.committed()
    except nacl.exceptions.CryptoError as exc:
        keys.abort()
        db.execute("ROLLBACK")
        raise StorageError("old device data failed authentication", code="storage_error") from exc
    except BaseException:
        keys.abort()
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _reconcile(db: Any, keys: KeySlots) -> None:
    """Zero key slots no row references; drop rows whose key is gone (both: a crash). Under the
    write lock, so that another process on this home is never between a key write and its
    commit while this runs."""
    db.execute("BEGIN IMMEDIATE")
    try:
        keys.refresh()
        refs = [r[0] for r in db.execute("SELECT slot FROM history").fetchall()]
        refs += [r[0] for r in db.execute("SELECT slot FROM uploads").fetchall()]
        lost = keys.reconcile(refs)
        if lost:
            db.executemany("DELETE FROM history WHERE slot=?", [(s,) for s in lost])
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
