"""A malicious peer node and a malicious device, for tests that feed a real node bad input.

:class:`RawPeer` holds its own :class:`NodeKey`, signs federation requests with
:mod:`federation.signing` and lets a test bend any part of the request (version, origin,
destination, time, nonce, signature, body) before it goes out as raw HTTP. :class:`RawDevice`
speaks the client WebSocket protocol frame by frame and can send arbitrary bytes.
Nothing here retries or repairs: every answer comes back exactly as the node sent it.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack

from federation import frames as F
from federation.signing import (
    H_SIG,
    H_VERSION,
    NodeKey,
    SignedRequest,
    device_auth_message,
    sign_request,
    verify_response,
)
from federation.transport import BATCH_PATH, CONTENT_TYPE, DESCRIPTOR_PATH, KEYS_PATH
from federation.signing import Descriptor
from federation.wire import Batch, Envelope, packb

__all__ = ["BATCH_PATH", "KEYS_PATH", "Answer", "RawDevice", "RawPeer", "envelope", "stats"]

DEADLINE_S = 20.0
STATS_PATH = "/haven/v1/stats"


def now_ms() -> int:
    return int(time.time() * 1000)


def envelope(to: bytes, *, body: bytes = b"\x00" * 64, ttl_ms: int = 3_600_000,
             eid: bytes | None = None, expires: int | None = None) -> Envelope:
    """An envelope with an opaque body (never opened by the node)."""
    return Envelope(eid or os.urandom(16), to, expires if expires is not None else now_ms() + ttl_ms,
                    body)


async def stats(http: aiohttp.ClientSession, base_url: str) -> dict[str, Any]:
    """The node's loopback-only aggregate counters."""
    async with http.get(base_url + STATS_PATH) as resp:
        assert resp.status == 200, resp.status
        return msgpack.unpackb(await resp.read())  # type: ignore[no-any-return]


@dataclass
class Answer:
    """One HTTP answer from the node: status, decoded msgpack body (if any), raw bytes."""

    status: int
    raw: bytes
    headers: Any
    body: Any = None
    request: SignedRequest | None = None

    @property
    def code(self) -> str | None:
        return self.body.get("code") if isinstance(self.body, dict) else None


@dataclass
class RawPeer:
    """A federation peer under the test's full control."""

    http: aiohttp.ClientSession
    base_url: str
    key: NodeKey = field(default_factory=NodeKey.generate)
    dest: str = ""
    offset_ms: int = 0

    async def handshake(self) -> Descriptor:
        """Fetch the node's descriptor: learn its id and clock offset (as a real peer does)."""
        t0 = now_ms()
        async with self.http.get(self.base_url + DESCRIPTOR_PATH) as resp:
            data = await resp.read()
        t1 = now_ms()
        desc = Descriptor.verify_decode(data)
        self.dest, self.offset_ms = desc.node_id, desc.now - (t0 + t1) // 2
        return desc

    def node_now(self) -> int:
        return now_ms() + self.offset_ms

    def sign(self, path: str, body: bytes, *, signer: NodeKey | None = None,
             dest: str | None = None, created: int | None = None) -> SignedRequest:
        return sign_request(signer or self.key, "POST", path, dest or self.dest, body,
                            self.node_now() if created is None else created)

    def headers(self, req: SignedRequest, **override: str) -> dict[str, str]:
        """Signature headers for ``req``; ``override`` replaces (or, with "", drops) headers."""
        h = req.to_headers() | {"Content-Type": CONTENT_TYPE}
        for name, value in override.items():
            name = name.replace("_", "-")
            if value == "":
                h.pop(name, None)
            else:
                h[name] = value
        return h

    async def post_raw(self, path: str, body: Any, headers: dict[str, str],
                       req: SignedRequest | None = None) -> Answer:
        async with asyncio.timeout(DEADLINE_S):
            async with self.http.post(self.base_url + path, data=body, headers=headers) as resp:
                raw = await resp.read()
                answer = Answer(resp.status, raw, resp.headers, request=req)
        if raw:
            answer.body = msgpack.unpackb(raw)
        return answer

    async def post(self, path: str, body: bytes, **kw: Any) -> Answer:
        """A correctly signed POST of ``body`` (any bytes), unless ``kw`` bends the signing."""
        req = self.sign(path, body, **kw)
        return await self.post_raw(path, body, self.headers(req), req)

    async def batch(self, envs: list[Envelope] | tuple[Envelope, ...]) -> Answer:
        return await self.post(BATCH_PATH, Batch(tuple(envs)).encode())

    async def keys(self, name: str, claim: bool) -> Answer:
        return await self.post(KEYS_PATH, packb({"name": name, "claim": claim}))

    def check_signed(self, answer: Answer) -> None:
        """The node signs every successful answer to the requesting peer (protocol §4)."""
        assert answer.request is not None
        verify_response(self.dest, self.key.node_id, answer.request.nonce, answer.raw,
                        answer.headers[H_SIG])


class RawDevice:
    """One WebSocket to the client API; frames in and out, nothing interpreted."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, challenge: F.Challenge) -> None:
        self.ws = ws
        self.challenge = challenge
        self.rid = 0

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, base_url: str) -> RawDevice:
        ws = await http.ws_connect(base_url + "/haven/v1/client", max_msg_size=F.MAX_FRAME * 2)
        first = await cls._recv_on(ws)
        assert isinstance(first, F.Challenge), first
        return cls(ws, first)

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    @staticmethod
    async def _recv_on(ws: aiohttp.ClientWebSocketResponse) -> F.Frame:
        async with asyncio.timeout(DEADLINE_S):
            msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data)
        return F.decode_frame(msg.data)

    async def recv(self) -> F.Frame:
        """Next frame that is not a pushed delivery."""
        while True:
            frame = await self._recv_on(self.ws)
            if not isinstance(frame, F.Deliver):
                return frame

    async def recv_msg(self) -> aiohttp.WSMessage:
        """Next raw WebSocket message (to observe closes)."""
        async with asyncio.timeout(DEADLINE_S):
            return await self.ws.receive()

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def request(self, frame: F.Frame | dict[str, Any]) -> F.Frame:
        data = frame.encode() if isinstance(frame, F.Frame) else packb(frame)
        await self.ws.send_bytes(data)
        return await self.recv()

    def proof(self, sign: Any, mailbox: bytes) -> bytes:
        """``sign`` signs bytes with the device's Ed25519 key."""
        return bytes(sign(device_auth_message(self.challenge.node_id, self.challenge.nonce,
                                              mailbox)))

    async def auth(self, mailbox: bytes, sig: bytes) -> F.Frame:
        return await self.request(F.Auth(self.next_rid(), mailbox, sig))

    async def close(self) -> None:
        await self.ws.close()


__all__ += ["H_VERSION", "now_ms"]
