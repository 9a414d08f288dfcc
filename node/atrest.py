"""Sealing stored rows at rest under short-lived epoch keys.

Implements ARCHITECTURE §4 "Nothing left to recover" (docs/operations.md §5 "At rest").

Epoch keys live in their own small file of fixed-size slots, overwritten in place and fsynced;
nothing else on disk can open a sealed row or compute its index hashes. A key is identified by
its slot; the slot also records the epoch number the key was made in (epochs are ``epoch_ms``
long, default 10 minutes), never a finer time.

Lifetime (driven by :class:`node.sqlite_store.SqliteStore`): new rows are sealed under the
newest key. When nothing is pending, every key is destroyed at once; when a key's epoch has
passed, the next rotation makes this epoch's key, re-seals whatever the old one still seals
under it and then destroys it (a write never makes the new epoch's key itself, so outside a
re-seal every pending row is under one key). At clean shutdown everything pending is
re-sealed under a fresh key and every other key destroyed; at start every key that seals
nothing is destroyed. So a remnant of a delivered row (WAL frame, freed page, SSD cell)
becomes undecryptable within one epoch, on a stopped node too.

Each key also keys the row index: :meth:`EpochKeys.index` is a keyed BLAKE2b under a subkey
derived from the epoch key, so destroying the key kills the index linkage as well.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct

import nacl.exceptions
import nacl.secret
import nacl.utils

from federation.errors import StorageError

EPOCH_MS = 600_000
SLOTS = 4
_SLOT = struct.Struct(">Q32s")  # epoch number the key was made in (0 = empty slot), key
INDEX_BYTES = 16


class _Key:
    __slots__ = ("born", "box", "index_key", "raw", "serial")

    def __init__(self, born: int, raw: bytes, serial: int) -> None:
        self.born = born
        self.raw = raw
        self.box = nacl.secret.SecretBox(raw)
        # A separate subkey for the index: the AEAD key itself is used for nothing else.
        self.index_key = hashlib.blake2b(raw, digest_size=32, person=b"haven-index-key").digest()
        self.serial = serial  # creation order in this process (slots are reused)


class EpochKeys:
    """A tiny key store: at most :data:`SLOTS` live epoch keys in one fixed-size file.

    Keys are named by their slot number (``kid``); :attr:`epochs` lists the epoch numbers the
    live keys were made in.
    """

    def __init__(self, path: str, epoch_ms: int = EPOCH_MS) -> None:
        self.path = path
        self.epoch_ms = epoch_ms
        self._slots: list[_Key | None] = [None] * SLOTS
        self._serial = 0
        self.generation = 0  # bumped whenever a key is made or destroyed (readers re-check it)
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if os.write(fd, bytes(_SLOT.size * SLOTS)) != _SLOT.size * SLOTS:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(fd)
            except BaseException:
                os.unlink(path)  # no half-written key file (it holds no key yet): retry next open
                raise
            finally:
                os.close(fd)
        self._image = b""  # the key file's bytes as this process last read or wrote them
        self.reload()

    def _read(self) -> bytes:
        with open(self.path, "rb") as f:
            data = f.read()
        if len(data) != _SLOT.size * SLOTS:
            raise StorageError("epoch key file has the wrong size")
        return data

    def reload(self) -> bool:
        """Re-read the key file (another process on this host may have made or destroyed a
        key: docs/operations.md "PostgreSQL back end"). Keys still there keep their place in
        the creation order; keys new to this process come after them, oldest first. Returns
        whether anything changed. One small read: cheap enough for every transaction."""
        data = self._read()
        if data == self._image:
            return False
        found = []
        for i in range(SLOTS):
            born, raw = _SLOT.unpack_from(data, i * _SLOT.size)
            old = self._slots[i]
            if not born:
                self._slots[i] = None
            elif old is None or old.raw != raw or old.born != born:
                found.append((born, i, raw))
        for born, i, raw in sorted(found):  # oldest first: the newest key gets the top serial
            self._slots[i] = self._make(born, raw)
        self._image = data
        self.generation += 1
        return True

    def _make(self, born: int, raw: bytes) -> _Key:
        self._serial += 1
        return _Key(born, raw, self._serial)

    def epoch_of(self, now_ms: int) -> int:
        return now_ms // self.epoch_ms + 1  # +1 so that epoch 0 can mean "empty slot"

    @property
    def ids(self) -> list[int]:
        """Live key ids, oldest first."""
        return [i for _, i in sorted((k.serial, i) for i, k in enumerate(self._slots) if k)]

    @property
    def epochs(self) -> list[int]:
        """The epoch numbers the live keys were made in, oldest first."""
        return sorted(k.born for k in self._slots if k)

    def born(self, kid: int) -> int:
        return self._get(kid).born

    def newest(self) -> int | None:
        ids = self.ids
        return ids[-1] if ids else None

    def current(self, now_ms: int) -> int:
        """The key to seal new rows under: the newest, unless its epoch has passed (then a new
        key is made; the caller re-seals and destroys the old ones)."""
        newest, epoch = self.newest(), self.epoch_of(now_ms)
        # this epoch's key; one epoch ahead is a clock stepped back a little: keep it. A key
        # from further ahead (clock stepped back far, epoch_ms raised) is replaced like an old one.
        if newest is not None and epoch <= self._get(newest).born <= epoch + 1:
            return newest
        return self.fresh(now_ms)

    def fresh(self, now_ms: int) -> int:
        """Make a new key now, whatever the epoch (shutdown re-seals under one)."""
        for i, slot in enumerate(self._slots):
            if slot is None:
                raw = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
                self._slots[i] = self._make(self.epoch_of(now_ms), raw)
                self._write()
                return i
        raise StorageError("too many live epoch keys; re-seal before adding another")

    def _get(self, kid: int) -> _Key:
        key = self._slots[kid] if 0 <= kid < SLOTS else None
        if key is None:
            raise StorageError("row sealed under a destroyed epoch key")
        return key

    def _write(self) -> None:
        self.generation += 1
        buf = bytearray(_SLOT.size * SLOTS)
        for i, k in enumerate(self._slots):
            if k is not None:
                _SLOT.pack_into(buf, i * _SLOT.size, k.born, k.raw)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            self._image = bytes(buf)
            os.pwrite(fd, self._image, 0)  # overwrite in place: no new file, no old copy
            os.fsync(fd)
        finally:
            os.close(fd)

    def destroy(self, kid: int) -> None:
        """Overwrite a key on disk (zeros, fsynced) and forget it in memory."""
        self.destroy_many([kid])

    def destroy_many(self, kids: list[int]) -> None:
        gone = [k for k in kids if 0 <= k < SLOTS and self._slots[k] is not None]
        for k in gone:
            self._slots[k] = None
        if gone:
            self._write()

    def seal(self, kid: int, data: bytes) -> bytes:
        return bytes(self._get(kid).box.encrypt(data))

    def open(self, kid: int, data: bytes) -> bytes:
        box = self._get(kid).box
        try:
            return bytes(box.decrypt(data))
        except nacl.exceptions.CryptoError as exc:
            raise StorageError("stored row failed authentication") from exc

    def try_open(self, data: bytes, prefer: list[int] | None = None) -> tuple[int, bytes] | None:
        """Open under whichever live key sealed it (``prefer`` first, then newest first), or
        None. A re-seal prefers the keys it is moving rows away from: one decryption per row."""
        order = list(reversed(self.ids))
        if prefer:
            order = [k for k in prefer if k in order] + [k for k in order if k not in prefer]
        for kid in order:
            try:
                return kid, bytes(self._get(kid).box.decrypt(data))
            except nacl.exceptions.CryptoError:
                continue
        return None

    def index(self, kid: int, purpose: bytes, value: bytes) -> bytes:
        """Keyed hash of ``value`` for an index column (``purpose`` separates the columns)."""
        key = self._get(kid).index_key
        return hashlib.blake2b(value, digest_size=INDEX_BYTES, key=key, person=purpose).digest()
