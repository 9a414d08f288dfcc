"""Thin asyncio shell: signed federation requests over aiohttp (docs/protocol.md §4).

It only moves bytes: builds signed requests with :mod:`federation.signing`, checks signed
responses, and translates aiohttp and protocol failures into :mod:`federation.errors`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import yarl

from .clock import SystemClock
from .errors import (
    BadSignature,
    ClockSkew,
    HavenError,
    MalformedFrame,
    RemoteProtocolError,
    TransportError,
)
from .fanout import (
    KEYS_MULTI_ANSWER_MAX,
    KEYS_MULTI_PATH,
    MULTI_PATH,
    KeysMultiAnswer,
    KeysMultiQuery,
)
from .relayauth import H_RELAY, verify_answer
from .signing import (
    H_SIG,
    Descriptor,
    LocatorChange,
    NodeKey,
    b64e,
    encode_moved,
    sign_request,
    verify_response,
)
from .wire import (
    MAX_BATCH_BYTES,
    Batch,
    BatchResult,
    BlobFetch,
    BlobFetched,
    BlobRelease,
    ErrorBody,
    KeyQuery,
    unpackb,
)

BATCH_PATH = "/haven/v1/federation/batch"
KEYS_PATH = "/haven/v1/federation/keys"
BLOB_PATH = "/haven/v1/federation/blob"
BLOB_DONE_PATH = "/haven/v1/federation/blob_done"
DESCRIPTOR_PATH = "/.well-known/haven/node"
MOVED_PATH = "/haven/v1/federation/moved"
CONTENT_TYPE = "application/msgpack"
LINK_URL = "relay-link:"  # the base URL a request over a relay link is posted to (ignored)
# A relay's link to a client (§12.3): (method, raw target, headers, body) -> (status, headers,
# body). Raises TransportError when the link is gone or does not answer.
LinkSend = Callable[
    [str, str, list[tuple[str, str]], bytes], Awaitable[tuple[int, list[tuple[str, str]], bytes]]
]
OFF_LOOP_BYTES = 64 * 1024  # larger bodies are hashed for their signature in a worker thread


class RemoteError(RemoteProtocolError):
    """The peer answered with a protocol error; ``code`` is the peer's stable code."""

    def __init__(self, code: str, message: str, peer_now: int | None = None) -> None:
        super().__init__(message, code=code)
        self.peer_now = peer_now


@dataclass(frozen=True, slots=True)
class FetchedDescriptor:
    descriptor: Descriptor
    offset_ms: int  # peer clock minus our clock, at the midpoint of the request


class PeerTransport:
    """Signed requests from this node to peer nodes, over one shared aiohttp session."""

    def __init__(
        self,
        key: NodeKey,
        session: aiohttp.ClientSession,
        timeout_s: float = 10,
        now_ms: Callable[[], int] | None = None,
    ) -> None:
        self.key = key
        self.session = session
        self.timeout_s = timeout_s
        # our clock, for the expiry of a relay's held-mode statement (§12.4)
        self.now_ms = now_ms or SystemClock().now_ms
        # On a relay: a node id -> the link to that client, None for other nodes (plain HTTP);
        # raises TransportError for a client without a link (node/held.py).
        self.route: Callable[[str], LinkSend | None] | None = None

    async def fetch_descriptor(self, base_url: str, now_ms: Any) -> FetchedDescriptor:
        """GET the signed descriptor with a fresh challenge; measure the peer's clock offset.

        ``now_ms`` is a callable giving our clock. The descriptor must echo the challenge, so a
        recorded descriptor replayed by someone else (e.g. a LAN spoofer) is refused.
        """
        challenge = os.urandom(16)
        t0 = now_ms()
        url = f"{base_url}{DESCRIPTOR_PATH}?c={b64e(challenge)}"
        data = await self._request("GET", url, None, {})
        t1 = now_ms()
        desc = Descriptor.verify_decode(data)
        if desc.challenge != challenge:
            raise BadSignature("descriptor does not answer our challenge")
        return FetchedDescriptor(desc, desc.now - (t0 + t1) // 2)

    async def post_batch(self, base_url: str, dest: str, created: int, batch: Batch) -> BatchResult:
        return await self.post_encoded_batch(base_url, dest, created, batch.encode())

    async def post_encoded_batch(
        self, base_url: str, dest: str, created: int, body: bytes
    ) -> BatchResult:
        """POST an already encoded :class:`Batch`: a retry (another locator, a re-stamped
        clock) signs the same bytes again with a fresh nonce, and encodes nothing."""
        data = await self._signed_post(base_url, BATCH_PATH, dest, created, body, relayed=True)
        return BatchResult.decode(data)

    async def post_multi(self, base_url: str, dest: str, created: int, body: bytes) -> BatchResult:
        """POST an encoded :class:`federation.fanout.MultiBatch` (§11.4); the answer has the
        shape of a batch's. A retry signs the same bytes again with a fresh nonce."""
        data = await self._signed_post(base_url, MULTI_PATH, dest, created, body, relayed=True)
        return BatchResult.decode(data)

    async def query_keys_multi(
        self, base_url: str, dest: str, created: int, query: KeysMultiQuery
    ) -> KeysMultiAnswer:
        """One key query for many names on ``dest`` (§11.4); answers up to 4 MiB."""
        data = await self._signed_post(
            base_url, KEYS_MULTI_PATH, dest, created, query.encode(), KEYS_MULTI_ANSWER_MAX
        )
        return KeysMultiAnswer.decode(data)

    async def query_keys(
        self, base_url: str, dest: str, created: int, name: str, claim: bool
    ) -> dict[str, Any]:
        body = KeyQuery(name, claim).encode()
        data = await self._signed_post(base_url, KEYS_PATH, dest, created, body)
        obj = unpackb(data, max_len=256 * 1024)
        if not isinstance(obj, dict):
            raise MalformedFrame("bad keys answer")
        return obj

    async def fetch_blob(
        self, base_url: str, dest: str, created: int, fetch: BlobFetch
    ) -> BlobFetched:
        """One chunk of a blob held by ``dest`` (docs/protocol.md §10.4)."""
        data = await self._signed_post(base_url, BLOB_PATH, dest, created, fetch.encode())
        got = BlobFetched.decode(data)
        if got.index != fetch.index:
            raise MalformedFrame("blob answer for another chunk")
        return got

    async def release_blob(
        self, base_url: str, dest: str, created: int, release: BlobRelease
    ) -> None:
        """Tell ``dest`` that the device holding ``release.token`` has the whole file."""
        await self._signed_post(base_url, BLOB_DONE_PATH, dest, created, release.encode())

    async def post_moved(
        self, base_url: str, dest: str, created: int, moves: tuple[LocatorChange, ...]
    ) -> None:
        """Tell ``dest`` this node's signed locator changes (§12.5); the answer is signed."""
        data = await self._signed_post(base_url, MOVED_PATH, dest, created, encode_moved(moves))
        obj = unpackb(data, max_len=1024)
        if not isinstance(obj, dict) or obj.get("ok") is not True:
            raise MalformedFrame("bad moved answer")

    async def _signed_post(
        self,
        base_url: str,
        path: str,
        dest: str,
        created: int,
        body: bytes,
        max_answer: int = MAX_BATCH_BYTES,
        relayed: bool = False,
    ) -> bytes:
        """One signed POST; the answer must be signed by ``dest``, or (``relayed``: batches and
        fan-out only) by the relay that ``dest`` authorised to hold for it (§12.4)."""
        # Sign the request target exactly as sent: ``path`` goes on the wire unchanged
        # (encoded=True stops any re-quoting), and the receiver verifies its raw path (§4.4).
        req = sign_request(self.key, "POST", path, dest, body, created)
        headers = req.to_headers() | {"Content-Type": CONTENT_TYPE}
        link = self.route(dest) if self.route is not None else None
        if link is not None:  # a relay's own request to its linked client (§12.4)
            data, resp_sig, relay = await self._via_link(link, path, headers, body, max_answer)
        else:
            url = yarl.URL(base_url + path, encoded=True)
            data, resp_sig, relay = await self._request_with_sig(
                "POST", url, body, headers, max_answer
            )
        if resp_sig is None:
            raise MalformedFrame("unsigned response")
        if relayed:  # small answers: checked on the loop
            verify_answer(dest, self.key.node_id, req.nonce, data, resp_sig, relay, self.now_ms())
        elif len(data) > OFF_LOOP_BYTES:  # a blob chunk: hashing 1 MiB would stall the loop
            await asyncio.to_thread(
                verify_response, dest, self.key.node_id, req.nonce, data, resp_sig
            )
        else:
            verify_response(dest, self.key.node_id, req.nonce, data, resp_sig)
        return data

    async def _via_link(
        self, link: LinkSend, path: str, headers: dict[str, str], body: bytes, max_answer: int
    ) -> tuple[bytes, str | None, str | None]:
        try:
            async with asyncio.timeout(self.timeout_s):
                status, got, data = await link("POST", path, list(headers.items()), body)
        except TimeoutError as exc:
            raise TransportError(
                f"peer unreachable (no answer within {self.timeout_s:g} s)"
            ) from exc
        if len(data) > max_answer:
            raise MalformedFrame("response too large")
        if status >= 400:
            raise _remote_error(status, data)
        named = {k.lower(): v for k, v in got}
        return data, named.get(H_SIG.lower()), named.get(H_RELAY.lower())

    async def _request(
        self, method: str, url: str | yarl.URL, body: bytes | None, headers: Any
    ) -> bytes:
        data, _, _ = await self._request_with_sig(method, url, body, headers)
        return data

    async def _request_with_sig(
        self,
        method: str,
        url: str | yarl.URL,
        body: bytes | None,
        headers: Any,
        max_answer: int = MAX_BATCH_BYTES,
    ) -> tuple[bytes, str | None, str | None]:
        try:
            async with asyncio.timeout(self.timeout_s):
                timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=3)
                async with self.session.request(
                    method, url, data=body, headers=headers, timeout=timeout
                ) as resp:
                    data = await _read_all(resp.content, max_answer)
                    if resp.status >= 400:
                        raise _remote_error(resp.status, data)
                    return data, resp.headers.get(H_SIG), resp.headers.get(H_RELAY)
        except HavenError:
            raise
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            # no URL here: node logs name peers by node id, never by address (docs/operations.md §7)
            reason = failure_reason(exc, self.timeout_s)
            raise TransportError(f"peer unreachable ({reason})") from exc


async def _read_all(content: aiohttp.StreamReader, max_len: int) -> bytes:
    """The whole body (``read(n)`` returns what is buffered, so read until EOF), or
    MalformedFrame as soon as it passes ``max_len``."""
    parts: list[bytes] = []
    size = 0
    while part := await content.read(max_len + 1 - size):
        parts.append(part)
        size += len(part)
        if size > max_len:
            raise MalformedFrame("response too large")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def failure_reason(exc: BaseException, timeout_s: float) -> str:
    """A short, user-readable reason for a failed HTTP/WebSocket attempt (no class names).

    Used by the node's peer transport and by the device's connection to its home node.
    """
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "host not found: check the address"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate is not valid for this address"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed: is it https, and is the port right?"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused: is it running, and is the port right?"
        return f"network error: {exc.os_error.strerror or 'cannot connect'}"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "the connection closed before an answer"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"it answered HTTP {exc.status}"
    if isinstance(exc, OSError) and exc.strerror:
        return f"network error: {exc.strerror}"
    return "network error"


def _remote_error(status: int, data: bytes) -> HavenError:
    try:
        body = ErrorBody.decode(data)
    except HavenError:
        return TransportError(f"peer answered HTTP {status}")
    # The receiver's clock rides on every refusal; the sender re-stamps with it after
    # clock_skew, which also covers a peer that restarted since our last request (§4.3).
    peer_now = body.now if body.code == ClockSkew.code else None
    return RemoteError(body.code, body.message, peer_now)
