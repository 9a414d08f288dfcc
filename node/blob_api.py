"""Attachment frames of the device API, and this node's side of blob federation (§10).

A device uploads to its home node (``blob_new``, ``blob_put``) and fetches through its home
node (``blob_get``, ``blob_done``): for a blob held by another node, this node fetches each
chunk over signed federation, keeps it as a *fetched copy* (same at-rest rules,
:mod:`node.blobs`) so the device can resume, and answers. A device never contacts a foreign
node. ``blob_done`` deletes the fetched copy and tells the origin, which forgets that token
and deletes the blob once no token is left; a release the origin could not be told of is
retried from memory for an hour (the origin's TTL deletes the blob in any case).

Blob frames of one connection are handled concurrently (up to :data:`MAX_CONCURRENT`, then
reading from that device waits), so eight chunks in flight are hashed, encrypted and written
in parallel and a slow federation fetch does not hold up the device's other frames.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from federation import frames as F
from federation.errors import (
    HavenError,
    KeyChanged,
    NotFound,
    NotReady,
    RateLimited,
    TooLarge,
    TransportError,
    Unavailable,
    Unsupported,
)
from federation.transport import RemoteError
from federation.wire import BlobFetch, BlobFetched, BlobRelease

from .blobs import MIB

UNSUPPORTED_WITH_WORKERS = "files are not available on a node served by several workers yet"

if TYPE_CHECKING:
    from .app import Node
    from .client_api import ClientSession

log = logging.getLogger("haven.blobs")
T = TypeVar("T")

FEATURE = "blobs"
MAX_CONCURRENT = 8  # blob frames of one connection handled at once
RELEASE_RETRY_MS = 3_600_000  # how long a release the origin missed is retried (memory only)
MAX_PENDING_RELEASES = 10_000
TICK_S = 1.0
# Remote codes passed on to the device as they are; anything else is ``unavailable``.
_PASSED_ON = {NotFound.code: NotFound, NotReady.code: NotReady, RateLimited.code: RateLimited}


def max_blob_size(max_file_mb: int) -> int:
    """Largest padded ciphertext for a file of ``max_file_mb`` MiB: Padmé adds at most 12.5%,
    the secretstream framing a little more (docs/protocol.md §10.1)."""
    return max_file_mb * MIB * 9 // 8 + 64 * 1024


class BlobApi:
    """Blob frames from devices, fetches from origins, and the blob store's timer."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.pending: dict[tuple[str, bytes, bytes], tuple[str, int]] = {}  # releases to retry
        self._rechecked: set[str] = set()  # peers whose descriptor was re-read for features

    @property
    def ttl_cap(self) -> int:
        cfg = self.node.config
        return min(cfg.ttl_ms, cfg.max_ttl_ms)

    # ---- device frames -----------------------------------------------------------------------

    async def handle(self, session: ClientSession, frame: F.Frame) -> None:
        if not self.node.blobs_enabled:
            raise Unsupported(UNSUPPORTED_WITH_WORKERS)
        match frame:
            case F.BlobNew():
                await self.on_new(session, frame)
            case F.BlobPut():
                await self.on_put(session, frame)
            case F.BlobGet():
                await self.on_get(session, frame)
            case F.BlobDone():
                await self.on_done(session, frame)

    def _take(self, purpose: str, account: str) -> None:
        if not self.node.rates.take(f"{purpose}:{account}", self.node.clock.now_ms()):
            raise RateLimited("too many file requests; try again shortly")

    async def on_new(self, session: ClientSession, f: F.BlobNew) -> None:
        node = self.node
        self._take("blobnew", session.account)
        if f.size > max_blob_size(node.config.max_file_mb):
            raise TooLarge(f"files are limited to {node.config.max_file_mb} MB on this node")
        now = node.clock.now_ms()
        expires = now + min(f.ttl, self.ttl_cap)
        have = await node.blobs.announce(
            session.account, f.blob, f.size, f.hashes, f.tokens, expires, now
        )
        session.send(F.BlobOk(f.rid, f.blob, tuple(have)))

    async def on_put(self, session: ClientSession, f: F.BlobPut) -> None:
        new = await self.node.blobs.put(f.blob, f.index, f.data)
        metrics = self.node.metrics
        metrics.event("blob.chunk_bytes_in", len(f.data))
        if not new:
            metrics.event("blob.chunk_repeats")
        session.send(F.Ok(f.rid))

    async def on_get(self, session: ClientSession, f: F.BlobGet) -> None:
        node = self.node
        self._take("blobget", session.account)
        now = node.clock.now_ms()
        if f.node == node.key.node_id:
            served = await node.blobs.read(f.blob, f.token, f.index, now)
            data, chunks, size = served.data, served.chunks, served.size
        else:
            data, chunks, size = await self._get_remote(session, f, now)
        session.send(F.BlobChunk(f.rid, f.index, data, chunks, size))
        node.metrics.event("blob.bytes_served", len(data))

    async def _get_remote(
        self, session: ClientSession, f: F.BlobGet, now: int
    ) -> tuple[bytes, int, int]:
        """From this node's fetched copy, or else fetched from the origin and kept."""
        blobs = self.node.blobs
        copy = blobs.copy_of(f.node, f.blob, f.token)
        if copy is not None:
            served = await blobs.copy_read(copy, f.index, now)
            if served is not None:
                return served.data, served.chunks, served.size
        self._take("remoteblob", session.account)
        got = await self.fetch(f.node, f.host, f.blob, f.token, f.index)
        await self._keep(f, got, now)
        return got.data, got.chunks, got.size

    async def _keep(self, f: F.BlobGet, got: BlobFetched, now: int) -> None:
        """Keep a fetched chunk so the device can resume; without room, pass it on anyway."""
        expires = now + min(got.ttl, self.ttl_cap)
        try:
            await self.node.blobs.copy_put(
                f.node, f.blob, f.token, f.index, got.data, got.size, expires, now
            )
        except HavenError as exc:
            self.node.metrics.error("blob", "copy_" + exc.code)

    async def on_done(self, session: ClientSession, f: F.BlobDone) -> None:
        node = self.node
        if f.node == node.key.node_id:
            await node.blobs.release(f.blob, f.token)
            session.send(F.Ok(f.rid))
            return
        dropped = await node.blobs.copy_drop(f.node, f.blob, f.token)
        try:
            await self.release(f.node, f.host, f.blob, f.token)
        except NotFound:
            if not dropped:
                raise
        except HavenError:
            self._queue_release(f.node, f.host, f.blob, f.token)
        session.send(F.Ok(f.rid))

    # ---- federation client -------------------------------------------------------------------

    async def fetch(
        self, origin: str, host: str, blob: bytes, token: bytes, index: int
    ) -> BlobFetched:
        """One chunk from ``origin`` over signed federation (§10.4)."""
        node = self.node
        transport = node.transport_or_fail()
        body = BlobFetch(blob, token, index)

        async def call(url: str) -> BlobFetched:
            return await transport.fetch_blob(url, origin, node.peers.stamp(origin), body)

        got = await self._federated(origin, host, call)
        node.metrics.event("blob.chunk_bytes_fetched", len(got.data))
        return got

    async def release(self, origin: str, host: str, blob: bytes, token: bytes) -> None:
        node = self.node
        transport = node.transport_or_fail()
        body = BlobRelease(blob, token)

        async def call(url: str) -> None:
            await transport.release_blob(url, origin, node.peers.stamp(origin), body)

        await self._federated(origin, host, call)

    async def _federated(self, origin: str, host: str, fn: Callable[[str], Awaitable[T]]) -> T:
        """Call ``origin`` as the key queries do (§4.3 clock re-stamp, §4.7 pins), mapping
        every failure to a stable code for the device."""
        try:
            await self._check_peer(origin, host)
            return await self._call(origin, fn)
        except RemoteError as exc:
            passed = _PASSED_ON.get(exc.code)
            if passed is not None:
                raise passed(str(exc)) from exc
            if exc.code == Unsupported.code:
                raise Unsupported("that node does not serve files") from exc
            raise Unavailable(f"the sender's node refused ({exc.code}); try again later") from exc
        except (TransportError, KeyChanged) as exc:
            raise Unavailable("the sender's node is unreachable; try again later") from exc

    async def _check_peer(self, origin: str, host: str) -> None:
        """``origin`` is pinned (resolved through ``host`` if need be) and serves blobs."""
        node, peers = self.node, self.node.peers
        if await peers.pinned(origin) is None:
            if not host:
                raise Unavailable("unknown node; the sender's address is needed")
            rec = await peers.resolve_host(host)
            if rec.node_id != origin:
                raise NotFound("no such blob")
            node.known_peers.add(origin)
        await peers.ensure_measured(origin)
        if FEATURE not in peers.st(origin).features and origin not in self._rechecked:
            # measured from a LAN announcement or by an older descriptor: read it once more
            self._rechecked.add(origin)
            peers.invalidate(origin)
            await peers.ensure_measured(origin)
        if FEATURE not in peers.st(origin).features:
            raise Unsupported("that node does not serve files")

    async def _call(self, origin: str, fn: Callable[[str], Awaitable[T]]) -> T:
        peers = self.node.peers
        try:
            return await peers.call_patiently(origin, fn)
        except RemoteError as exc:
            if exc.code == "clock_skew" and exc.peer_now is not None:
                peers.correct_clock(origin, exc.peer_now)
            elif exc.code == "wrong_destination":
                peers.invalidate(origin)
            else:
                raise
        return await peers.call_patiently(origin, fn)

    def _queue_release(self, origin: str, host: str, blob: bytes, token: bytes) -> None:
        if len(self.pending) < MAX_PENDING_RELEASES:
            give_up = self.node.clock.now_ms() + RELEASE_RETRY_MS
            self.pending[(origin, blob, token)] = (host, give_up)

    async def _retry_releases(self, now: int) -> None:
        for key, (host, give_up) in list(self.pending.items()):
            origin, blob, token = key
            try:
                await self.release(origin, host, blob, token)
            except NotFound:
                pass  # already gone there
            except HavenError:
                if now < give_up:
                    continue
            self.pending.pop(key, None)

    # ---- timer -------------------------------------------------------------------------------

    async def run(self) -> None:
        """TTL expiry, epoch re-seal and release retries, once a second."""
        failed: str | None = None
        while True:
            now = self.node.clock.now_ms()
            try:
                await self.node.blobs.tick(now)
                if self.pending:
                    await self._retry_releases(now)
                if failed is not None:
                    failed = None
                    log.info("blob store: timers succeed again")
            except HavenError as exc:
                if exc.code != failed:
                    failed = exc.code
                    log.error("blob store timer failed (%s)", exc.code)
            await asyncio.sleep(TICK_S)


class BlobRequests:
    """The blob frames of one device connection, handled concurrently; owned by the session
    (:meth:`close` ends them with it)."""

    def __init__(self, api: BlobApi, session: ClientSession) -> None:
        self.api = api
        self.session = session
        self.slots = asyncio.Semaphore(MAX_CONCURRENT)
        self.tasks: set[asyncio.Task[None]] = set()

    async def submit(self, frame: F.Frame) -> None:
        await self.slots.acquire()  # past MAX_CONCURRENT, reading from this device waits
        task = asyncio.create_task(self._run(frame))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, frame: F.Frame) -> None:
        rid = int(getattr(frame, "rid", 0))
        try:
            await self.api.handle(self.session, frame)
        except HavenError as exc:
            self.api.node.metrics.error("blob", exc.code)
            self.session.error(rid, exc)
        except Exception as exc:  # noqa: BLE001 - one request fails, not the connection
            log.error("blob request failed (internal: %s)", type(exc).__name__)
            self.session.error(rid, HavenError("internal error"))
        finally:
            self.slots.release()

    async def close(self, grace_s: float = 5.0) -> None:
        """Let requests under way finish (a chunk being written), then cancel the rest."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace_s)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
