"""Relay service: reachability for personal nodes behind NAT (docs/protocol.md §12).

A node with ``relay = true`` in node.toml mints relay invites (``haven node relay-invite``),
accepts one outbound link per client at ``/haven/v1/relay/link`` and routes every HTTP request
whose ``Host`` is ``<label>.<relay_domain>[:port]`` to that client over its link, unchanged
(:class:`RelayService`). Requests and answers stay signed end to end by the two federating
nodes: the relay parses neither; it only limits sizes, requests in flight and time.

What the relay keeps: the ``relay_clients`` table (label, token hash until bound, bound client
node id, quota, expiry, created day, the client's latest authorisation statement) in its
SQLite store; PostgreSQL nodes refuse ``relay = true``. Traffic figures (bytes in and out per
client) are memory only, and nothing about the clients' peers is kept or logged.

Hooks for the other relay parts:

- **Held mode** (client offline): :attr:`RelayService.offline` is called with ``(label,
  client id, request, body)`` for a request to a known client without a link and returns the
  response; the default answers ``503 unavailable``. Held mode replaces it.
- **The relay's own requests to a client** (held envelopes forwarded on reconnect):
  :meth:`RelayService.post_signed` signs a federation POST as the relay, sends it over the
  client's link and returns the answer once the client's signature verifies;
  :meth:`RelayService.request` sends any request as given and returns ``(status, headers,
  body)``. Both raise :class:`federation.errors.Unavailable` when the client has no link. (An
  ordinary :class:`federation.transport.PeerTransport` posting to the client's public URL also
  works when the relay resolves its own wildcard names to itself: the request enters through
  its own listener and is routed by Host like any other.) :meth:`RelayService.wait_linked`
  waits for a client's link, and :attr:`RelayService.on_link` is called with the client id
  each time a link comes up.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from federation.errors import (
    HavenError,
    LocalProtocolError,
    MalformedFrame,
    RemoteProtocolError,
    Unavailable,
)
from federation.relayauth import RelayAuth
from federation.relaylink import (
    MAX_BODY,
    MAX_IN_FLIGHT,
    MAX_LINK_FRAME,
    NONCE_LEN,
    TOKEN_LEN,
    Challenge,
    Error,
    Hello,
    Ok,
    RelayInvite,
    Req,
    Res,
    decode_link_frame,
    encode_invite,
    forwarded_headers,
    new_label,
    valid_label,
    verify_hello,
)
from federation.signing import H_SIG, sign_request, verify_response
from federation.transport import CONTENT_TYPE, RemoteError
from federation.wire import ErrorBody, packb

from . import guard
from .sqlite_store import SqliteStore

if TYPE_CHECKING:
    from .app import Node

log = logging.getLogger("haven.relay")

MIB = 1024 * 1024
INVITE_TTL_MS = 7 * 86_400_000
DAY_MS = 86_400_000
REQUEST_TIMEOUT_S = 10.0  # then the peer gets 503 unavailable
HEARTBEAT_S = 20.0  # WebSocket ping
HELLO_TIMEOUT_S = 10.0
LABELS_REREAD_S = 2.0  # an unknown label re-reads the table at most this often
# only these targets are forwarded to a client (the rest is the client's own business)
FORWARDED_PREFIXES = ("/.well-known/haven/", "/haven/v1/federation/")


def token_hash(token: bytes) -> bytes:
    """BLAKE2b-256 of an invite token (only the hash is stored)."""
    return hashlib.blake2b(token, digest_size=32).digest()


def relay_store(store: object) -> SqliteStore:
    """The relay's store; relay service needs the SQLite store (its ``relay_clients`` table)."""
    if not isinstance(store, SqliteStore):
        raise LocalProtocolError(
            "relay = true needs the SQLite store (a PostgreSQL node cannot be a relay yet)"
        )
    return store


def relay_domain(config: Any) -> str:
    """``relay_domain`` from node.toml, else the host part of the public URL (no port)."""
    return str(config.relay_domain or urlsplit(config.public_url).hostname or "").lower()


def port_suffix(public_url: str) -> str:
    """``:port`` when the relay's public URL has a non-default port, else ``""``."""
    parts = urlsplit(public_url)
    default = 443 if parts.scheme == "https" else 80
    return f":{parts.port}" if parts.port and parts.port != default else ""


def host_suffixes(public_url: str) -> tuple[str, ...]:
    """The ``:port`` a client's Host header may end with: the relay's public port (spelled out
    even when it is the default one)."""
    parts = urlsplit(public_url)
    return (f":{parts.port or (443 if parts.scheme == 'https' else 80)}",)


def label_of_host(host: str, domain: str, suffixes: tuple[str, ...]) -> str | None:
    """The label a ``Host`` header names (``label.domain``, optionally with one of
    ``suffixes``), lowercased; None for any other host."""
    host = host.lower()
    for suffix in suffixes:
        if host.endswith(suffix):
            host = host[: -len(suffix)]
            break
    label, dot, rest = host.partition(".")
    if not dot or rest != domain or not valid_label(label):
        return None
    return label


def forwardable(target: str) -> bool:
    """Whether a raw request target is one a relay forwards (federation paths only)."""
    return target.startswith(FORWARDED_PREFIXES)


def error_body(code: str, message: str, now: int) -> bytes:
    return packb({"code": code, "message": message, "now": now})


@dataclass(slots=True)
class ClientStats:
    """Per-client traffic since start (memory only)."""

    bytes_in: int = 0  # towards the client
    bytes_out: int = 0  # from the client


@dataclass(slots=True)
class Link:
    """One client's live link: the WebSocket and the forwarded requests awaiting answers."""

    ws: web.WebSocketResponse
    client: str
    label: str
    pending: dict[int, asyncio.Future[Res]] = field(default_factory=dict)
    next_id: int = 1
    slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_IN_FLIGHT))

    def fail_all(self) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(Unavailable("relay link closed"))
        self.pending.clear()


class RelayService:
    """The relay role of one node: labels, links, Host routing and forwarding."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.store = relay_store(node.store)
        self.domain = relay_domain(node.config)
        self.suffixes = host_suffixes(node.config.public_url)
        self.labels: dict[str, str] = {}  # label -> bound client id ("" until bound)
        self._labels_read = 0.0
        self.links: dict[str, Link] = {}  # label -> live link
        self.stats: dict[str, ClientStats] = {}
        self.statements: dict[str, bytes] = {}  # client id -> latest signed statement (§12.4)
        self.offline: Callable[[str, str, web.Request, bytes], Awaitable[web.StreamResponse]] = (
            self._unavailable
        )
        self.on_link: Callable[[str], None] | None = None
        self._linked = asyncio.Condition()

    # ---- labels --------------------------------------------------------------------------

    async def load(self) -> None:
        """Read the labels from the store (at start, on a hello, on an unknown label)."""
        self.labels = {label: client for label, _, client, _, _ in await self.store.relay_clients()}
        self._labels_read = time.monotonic()

    def label_of_host(self, host: str) -> str | None:
        """The label a ``Host`` header names (``label.domain[:port]``), or None."""
        return label_of_host(host, self.domain, self.suffixes)

    def client_of(self, label: str) -> str:
        return self.labels.get(label, "")

    # ---- routing (middleware) -------------------------------------------------------------

    def middleware(self) -> Any:
        """aiohttp middleware: requests for a client's host go over its link."""

        @web.middleware
        async def route(
            request: web.Request,
            handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        ) -> web.StreamResponse:
            label = self.label_of_host(request.host)
            if label is None:
                return await handler(request)
            return await self._route(label, request)

        return route

    def _answer(self, status: int, code: str, message: str) -> web.Response:
        body = error_body(code, message, self.node.clock.now_ms())
        return web.Response(status=status, body=body, content_type="application/msgpack")

    async def _route(self, label: str, request: web.Request) -> web.StreamResponse:
        if label not in self.labels and time.monotonic() - self._labels_read > LABELS_REREAD_S:
            await self.load()
        client = self.labels.get(label, "")
        if not client or not forwardable(request.raw_path):
            return self._answer(404, "not_found", "no such node here")
        if request.content_length is not None and request.content_length > MAX_BODY:
            return self._answer(413, "too_large", "request body too large")
        body = await request.read()
        if len(body) > MAX_BODY:
            return self._answer(413, "too_large", "request body too large")
        if label not in self.links:
            return await self.offline(label, client, request, body)
        try:
            status, headers, out = await self.request(
                client,
                request.method,
                request.raw_path,
                forwarded_headers(request.headers.items()),
                body,
            )
        except Unavailable:
            return self._answer(503, "unavailable", "the node is not reachable right now")
        return web.Response(status=status, body=out, headers=CIMultiDict(headers))

    async def _unavailable(
        self, label: str, client: str, request: web.Request, body: bytes
    ) -> web.StreamResponse:
        """Default while held mode is absent: the client is offline."""
        return self._answer(503, "unavailable", "the node is offline")

    # ---- forwarding -----------------------------------------------------------------------

    def link_of(self, client: str) -> Link | None:
        for link in self.links.values():
            if link.client == client:
                return link
        return None

    async def request(
        self,
        client: str,
        method: str,
        target: str,
        headers: tuple[tuple[str, str], ...],
        body: bytes,
    ) -> tuple[int, tuple[tuple[str, str], ...], bytes]:
        """Send one request over ``client``'s link and wait for its answer (at most 10 s).
        Raises Unavailable without a link, on a timeout or when the link drops."""
        link = self.link_of(client)
        if link is None:
            raise Unavailable("no link")
        stats = self.stats.setdefault(link.label, ClientStats())
        rid = link.next_id
        link.next_id += 1
        try:  # the 10 s include waiting for one of the link's 64 slots
            async with asyncio.timeout(REQUEST_TIMEOUT_S), link.slots:
                fut: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
                link.pending[rid] = fut
                frame = Req(id=rid, m=method, p=target, h=headers, b=body).encode()
                await link.ws.send_bytes(frame)
                stats.bytes_in += len(frame)
                res = await fut
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            raise Unavailable("no answer over the relay link") from exc
        finally:
            link.pending.pop(rid, None)
        return res.s, forwarded_headers(res.h), res.b

    async def post_signed(self, client: str, path: str, body: bytes, created: int) -> bytes:
        """A signed federation POST from this relay (origin = relay id) to ``client`` over its
        link; returns the answer body once its signature by ``client`` verifies. ``created``
        is in the client's clock (§4.3). Raises Unavailable (no link, no answer),
        :class:`federation.transport.RemoteError` for a refusal, BadSignature or
        MalformedFrame for an unsigned or badly signed answer."""
        req = sign_request(self.node.key, "POST", path, client, body, created)
        headers = (("Content-Type", CONTENT_TYPE), *req.to_headers().items())
        status, got_headers, answer = await self.request(client, "POST", path, headers, body)
        if status >= 400:
            try:
                err = ErrorBody.decode(answer)
            except HavenError:
                raise Unavailable(f"client answered HTTP {status}") from None
            raise RemoteError(err.code, err.message, err.now)
        sig = dict((k.lower(), v) for k, v in got_headers).get(H_SIG.lower())
        if sig is None:
            raise MalformedFrame("unsigned response")
        verify_response(client, self.node.key.node_id, req.nonce, answer, sig)
        return answer

    async def wait_linked(self, client: str, within_s: float) -> bool:
        """Wait until ``client`` has a link (True) or ``within_s`` seconds pass (False)."""
        try:
            async with asyncio.timeout(within_s), self._linked:
                await self._linked.wait_for(lambda: self.link_of(client) is not None)
        except TimeoutError:
            return False
        return True

    # ---- the link endpoint ----------------------------------------------------------------

    async def link_ws(self, request: web.Request) -> web.WebSocketResponse:
        """``GET /haven/v1/relay/link``: challenge, hello, then forwarding until it closes."""
        ws = web.WebSocketResponse(max_msg_size=MAX_LINK_FRAME, heartbeat=HEARTBEAT_S)
        conn = guard.conn_of(self.node.admission, request)
        await ws.prepare(request)
        if conn is not None:
            self.node.admission.upgraded(conn)
        link: Link | None = None
        try:
            link = await self._handshake(ws)
            if link is None:
                return ws
            if conn is not None:
                self.node.admission.authenticated(conn)
            await self._serve_link(link)
        except (ConnectionError, RemoteProtocolError) as exc:
            log.debug("relay link closed: %s", type(exc).__name__)
        except Exception as exc:  # noqa: BLE001 - client input: no traceback in the log
            log.error("relay link failed (internal: %s)", type(exc).__name__)
        finally:
            if link is not None:
                link.fail_all()
                if self.links.get(link.label) is link:
                    del self.links[link.label]
            if not ws.closed:
                await ws.close()
        return ws

    async def _refuse(self, ws: web.WebSocketResponse, code: str, message: str) -> None:
        await ws.send_bytes(Error(code=code, message=message).encode())
        await ws.close()

    async def _handshake(self, ws: web.WebSocketResponse) -> Link | None:
        nonce = os.urandom(NONCE_LEN)
        await ws.send_bytes(Challenge(node=self.node.key.node_id, nonce=nonce).encode())
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                msg = await ws.receive()
        except TimeoutError:
            await self._refuse(ws, "unauthorized", "no hello")
            return None
        if msg.type != WSMsgType.BINARY:
            return None
        try:
            hello = decode_link_frame(msg.data)
            if not isinstance(hello, Hello):
                raise RemoteProtocolError("expected hello")
        except RemoteProtocolError:
            await self._refuse(ws, "malformed", "expected a hello frame")
            return None
        try:
            verify_hello(hello, self.node.key.node_id, nonce)
        except RemoteProtocolError:
            await self._refuse(ws, "unauthorized", "bad hello signature")
            return None
        code = await self._bind(hello)
        if code is not None:
            await self._refuse(ws, code, "this node may not use that label")
            return None
        if hello.auth:  # kept for held mode (§12.4) if valid for this client and this relay
            try:
                RelayAuth.decode(hello.auth).check(
                    hello.node, self.node.key.node_id, self.node.clock.now_ms()
                )
            except RemoteProtocolError:
                pass
            else:
                self.statements[hello.node] = hello.auth
                await self._keep_statement(hello.node, hello.auth)
        link = Link(ws=ws, client=hello.node, label=hello.label)
        old = self.links.get(hello.label)
        self.links[hello.label] = link  # a newer link replaces the older one
        if old is not None:
            old.fail_all()
            await old.ws.close()
        self.stats.setdefault(hello.label, ClientStats())
        await ws.send_bytes(Ok().encode())
        async with self._linked:
            self._linked.notify_all()
        if self.on_link is not None:
            self.on_link(hello.node)
        log.info("relay client linked")
        return link

    async def _keep_statement(self, client: str, auth: bytes) -> None:
        """Store the latest statement, so held mode survives a restart of this relay."""
        try:
            await self.store.set_relay_auth(client, auth)
        except HavenError as exc:  # held mode still works until this relay restarts
            log.warning("relay statement not stored (%s)", type(exc).__name__)

    async def load_statements(self) -> None:
        """At start: the statements the store keeps that are still valid (by their client,
        for this relay, not expired); a newer one from a hello since then stays."""
        now = self.node.clock.now_ms()
        for client, raw in (await self.store.relay_auths()).items():
            try:
                RelayAuth.decode(raw).check(client, self.node.key.node_id, now)
            except RemoteProtocolError:
                continue
            self.statements.setdefault(client, raw)

    async def _bind(self, hello: Hello) -> str | None:
        """None if ``hello.node`` may use ``hello.label`` (binding it with the token on first
        use), else the error code."""
        await self.load()
        if hello.label not in self.labels:
            return "invalid_invite"
        bound = self.labels[hello.label]
        if bound:
            return None if bound == hello.node else "unauthorized"
        if len(hello.token) != TOKEN_LEN:
            return "invalid_invite"
        now = self.node.clock.now_ms()
        if not await self.store.bind_relay_client(
            hello.label, token_hash(hello.token), hello.node, now
        ):
            return "invalid_invite"
        self.labels[hello.label] = hello.node
        return None

    async def _serve_link(self, link: Link) -> None:
        stats = self.stats.setdefault(link.label, ClientStats())
        async for msg in link.ws:
            if msg.type != WSMsgType.BINARY:
                if msg.type == WSMsgType.ERROR:
                    return
                continue
            stats.bytes_out += len(msg.data)
            frame = decode_link_frame(msg.data)  # malformed: the link closes
            if isinstance(frame, Res):
                fut = link.pending.get(frame.id)
                if fut is not None and not fut.done():
                    fut.set_result(frame)
            # anything else from a linked client is ignored (forward compatible)

    # ---- operator view --------------------------------------------------------------------

    async def describe(self) -> list[dict[str, Any]]:
        """``relay-clients``: per client, no ids of the clients' peers."""
        return await describe_clients(self.store, self)


async def describe_clients(store: SqliteStore, live: RelayService | None) -> list[dict[str, Any]]:
    """The rows of ``relay_clients`` with live figures (zeros while stopped)."""
    out: list[dict[str, Any]] = []
    held = await store.outbox_counts()  # held envelopes are outbox rows for the client
    for label, _, client, quota, expires in await store.relay_clients():
        st = live.stats.get(label) if live is not None else None
        out.append(
            {
                "label": label,
                "client": client or None,
                "connected": live is not None and label in live.links,
                "bytes_in": st.bytes_in if st else 0,
                "bytes_out": st.bytes_out if st else 0,
                "held": held.get(client, 0) if client else 0,
                "quota": quota,
                "invite_expires": None if client else expires,
            }
        )
    return out


async def mint_invite(home: str, quota: int | None = None) -> tuple[str, RelayInvite]:
    """``haven node relay-invite``: a new label and token, stored as their hash."""
    from .app import build

    node = build(home)
    if not node.config.relay:
        raise LocalProtocolError("this node is not a relay (set relay = true in node.toml)")
    store = relay_store(node.store)
    token = os.urandom(TOKEN_LEN)
    label = new_label()
    q = quota if quota is not None else node.config.relay_quota_mb * MIB
    if q < 0:
        raise LocalProtocolError("--quota must be 0 or more", code="bad_argument")
    host = f"{label}.{relay_domain(node.config)}{port_suffix(node.config.public_url)}"
    await store.open()
    try:
        now = node.clock.now_ms()
        expires = -(-(now + INVITE_TTL_MS) // DAY_MS) * DAY_MS
        await store.add_relay_client(label, token_hash(token), q, expires, now // DAY_MS * DAY_MS)
    finally:
        await store.close()
    inv = RelayInvite(
        url=node.config.public_url, node=node.key.node_id, t=token, label=label, host=host
    )
    return encode_invite(inv), inv


async def list_clients(home: str) -> list[dict[str, Any]]:
    """``haven node relay-clients``: the running node's live view, else the stored rows."""
    from . import admin
    from .app import build
    from .config import NodeConfig

    live = await admin.loopback_view(NodeConfig.load(home), "/haven/v1/relay/clients")
    if live is not None:
        return live
    node = build(home)
    store = relay_store(node.store)
    await store.open()
    try:
        return await describe_clients(store, None)
    finally:
        await store.close()


async def clients_view(service: RelayService, request: web.Request) -> web.Response:
    """``GET /haven/v1/relay/clients`` (loopback only): the live operator view."""
    if request.remote not in ("127.0.0.1", "::1"):
        raise web.HTTPNotFound()
    try:
        rows = await service.describe()
    except HavenError as exc:
        return web.Response(status=503, body=error_body(exc.code, "store", 0))
    return web.Response(body=packb(rows), content_type="application/msgpack")
