"""The device's key file: the wrapped database key and one key per stored message.

``device.keys`` is a file of fixed-size slots overwritten in place (``pwrite`` + ``fsync``), the
device-side counterpart of the node's epoch-key file (``node/atrest.py``):

- the **header slot** (:data:`HEADER_SIZE` bytes) holds the random database key that opens
  ``device.db`` (SQLCipher), wrapped by an Argon2id key derived from the passphrase, by a key
  kept in the OS keyring, or — on a device created without either — in clear (``protected`` is
  then false, and ``haven whoami`` says so). Changing the passphrase rewrites this one slot; the
  database is not re-keyed.
- **message slots** (:data:`SLOT_SIZE` bytes each) hold one random key per history row; the row
  stores its slot index and its text is sealed under that key. Deleting, expiring or editing a
  text zeroes its slot, so every copy of the old ciphertext (freed pages, stale WAL frames,
  blocks the filesystem let go) is noise even to someone holding the database key.

Slot writes are part of the history transaction that needs them, like a group commit: the new
keys and the zeroed slots of one transaction are written together, with one ``fsync``, just
before it commits, while the database's write lock is held (so processes sharing a home never
write the file at the same time). Slot 0 is not a key: it holds a random token, renewed on every
write, which tells a process that another one changed the file (:meth:`KeySlots.refresh`). A
transaction that rolls back restores the slots it changed. A crash between the key write and
the commit can leave keys nobody references (the next open zeroes them,
:meth:`KeySlots.reconcile`) or, for an edit, zero the key of a row that still exists. Such a
message is then dropped, never revealed.
"""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Iterable
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils

from federation.errors import LocalProtocolError, StorageError

MAGIC = b"HVKS"
VERSION = 1
HEADER_SIZE = 256
SLOT_SIZE = 32
GROW_SLOTS = 256  # the file grows by 8 KiB of zeroed slots at a time
KEY_SIZE = nacl.secret.SecretBox.KEY_SIZE

MODE_CLEAR, MODE_PASSPHRASE, MODE_KEYRING = 0, 1, 2
MODE_NAMES = {MODE_CLEAR: "none", MODE_PASSPHRASE: "passphrase", MODE_KEYRING: "keyring"}
# Argon2id cost of the passphrase wrap: libsodium's "interactive" limits (2 passes, 64 MiB),
# stored in the slot so that a later version can raise them on the next passphrase change.
OPSLIMIT = nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE
MEMLIMIT = nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE
KEYRING_SERVICE = "haven-device"

# magic, version, mode, opslimit, memlimit, salt, length of the wrapped key
_HEADER = struct.Struct(">4sBBIQ16sH")
_ZERO = bytes(SLOT_SIZE)


def _keyring() -> Any | None:
    """The ``keyring`` module if it is installed and has a usable backend, else ``None``."""
    try:
        import keyring  # type: ignore[import-not-found,unused-ignore]
        import keyring.backends.fail  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    try:
        backend = keyring.get_keyring()
    except Exception:  # noqa: BLE001 - a broken keyring configuration is "no keyring"
        return None
    if isinstance(backend, keyring.backends.fail.Keyring):
        return None
    return keyring


def _kek(passphrase: str, salt: bytes, ops: int, mem: int) -> bytes:
    return bytes(nacl.pwhash.argon2id.kdf(KEY_SIZE, passphrase.encode(), salt, ops, mem))


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KeySlots:
    """An open ``device.keys``: header slot plus message-key slots, cached in memory."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise StorageError(
                "this device's key file (device.keys) is missing: its database cannot be opened",
                code="key_file_missing",
            ) from None
        if len(data) < HEADER_SIZE or (len(data) - HEADER_SIZE) % SLOT_SIZE:
            raise StorageError("device key file has the wrong size", code="key_file_damaged")
        self._load_header(data)
        self._pending_keys: set[int] = set()  # allocated in the open transaction
        self._pending_zero: dict[int, bytes] = {}  # zeroed in it: slot -> the key it held
        self._dirty: set[int] = set()  # changed in memory, not yet written
        self._flushed = False  # this transaction's slots are on disk
        self._load_slots(data)

    def _load_slots(self, data: bytes) -> None:
        self._slots = bytearray(data[HEADER_SIZE:])
        self._on_disk = len(self._slots) // SLOT_SIZE
        self._free = [i for i in range(1, self._on_disk) if self._slot(i) == _ZERO]
        self._free.reverse()  # pop() hands out the lowest free slot first
        self._token = self._slot(0) if self._on_disk else _ZERO

    def refresh(self) -> None:
        """Re-read the slots if another process wrote the file since (its token changed).
        Called at the start of every transaction, under the database's write lock."""
        if self._pending_keys or self._pending_zero:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            token = os.pread(fd, SLOT_SIZE, HEADER_SIZE)
            if token == self._token:
                return
            size = os.fstat(fd).st_size
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
        if len(data) < HEADER_SIZE + SLOT_SIZE or (len(data) - HEADER_SIZE) % SLOT_SIZE:
            raise StorageError("device key file has the wrong size", code="key_file_damaged")
        self._dirty = set()
        self._load_slots(data)

    # ---- creation and the header slot ------------------------------------------------------

    @classmethod
    def create(cls, path: str, db_key: bytes, passphrase: str | None, keyring: bool) -> KeySlots:
        """Write a new key file holding ``db_key`` (exclusive create: never overwrites one)."""
        header = _header(db_key, passphrase, keyring)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            data = header + nacl.utils.random(SLOT_SIZE) + bytes(SLOT_SIZE * (GROW_SLOTS - 1))
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        _fsync_dir(path)
        return cls(path)

    def _load_header(self, data: bytes) -> None:
        magic, version, mode, ops, mem, salt, n = _HEADER.unpack_from(data)
        if magic != MAGIC or version != VERSION or mode not in MODE_NAMES:
            raise StorageError("not a device key file", code="key_file_damaged")
        self.mode: int = mode
        self._ops, self._mem, self._salt = int(ops), int(mem), bytes(salt)
        self._wrapped = bytes(data[_HEADER.size : _HEADER.size + n])

    @property
    def protected(self) -> bool:
        return self.mode != MODE_CLEAR

    @property
    def protection(self) -> str:
        return MODE_NAMES[self.mode]

    def unwrap(self, passphrase: str | None) -> bytes:
        """The database key. Raises ``passphrase_required`` / ``wrong_passphrase``."""
        if self.mode == MODE_CLEAR:
            return bytes(self._wrapped[:KEY_SIZE])
        if self.mode == MODE_KEYRING:
            kr = _keyring()
            secret = None if kr is None else kr.get_password(KEYRING_SERVICE, self._salt.hex())
            if secret is None:
                raise LocalProtocolError(
                    "this device's key is in the OS keyring, which is not available",
                    code="keyring_unavailable",
                )
            kek = bytes.fromhex(secret)
        else:
            if not passphrase:
                raise LocalProtocolError(
                    "this device is passphrase-protected: set HAVEN_PASSPHRASE",
                    code="passphrase_required",
                )
            kek = _kek(passphrase, self._salt, self._ops, self._mem)
        try:
            return bytes(nacl.secret.SecretBox(kek).decrypt(self._wrapped))
        except nacl.exceptions.CryptoError:
            raise LocalProtocolError("wrong passphrase", code="wrong_passphrase") from None

    def rewrap(self, db_key: bytes, passphrase: str | None, keyring: bool = False) -> None:
        """Replace the header slot in place (a passphrase change): one write, one fsync."""
        old_mode, old_salt = self.mode, self._salt
        header = _header(db_key, passphrase, keyring)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, header, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._load_header(header)
        if old_mode == MODE_KEYRING and old_salt != self._salt:
            kr = _keyring()
            if kr is not None:
                try:
                    kr.delete_password(KEYRING_SERVICE, old_salt.hex())
                except Exception:  # noqa: BLE001 - keyring backends raise their own types
                    pass

    # ---- message slots ---------------------------------------------------------------------

    def _slot(self, i: int) -> bytes:
        return bytes(self._slots[i * SLOT_SIZE : (i + 1) * SLOT_SIZE])

    def key(self, slot: int) -> bytes | None:
        """The key in ``slot``, or ``None`` if it was zeroed (the text is shredded)."""
        if not 0 < slot < len(self._slots) // SLOT_SIZE:
            return None
        k = self._slot(slot)
        return None if k == _ZERO else k

    def _set(self, slot: int, value: bytes) -> None:
        self._slots[slot * SLOT_SIZE : (slot + 1) * SLOT_SIZE] = value
        self._dirty.add(slot)

    def allocate(self) -> tuple[int, bytes]:
        """A fresh key in a free slot (on disk once :meth:`flush` runs)."""
        if not self._free:
            start = len(self._slots) // SLOT_SIZE
            self._slots.extend(bytes(SLOT_SIZE * GROW_SLOTS))
            self._free = list(range(start + GROW_SLOTS - 1, start - 1, -1))
        slot = self._free.pop()
        key = nacl.utils.random(KEY_SIZE)
        self._set(slot, key)
        self._pending_keys.add(slot)
        return slot, key

    def release(self, slot: int) -> None:
        """Give back a slot allocated in this transaction that ended up unused."""
        if slot in self._pending_keys:
            self._pending_keys.discard(slot)
            self._set(slot, _ZERO)
            self._free.append(slot)
            self._free.sort(reverse=True)

    def shred(self, slot: int) -> None:
        """Zero ``slot`` (its row is deleted or re-sealed in this transaction)."""
        if slot in self._pending_keys:  # allocated and dropped in one transaction
            self.release(slot)
            return
        key = self.key(slot)
        if key is not None and slot not in self._pending_zero:
            self._pending_zero[slot] = key
            self._set(slot, _ZERO)

    def flush(self) -> None:
        """Write this transaction's new and zeroed slots: one fsync, just before COMMIT."""
        self._write()
        self._flushed = True

    def committed(self) -> None:
        """The transaction committed: its zeroed slots become free."""
        self._free.extend(self._pending_zero)
        self._free.sort(reverse=True)
        self._pending_keys, self._pending_zero, self._flushed = set(), {}, False

    def abort(self) -> None:
        """The transaction rolled back: restore the slots it zeroed, zero those it allocated
        (on disk too if :meth:`flush` had written them). Call under the write lock."""
        for slot in sorted(self._pending_keys):
            self.release(slot)
        for slot, key in self._pending_zero.items():
            self._set(slot, key)
        self._pending_zero = {}
        if self._flushed:
            self._write()
        else:
            self._dirty = set()  # memory is back to what the disk holds
        self._flushed = False

    def reconcile(self, referenced: Iterable[int]) -> list[int]:
        """Zero every key no row references (a crash between a key write and its commit);
        return the referenced slots that hold no key. Call under the write lock."""
        refs = set(referenced)
        for i in range(1, len(self._slots) // SLOT_SIZE):
            if i not in refs and self._slot(i) != _ZERO:
                self._set(i, _ZERO)
                self._free.append(i)
        self._free.sort(reverse=True)
        self._write()
        return sorted(i for i in refs if self.key(i) is None)

    def _write(self) -> None:
        grown = self._on_disk * SLOT_SIZE < len(self._slots)
        if not self._dirty and not grown:
            return
        self._token = nacl.utils.random(SLOT_SIZE)  # tells other processes to re-read
        self._set(0, self._token)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            if grown:  # the new region is written whole: real zeroed blocks, no holes
                start = self._on_disk * SLOT_SIZE
                os.pwrite(fd, bytes(self._slots[start:]), HEADER_SIZE + start)
            for slot in sorted(s for s in self._dirty if s < self._on_disk):
                os.pwrite(fd, self._slot(slot), HEADER_SIZE + slot * SLOT_SIZE)
            os.fsync(fd)  # in-place overwrite: no new file, no old copy of a key
        finally:
            os.close(fd)
        self._on_disk = len(self._slots) // SLOT_SIZE
        self._dirty = set()


def _header(db_key: bytes, passphrase: str | None, keyring: bool) -> bytes:
    salt = nacl.utils.random(16)
    ops = mem = 0
    if passphrase:
        mode, ops, mem = MODE_PASSPHRASE, OPSLIMIT, MEMLIMIT
        wrapped = bytes(nacl.secret.SecretBox(_kek(passphrase, salt, ops, mem)).encrypt(db_key))
    elif keyring:
        kr = _keyring()
        if kr is None:
            raise LocalProtocolError(
                "no OS keyring is available on this system", code="keyring_unavailable"
            )
        kek = nacl.utils.random(KEY_SIZE)
        kr.set_password(KEYRING_SERVICE, salt.hex(), kek.hex())
        mode = MODE_KEYRING
        wrapped = bytes(nacl.secret.SecretBox(kek).encrypt(db_key))
    else:
        mode, wrapped = MODE_CLEAR, db_key
    out = bytearray(HEADER_SIZE)
    _HEADER.pack_into(out, 0, MAGIC, VERSION, mode, ops, mem, salt, len(wrapped))
    out[_HEADER.size : _HEADER.size + len(wrapped)] = wrapped
    return bytes(out)
