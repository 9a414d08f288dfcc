"""The asyncio/aiohttp shell of connection admission (decisions live in node/admission.py).

:class:`GuardedSite` is a ``web.TCPSite`` whose protocol factory wraps each aiohttp
``RequestHandler`` in :class:`GuardedProtocol`, which asks the registry before aiohttp sees the
connection and reports every byte as it arrives. :func:`middleware` tells the registry when a
request starts and ends (and, behind a trusted proxy, which address it is for).
:class:`WriteQueue` bounds what is queued for one WebSocket.
"""

from __future__ import annotations

import asyncio
import ipaddress
import struct
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web

from .admission import FD_RESERVE, Admission, Conn


class GuardedProtocol(asyncio.Protocol):
    """Admission in front of aiohttp's ``RequestHandler``: every callback is forwarded."""

    def __init__(self, admission: Admission, factory: Callable[[], asyncio.Protocol]) -> None:
        self.admission = admission
        self.factory = factory
        self.inner: asyncio.Protocol | None = None
        self.conn: Conn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # a stream server's transport
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        adm = self.admission
        code = adm.refusal(source, per_source=not adm.config.trusted_proxy)
        if code is not None:
            adm.refuse(code)
            transport.abort()
            return
        self.conn = adm.open(source, transport)
        self.inner = self.factory()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.inner is None or self.conn is None:
            return
        self.admission.received(self.conn, data)
        if not self.conn.closing:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.admission.closed(self.conn)
        if self.inner is not None:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


class GuardedSite(web.TCPSite):
    """``web.TCPSite`` whose connections pass through :class:`GuardedProtocol`."""

    __slots__ = ("_admission", "_handshake_timeout")

    def __init__(
        self, runner: web.BaseRunner, admission: Admission, *args: Any, **kwargs: Any
    ) -> None:
        super().__init__(runner, *args, **kwargs)
        self._admission = admission
        self._handshake_timeout = max(1.0, admission.config.read_grace_ms / 1000)

    async def start(self) -> None:
        self._runner._reg_site(self)
        server = self._runner.server
        if server is None:
            raise RuntimeError("runner is not set up")
        loop = asyncio.get_running_loop()
        admission = self._admission
        self._server = await loop.create_server(
            lambda: GuardedProtocol(admission, server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._handshake_timeout if self._ssl_context else None,
            # asyncio accepts up to `backlog` sockets per loop pass before any refused one is
            # closed, so it must stay below FD_RESERVE or a burst reaches the fd limit
            backlog=min(self._backlog, FD_RESERVE // 2),
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = int(sockets[0].getsockname()[1]) if sockets else self._port


def conn_of(admission: Admission, request: web.BaseRequest) -> Conn | None:
    transport = request.transport
    return admission.conns.get(transport) if transport is not None else None


def forwarded_source(request: web.BaseRequest) -> str | None:
    """The client address a trusted reverse proxy appended last to ``X-Forwarded-For``."""
    raw = request.headers.get("X-Forwarded-For", "")
    last = raw.rsplit(",", 1)[-1].strip()
    try:
        return str(ipaddress.ip_address(last)) if last else None
    except ValueError:
        return None


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(admission: Admission) -> Any:
    """Marks request progress for the deadlines; applies the proxy's forwarded source."""

    @web.middleware
    async def track(request: web.Request, handler: Handler) -> web.StreamResponse:
        conn = conn_of(admission, request)
        if conn is None:
            return await handler(request)
        if admission.config.trusted_proxy:
            source = forwarded_source(request)
            code = admission.rebind(conn, source) if source else None
            if code is not None:
                admission.refuse(code)
                conn.abort()
                raise web.HTTPServiceUnavailable()
        admission.request_started(conn, request.content if request.body_exists else None)
        try:
            return await handler(request)
        finally:
            if conn.frames is None:
                admission.request_done(conn)

    return track


class WriteQueue:
    """Outgoing frames of one socket, counted in bytes; past ``limit`` the peer is dropped.

    ``limit`` is read on every put, so a session can raise it once the device signs in.
    """

    def __init__(self, limit: Callable[[], int], on_overflow: Callable[[], None]) -> None:
        self._q: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._limit = limit
        self._on_overflow = on_overflow
        self.bytes = 0
        self.overflowed = False

    def put_nowait(self, data: bytes | None) -> None:
        if data is not None:
            if self.overflowed:
                return
            self.bytes += len(data)
            if self.bytes > self._limit():
                self.overflowed = True
                self._on_overflow()
                return
        self._q.put_nowait(data)

    def get_nowait(self) -> bytes | None:
        data = self._q.get_nowait()
        if data is not None:
            self.bytes -= len(data)
        return data

    def qsize(self) -> int:
        return self._q.qsize()

    def empty(self) -> bool:
        return self._q.empty()

    async def get(self) -> bytes | None:
        data = await self._q.get()
        if data is not None:
            self.bytes -= len(data)
        return data


def _ws_header(n: int) -> bytes:
    """RFC 6455 §5.2 header of one unmasked, final, binary server frame of ``n`` bytes."""
    if n < 126:
        return struct.pack("!BB", 0x82, n)
    if n < 65536:
        return struct.pack("!BBH", 0x82, 126, n)
    return struct.pack("!BBQ", 0x82, 127, n)


async def send_frames(ws: web.WebSocketResponse, frames: list[bytes]) -> None:
    """Send several binary messages with one transport write instead of one write each.

    aiohttp has no public call for this, so its writer is used directly; where that is not
    possible (compression negotiated, closing, another aiohttp layout) each message goes
    through ``send_bytes``. The messages on the wire are the same either way. aiohttp's own
    flow control still applies: the bytes written count toward its drain threshold, and the
    last message goes through ``send_bytes``, which waits while the transport is paused.
    """
    writer = getattr(ws, "_writer", None)
    transport = getattr(writer, "transport", None)
    if (
        len(frames) < 2
        or writer is None
        or transport is None
        or getattr(writer, "compress", True)
        or getattr(writer, "_closing", True)
        or getattr(writer, "use_mask", True)
        or not isinstance(getattr(writer, "_output_size", None), int)
        or transport.is_closing()
    ):
        for data in frames:
            await ws.send_bytes(data)
        return
    parts: list[bytes] = []
    for data in frames[:-1]:
        parts.append(_ws_header(len(data)))
        parts.append(data)
    raw = b"".join(parts)
    transport.write(raw)
    writer._output_size += len(raw)
    await ws.send_bytes(frames[-1])
