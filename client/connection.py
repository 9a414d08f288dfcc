"""A device's WebSocket connection to its home node (docs/protocol.md §5)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from types import TracebackType
from typing import Any

import aiohttp

from federation import frames as F
from federation.errors import HavenError, RemoteProtocolError, TransportError
from federation.transport import failure_reason
from federation.wire import Envelope

CLIENT_PATH = "/haven/v1/client"


class NodeConnection:
    """Request/answer matching by ``rid``; pushed envelopes arrive on :attr:`deliveries`."""

    def __init__(self, url: str, *, timeout_s: float = 30) -> None:
        self.base_url = url.rstrip("/")
        self.url = self.base_url + CLIENT_PATH
        self.timeout_s = timeout_s
        self.deliveries: asyncio.Queue[list[Envelope]] = asyncio.Queue()
        # device-link messages received but not yet consumed (client/linking.py)
        self.link_held: list[tuple[Envelope, Any]] = []
        self.challenge: F.Challenge | None = None
        self._rid = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[F.Frame]] = {}
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed_exc: BaseException | None = None
        self._closed = asyncio.Event()

    async def __aenter__(self) -> NodeConnection:
        self._session = aiohttp.ClientSession()
        try:
            async with asyncio.timeout(self.timeout_s):
                self._ws = await self._session.ws_connect(
                    self.url, max_msg_size=F.MAX_FRAME, heartbeat=30
                )
                msg = await self._ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise self._not_haven()
            try:
                first = F.decode_frame(msg.data)
            except HavenError as exc:
                raise self._not_haven() from exc
            if not isinstance(first, F.Challenge):
                raise self._not_haven()
            self.challenge = first
        except aiohttp.WSServerHandshakeError as exc:
            await self._session.close()
            # Something answers HTTP there but does not serve the client WebSocket: another
            # web server, or a Haven node's port mixed up with something else. 5xx is rather
            # a proxy whose node is down.
            if exc.status >= 500:
                raise self.unreachable(exc) from exc
            raise self._not_haven() from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            await self._session.close()
            raise self.unreachable(exc) from exc
        except BaseException:
            await self._session.close()
            raise
        self._reader = asyncio.create_task(self._read())
        return self

    def unreachable(self, exc: BaseException) -> TransportError:
        """``node_unreachable``, naming the URL and why (never a class name)."""
        return TransportError(
            f"cannot reach the node at {self.base_url} ({failure_reason(exc, self.timeout_s)})",
            code="node_unreachable",
        )

    def _not_haven(self) -> TransportError:
        return TransportError(
            f"{self.base_url} is not a Haven node (wrong port?)", code="not_a_haven_node"
        )

    def _lost(self, why: str) -> TransportError:
        return TransportError(
            f"the connection to the node at {self.base_url} {why}", code="node_unreachable"
        )

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed.set()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._ws is not None:
            await self._ws.close()
        if self._session is not None:
            await self._session.close()

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                try:
                    frame = F.decode_frame(msg.data)
                except F.UnknownFrameType:
                    continue  # a newer node's frame type: ignored, as unknown fields are
                if isinstance(frame, F.Deliver):
                    self.deliveries.put_nowait(list(frame.envs))
                    continue
                rid = getattr(frame, "rid", 0)
                # An answer (error or not) fails or completes only the request with its rid.
                # An error with rid 0 or a rid we never sent names no request of ours (e.g.
                # the node could not read a frame): it must not fail the others (§5.6).
                waiter = self._waiters.pop(rid, None) if rid else None
                if waiter is not None and not waiter.done():
                    waiter.set_result(frame)
        except (HavenError, aiohttp.ClientError) as exc:
            self._closed_exc = exc
        finally:
            self._closed.set()
            err = self._lost("closed")
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(err)
            self._waiters.clear()

    @property
    def closed(self) -> bool:
        """Whether the connection ended (node restarted, network lost, or closed here)."""
        return self._closed.is_set() or self._ws is None or self._ws.closed

    async def wait_closed(self) -> None:
        """Return once the connection has ended, for whatever reason (the reader stopped)."""
        await self._closed.wait()

    def next_rid(self) -> int:
        return next(self._rid)

    async def request(self, frame: F.Frame) -> F.Frame:
        """Send a request frame and wait for the answer with the same ``rid``.

        Raises:
            RemoteProtocolError: the node answered with an ``error`` frame (``code`` kept).
            TransportError: the connection failed.
        """
        if self._ws is None or self._ws.closed:
            raise self._lost("is closed")
        rid: int = getattr(frame, "rid")  # noqa: B009
        fut: asyncio.Future[F.Frame] = asyncio.get_running_loop().create_future()
        self._waiters[rid] = fut
        try:
            await self._ws.send_bytes(frame.encode())
            async with asyncio.timeout(self.timeout_s):
                answer = await fut
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise self._lost(f"failed ({failure_reason(exc, self.timeout_s)})") from exc
        finally:
            self._waiters.pop(rid, None)
        if isinstance(answer, F.Error):
            raise RemoteProtocolError(answer.message, code=answer.code)
        return answer

    async def send_raw(self, data: bytes) -> None:
        if self._ws is None:
            raise self._lost("is closed")
        try:
            await self._ws.send_bytes(data)
        except (aiohttp.ClientError, OSError) as exc:
            raise self._lost(f"failed ({failure_reason(exc, self.timeout_s)})") from exc

    async def ack(self, ids: list[bytes]) -> None:
        if ids:
            await self.send_raw(F.Ack(tuple(ids)).encode())

    async def send_frame(self, frame: F.Frame) -> None:
        await self.send_raw(frame.encode())


def expect(frame: F.Frame, cls: type[Any]) -> Any:
    if not isinstance(frame, cls):
        raise RemoteProtocolError(f"unexpected answer {frame.T}")
    return frame
