"""Disk-full guard: a ballast file that is given back when the disk fills (docs/operations.md).

A truly full disk must not stop a node from *deleting*: acks and expiry are deletes, and a
delete needs room in the WAL and, at checkpoint, in ``store.db``. So the node keeps
``ballast.bin`` (``ballast_mb``, real blocks) in its home. The first time a write fails because
the disk is full, the ballast is released (unlinked) and the node enters the *full* state: new
envelopes are refused with ``storage_error`` without being tried, so the space just given back
goes to deletions and checkpoints only. The sweeper checks the free space; once it is back above
ballast + :data:`MARGIN_BYTES`, the ballast is recreated and the node accepts envelopes again.

A ``max_db_mb`` cap also fails with SQLITE_FULL; it is told apart by the free space on the disk
(a full cap on a roomy disk is not a full disk), and then nothing is released.
"""

from __future__ import annotations

import errno
import logging
import os

from federation.errors import StorageError

log = logging.getLogger("haven.disk")

BALLAST_NAME = "ballast.bin"
MARGIN_BYTES = 16 * 2**20  # free space needed on top of the ballast to leave the full state
CHUNK = 2**20


class DiskFull(StorageError):
    """A write failed for lack of space (SQLITE_FULL): the disk, or the ``max_db_mb`` cap."""


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return int(st.f_bavail) * int(st.f_frsize)


class DiskGuard:
    """The ballast file and the full state. File operations are blocking and short; the
    sweeper runs them in a thread."""

    def __init__(self, home: str, ballast_mb: int, margin: int = MARGIN_BYTES) -> None:
        self.home = home
        self.path = os.path.join(home, BALLAST_NAME)
        self.size = max(0, ballast_mb) * 2**20
        self.margin = margin
        self.full = False  # refuse new envelopes until space is back

    @property
    def held(self) -> bool:
        try:
            return os.path.getsize(self.path) >= self.size
        except OSError:
            return False

    def start(self) -> None:
        """Create the ballast at start if it is missing and the disk has room for it."""
        if self.size == 0:
            self._discard()  # ballast_mb = 0: an old ballast is given back
            return
        if self.held:
            return
        if free_bytes(self.home) < self.size + self.margin:
            log.warning("disk low at start: ballast not created (%d MiB wanted)", self.size >> 20)
            return
        self._create()

    def on_full(self) -> bool:
        """A write failed with SQLITE_FULL. Enter the full state (releasing the ballast) if the
        disk itself is low; return whether it is. A ``max_db_mb`` cap on a roomy disk is not."""
        if self.full:
            return True
        try:
            low = free_bytes(self.home) < self.margin
        except OSError:
            low = True
        if not low:
            return False
        self.full = True
        released = self._discard()
        if released:
            log.error("disk full: ballast released (%d MiB)", released >> 20)
        else:
            log.error("disk full: no ballast to release")
        return True

    def check(self) -> bool:
        """Leave the full state (restoring the ballast) once free space is back above
        ballast + margin. Called by the sweeper; returns whether the state changed."""
        if not self.full and (self.size == 0 or self.held):
            return False
        try:
            if free_bytes(self.home) < self.size + self.margin:
                return False
            if self.size:
                self._create()
        except OSError as exc:
            log.warning("ballast not restored: %s", exc.strerror or exc)
            return False
        was_full, self.full = self.full, False
        if was_full:
            log.info("space back: ballast restored")
        return was_full

    def _create(self) -> None:
        """Write the ballast with real blocks (fallocate, or zeros where unsupported), fsynced."""
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, self.size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                zeros = bytes(CHUNK)
                for off in range(0, self.size, CHUNK):
                    os.pwrite(fd, zeros[: min(CHUNK, self.size - off)], off)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, self.path)

    def _discard(self) -> int:
        """Unlink the ballast; return the bytes given back (0 if there was none)."""
        try:
            size = os.path.getsize(self.path)
            os.unlink(self.path)
        except FileNotFoundError:
            return 0
        return size
