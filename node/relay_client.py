"""Relay client: a personal node behind NAT reachable through its relay (docs/protocol.md §12).

``haven node init --via-relay CODE`` takes the node's ``public_url`` from the relay invite and
writes ``relay.json`` (mode 0600) in the home: ``{"url", "node", "label", "host", "token"}``
(the token, base64url, is dropped once the relay has bound the label). At serve time
:class:`RelayLink` keeps one outbound WebSocket to the relay (reconnecting with backoff 0.5 s
doubling to 30 s, full jitter) and serves each forwarded ``req`` by making the same request to
this node's own listener, so the federation handlers check it exactly as a direct request; the
answer goes back unchanged. Nothing inbound is needed. Logs name neither addresses nor ids.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from yarl import URL

from federation.errors import LocalProtocolError, RemoteProtocolError
from federation.relayauth import AUTH_VALID_MS, RelayAuth
from federation.relaylink import (
    LINK_PATH,
    MAX_BODY,
    MAX_IN_FLIGHT,
    MAX_LINK_FRAME,
    Challenge,
    Error,
    Ok,
    RelayInvite,
    Req,
    Res,
    decode_link_frame,
    forwarded_headers,
    sign_hello,
)
from federation.signing import b64d, b64e

from .relay import HEARTBEAT_S, forwardable

if TYPE_CHECKING:
    from .app import Node

log = logging.getLogger("haven.relay")

RELAY_NAME = "relay.json"
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 30.0
LOCAL_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class RelayInfo:
    """``relay.json``: which relay this node uses and under which label."""

    url: str
    node: str
    label: str
    host: str
    token: bytes = b""

    @classmethod
    def from_invite(cls, inv: RelayInvite) -> RelayInfo:
        return cls(url=inv.url, node=inv.node, label=inv.label, host=inv.host, token=inv.t)

    def save(self, home: str) -> None:
        """Write ``relay.json`` atomically, mode 0600."""
        obj: dict[str, Any] = {
            "url": self.url,
            "node": self.node,
            "label": self.label,
            "host": self.host,
        }
        if self.token:
            obj["token"] = b64e(self.token)
        path = os.path.join(home, RELAY_NAME)
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, home: str) -> RelayInfo | None:
        """``relay.json`` from the home, or None for a node without a relay."""
        path = os.path.join(home, RELAY_NAME)
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise LocalProtocolError(f"{RELAY_NAME} is unreadable") from exc
        try:
            return cls(
                url=str(obj["url"]),
                node=str(obj["node"]),
                label=str(obj["label"]),
                host=str(obj["host"]),
                token=b64d(str(obj["token"])) if obj.get("token") else b"",
            )
        except (KeyError, TypeError, RemoteProtocolError) as exc:
            raise LocalProtocolError(f"{RELAY_NAME} is malformed") from exc

    def public_url(self) -> str:
        """The client's public URL: the relay's scheme and the client host."""
        scheme = URL(self.url).scheme or "https"
        return f"{scheme}://{self.host}"


def link_url(relay_url: str) -> str:
    """The relay's link endpoint as a WebSocket URL."""
    url = URL(relay_url)
    scheme = "wss" if url.scheme == "https" else "ws"
    return str(url.with_scheme(scheme).with_path(LINK_PATH))


class LinkRefused(Exception):
    """The relay refused the hello (its code); the link is retried with backoff anyway."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class RelayLink:
    """The client side of the link, run as one of the node's tasks."""

    def __init__(self, node: Node, info: RelayInfo) -> None:
        self.node = node
        self.info = info
        self.connected = asyncio.Event()
        self.rng = random.Random()
        self.links_made = 0
        self.last_refusal = ""
        # the statement the relay last accepted (§12.4), published in the descriptor's
        # ``relay``; b"" until a link came up
        self.statement = b""

    def local_base(self) -> str:
        """This node's own listener, as the relay's requests are replayed to it."""
        host = self.node.config.listen_host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        scheme = "https" if self.node.config.tls_cert else "http"
        return f"{scheme}://{host}:{self.node.port}"

    async def run(self) -> None:
        """Keep the link up until cancelled (backoff 0.5 s doubling to 30 s, full jitter)."""
        failures = 0
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=15, sock_connect=15)
        ) as session:
            while True:
                try:
                    await self._link(session)
                    failures = 0  # it was up: start the schedule again
                except LinkRefused as exc:
                    self.last_refusal = exc.code
                    log.warning("relay refused the link (%s)", exc.code)
                    failures += 1
                except (aiohttp.ClientError, OSError, TimeoutError, RemoteProtocolError) as exc:
                    log.info("relay link down (%s)", type(exc).__name__)
                    failures += 1
                except Exception as exc:  # noqa: BLE001 - a link bug must not stop the node
                    log.error("relay link failed (internal: %s)", type(exc).__name__)
                    failures += 1
                finally:
                    self.connected.clear()
                ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** min(failures, 10))
                await asyncio.sleep(self.rng.uniform(0, ceiling) if failures else BACKOFF_BASE_S)

    async def _link(self, session: aiohttp.ClientSession) -> None:
        async with session.ws_connect(
            link_url(self.info.url),
            max_msg_size=MAX_LINK_FRAME,
            heartbeat=HEARTBEAT_S,
            autoping=True,
        ) as ws:
            msg = await asyncio.wait_for(ws.receive(), 15)
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise RemoteProtocolError("no challenge")
            challenge = decode_link_frame(msg.data)
            if not isinstance(challenge, Challenge) or challenge.node != self.info.node:
                raise LinkRefused("wrong_relay")
            until = self.node.clock.now_ms() + AUTH_VALID_MS
            auth = RelayAuth.make(self.node.key, self.info.node, until).encode()
            hello = sign_hello(
                self.node.key,
                self.info.node,
                challenge.nonce,
                self.info.label,
                self.info.token,
                auth,
            )
            await ws.send_bytes(hello.encode())
            msg = await asyncio.wait_for(ws.receive(), 15)
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise RemoteProtocolError("no answer to hello")
            answer = decode_link_frame(msg.data)
            if isinstance(answer, Error):
                raise LinkRefused(answer.code[:40])
            if not isinstance(answer, Ok):
                raise RemoteProtocolError("unexpected answer to hello")
            self.statement = auth
            if self.info.token:  # bound now: the token is spent
                self.info = RelayInfo(
                    url=self.info.url,
                    node=self.info.node,
                    label=self.info.label,
                    host=self.info.host,
                )
                self.info.save(self.node.home)
            self.links_made += 1
            self.connected.set()
            log.info("relay link up")
            await self._serve(ws, session)

    async def _serve(
        self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession
    ) -> None:
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    if msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                        return
                    continue
                frame = decode_link_frame(msg.data)
                if not isinstance(frame, Req):
                    continue
                await slots.acquire()
                task = asyncio.create_task(self._answer(ws, session, frame, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            for t in tasks:
                t.cancel()

    async def _answer(
        self,
        ws: aiohttp.ClientWebSocketResponse,
        session: aiohttp.ClientSession,
        req: Req,
        slots: asyncio.Semaphore,
    ) -> None:
        try:
            res = await self.replay(session, req)
            if not ws.closed:
                await ws.send_bytes(res.encode())
        except (ConnectionError, RuntimeError):
            pass  # the link dropped: the relay answers the peer 503
        finally:
            slots.release()

    async def replay(self, session: aiohttp.ClientSession, req: Req) -> Res:
        """Make ``req`` to this node's own listener and return its answer unchanged."""
        if not forwardable(req.p) or req.m not in ("GET", "POST"):
            return Res(id=req.id, s=404, h=(), b=b"")
        url = URL(self.local_base() + req.p, encoded=True)
        try:
            async with session.request(
                req.m,
                url,
                headers=list(req.h),
                data=req.b if req.m == "POST" else None,
                allow_redirects=False,
                ssl=False,  # our own listener: its certificate names the public host
                timeout=aiohttp.ClientTimeout(total=LOCAL_TIMEOUT_S),
            ) as r:
                body = await _read_capped(r.content, MAX_BODY)
                if body is None:
                    return Res(id=req.id, s=502, h=(), b=b"")
                return Res(id=req.id, s=r.status, h=forwarded_headers(r.headers.items()), b=body)
        except (aiohttp.ClientError, OSError, TimeoutError):
            return Res(id=req.id, s=503, h=(), b=b"")


async def _read_capped(stream: aiohttp.StreamReader, cap: int) -> bytes | None:
    """The whole body, or None if it is longer than ``cap`` (a single ``read(n)`` returns
    whatever has arrived so far, not the whole body)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await stream.read(1 << 16):
        size += len(chunk)
        if size > cap:
            return None
        parts.append(chunk)
    return b"".join(parts)
