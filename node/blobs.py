"""The blob store: attachment ciphertext as files on disk, never rows (docs/protocol.md §10).

Each blob, and each *fetched copy* this node keeps of another node's blob for one of its
devices, is a directory under ``HOME/blobs/`` whose name is random (unrelated to the blob id).
It holds two files:

- ``data``: chunk ``i`` re-encrypted by this node (XChaCha20-Poly1305 IETF under a random
  per-blob key, nonce = a per-blob random prefix + ``i``) at the fixed offset
  ``i * (CHUNK_SIZE + 16)``. The file is allocated in full when the blob is announced, so a
  full disk refuses the upload up front instead of half-way.
- ``meta``: blob id, per-blob key, nonce prefix, size, chunk hashes, token hashes, the chunks
  known to be stored, expiry and kind, sealed under the blob store's *own* epoch keys
  (``HOME/blob-epochs.key``, a second :class:`node.atrest.EpochKeys`). At each epoch end every
  meta is sealed again under a fresh key and the old key destroyed; with no blobs there is no
  key at all; after a deletion the other metas move to a fresh key at the next tick (up to
  :data:`SHRED_RESEAL_MAX` of them). The per-blob key exists only inside the sealed meta, so
  once the epoch key that sealed a meta is gone, every remnant of that blob (freed blocks of
  ``data``, old ``meta`` copies) is noise: the blob is crypto-shredded without rewriting it.

A chunk is answered ``ok`` only after its ``data`` bytes are fsynced. The meta is rewritten only
when something other than the stored chunks changes (creation, completion, a token released,
a re-seal), not per chunk: at start, chunks the meta does not list yet are found by opening
their slot (the AEAD tag proves a complete, untorn write), so an interrupted upload resumes
from what is durable.

Hashing, encryption and file I/O (:mod:`node.blobfiles`) run in worker threads
(a small pool of the store's own), so a 1 MiB chunk never blocks the event loop. The index blob id
-> directory is memory only, rebuilt at start by opening every meta. Which account uploaded a
blob is memory only too (for its quota of bytes in flight); it is never written down.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import msgspec

from federation.errors import (
    Conflict,
    HashMismatch,
    HavenError,
    MalformedFrame,
    NotFound,
    NotReady,
    QuotaExceeded,
    StorageError,
    TooLarge,
)
from federation.wire import CHUNK_SIZE, MAX_CHUNKS

from . import blobfiles as files
from .atrest import EpochKeys
from .blobfiles import chunk_count, chunk_len, data_len
from .metrics import Metrics

log = logging.getLogger("haven.blobs")

UPLOAD = "upload"
COPY = "copy"
BLOBS_DIR = "blobs"
BLOB_EPOCHS_NAME = "blob-epochs.key"
MIB = 1024 * 1024
# Free space left to the message store when a blob is announced: a blob never takes the
# last of the disk (the store's ballast is for the database, node/ballast.py).
DISK_RESERVE = 64 * MIB
# After a deletion, the remaining metas are re-sealed under a fresh key at the next tick
# when there are at most this many (else at the epoch's end, like the message store's rows).
SHRED_RESEAL_MAX = 1000
IO_THREADS = 4
BOOKKEEPING = 64 * 1024  # counted per blob on top of its data (meta ≤ ~37 KiB, directory)
T = TypeVar("T")


def footprint(size: int) -> int:
    """What a blob of ``size`` bytes counts against the quotas: its data file plus a flat
    allowance for its directory and meta, so that a flood of tiny blobs is bounded too."""
    return data_len(size) + BOOKKEEPING


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def token_hash(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


class _Meta(msgspec.Struct, frozen=True):
    """What a sealed ``meta`` file holds (never written in the clear)."""

    blob: bytes
    kind: str
    origin: str  # the origin's node id for a fetched copy; "" for an upload here
    key: bytes
    prefix: bytes
    size: int
    hashes: tuple[bytes, ...]  # uploads only: SHA-256 of each chunk as announced
    tokens: tuple[bytes, ...]  # SHA-256 of each fetch token still allowed
    have: tuple[int, ...]
    expires: int


_META_ENC = msgspec.msgpack.Encoder()
_META_DEC = msgspec.msgpack.Decoder(_Meta)


@dataclass(eq=False)
class Blob:
    """One blob or fetched copy, as held in memory."""

    dirname: str
    blob: bytes
    kind: str
    origin: str
    key: bytes
    prefix: bytes
    size: int
    hashes: tuple[bytes, ...]
    tokens: set[bytes]
    have: set[int]
    expires: int
    kid: int = -1  # epoch key that seals the meta on disk
    account: str | None = None  # memory only: whose bytes in flight this is
    gone: bool = False
    writing: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # chunks in writes
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def chunks(self) -> int:
        return chunk_count(self.size)

    @property
    def complete(self) -> bool:
        return len(self.have) == self.chunks

    @property
    def footprint(self) -> int:
        return footprint(self.size)

    def meta(self) -> _Meta:
        return _Meta(
            self.blob,
            self.kind,
            self.origin,
            self.key,
            self.prefix,
            self.size,
            self.hashes,
            tuple(sorted(self.tokens)),
            tuple(sorted(self.have)),
            self.expires,
        )


@dataclass(frozen=True, slots=True)
class Served:
    """A chunk read for a fetch, with what the fetcher needs to know about the blob."""

    data: bytes
    chunks: int
    size: int
    ttl: int  # ms left before the blob expires


def _translate_os(exc: OSError, what: str) -> HavenError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"disk full while {what}")
    return StorageError(f"blob store failed while {what} ({exc.strerror or 'I/O error'})")


class BlobStore:
    """Blobs and fetched copies under ``root``; see the module docstring.

    Args:
        root: ``HOME/blobs`` (created if missing).
        keys_path: the blob epoch key file (``HOME/blob-epochs.key``).
        epoch_ms: epoch length (the node's ``epoch_ms``).
        max_store: node-wide cap in bytes on the data files (fetched copies included).
        max_per_account: bytes in flight per uploading account (memory only).
        metrics: counters (``blob.*``).
    """

    def __init__(
        self,
        root: str,
        keys_path: str,
        epoch_ms: int,
        max_store: int,
        max_per_account: int,
        metrics: Metrics,
        disk_reserve: int = DISK_RESERVE,
    ) -> None:
        self.root = root
        self.keys_path = keys_path
        self.epoch_ms = epoch_ms
        self.max_store = max_store
        self.max_per_account = max_per_account
        self.metrics = metrics
        self.disk_reserve = disk_reserve
        self.keys: EpochKeys | None = None
        self.uploads: dict[bytes, Blob] = {}
        self.copies: dict[tuple[str, bytes, bytes], Blob] = {}  # (origin, blob, token hash)
        self.used = 0  # bytes of data files
        self.in_flight: dict[str, int] = {}  # account -> bytes (memory only)
        self.free_space: Callable[[], int] = lambda: files.free_space(self.root)
        self._creating: set[Blob] = set()
        # A small pool of its own: chunk hashing, encryption and writes never queue behind
        # (or crowd out) the default executor's other work; 4 keeps two cores busy while
        # two threads wait in fdatasync.
        self._pool = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="haven-blobs")
        self._shred = False  # a blob was deleted since the last rotation

    # ---- lifecycle ---------------------------------------------------------------------------

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args))

    def close(self) -> None:
        """Stop the worker threads (after the requests using them have ended)."""
        self._pool.shutdown(wait=True)

    async def open(self, now: int) -> None:
        """Rebuild the index from every meta; drop what cannot be opened or has expired."""
        os.makedirs(self.root, mode=0o700, exist_ok=True)
        self.keys = EpochKeys(self.keys_path, self.epoch_ms)
        found = await self._io(files.read_metas, self.root)
        for dirname, raw in found:
            blob = self._open_meta(dirname, raw)
            if blob is None or blob.expires <= now:
                await self._io(files.remove, self.root, dirname)
                if blob is not None:
                    self.metrics.event("blob.deleted_ttl")
                continue
            if not blob.complete:
                blob.have |= await self._io(
                    files.scan, self.root, blob.dirname, blob.key, blob.prefix, blob.size, blob.have
                )
            self._index(blob)
        keys = self.keys
        in_use = {b.kid for b in self.all()}
        keys.destroy_many([k for k in keys.ids if k not in in_use])
        if found:
            log.info("blob store: %d blobs and copies", len(self.uploads) + len(self.copies))

    def _open_meta(self, dirname: str, raw: bytes | None) -> Blob | None:
        if not raw or self.keys is None:
            return None
        kid = raw[0]
        try:
            meta = _META_DEC.decode(self.keys.open(kid, raw[1:]))
        except (StorageError, msgspec.MsgspecError):
            return None  # sealed under a destroyed key: noise now
        return Blob(
            dirname,
            meta.blob,
            meta.kind,
            meta.origin,
            meta.key,
            meta.prefix,
            meta.size,
            meta.hashes,
            set(meta.tokens),
            set(meta.have),
            meta.expires,
            kid=kid,
        )

    def _index(self, blob: Blob) -> None:
        if blob.kind == UPLOAD:
            self.uploads[blob.blob] = blob
        else:
            self.copies[(blob.origin, blob.blob, next(iter(blob.tokens)))] = blob
        self.used += blob.footprint

    def all(self) -> list[Blob]:
        return [*self.uploads.values(), *self.copies.values()]

    def counts(self) -> dict[str, int]:
        """Aggregate figures for ``/haven/v1/stats`` (no ids)."""
        return {
            "uploads": len(self.uploads),
            "copies": len(self.copies),
            "bytes": self.used,
            "epoch_keys": len(self.keys.ids) if self.keys else 0,
        }

    # ---- uploads -----------------------------------------------------------------------------

    async def announce(
        self,
        account: str,
        blob_id: bytes,
        size: int,
        hashes: tuple[bytes, ...],
        tokens: Iterable[bytes],
        expires: int,
        now: int,
    ) -> list[int]:
        """Create an upload, or resume one announced with the same size and hashes.

        Returns the chunk indexes already stored.

        Raises:
            MalformedFrame: the hash count does not match the size.
            Conflict: the id is taken by another size or other hashes.
            QuotaExceeded: the account's bytes in flight or the node-wide cap.
            StorageError: the disk has no room (nothing else is affected).
        """
        n = chunk_count(size)
        if n > MAX_CHUNKS or len(hashes) != n:
            raise MalformedFrame("hash count does not match the size")
        old = self.uploads.get(blob_id)
        if old is not None:
            if old.size != size or old.hashes != hashes:
                raise Conflict("this blob id is taken")
            if old.account is None:  # announced before a restart: count it again now
                old.account = account
                self.in_flight[account] = self.in_flight.get(account, 0) + old.footprint
            await self._settled(old)
            return sorted(old.have)
        need = footprint(size)
        if self.in_flight.get(account, 0) + need > self.max_per_account:
            raise QuotaExceeded("too many bytes of files in flight for this account")
        self._check_room(need)
        blob = Blob(
            os.urandom(16).hex(),
            blob_id,
            UPLOAD,
            "",
            os.urandom(32),
            os.urandom(16),
            size,
            hashes,
            set(tokens),
            set(),
            expires,
            account=account,
        )
        await self._create(blob, now)
        if blob_id in self.uploads:  # announced twice at once: keep the first
            await self._destroy(blob, None)
            return await self.announce(account, blob_id, size, hashes, tokens, expires, now)
        self._index(blob)
        self.in_flight[account] = self.in_flight.get(account, 0) + need
        return []

    def _check_room(self, need: int) -> None:
        if self.used + need > self.max_store:
            raise QuotaExceeded("this node's file store is full")
        try:
            free = self.free_space()
        except OSError as exc:
            raise _translate_os(exc, "checking free space") from exc
        if free < need + self.disk_reserve:
            raise StorageError("not enough disk space for this file")

    async def _create(self, blob: Blob, now: int) -> None:
        self._creating.add(blob)  # its meta's key is in use before it is indexed
        try:
            try:
                await self._io(files.make, self.root, blob.dirname, blob.size)
            except OSError as exc:
                await self._io(files.remove, self.root, blob.dirname)
                raise _translate_os(exc, "creating a blob") from exc
            try:
                await self._write_meta(blob, now)
            except HavenError:
                await self._io(files.remove, self.root, blob.dirname)
                raise
        finally:
            self._creating.discard(blob)

    async def put(self, blob_id: bytes, index: int, data: bytes) -> bool:
        """Store one chunk of an upload; True if it was new (False: already stored).

        Raises:
            NotFound: no such upload.
            TooLarge: the chunk is longer than CHUNK_SIZE.
            MalformedFrame: wrong length for its index, or an index past the end.
            HashMismatch: its SHA-256 is not the announced one.
            StorageError: the write failed.
        """
        blob = self.uploads.get(blob_id)
        if blob is None or blob.gone:
            raise NotFound("no such blob")
        if len(data) > CHUNK_SIZE:
            raise TooLarge("chunk larger than 1 MiB")
        if index >= blob.chunks:
            raise MalformedFrame("chunk index past the end of the blob")
        if len(data) != chunk_len(blob.size, index):
            raise MalformedFrame("chunk has the wrong length for its index")
        if index not in blob.have and await self._write(blob, index, data, blob.hashes[index]):
            if blob.complete:
                await self._rewrite(blob)  # the meta lists every chunk from now on
            return True
        # already stored (maybe by a put of the same chunk at the same time): still checked
        if await self._io(_sha256, data) != blob.hashes[index]:
            raise HashMismatch("chunk does not match its announced hash")
        return False

    async def _write(self, blob: Blob, index: int, data: bytes, expect: bytes | None) -> bool:
        """Write chunk ``index``; False if it was already stored (or stored meanwhile by a
        write of the same chunk under way: that one is waited for, not doubled)."""
        while (busy := blob.writing.get(index)) is not None:
            await asyncio.shield(busy)
        if index in blob.have:
            return False
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        blob.writing[index] = done
        try:
            await self._io(
                files.write_chunk,
                self.root,
                blob.dirname,
                blob.key,
                blob.prefix,
                index,
                data,
                expect,
            )
        except OSError as exc:
            if blob.gone:
                raise NotFound("no such blob") from exc
            raise _translate_os(exc, "writing a chunk") from exc
        finally:
            del blob.writing[index]
            done.set_result(None)
        if blob.gone:
            raise NotFound("no such blob")
        blob.have.add(index)
        return True

    async def _settled(self, blob: Blob) -> None:
        """Wait for the chunk writes under way (a resume then lists what they stored)."""
        for busy in list(blob.writing.values()):
            await asyncio.shield(busy)

    async def read(self, blob_id: bytes, token: bytes, index: int, now: int) -> Served:
        """Chunk ``index`` of a complete upload, for the holder of ``token``.

        Raises:
            NotFound: unknown blob or token (one answer for both), or an index past the end.
            NotReady: the upload is not complete yet.
        """
        blob = self.uploads.get(blob_id)
        if blob is None or blob.gone or token_hash(token) not in blob.tokens:
            raise NotFound("no such blob")
        if blob.expires <= now:  # the next tick deletes it
            raise NotFound("no such blob")
        if index >= blob.chunks:
            raise NotFound("no such chunk")
        if not blob.complete:
            raise NotReady("the upload is not complete yet")
        data = await self._read(blob, index)
        return Served(data, blob.chunks, blob.size, max(0, blob.expires - now))

    async def _read(self, blob: Blob, index: int) -> bytes:
        try:
            return await self._io(
                files.read_chunk, self.root, blob.dirname, blob.key, blob.prefix, blob.size, index
            )
        except OSError as exc:
            if blob.gone:
                raise NotFound("no such blob") from exc
            raise _translate_os(exc, "reading a chunk") from exc

    async def release(self, blob_id: bytes, token: bytes) -> bool:
        """The device holding ``token`` has the file: forget the token; with no token left
        the blob is deleted at once. True if it was deleted.

        Raises:
            NotFound: unknown blob or token.
        """
        blob = self.uploads.get(blob_id)
        h = token_hash(token)
        if blob is None or blob.gone or h not in blob.tokens:
            raise NotFound("no such blob")
        blob.tokens.discard(h)
        if not blob.tokens:
            await self._destroy(blob, "blob.deleted_fetched")
            return True
        await self._rewrite(blob)
        return False

    # ---- fetched copies ----------------------------------------------------------------------

    def copy_of(self, origin: str, blob_id: bytes, token: bytes) -> Blob | None:
        blob = self.copies.get((origin, blob_id, token_hash(token)))
        return None if blob is None or blob.gone else blob

    async def copy_read(self, blob: Blob, index: int, now: int) -> Served | None:
        """Chunk ``index`` from a fetched copy, or None if this node does not have it yet."""
        if index not in blob.have or index >= blob.chunks or blob.expires <= now:
            return None
        try:
            data = await self._read(blob, index)
        except HavenError:
            return None  # fetch it again from the origin
        return Served(data, blob.chunks, blob.size, max(0, blob.expires - now))

    async def copy_put(
        self,
        origin: str,
        blob_id: bytes,
        token: bytes,
        index: int,
        data: bytes,
        size: int,
        expires: int,
        now: int,
    ) -> None:
        """Keep a chunk fetched from ``origin`` for the device holding ``token``.

        Raises:
            QuotaExceeded, StorageError: no room (the caller serves the chunk anyway).
            MalformedFrame: the chunk does not fit the size the origin gave.
        """
        if size < 1 or chunk_count(size) > MAX_CHUNKS or index >= chunk_count(size):
            raise MalformedFrame("bad blob size from the origin")
        if len(data) != chunk_len(size, index):
            raise MalformedFrame("chunk has the wrong length for its index")
        key = (origin, blob_id, token_hash(token))
        blob = self.copies.get(key)
        if blob is None or blob.gone:
            blob = Blob(
                os.urandom(16).hex(),
                blob_id,
                COPY,
                origin,
                os.urandom(32),
                os.urandom(16),
                size,
                (),
                {key[2]},
                set(),
                expires,
            )
            self._check_room(blob.footprint)
            await self._create(blob, now)
            if key in self.copies:  # two chunks of a new copy at once: keep the first
                await self._destroy(blob, None)
                blob = self.copies[key]
            else:
                self._index(blob)
        if blob.size != size:
            raise MalformedFrame("the origin changed the blob size")
        if await self._write(blob, index, data, None) and blob.complete:
            await self._rewrite(blob)

    async def copy_drop(self, origin: str, blob_id: bytes, token: bytes) -> bool:
        """The device has the whole file: delete this node's fetched copy. True if one existed."""
        blob = self.copy_of(origin, blob_id, token)
        if blob is None:
            return False
        await self._destroy(blob, "blob.deleted_fetched")
        return True

    # ---- meta, deletion, timers --------------------------------------------------------------

    async def _write_meta(self, blob: Blob, now: int, kid: int | None = None) -> None:
        if self.keys is None:
            raise StorageError("blob store is not open")
        kid = self.keys.current(now) if kid is None else kid
        sealed = bytes([kid]) + self.keys.seal(kid, _META_ENC.encode(blob.meta()))
        try:
            await self._io(files.replace_meta, self.root, blob.dirname, sealed)
        except OSError as exc:
            raise _translate_os(exc, "writing a blob's meta") from exc
        blob.kid = kid

    async def _rewrite(self, blob: Blob) -> None:
        """Write the meta again under the key that seals it now (rotate() moves it on)."""
        async with blob.lock:
            if not blob.gone:
                await self._write_meta(blob, 0, blob.kid)

    async def _destroy(self, blob: Blob, event: str | None) -> None:
        async with blob.lock:
            if blob.gone:
                return
            blob.gone = True
        if blob.kind == UPLOAD:
            if self.uploads.get(blob.blob) is blob:
                del self.uploads[blob.blob]
                self.used -= blob.footprint
        else:
            key = (blob.origin, blob.blob, next(iter(blob.tokens)))
            if self.copies.get(key) is blob:
                del self.copies[key]
                self.used -= blob.footprint
        if blob.account is not None:
            left = self.in_flight.get(blob.account, 0) - blob.footprint
            if left > 0:
                self.in_flight[blob.account] = left
            else:
                self.in_flight.pop(blob.account, None)
        await self._io(files.remove, self.root, blob.dirname)
        self._shred = True
        if event is not None:
            self.metrics.event(event)

    async def tick(self, now: int) -> dict[str, int]:
        """Delete expired blobs and copies; at an epoch's end re-seal every meta under a fresh
        key and destroy the old ones (no blobs: no keys)."""
        expired = [b for b in self.all() if b.expires <= now]
        for blob in expired:
            await self._destroy(blob, "blob.deleted_ttl")
        return {"expired": len(expired), "resealed": await self.rotate(now)}

    async def rotate(self, now: int) -> int:
        keys = self.keys
        if keys is None:
            return 0
        live = [b for b in self.all() if not b.gone]
        if not live and not self._creating:
            if keys.ids:
                keys.destroy_many(keys.ids)
            return 0
        kid = keys.current(now)
        if self._shred and kid in {b.kid for b in live} and len(live) <= SHRED_RESEAL_MAX:
            # a blob was deleted: move the others to a fresh key now, so that the dead one's
            # old metas (and with them its key) die within a tick, not at the epoch's end
            kid = keys.fresh(now)
        self._shred = False
        resealed = 0
        for blob in live:
            if blob.kid == kid:
                continue
            async with blob.lock:
                if blob.gone:
                    continue
                await self._write_meta(blob, now, kid)
            resealed += 1
        in_use = {b.kid for b in [*self.all(), *self._creating]}
        keys.destroy_many([k for k in keys.ids if k not in in_use])
        return resealed
