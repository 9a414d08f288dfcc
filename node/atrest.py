"""Sealing stored rows at rest under short-lived epoch keys.

Implements ARCHITECTURE §4 "Nothing left to recover".

Epoch keys live in their own small file of fixed-size slots, overwritten in place and fsynced;
nothing else on disk can open a sealed row. When an epoch ends, still-pending rows are re-sealed
under the current key and only then is the old key overwritten with zeros. Remnants of delivered
envelopes (WAL frames, freed pages, SSD cells) become undecryptable within about one epoch.
"""

from __future__ import annotations

import errno
import os
import struct

import nacl.exceptions
import nacl.secret
import nacl.utils

from federation.errors import StorageError

EPOCH_MS = 3_600_000
SLOTS = 4
_SLOT = struct.Struct(">Q32s")  # epoch (0 = empty), key


class EpochKeys:
    """A tiny key store: at most :data:`SLOTS` live epoch keys in one fixed-size file."""

    def __init__(self, path: str, epoch_ms: int = EPOCH_MS) -> None:
        self.path = path
        self.epoch_ms = epoch_ms
        self._keys: dict[int, nacl.secret.SecretBox] = {}
        self._raw: dict[int, bytes] = {}
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
        with open(path, "rb") as f:
            data = f.read()
        if len(data) != _SLOT.size * SLOTS:
            raise StorageError("epoch key file has the wrong size")
        for i in range(SLOTS):
            epoch, key = _SLOT.unpack_from(data, i * _SLOT.size)
            if epoch:
                self._raw[epoch] = key
                self._keys[epoch] = nacl.secret.SecretBox(key)

    def epoch_of(self, now_ms: int) -> int:
        return now_ms // self.epoch_ms + 1  # +1 so that epoch 0 can mean "empty slot"

    @property
    def epochs(self) -> list[int]:
        return sorted(self._keys)

    def current(self, now_ms: int) -> int:
        """The epoch to seal new rows under, creating its key on first use."""
        epoch = self.epoch_of(now_ms)
        if epoch not in self._keys:
            newest = max(self._keys, default=0)
            if newest > epoch:
                return newest  # clock went backwards: keep using the newest key
            self._add(epoch)
        return epoch

    def _write(self) -> None:
        buf = bytearray(_SLOT.size * SLOTS)
        for i, epoch in enumerate(sorted(self._raw)[-SLOTS:]):
            _SLOT.pack_into(buf, i * _SLOT.size, epoch, self._raw[epoch])
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(buf), 0)  # overwrite in place: no new file, no old copy
            os.fsync(fd)
        finally:
            os.close(fd)

    def _add(self, epoch: int) -> None:
        if len(self._raw) >= SLOTS:
            raise StorageError("too many live epoch keys; re-seal before adding another")
        key = nacl.utils.random(nacl.secret.SecretBox.KEY_SIZE)
        self._raw[epoch] = key
        self._keys[epoch] = nacl.secret.SecretBox(key)
        self._write()

    def destroy(self, epoch: int) -> None:
        """Overwrite an epoch key on disk and forget it in memory."""
        if epoch in self._raw:
            del self._raw[epoch]
            del self._keys[epoch]
            self._write()

    def seal(self, epoch: int, data: bytes) -> bytes:
        return bytes(self._keys[epoch].encrypt(data))

    def open(self, epoch: int, data: bytes) -> bytes:
        box = self._keys.get(epoch)
        if box is None:
            raise StorageError("row sealed under a destroyed epoch key")
        try:
            return bytes(box.decrypt(data))
        except nacl.exceptions.CryptoError as exc:
            raise StorageError("stored row failed authentication") from exc
