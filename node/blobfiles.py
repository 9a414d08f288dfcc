"""The files of one blob directory (docs/protocol.md §10.5): blocking calls, run in threads.

A blob directory under ``HOME/blobs/`` holds ``data`` (chunk ``i`` encrypted with
XChaCha20-Poly1305 IETF under the per-blob key, nonce = prefix || uint64_be(i), at the fixed
offset ``i * SLOT``) and ``meta`` (sealed by :mod:`node.blobs`; opaque here). Everything here
is synchronous and touches only the files: :class:`node.blobs.BlobStore` calls it through
:func:`asyncio.to_thread` and keeps all state.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil

import nacl.bindings as nb
import nacl.exceptions

from federation.errors import HashMismatch, StorageError
from federation.wire import CHUNK_SIZE

TAG = 16  # AEAD tag per chunk
SLOT = CHUNK_SIZE + TAG
META = "meta"
DATA = "data"


def chunk_count(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


def chunk_len(size: int, index: int) -> int:
    """Length of chunk ``index`` of a blob of ``size`` bytes (the last one may be shorter)."""
    return min(CHUNK_SIZE, size - index * CHUNK_SIZE)


def data_len(size: int) -> int:
    """Size of the ``data`` file of a blob of ``size`` bytes."""
    n = chunk_count(size)
    return (n - 1) * SLOT + chunk_len(size, n - 1) + TAG


def _nonce(prefix: bytes, index: int) -> bytes:
    return prefix + index.to_bytes(8, "big")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_metas(root: str) -> list[tuple[str, bytes | None]]:
    """``(directory name, sealed meta or None)`` for every blob directory."""
    out: list[tuple[str, bytes | None]] = []
    for name in sorted(os.listdir(root)):
        try:
            with open(os.path.join(root, name, META), "rb") as f:
                out.append((name, f.read(1 << 20)))
        except OSError:
            out.append((name, None))  # a directory left half-made or half-removed
    return out


def make(root: str, dirname: str, size: int) -> None:
    """Create the directory and its ``data`` file, allocated in full (ENOSPC now, not later)."""
    path = os.path.join(root, dirname)
    os.mkdir(path, 0o700)
    fd = os.open(os.path.join(path, DATA), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, data_len(size))
    finally:
        os.close(fd)


def write_chunk(
    root: str,
    dirname: str,
    key: bytes,
    prefix: bytes,
    index: int,
    data: bytes,
    expect: bytes | None,
) -> None:
    """Check ``data`` against ``expect`` (its SHA-256), encrypt it, write it, fdatasync."""
    if expect is not None and hashlib.sha256(data).digest() != expect:
        raise HashMismatch("chunk does not match its announced hash")
    ct = nb.crypto_aead_xchacha20poly1305_ietf_encrypt(data, None, _nonce(prefix, index), key)
    fd = os.open(os.path.join(root, dirname, DATA), os.O_WRONLY)
    try:
        os.pwrite(fd, ct, index * SLOT)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _open_slot(ct: bytes, key: bytes, prefix: bytes, index: int) -> bytes:
    return bytes(
        nb.crypto_aead_xchacha20poly1305_ietf_decrypt(ct, None, _nonce(prefix, index), key)
    )


def read_chunk(root: str, dirname: str, key: bytes, prefix: bytes, size: int, index: int) -> bytes:
    """Chunk ``index``, decrypted. Raises StorageError if it fails authentication."""
    fd = os.open(os.path.join(root, dirname, DATA), os.O_RDONLY)
    try:
        ct = os.pread(fd, chunk_len(size, index) + TAG, index * SLOT)
    finally:
        os.close(fd)
    try:
        return _open_slot(ct, key, prefix, index)
    except nacl.exceptions.CryptoError as exc:
        raise StorageError("stored chunk failed authentication") from exc


def scan(
    root: str, dirname: str, key: bytes, prefix: bytes, size: int, known: set[int]
) -> set[int]:
    """Chunks durably stored besides ``known``: those whose slot opens under the key (the tag
    proves a whole, untorn write)."""
    found: set[int] = set()
    try:
        fd = os.open(os.path.join(root, dirname, DATA), os.O_RDONLY)
    except OSError:
        return found
    try:
        for i in range(chunk_count(size)):
            if i in known:
                continue
            ct = os.pread(fd, chunk_len(size, i) + TAG, i * SLOT)
            try:
                _open_slot(ct, key, prefix, i)
            except nacl.exceptions.CryptoError:
                continue
            found.add(i)
    finally:
        os.close(fd)
    return found


def replace_meta(root: str, dirname: str, sealed: bytes) -> None:
    """Replace ``meta`` atomically (write, fsync, rename, fsync the directory): a crash
    leaves the old or the new one. The old copy's freed blocks are sealed under an epoch key
    that is destroyed at the next re-seal."""
    path = os.path.join(root, dirname)
    tmp = os.path.join(path, META + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if os.write(fd, sealed) != len(sealed):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, os.path.join(path, META))
    _fsync_dir(path)


def remove(root: str, dirname: str) -> None:
    """Overwrite ``meta`` with zeros (it holds the blob key, sealed), then unlink everything."""
    path = os.path.join(root, dirname)
    meta = os.path.join(path, META)
    try:
        fd = os.open(meta, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(os.fstat(fd).st_size), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # no meta (half-made): nothing to overwrite
    shutil.rmtree(path, ignore_errors=True)
    try:
        _fsync_dir(root)
    except OSError:
        pass


def free_space(root: str) -> int:
    st = os.statvfs(root)
    return st.f_bavail * st.f_frsize


M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


def return_large_buffers_to_the_os() -> bool:
    """Make glibc serve every allocation of 128 KiB or more with its own mmap, always.

    By default glibc raises that threshold each time such a block is freed, after which 1 MiB
    chunk buffers come from the (per-thread) heaps and stay resident once freed: a 100 MB
    transfer then grew a node's RSS by ~50 MB, against ~20 MB with the fixed threshold
    (scripts/bench_blobs_node.py). Process-wide; a no-op where there is no glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024))
    except (OSError, AttributeError):
        return False
