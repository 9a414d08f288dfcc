"""A malicious relay for tests: a forwarder that sits where a relay sits and misbehaves.

In front of a real relay (``keep_host``: the peer's ``Host`` goes on, so the relay routes it
to its client's link as usual), it is the relay's own front door: whatever it does to a request
or an answer, the relay could do in its place.

A relay (docs/protocol.md §12) only moves a peer's federation request to its client and the
client's answer back: method, raw target, ``Content-Type`` and ``Haven-*`` headers, body. This
forwarder does exactly that between a peer and a node whose ``public_url`` points at it, and
can be switched at any time (``mode``, or ``plan``: one mode for each of the next batch
requests) to the misbehaviour a relay is capable of:

- ``alter_request``: flip one byte of every request body on the way in;
- ``replay``: forward every request, answer the peer, then send the same request again;
- ``drop_response``: forward every request but answer the peer ``502`` with no body;
- ``alter_response``: forward every request, flip one byte of the node's answer body;
- ``forge_accept``: never forward a batch; answer it with the node's last signed batch answer
  (a real signature by the node, for another request);
- ``forge_held``: never forward a batch; answer "all accepted", signed by the relay's own key
  as a held-mode relay does (§12.4), with a ``Haven-Relay`` statement that is not a valid one
  for it: none, one it signed itself, one of the node's that expired, one of the node's that
  names another relay (in turn; the last two need the node's key, ``client_key``).

The node and the peer must refuse each of them with their ordinary checks; the forwarder
holds no keys, so it cannot do better than this. It runs an aiohttp server on its own event
loop in a thread of the test process and counts what it did (``seen``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from federation.errors import HavenError
from federation.relayauth import H_RELAY, RELAY_AUTH_TAG, RelayAuth, header_value
from federation.signing import H_SIG, NodeKey, SignedRequest, sign_response
from federation.wire import Batch, BatchResult, packb

MODES = (
    "pass",
    "alter_request",
    "replay",
    "drop_response",
    "alter_response",
    "forge_accept",
    "forge_held",
)


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
    plan: list[str] = field(default_factory=list)  # modes for the next batches, then ``mode``
    keep_host: bool = False  # forward the peer's Host header (in front of a real relay)
    client_key: NodeKey | None = None  # the node's key, for forged statements (test only)
    key: NodeKey = field(default_factory=NodeKey.generate)
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
        body = await request.read()
        headers = _kept(request.headers)
        target = request.raw_path
        is_batch = request.method == "POST" and target.split("?")[0].endswith(("/batch", "/multi"))
        mode = self.plan.pop(0) if is_batch and self.plan else self.mode
        if is_batch:
            self.seen[mode] += 1
        if is_batch and mode == "forge_accept" and self._last_batch_answer is not None:
            status, rheaders, rbody = self._last_batch_answer
            return web.Response(status=status, body=rbody, headers=rheaders)
        if is_batch and mode == "forge_held":
            return self._forged_held(request, body)
        if is_batch and mode == "alter_request":
            body = _flip(body)
        if self.keep_host:
            headers = [("Host", request.host), *headers]
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

    def _forged_held(self, request: web.Request, body: bytes) -> web.Response:
        """ "All accepted", signed by this relay, with a statement that does not authorise it."""
        req = SignedRequest.from_headers(request.headers)
        try:
            ids = tuple(e.id for e in Batch.decode(body).envelopes)
        except HavenError:  # /multi: another shape; an empty acceptance is forged all the same
            ids = ()
        answer = BatchResult(accepted=ids).encode()
        headers = {
            "Content-Type": "application/msgpack",
            H_SIG: sign_response(self.key, req.origin, req.nonce, answer),
        }
        variant = (self.seen["forge_held"] - 1) % 4  # counted above
        dest = req.destination
        now = int(time.time() * 1000)
        until = now + 86_400_000
        if variant == 1:  # "the node authorises me", signed by me
            msg = RELAY_AUTH_TAG + packb([dest, self.key.node_id, until])
            forged = RelayAuth(dest, self.key.node_id, until, self.key.sign(msg))
            headers[H_RELAY] = header_value(forged)
        elif variant == 2 and self.client_key is not None:  # the node's own, expired
            old = RelayAuth.make(self.client_key, self.key.node_id, now - 60_000)
            headers[H_RELAY] = header_value(old)
        elif variant == 3 and self.client_key is not None:  # the node's own, for another relay
            other = RelayAuth.make(self.client_key, NodeKey.generate().node_id, until)
            headers[H_RELAY] = header_value(other)
        return web.Response(status=200, body=answer, headers=headers)
