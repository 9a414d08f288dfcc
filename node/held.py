"""Held mode on a relay: accepting batches for an offline client (docs/protocol.md §12.4).

While a relay client has no link, the relay answers ``POST /haven/v1/federation/batch`` and
``/multi`` for the client's host itself: the same checks as a node's (:func:`authenticate`,
with ``Haven-Destination`` = the client id), the same admission (TTL cap), and the envelopes
become **outbox rows for destination = client id** in the relay's own store, so the at-rest
rules of every node apply unchanged (sealed rows, epoch keys, deleted once forwarded). The
answer is signed by the relay's key and carries the client's statement in ``Haven-Relay``;
peers check it (:func:`federation.relayauth.verify_answer`). Everything else for an offline
client is ``503 unavailable``.

When the client links again, the relay's ordinary outbox worker for that destination sends
the rows over the link (:meth:`HeldClients.route` gives the transport a link sender in place
of HTTP), in order, with its usual backoff and splitting; the client stores each envelope id
once. The latest statement per client is kept in the ``relay_clients`` row, and held bytes per
client are counted in memory (like the outbox quotas), recounted from the stored rows at start
(:func:`restore`); the per-peer figures a relay could derive are never stored.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from federation.errors import HavenError, QuotaExceeded, TransportError
from federation.fanout import MULTI_BODY_MAX, MULTI_PATH, MultiBatch
from federation.relayauth import H_RELAY, RelayAuth, header_value
from federation.signing import H_SIG, sign_response
from federation.transport import BATCH_PATH, LinkSend
from federation.wire import MAX_BATCH_BYTES, Batch, BatchResult, Envelope, check_envelopes, packb

from .federation_api import authenticate, error_response

if TYPE_CHECKING:
    from .app import Node
    from .relay import RelayService

DEFAULT_QUOTA = 64 * 1024 * 1024  # bytes of held envelopes per client (relay_quota_mb)


@dataclass(slots=True)
class _Client:
    quota: int
    quota_read: bool = False  # read from the relay_clients row (node/relay.py)
    auth: RelayAuth | None = None  # the latest statement, from the client's last hello
    link: LinkSend | None = None
    held_bytes: int = 0


@dataclass(slots=True)
class HeldClients:
    """The relay's clients as held mode sees them: statement, link, quota and held bytes.

    :func:`attach` connects it to the relay service (node/relay.py): its statements, links and
    the clients' quotas.
    """

    clients: dict[str, _Client] = field(default_factory=dict)
    _rows: dict[bytes, tuple[str, int]] = field(default_factory=dict)  # id -> client, bytes
    _expiry: list[tuple[int, bytes]] = field(default_factory=list)
    wake: Callable[[str], None] | None = None  # the node's "peer reachable": starts its outbox
    known: Callable[[str], bool] | None = None  # whether a node id is a bound client here

    def register(self, client_id: str, quota: int = DEFAULT_QUOTA) -> None:
        """A bound client, allowed ``quota`` bytes of held envelopes."""
        c = self.clients.setdefault(client_id, _Client(quota))
        c.quota = quota

    def authorised(self, client_id: str, auth: RelayAuth) -> None:
        """The client's latest statement (checked by the caller: by the client, for us)."""
        self.clients.setdefault(client_id, _Client(DEFAULT_QUOTA)).auth = auth

    def linked(self, client_id: str, link: LinkSend) -> None:
        """A link is up: the client's outbox worker starts forwarding at once."""
        self.clients.setdefault(client_id, _Client(DEFAULT_QUOTA)).link = link
        if self.wake is not None:
            self.wake(client_id)

    def unlinked(self, client_id: str, link: LinkSend | None = None) -> None:
        """The link closed (unless a newer one already replaced ``link``)."""
        c = self.clients.get(client_id)
        if c is not None and (link is None or c.link is link):
            c.link = None

    def route(self, dest: str) -> LinkSend | None:
        """For the transport: the link to ``dest`` if it is a linked client; None for any other
        node (plain HTTP).

        Raises:
            TransportError: ``dest`` is a client without a link (its outbox waits, backing off:
                posting to its public host would come back here).
        """
        c = self.clients.get(dest)
        if c is None and (self.known is None or not self.known(dest)):
            return None
        if c is None or c.link is None:
            raise TransportError("relay client offline")
        return c.link

    def held(self, client_id: str) -> int:
        """Bytes of envelopes held for ``client_id`` (counted from the store at start)."""
        c = self.clients.get(client_id)
        return 0 if c is None else c.held_bytes

    def admit(self, client_id: str, env: Envelope, now: int) -> str | None:
        """``quota_exceeded``, or None and the envelope counts towards the client's quota
        (an envelope id already held counts once)."""
        self._expire(now)
        if env.id in self._rows:
            return None
        c = self.clients[client_id]
        size = len(env.body)
        if c.held_bytes + size > c.quota:
            return QuotaExceeded.code
        c.held_bytes += size
        self._rows[env.id] = (client_id, size)
        heapq.heappush(self._expiry, (env.expires, env.id))
        return None

    def restored(self, client_id: str, env: Envelope) -> None:
        """A row already held in the store at start counts towards the client's quota."""
        if env.id in self._rows:
            return
        c = self.clients.setdefault(client_id, _Client(DEFAULT_QUOTA))
        c.held_bytes += len(env.body)
        self._rows[env.id] = (client_id, len(env.body))
        heapq.heappush(self._expiry, (env.expires, env.id))

    def left(self, ids: list[bytes]) -> None:
        """These rows left the outbox (forwarded, refused for good, or never committed)."""
        for eid in ids:
            got = self._rows.pop(eid, None)
            if got is not None:
                c = self.clients.get(got[0])
                if c is not None:
                    c.held_bytes = max(0, c.held_bytes - got[1])

    def _expire(self, now: int) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, eid = heapq.heappop(self._expiry)
            self.left([eid])


def unavailable(node: Node) -> web.Response:
    """``503 unavailable``: what an offline client's host answers to anything but batches."""
    node.metrics.error("federation", "unavailable")
    body = packb(
        {"code": "unavailable", "message": "node offline; try later", "now": node.clock.now_ms()}
    )
    return web.Response(status=503, body=body, content_type="application/msgpack")


async def answer(
    node: Node, held: HeldClients, request: web.Request, client_id: str, body: bytes
) -> web.Response:
    """Answer a request for the host of ``client_id``, which has no link (§12.4); ``body`` is
    the request body, already read (at most the relay's 4 MiB)."""
    c = held.clients.get(client_id)
    now = node.clock.now_ms()
    if (
        request.method != "POST"
        or request.raw_path not in (BATCH_PATH, MULTI_PATH)
        or c is None
        or c.auth is None
        or c.auth.until < now
    ):
        return unavailable(node)
    auth = c.auth
    try:
        if request.raw_path == BATCH_PATH:
            req, _ = await authenticate(node, request, MAX_BATCH_BYTES, client_id, body)
            envs = list(Batch.decode(body).envelopes)
        else:
            req, _ = await authenticate(node, request, MULTI_BODY_MAX, client_id, body)
            envs = MultiBatch.decode(body).envelopes()
            check_envelopes(envs)
    except HavenError as exc:
        return error_response(node, exc)
    good: list[Envelope] = []
    rejected: list[tuple[bytes, str]] = []
    for env in envs:
        env, code = node.admit(env, now)
        if code is None:
            code = held.admit(client_id, env, now)
        if code is None:
            good.append(env)
        else:
            node.metrics.error("federation", code)
            rejected.append((env.id, code))
    futs = node.mailboxes.submit_outbox([(client_id, env) for env in good])
    results = await asyncio.gather(*futs, return_exceptions=True)
    accepted = []
    for env, res in zip(good, results, strict=True):
        if isinstance(res, BaseException):
            held.left([env.id])
            rejected.append((env.id, getattr(res, "code", "internal")))
        else:
            accepted.append(env.id)
    node.metrics.event("relay.held_in", len(accepted))
    node.metrics.request("in", "ok")
    out = BatchResult(tuple(accepted), tuple(rejected)).encode()
    headers = {
        H_SIG: sign_response(node.key, req.origin, req.nonce, out),
        H_RELAY: header_value(auth),
    }
    return web.Response(body=out, content_type="application/msgpack", headers=headers)


RESTORE_PAGE = 256  # held rows read per query at start


async def restore(node: Node, service: RelayService) -> None:
    """At start: the statements the store keeps (:meth:`RelayService.load_statements`), each
    bound client's quota, and the bytes already held for it, counted from its outbox rows (read
    once, page by page: at most its quota per client), so neither the 503s nor the quota start
    from nothing after a restart."""
    held = node.held
    await service.load_statements()
    for client, raw in service.statements.items():
        held.authorised(client, RelayAuth.decode(raw))
    for _, _, client, quota, _ in await service.store.relay_clients():
        if not client:
            continue
        held.register(client, quota)
        held.clients[client].quota_read = True
        after = 0
        while page := await service.store.outbox_page(client, after, RESTORE_PAGE):
            for _, env in page:
                held.restored(client, env)
            after = page[-1][0]


def attach(node: Node, service: RelayService) -> None:
    """Held mode for the relay service's clients: it answers for a client without a link
    (:attr:`RelayService.offline`), and a new link starts forwarding what is held for it
    (:attr:`RelayService.on_link`), over that link (:meth:`RelayService.request`)."""
    held = node.held

    async def offline(
        label: str, client: str, request: web.Request, body: bytes
    ) -> web.StreamResponse:
        c = held.clients.get(client)
        if c is None or not c.quota_read:
            quota = next(
                (q for lb, _, _, q, _ in await service.store.relay_clients() if lb == label),
                DEFAULT_QUOTA,
            )
            held.register(client, quota)
            held.clients[client].quota_read = True
        raw = service.statements.get(client)
        if raw is not None:  # checked when the hello came: by this client, for this relay
            held.authorised(client, RelayAuth.decode(raw))
        return await answer(node, held, request, client, body)

    def link_to(client: str) -> LinkSend:
        async def send(
            method: str, path: str, headers: list[tuple[str, str]], body: bytes
        ) -> tuple[int, list[tuple[str, str]], bytes]:
            status, got, out = await service.request(client, method, path, tuple(headers), body)
            return status, list(got), out

        return send

    before = service.on_link

    def on_link(client: str) -> None:
        held.linked(client, link_to(client))  # raises Unavailable once the link is gone
        if before is not None:
            before(client)

    service.offline = offline
    service.on_link = on_link
    held.known = lambda node_id: node_id in service.labels.values()
