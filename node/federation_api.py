"""Federation API: signed descriptor, envelope batches, key queries, blob fetches and group
fan-out (docs/protocol.md §4, §10, §11.4).

Checks run cheapest first and all before anything is stored: size, version, destination,
clock skew (against *our* clock; the sender stamps requests in our clock), rate, origin key,
signature, nonce. Every refusal has a stable code, is counted, and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from federation.errors import (
    HavenError,
    NotFound,
    RateLimited,
    TooLarge,
    Unsupported,
    WrongDestination,
)
from federation.fanout import (
    KEYS_MULTI_QUERY_MAX,
    MULTI_BODY_MAX,
    KeysMultiAnswer,
    KeysMultiQuery,
    MultiBatch,
)
from federation.signing import (
    H_SIG,
    MOVED_BODY_MAX,
    SignedRequest,
    decode_moved,
    descriptor_challenge,
    sign_response,
    verify_request,
)
from federation.wire import (
    BLOB_BODY_MAX,
    MAX_BATCH_BYTES,
    Batch,
    BatchResult,
    BlobFetch,
    BlobFetched,
    BlobRelease,
    Envelope,
    KeyQuery,
    check_envelopes,
    packb,
)

from .blob_api import UNSUPPORTED_WITH_WORKERS
from .peer_admission import admit_origin

if TYPE_CHECKING:
    from .app import Node

log = logging.getLogger("haven.federation")

STATUS = {
    "too_large": 413,
    "rate_limited": 429,
    "bad_signature": 401,
    "replay": 401,
    "clock_skew": 401,
    "wrong_destination": 421,
    "not_found": 404,
    "unsupported_version": 400,
    "malformed": 400,
    "storage_error": 503,
    "not_ready": 409,
}


def error_response(node: Node, exc: HavenError) -> web.Response:
    node.metrics.error("federation", exc.code)
    node.metrics.request("in", exc.code)
    body = packb({"code": exc.code, "message": str(exc)[:200], "now": node.clock.now_ms()})
    return web.Response(
        status=STATUS.get(exc.code, 400), body=body, content_type="application/msgpack"
    )


async def authenticate(
    node: Node,
    request: web.Request,
    max_len: int,
    destination: str | None = None,
    body: bytes | None = None,
) -> tuple[SignedRequest, bytes]:
    """Run every pre-storage check on a signed request; return it with its body.

    ``destination``: the node id the request must name, this node's own unless a relay holds
    for an offline client (docs/protocol.md §12.4), who has read ``body`` already."""
    if request.content_length is not None and request.content_length > max_len:
        raise TooLarge("request body too large")
    req = SignedRequest.from_headers(request.headers)  # version + shape
    if req.destination != (destination or node.key.node_id):
        raise WrongDestination("request is for another node")
    now = node.clock.now_ms()
    node.nonces.check_fresh(req.created, now)
    # Two buckets: before the signature only a global one (it bounds verification CPU), since
    # an unverified Haven-Origin could name a real peer and spend *its* budget; the per-peer
    # bucket is charged once the origin is proven.
    if not node.rates.take("fedverify:*", now):
        raise RateLimited("too many federation requests")
    if body is None:
        body = await read_body(request, max_len)
    elif len(body) > max_len:
        raise TooLarge("request body too large")
    # The raw request target (path + query as sent, still percent-encoded): §4.4.
    verify_request(req, request.method, request.raw_path, body)
    admit_origin(node.rates.new_peers, node.known_peers, req.origin, now)  # unpinned: shared
    if not node.rates.take("fed:" + req.origin, now):
        raise RateLimited("too many requests from this peer")
    node.nonces.check_and_remember(req.origin, req.nonce, req.created, now)
    if node.role is not None:  # several workers: the nonce must be new to all of them
        await node.role.bus.remember_nonce(
            req.origin, req.nonce, max(req.created, now) + node.nonces.skew_ms
        )
    return req, body


async def read_body(request: web.Request, max_len: int) -> bytes:
    """The whole body, or TooLarge as soon as it passes ``max_len``.

    ``StreamReader.read(n)`` returns *up to* n bytes (whatever is buffered), so read until EOF.
    """
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(max_len + 1 - size):
        chunks.append(chunk)
        size += len(chunk)
        if size > max_len:
            raise TooLarge("request body too large")
    # one copy at most: a body that came in one chunk is that chunk (msgspec then decodes it
    # in place, copying each envelope body once, into the Envelope it becomes)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def signed(node: Node, req: SignedRequest, body: bytes) -> web.Response:
    sig = sign_response(node.key, req.origin, req.nonce, body)
    return web.Response(body=body, content_type="application/msgpack", headers={H_SIG: sig})


async def descriptor(node: Node, request: web.Request) -> web.Response:
    """The signed descriptor; ``?c=`` is echoed inside it (§4.1). The challenge must be the
    canonical unpadded base64url of 16..32 bytes, given at most once; anything else is
    ``malformed`` (a descriptor signed over a garbled challenge would prove nothing)."""
    try:
        challenge = descriptor_challenge(request.rel_url.raw_query_string)
    except HavenError as exc:
        return error_response(node, exc)
    body = node.descriptor_bytes(challenge)
    return web.Response(body=body, content_type="application/msgpack")


async def batch(node: Node, request: web.Request) -> web.Response:
    try:
        req, body = await authenticate(node, request, MAX_BATCH_BYTES)
        decoded = Batch.decode(body)
    except HavenError as exc:
        return error_response(node, exc)
    return await _take(node, req, list(decoded.envelopes))


async def multi(node: Node, request: web.Request) -> web.Response:
    """One submission's recipients on this node (§11.4): checked exactly as a batch (same
    order, rates and replay window), then each composed envelope is taken like a batch's."""
    try:
        if not node.config.multi:  # served as a node without the feature
            raise NotFound("no such endpoint")
        req, body = await authenticate(node, request, MULTI_BODY_MAX)
        envs = MultiBatch.decode(body).envelopes()
        check_envelopes(envs)
    except HavenError as exc:
        return error_response(node, exc)
    node.metrics.event("multi.requests_in")
    return await _take(node, req, envs)


async def _take(node: Node, req: SignedRequest, envs: list[Envelope]) -> web.Response:
    """Admit and store envelopes for mailboxes here; answer the signed batch result."""
    await node.peers.seen(req.origin)
    if node.role is not None:  # registered through another worker: ask the store
        await node.learn((node.key.node_id, env) for env in envs)
    now = node.clock.now_ms()
    good: list[Envelope] = []
    rejected: list[tuple[bytes, str]] = []
    for env in envs:
        env, code = node.admit(env, now)
        if code is None:
            code = node.admit_local(env)
        if code is None:
            good.append(env)
        else:
            node.metrics.error("federation", code)
            rejected.append((env.id, code))
    results = await asyncio.gather(*node.mailboxes.submit_local(good), return_exceptions=True)
    accepted = []
    for env, res in zip(good, results, strict=True):
        if isinstance(res, BaseException):
            rejected.append((env.id, getattr(res, "code", "internal")))
        else:
            accepted.append(env.id)
    node.metrics.event("federation.envelopes_in", len(accepted))
    node.metrics.request("in", "ok")
    return signed(node, req, BatchResult(tuple(accepted), tuple(rejected)).encode())


async def moved(node: Node, request: web.Request) -> web.Response:
    """A peer's signed locator changes (§12.5): authenticated like a batch, then followed if
    they start at the host we pinned for it and verify with its key."""
    try:
        req, body = await authenticate(node, request, MOVED_BODY_MAX)
        moves = decode_moved(body)
        await node.peers.follow_moves(req.origin, moves)
    except HavenError as exc:
        return error_response(node, exc)
    node.metrics.request("in", "ok")
    return signed(node, req, packb({"ok": True}))


async def keys(node: Node, request: web.Request) -> web.Response:
    try:
        req, body = await authenticate(node, request, 4096)
        query = KeyQuery.decode(body)
        if not node.rates.take("fedkeys:" + req.origin, node.clock.now_ms()):
            raise RateLimited("too many key queries from this peer")
        await node.peers.seen(req.origin)
        dl, claimed = await node.local_keys(query.name, query.claim)
    except HavenError as exc:
        return error_response(node, exc)
    answer = packb(
        {"device_list": dl.to_wire(), "claimed": {k: list(v) for k, v in claimed.items()}}
    )
    node.metrics.request("in", "ok")
    return signed(node, req, answer)


async def keys_multi(node: Node, request: web.Request) -> web.Response:
    """Keys of many users here in one request (§11.4): one ``fedkeys`` token per call, one
    claimed key per hosted device as ``/keys``; a missing name gets ``not_found`` alone."""
    try:
        if not node.config.multi:  # served as a node without the feature
            raise NotFound("no such endpoint")
        req, body = await authenticate(node, request, KEYS_MULTI_QUERY_MAX)
        query = KeysMultiQuery.decode(body)
        if not node.rates.take("fedkeys:" + req.origin, node.clock.now_ms()):
            raise RateLimited("too many key queries from this peer")
        await node.peers.seen(req.origin)
        rows: list[Any] = []
        for name in query.names:
            try:
                dl, claimed = await node.local_keys(name, query.claim)
            except NotFound:
                rows.append((name, None, {}, NotFound.code))
            else:
                rows.append((name, dl, claimed, ""))
    except HavenError as exc:
        return error_response(node, exc)
    node.metrics.event("keys_multi.requests_in")
    node.metrics.request("in", "ok")
    return signed(node, req, KeysMultiAnswer(tuple(rows)).encode())


async def blob(node: Node, request: web.Request) -> web.Response:
    """One chunk of a blob stored here, for the holder of a recipient's token (§10.4). An
    unknown blob and a wrong token get the same ``not_found``."""
    try:
        req, body = await authenticate(node, request, BLOB_BODY_MAX)
        if not node.blobs_enabled:
            raise Unsupported(UNSUPPORTED_WITH_WORKERS)
        fetch = BlobFetch.decode(body)
        now = node.clock.now_ms()
        if not node.rates.take("fedblob:" + req.origin, now):
            raise RateLimited("too many blob requests from this peer")
        served = await node.blobs.read(fetch.blob, fetch.token, fetch.index, now)
    except HavenError as exc:
        return error_response(node, exc)
    node.metrics.event("blob.bytes_served_federation", len(served.data))
    body = BlobFetched(fetch.index, served.data, served.chunks, served.size, served.ttl).encode()
    # ~1 MiB to hash for the signature: in a worker thread, not on the event loop
    sig = await asyncio.to_thread(sign_response, node.key, req.origin, req.nonce, body)
    return web.Response(body=body, content_type="application/msgpack", headers={H_SIG: sig})


async def blob_done(node: Node, request: web.Request) -> web.Response:
    """A recipient's device has the whole file: forget its token (no token left: delete)."""
    try:
        req, body = await authenticate(node, request, BLOB_BODY_MAX)
        if not node.blobs_enabled:
            raise Unsupported(UNSUPPORTED_WITH_WORKERS)
        release = BlobRelease.decode(body)
        if not node.rates.take("fedblob:" + req.origin, node.clock.now_ms()):
            raise RateLimited("too many blob requests from this peer")
        await node.blobs.release(release.blob, release.token)
    except HavenError as exc:
        return error_response(node, exc)
    return signed(node, req, packb({"ok": True}))
