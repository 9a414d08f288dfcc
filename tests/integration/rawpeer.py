"""A malicious peer node and a malicious device, for tests that feed a real node bad input.

:class:`RawPeer` holds its own :class:`NodeKey`, signs federation requests with
:mod:`federation.signing` and lets a test bend any part of a request (version, origin,
destination, time, nonce, signature, body) before it goes out as raw HTTP. :class:`RawDevice`
speaks the client WebSocket protocol frame by frame and can send arbitrary bytes;
:class:`RawIdentity` is a device's key material, so a test can register and publish keys exactly
as it likes (for example one-time keys and no fallback key). :func:`ws_declare_oversized` talks
WebSocket over a bare TCP stream, to announce a frame larger than the node accepts without
sending its payload. Nothing here retries or repairs: every answer comes back as the node sent it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import nacl.public
import nacl.signing
import vodozemac as vz
import yarl

from federation import frames as F
from federation.devicelist import DeviceInfo, DeviceList, SignedDeviceList
from federation.signing import (
    H_SIG,
    Descriptor,
    NodeKey,
    SignedRequest,
    device_auth_message,
    sign_request,
    verify_response,
)
from federation.transport import BATCH_PATH, CONTENT_TYPE, DESCRIPTOR_PATH, KEYS_PATH
from federation.wire import Batch, Envelope, packb

__all__ = [
    "BATCH_PATH",
    "KEYS_PATH",
    "Answer",
    "RawDevice",
    "RawIdentity",
    "RawPeer",
    "closed_by_node",
    "envelope",
    "now_ms",
    "raw_connect",
    "read_close",
    "read_frame",
    "set_node_config",
    "stats",
    "upgrade_request",
    "ws_client_frame",
    "ws_declare_oversized",
    "ws_open",
]

DEADLINE_S = 20.0
STATS_PATH = "/haven/v1/stats"
CLIENT_PATH = "/haven/v1/client"


def set_node_config(home: Path, **changes: Any) -> None:
    """Rewrite a stopped node's ``node.toml`` with ``changes`` (e.g. a limit for one test)."""
    from node.config import NodeConfig

    dataclasses.replace(NodeConfig.load(str(home)), **changes).save(str(home))


def now_ms() -> int:
    """The wall clock exactly as the node's ``SystemClock`` reads it."""
    return time.time_ns() // 1_000_000


def envelope(
    to: bytes,
    *,
    body: bytes = b"\x00" * 64,
    ttl_ms: int = 3_600_000,
    eid: bytes | None = None,
    expires: int | None = None,
) -> Envelope:
    """An envelope with an opaque body (the node never opens bodies)."""
    exp = expires if expires is not None else now_ms() + ttl_ms
    return Envelope(eid or os.urandom(16), to, exp, body)


async def stats(http: aiohttp.ClientSession, base_url: str) -> dict[str, Any]:
    """The node's loopback-only aggregate counters: ``{"errors", "events", "counts"}``."""
    async with asyncio.timeout(DEADLINE_S):
        async with http.get(base_url + STATS_PATH) as resp:
            assert resp.status == 200, resp.status
            return msgpack.unpackb(await resp.read())  # type: ignore[no-any-return]


# ---- federation peer -----------------------------------------------------------------------------


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
        async with asyncio.timeout(DEADLINE_S):
            async with self.http.get(self.base_url + DESCRIPTOR_PATH) as resp:
                data = await resp.read()
        t1 = now_ms()
        desc = Descriptor.verify_decode(data)
        self.dest, self.offset_ms = desc.node_id, desc.now - (t0 + t1) // 2
        return desc

    def node_now(self) -> int:
        return now_ms() + self.offset_ms

    def sign(
        self,
        path: str,
        body: bytes,
        *,
        signer: NodeKey | None = None,
        dest: str | None = None,
        created: int | None = None,
    ) -> SignedRequest:
        when = self.node_now() if created is None else created
        return sign_request(signer or self.key, "POST", path, dest or self.dest, body, when)

    @staticmethod
    def headers(req: SignedRequest, **override: str | None) -> dict[str, str]:
        """Signature headers for ``req``; ``Haven_Origin="x"`` replaces one, ``=None`` drops it."""
        h = req.to_headers() | {"Content-Type": CONTENT_TYPE}
        for name, value in override.items():
            name = name.replace("_", "-")
            if value is None:
                h.pop(name, None)
            else:
                h[name] = value
        return h

    async def post_raw(
        self, path: str, body: Any, headers: dict[str, str], req: SignedRequest | None = None
    ) -> Answer:
        """POST exactly these headers and body (bytes, or an async iterator for chunked)."""
        async with asyncio.timeout(DEADLINE_S):
            async with self.http.post(self.base_url + path, data=body, headers=headers) as resp:
                raw = await resp.read()
                answer = Answer(resp.status, raw, resp.headers, request=req)
        if raw:
            answer.body = msgpack.unpackb(raw)
        return answer

    async def post_target(
        self, target: str, body: bytes, headers: dict[str, str], req: SignedRequest | None = None
    ) -> Answer:
        """POST to the request target ``target`` exactly as given (no percent-decoding or
        re-quoting on the way out), e.g. ``/haven/v1/federation/%62atch``."""
        url = yarl.URL(self.base_url + target, encoded=True)
        async with asyncio.timeout(DEADLINE_S):
            async with self.http.post(url, data=body, headers=headers) as resp:
                raw = await resp.read()
                answer = Answer(resp.status, raw, resp.headers, request=req)
        if raw:
            answer.body = msgpack.unpackb(raw)
        return answer

    async def get_target(self, target: str) -> Answer:
        """GET ``target`` exactly as given (e.g. a descriptor challenge ``?c=%%%``)."""
        url = yarl.URL(self.base_url + target, encoded=True)
        async with asyncio.timeout(DEADLINE_S):
            async with self.http.get(url) as resp:
                raw = await resp.read()
                answer = Answer(resp.status, raw, resp.headers)
        if raw and resp.status != 200:
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
        verify_response(
            self.dest, self.key.node_id, answer.request.nonce, answer.raw, answer.headers[H_SIG]
        )


# ---- device --------------------------------------------------------------------------------------


def _raw_b64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4))


@dataclass
class RawIdentity:
    """A device's keys held by the test: Olm account, identity key, sealing key, mailbox."""

    account: vz.Account = field(default_factory=vz.Account)
    identity: nacl.signing.SigningKey = field(default_factory=nacl.signing.SigningKey.generate)
    sealing: nacl.public.PrivateKey = field(default_factory=nacl.public.PrivateKey.generate)
    mailbox: bytes = field(default_factory=lambda: os.urandom(16))
    address: str = ""

    @property
    def auth_key(self) -> bytes:
        return _raw_b64(self.account.ed25519_key.to_base64())

    def sign(self, message: bytes) -> bytes:
        return _raw_b64(self.account.sign(message).to_base64())

    def device_list(self, address: str, version: int = 1) -> SignedDeviceList:
        dev = DeviceInfo(
            self.account.curve25519_key.to_base64(),
            self.account.ed25519_key.to_base64(),
            bytes(self.sealing.public_key),
            self.mailbox,
            now_ms(),
        )
        return DeviceList(address, bytes(self.identity.verify_key), version, (dev,)).sign(
            self.identity
        )

    def one_time_keys(self, n: int, signed: bool = True) -> tuple[tuple[str, str], ...]:
        """New one-time keys as published: ``key:signature`` (unsigned ones are refused by
        senders, see client.device.verified_key)."""
        from client.device import OTK_TAG

        self.account.generate_one_time_keys(n)

        def wire(key: str) -> str:
            return (
                f"{key}:{self.account.sign(OTK_TAG + key.encode()).to_base64()}" if signed else key
            )

        keys = tuple((k, wire(v.to_base64())) for k, v in self.account.one_time_keys.items())
        self.account.mark_keys_as_published()
        return keys


class RawDevice:
    """One WebSocket to the client API; frames in and out, nothing interpreted."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, challenge: F.Challenge) -> None:
        self.ws = ws
        self.challenge = challenge
        self.rid = 0

    @classmethod
    async def connect(cls, http: aiohttp.ClientSession, base_url: str) -> RawDevice:
        async with asyncio.timeout(DEADLINE_S):
            ws = await http.ws_connect(base_url + CLIENT_PATH, max_msg_size=2 * F.MAX_FRAME)
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
        return F.decode_frame(msg.data, 2 * F.MAX_FRAME)

    async def recv(self) -> F.Frame:
        """The next frame that is not a pushed delivery."""
        while True:
            frame = await self._recv_on(self.ws)
            if not isinstance(frame, F.Deliver):
                return frame

    async def recv_sized(self) -> tuple[F.Frame, int]:
        """The next frame, deliveries included, with its size in bytes on the wire."""
        async with asyncio.timeout(DEADLINE_S):
            msg = await self.ws.receive()
        assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data)
        return F.decode_frame(msg.data, 2 * F.MAX_FRAME), len(msg.data)

    async def recv_msg(self) -> aiohttp.WSMessage:
        """The next raw WebSocket message (to observe a close)."""
        async with asyncio.timeout(DEADLINE_S):
            return await self.ws.receive()

    async def send_bytes(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def request(self, frame: F.Frame | dict[str, Any]) -> F.Frame:
        data = frame.encode() if isinstance(frame, F.Frame) else packb(frame)
        await self.ws.send_bytes(data)
        return await self.recv()

    def proof(self, ident: RawIdentity, mailbox: bytes | None = None) -> bytes:
        """``ident``'s signature over this connection's challenge, for ``mailbox``."""
        mb = ident.mailbox if mailbox is None else mailbox
        return ident.sign(device_auth_message(self.challenge.node_id, self.challenge.nonce, mb))

    async def auth(self, ident: RawIdentity) -> F.Frame:
        return await self.request(F.Auth(self.next_rid(), ident.mailbox, self.proof(ident)))

    async def register(self, ident: RawIdentity, token: bytes, address: str) -> F.Frame:
        return await self.request(
            F.Register(
                self.next_rid(),
                token,
                ident.mailbox,
                ident.auth_key,
                self.proof(ident),
                ident.device_list(address),
            )
        )

    async def close(self) -> None:
        await self.ws.close()


# ---- WebSocket over a bare stream ----------------------------------------------------------------


async def _read_ws_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await reader.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        (n,) = struct.unpack(">H", await reader.readexactly(2))
    elif n == 127:
        (n,) = struct.unpack(">Q", await reader.readexactly(8))
    return b0 & 0x0F, await reader.readexactly(n)


async def ws_declare_oversized(host: str, port: int, declared: int) -> tuple[F.Frame, int | None]:
    """Open a WebSocket by hand and send only the header of a ``declared``-byte binary frame.

    Returns the node's first frame (its challenge) and the close code the node answers with
    (None if it closed without a close frame). Sending no payload keeps the close clean: the
    node has nothing unread, so it cannot reset the connection before its close frame arrives.
    """
    async with asyncio.timeout(DEADLINE_S):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                (
                    f"GET {CLIENT_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                    "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                    f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head[:80]
            opcode, payload = await _read_ws_frame(reader)
            assert opcode == 0x2, opcode
            challenge = F.decode_frame(payload)
            # FIN + binary; masked, 64-bit length; a mask; no payload bytes.
            writer.write(bytes([0x82, 0x80 | 127]) + struct.pack(">Q", declared) + os.urandom(4))
            await writer.drain()
            code: int | None = None
            while True:
                try:
                    opcode, payload = await _read_ws_frame(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                if opcode == 0x8:
                    code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                    break
            return challenge, code
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass


# ---- raw connections from a chosen loopback source -----------------------------------------------


def ws_client_frame(payload: bytes, opcode: int = 0x2, fin: bool = True) -> bytes:
    """One masked client-to-server WebSocket frame (RFC 6455 §5.2)."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def upgrade_request(host: str, port: int) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {CLIENT_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


async def raw_connect(
    port: int, source: str = "127.0.0.1", host: str = "127.0.0.1", rcvbuf: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A bare TCP stream to the node from ``source`` (any 127.0.0.0/8 address on Linux).

    ``rcvbuf`` shrinks the socket's receive buffer, for a peer that never reads."""
    import socket

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    sock.bind((source, 0))
    try:
        async with asyncio.timeout(DEADLINE_S):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


async def ws_open(
    port: int, source: str = "127.0.0.1", rcvbuf: int = 0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, F.Frame]:
    """A hand-made WebSocket from ``source``: upgraded, with the node's challenge read."""
    reader, writer = await raw_connect(port, source, rcvbuf=rcvbuf)
    try:
        async with asyncio.timeout(DEADLINE_S):
            writer.write(upgrade_request("127.0.0.1", port))
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(head[:40].decode(errors="replace"))
            _opcode, payload = await _read_ws_frame(reader)
    except BaseException:
        writer.close()
        raise
    return reader, writer, F.decode_frame(payload)


async def read_close(reader: asyncio.StreamReader) -> int | None:
    """Read frames until the node closes: its close code, or None if it closed without one."""
    async with asyncio.timeout(DEADLINE_S):
        while True:
            try:
                opcode, payload = await _read_ws_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
            if opcode == 0x8:
                return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None


async def closed_by_node(reader: asyncio.StreamReader) -> bool:
    """Wait (bounded) until the node closes this stream; True once it has."""
    async with asyncio.timeout(DEADLINE_S):
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
    return True


async def read_frame(reader: asyncio.StreamReader) -> F.Frame:
    """The next binary frame on a hand-made WebSocket, decoded."""
    async with asyncio.timeout(DEADLINE_S):
        opcode, payload = await _read_ws_frame(reader)
    assert opcode == 0x2, (opcode, payload[:40])
    return F.decode_frame(payload, 2 * F.MAX_FRAME)
