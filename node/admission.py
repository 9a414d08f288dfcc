"""Connection admission: caps, deadlines and bounded buffers below aiohttp (operations.md).

Every accepted TCP connection passes through ``node.guard.GuardedProtocol``, a thin forwarding
``asyncio.Protocol`` in front of aiohttp's ``RequestHandler``. It asks the :class:`Admission`
registry here first; a connection over a cap is closed at once, before aiohttp allocates
anything, and only counted (never logged). Admitted connections are tracked as :class:`Conn`
records. This module holds the decisions; ``node/guard.py`` is the asyncio/aiohttp shell.

* **Caps.** ``max_connections`` in all; at most ``max_unauthenticated`` of them may be
  unauthenticated, so the rest stays reserved for signed-in devices when strangers fill the
  pre-auth pool. Per source (the peer IP, memory only; loopback exempt unless
  ``exempt_loopback = false``): ``max_connections_per_source`` and
  ``max_unauthenticated_per_source``. Behind a trusted reverse proxy the source is the
  forwarded address, applied per request by ``node.guard.middleware``.
* **Deadlines** (checked by :meth:`Admission.watchdog`, about once a second): while anything
  is started but unfinished -- request headers, a request body, a WebSocket frame -- every
  ``read_grace_ms`` window must bring at least ``min_read_rate`` bytes/s on average (so a
  one-byte trickle or a stalled half body dies after one or two windows, while a big upload on
  a slow link keeps going; early fast bytes buy no credit for a later stall). A WebSocket must
  authenticate within ``auth_timeout_ms`` of connecting; an idle keep-alive connection or a
  silent device socket is closed after ``idle_timeout_ms``.
* **Bounded buffers.** WebSocket frame boundaries are followed byte by byte (:class:`FrameTracker`,
  pure), so progress is measured as it arrives, not when our loop gets round to a message, and
  an unauthenticated socket that declares a frame or message over ``preauth_max_frame`` is
  closed with 1009 before any of it is buffered; it may send at most ``PREAUTH_FRAMES``
  frames. Outgoing frames go through ``node.guard.WriteQueue``, which disconnects a peer that
  does not read once its queue passes its bound (64 KiB before authentication).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import NodeConfig
    from .metrics import Metrics

FD_RESERVE = 256  # store, logs, outgoing sockets and one accept burst stay below the fd limit
CLOSE_TOO_BIG = bytes([0x88, 0x02, 0x03, 0xF1])  # WebSocket close frame, code 1009
CLOSE_POLICY = bytes([0x88, 0x02, 0x03, 0xF0])  # WebSocket close frame, code 1008
PREAUTH_FRAMES = 16  # frames a WebSocket may send before it authenticates (then it is closed)
MAX_HEAD_BYTES = 1 << 20  # request bytes before a handler runs (aiohttp caps each header line)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def connection_budget(wanted: int, fd_soft_limit: int) -> int:
    """``max_connections`` kept below the fd limit with a reserve for everything else."""
    return max(16, min(wanted, fd_soft_limit - FD_RESERVE))


class FrameTracker:
    """Follows client-to-server WebSocket frame boundaries in a byte stream (RFC 6455 §5.2).

    Pure: it never buffers payload, only the at most 14 header bytes of the frame it is in.
    """

    __slots__ = ("_head", "_left", "largest", "message")

    def __init__(self) -> None:
        self._head = bytearray()
        self._left = 0  # payload bytes still to come in the current frame
        self.message = 0  # declared bytes of the data message being assembled
        self.largest = 0  # largest frame or message declared so far

    @property
    def in_frame(self) -> bool:
        return bool(self._head) or self._left > 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        pos, end = 0, len(view)
        while pos < end:
            if self._left:
                n = min(self._left, end - pos)
                self._left -= n
                pos += n
                continue
            head = self._head
            if not head and end - pos >= 2:  # the usual case: a whole header in this chunk
                need = _header_len(view[pos + 1])
                if end - pos >= need:
                    self._frame(view[pos : pos + need])
                    pos += need
                    continue
            head.append(view[pos])
            pos += 1
            if len(head) >= 2 and len(head) >= _header_len(head[1]):
                self._head = bytearray()
                self._frame(head)

    def _frame(self, head: bytearray | memoryview) -> None:
        """A complete frame header: account the frame, then skip its payload."""
        size = head[1] & 0x7F
        if size == 126:
            size = int.from_bytes(head[2:4], "big")
        elif size == 127:
            size = int.from_bytes(head[2:10], "big")
        fin, opcode = head[0] & 0x80, head[0] & 0x0F
        if opcode < 0x8:  # data or continuation frame: count towards the message
            self.message = size if opcode != 0 else self.message + size
            self.largest = max(self.largest, self.message)
            if fin:
                self.message = 0
        else:
            self.largest = max(self.largest, size)
        self._left = size


def _header_len(second: int) -> int:
    """Bytes of a frame header, from its second byte (length code and mask bit)."""
    size = second & 0x7F
    return 2 + (2 if size == 126 else 8 if size == 127 else 0) + (4 if second & 0x80 else 0)


@dataclass(slots=True, eq=False)
class Conn:
    """One admitted connection. Times are ``time.monotonic()`` seconds (socket deadlines)."""

    source: str
    exempt: bool
    opened: float
    transport: asyncio.Transport
    authenticated: bool = False
    closing: bool = False
    partial_since: float | None = None  # first byte of an unfinished request head or frame
    partial_bytes: int = 0
    last_active: float = 0.0
    body: Any = None  # aiohttp StreamReader of a request whose body is still arriving
    window_start: float = 0.0  # minimum-rate window of whatever is in progress
    window_bytes: int = 0
    in_request: bool = False
    head_tail: bytes = b""  # last bytes of an unfinished request head (to find its end)
    frames: FrameTracker | None = None  # set once upgraded to a WebSocket
    handling: bool = False  # a pre-auth frame is being handled: the node, not the peer, is slow

    def abort(self) -> None:
        self.closing = True
        self.transport.abort()

    def close_ws(self, frame: bytes) -> None:
        """Send a close frame and close; abort if the peer does not read what we sent."""
        self.closing = True
        if self.transport.get_write_buffer_size() > 0:
            self.transport.abort()
            return
        self.transport.write(frame)
        self.transport.close()


class Admission:
    """The registry of live connections, their caps and their deadlines."""

    def __init__(self, config: NodeConfig, metrics: Metrics, max_connections: int) -> None:
        self.config = config
        self.metrics = metrics
        self.max_connections = max_connections
        self.conns: dict[asyncio.BaseTransport, Conn] = {}
        self.unauthenticated = 0
        self.by_source: Counter[str] = Counter()
        self.unauth_by_source: Counter[str] = Counter()

    @property
    def max_unauthenticated(self) -> int:
        """Pre-auth connections allowed; ``max_connections`` minus this is kept for devices.
        When the fd limit lowers ``max_connections``, the pre-auth share shrinks with it."""
        cfg = self.config
        share = self.max_connections * cfg.max_unauthenticated // max(1, cfg.max_connections)
        return max(1, min(cfg.max_unauthenticated, share))

    # ---- caps --------------------------------------------------------------------------------

    def is_exempt(self, source: str) -> bool:
        if not self.config.exempt_loopback:
            return False
        try:
            return ipaddress.ip_address(source).is_loopback
        except ValueError:
            return False

    def refusal(self, source: str, per_source: bool = True) -> str | None:
        """The stable code a new connection from ``source`` is refused with, or None."""
        if len(self.conns) >= self.max_connections:
            return "over_capacity"
        if self.unauthenticated >= self.max_unauthenticated:
            return "unauthenticated_over_capacity"
        if per_source and not self.is_exempt(source):
            if self.by_source[source] >= self.config.max_connections_per_source:
                return "source_over_capacity"
            if self.unauth_by_source[source] >= self.config.max_unauthenticated_per_source:
                return "source_over_capacity"
        return None

    def open(self, source: str, transport: asyncio.Transport) -> Conn:
        now = time.monotonic()
        conn = Conn(source, self.is_exempt(source), now, transport, last_active=now)
        conn.partial_since = conn.window_start = now  # a fresh connection owes us a request
        self.conns[transport] = conn
        self.unauthenticated += 1
        self._count(conn, source, +1)
        return conn

    def _count(self, conn: Conn, source: str, delta: int) -> None:
        self.by_source[source] += delta
        if not conn.authenticated:
            self.unauth_by_source[source] += delta
        for counter in (self.by_source, self.unauth_by_source):
            if counter[source] <= 0:
                del counter[source]

    def closed(self, conn: Conn) -> None:
        if self.conns.pop(conn.transport, None) is None:
            return
        if not conn.authenticated:
            self.unauthenticated -= 1
        self._count(conn, conn.source, -1)

    def authenticated(self, conn: Conn) -> None:
        """A device signed in: it leaves the pre-auth pool and its caps."""
        if conn.authenticated or conn.transport not in self.conns:
            return
        self._count(conn, conn.source, -1)
        conn.authenticated = True
        self.unauthenticated -= 1
        self._count(conn, conn.source, +1)

    def rebind(self, conn: Conn, source: str) -> str | None:
        """Behind a trusted proxy: account ``conn`` to the forwarded ``source`` instead."""
        if source == conn.source:
            return None
        self._count(conn, conn.source, -1)
        exempt = self.is_exempt(source)
        code = None
        if not exempt:
            if self.by_source[source] >= self.config.max_connections_per_source or (
                not conn.authenticated
                and self.unauth_by_source[source] >= self.config.max_unauthenticated_per_source
            ):
                code = "source_over_capacity"
        conn.source, conn.exempt = source, exempt
        self._count(conn, source, +1)
        return code

    def refuse(self, code: str) -> None:
        self.metrics.error("conn", code)

    def snapshot(self) -> dict[str, int]:
        return {
            "open": len(self.conns),
            "unauthenticated": self.unauthenticated,
            "max_connections": self.max_connections,
            "max_unauthenticated": self.max_unauthenticated,
        }

    # ---- progress ----------------------------------------------------------------------------

    def received(self, conn: Conn, data: bytes) -> None:
        """Bytes arrived: account them to whatever is unfinished; enforce pre-auth frame size."""
        now = time.monotonic()
        conn.last_active = now
        if conn.frames is not None:
            frames = conn.frames
            if not frames.in_frame:
                self._begin(conn, now)
            conn.window_bytes += len(data)
            frames.feed(data)
            if not frames.in_frame:
                conn.partial_since = None
            if not conn.authenticated and frames.largest > self.config.preauth_max_frame:
                self.metrics.error("client", "too_large")
                conn.close_ws(CLOSE_TOO_BIG)
            return
        if conn.body is not None and not conn.body.is_eof():
            conn.window_bytes += len(data)  # a body, read by the handler or drained after it
            return
        if conn.in_request:
            return
        if conn.partial_since is None:
            self._begin(conn, now)
        conn.partial_bytes += len(data)
        conn.window_bytes += len(data)
        # The head is complete at its blank line, whenever the handler gets to run.
        if b"\r\n\r\n" in conn.head_tail + data[:3] or b"\r\n\r\n" in data:
            conn.partial_since, conn.head_tail = None, b""
        else:
            conn.head_tail = (conn.head_tail + data[-3:])[-3:]
        if conn.partial_bytes > MAX_HEAD_BYTES:
            self.metrics.error("conn", "too_large")
            conn.abort()

    def request_started(self, conn: Conn, body: Any) -> None:
        conn.in_request = True
        conn.partial_since = None
        conn.body = body
        conn.window_start, conn.window_bytes = time.monotonic(), 0

    def request_done(self, conn: Conn) -> None:
        conn.in_request = False
        if conn.body is not None and conn.body.is_eof():
            conn.body = None  # else aiohttp drains the unread rest, still under the deadline
        conn.last_active = time.monotonic()

    def upgraded(self, conn: Conn) -> None:
        conn.in_request, conn.body = False, None
        conn.partial_since = None
        conn.frames = FrameTracker()

    # ---- deadlines ---------------------------------------------------------------------------

    @staticmethod
    def _begin(conn: Conn, now: float) -> None:
        conn.partial_since, conn.partial_bytes = now, 0
        conn.window_start, conn.window_bytes = now, 0

    def _stalled(self, conn: Conn, now: float) -> bool:
        """Minimum rate: each ``read_grace_ms`` window of an unfinished request head, body or
        frame must bring ``min_read_rate`` bytes/s on average, else the sender is stalling."""
        grace = self.config.read_grace_ms / 1000
        if not conn.transport.is_reading():  # paused by us (a full buffer): not their stall
            conn.window_start, conn.window_bytes = now, 0
            return False
        if now - conn.window_start < grace:
            return False
        if conn.window_bytes < self.config.min_read_rate * grace:
            return True
        conn.window_start, conn.window_bytes = now, 0
        return False

    def verdict(self, conn: Conn, now: float) -> str | None:
        """Why ``conn`` must be closed now, or None."""
        cfg = self.config
        if conn.frames is not None:
            late = now - conn.opened > cfg.auth_timeout_ms / 1000
            if not conn.authenticated and not conn.handling and late:
                return "auth_timeout"
        receiving = conn.partial_since is not None or (
            conn.body is not None and not conn.body.is_eof()
        )
        if receiving:
            return "read_timeout" if self._stalled(conn, now) else None
        if not conn.in_request and now - conn.last_active > cfg.idle_timeout_ms / 1000:
            return "idle_timeout"
        return None

    def sweep(self, now: float | None = None) -> int:
        """Close every connection past a deadline; return how many."""
        now = time.monotonic() if now is None else now
        n = 0
        for conn in list(self.conns.values()):
            if conn.closing:
                if now - conn.last_active > 5:  # a close that never completes
                    conn.transport.abort()
                continue
            code = self.verdict(conn, now)
            if code is None:
                continue
            self.metrics.error("conn", code)
            n += 1
            conn.last_active = now
            if conn.frames is not None and code == "auth_timeout":
                conn.close_ws(CLOSE_POLICY)
            else:
                conn.abort()
        return n

    async def watchdog(self) -> None:
        """Run :meth:`sweep` about once a second (owned by the node's TaskGroup)."""
        while True:
            await asyncio.sleep(1)
            self.sweep()
