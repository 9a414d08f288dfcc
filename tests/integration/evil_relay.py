"""A malicious relay for tests: a forwarder that sits where a relay sits and misbehaves.

A relay (docs/protocol.md §12) only moves a peer's federation request to its client and the
client's answer back: method, raw target, ``Content-Type`` and ``Haven-*`` headers, body. This
forwarder does exactly that between a peer and a node whose ``public_url`` points at it, and
can be switched at any time to the misbehaviour a relay is capable of:

- ``alter_request``: flip one byte of every request body on the way in;
- ``replay``: forward every request, answer the peer, then send the same request again;
- ``drop_response``: forward every request but answer the peer ``502`` with no body;
- ``alter_response``: forward every request, flip one byte of the node's answer body;
- ``forge_accept``: never forward a batch; answer it with the node's last signed batch answer
  (a real signature by the node, for another request).

The node and the peer must refuse each of them with their ordinary checks; the forwarder
holds no keys, so it cannot do better than this. It runs an aiohttp server on its own event
loop in a thread of the test process and counts what it did (``seen``).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

MODES = ("pass", "alter_request", "replay", "drop_response", "alter_response", "forge_accept")


def _kept(headers: object) -> list[tuple[str, str]]:
    """The headers a relay forwards (spec: ``Content-Type`` and ``Haven-*``, in order)."""
    items = headers.items()  # type: ignore[attr-defined]
    return [
        (k, v) for k, v in items if k.lower() == "content-type" or k.lower().startswith("haven-")
    ]


def _flip(body: bytes) -> bytes:
    if not body:
        return b"\x00"
    i = len(body) // 2
    return body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1 :]


@dataclass
class EvilRelay:
    """Forward ``127.0.0.1:port`` to ``target`` (a node's listen URL), misbehaving per ``mode``."""

    port: int
    target: str
    mode: str = "pass"
    seen: Counter[str] = field(default_factory=Counter)
    replay_codes: list[int] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None
    _http: aiohttp.ClientSession | None = None
    _last_batch_answer: tuple[int, list[tuple[str, str]], bytes] | None = None

    def start(self) -> EvilRelay:
        ready = threading.Event()
        self._loop = asyncio.new_event_loop()

        def run() -> None:
            assert self._loop is not None
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._serve())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="evil-relay", daemon=True)
        self._thread.start()
        if not ready.wait(20):
            raise AssertionError("evil relay did not start")
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._close(), self._loop)
        fut.result(20)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(20)
        self._loop = None

    async def _serve(self) -> None:
        self._http = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._http is not None:
            await self._http.close()

    async def _forward(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        assert self._http is not None
        async with self._http.request(
            method, self.target + target, headers=headers, data=body, allow_redirects=False
        ) as r:
            return r.status, _kept(r.headers), await r.read()

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        """The node's own devices' client WebSocket, passed through untouched (not a
        federation request: a relay's misbehaviour towards devices is out of scope here)."""
        assert self._http is not None
        ours = web.WebSocketResponse(max_msg_size=0)
        await ours.prepare(request)
        url = self.target.replace("http", "ws", 1) + request.raw_path
        async with self._http.ws_connect(url, max_msg_size=0) as theirs:

            async def pump(src: object, dst: object) -> None:
                async for msg in src:  # type: ignore[attr-defined]
                    if msg.type == aiohttp.WSMsgType.BINARY:
                        await dst.send_bytes(msg.data)  # type: ignore[attr-defined]
                    elif msg.type == aiohttp.WSMsgType.TEXT:
                        await dst.send_str(msg.data)  # type: ignore[attr-defined]
                    else:
                        break
                await dst.close()  # type: ignore[attr-defined]

            await asyncio.gather(pump(ours, theirs), pump(theirs, ours), return_exceptions=True)
        return ours

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._websocket(request)
        mode = self.mode
        body = await request.read()
        headers = _kept(request.headers)
        target = request.raw_path
        is_batch = request.method == "POST" and target.split("?")[0].endswith(("/batch", "/multi"))
        if is_batch and mode != "pass":
            self.seen[mode] += 1
        if is_batch and mode == "forge_accept" and self._last_batch_answer is not None:
            status, rheaders, rbody = self._last_batch_answer
            return web.Response(status=status, body=rbody, headers=rheaders)
        if is_batch and mode == "alter_request":
            body = _flip(body)
        status, rheaders, rbody = await self._forward(request.method, target, headers, body)
        if is_batch and status == 200:
            self._last_batch_answer = (status, rheaders, rbody)
        if is_batch and mode == "replay":
            again, _, _ = await self._forward(request.method, target, headers, body)
            self.replay_codes.append(again)
        if is_batch and mode == "drop_response":
            return web.Response(status=502)
        if is_batch and mode == "alter_response":
            rbody = _flip(rbody)
        return web.Response(status=status, body=rbody, headers=rheaders)
