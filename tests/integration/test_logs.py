"""The node's log under peer input (issue item 6): no client address, mailbox id, account name
or traceback, and a bounded number of lines.

Before the fix, each federation upload cut mid-body and each request with a broken header made
aiohttp log ``Error handling request from 127.0.0.x`` with a traceback. Here a signed upload is
cut 30 times and 30 broken headers are sent, on a node with ``log_lines_per_minute = 5``.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator

import aiohttp
import pytest

from federation.wire import Batch

from .conn_world import Pair, clean_log, limited_node, make_pair, messaging
from .harness import async_wait_until
from .rawpeer import BATCH_PATH, RawPeer, envelope, raw_connect, stats

LINES_PER_MINUTE = 5
ROUNDS = 30


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base = tmp_path_factory.mktemp("logs")
    node = limited_node(base, log_lines_per_minute=LINES_PER_MINUTE, exempt_loopback=True)
    p = make_pair(node, base)
    try:
        yield p
    finally:
        p.close()
        node.stop()


async def cut_upload(peer: RawPeer, port: int, to: bytes) -> None:
    """A correctly signed batch whose body stops halfway; then the connection is reset."""
    body = Batch(tuple(envelope(to, body=b"\x00" * 4000) for _ in range(8))).encode()
    req = peer.sign(BATCH_PATH, body)
    head = f"POST {BATCH_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in peer.headers(req).items())
    head += f"Content-Length: {len(body)}\r\n\r\n"
    _reader, writer = await raw_connect(port, "127.0.0.9")
    writer.write(head.encode() + body[: len(body) // 2])
    await writer.drain()
    await asyncio.sleep(0.05)  # attack pacing: let the handler start reading, then cut
    writer.transport.abort()


async def broken_header(port: int) -> None:
    reader, writer = await raw_connect(port, "127.0.0.10")
    writer.write(b"GET /.well-known/haven/node HTTP/1.1\r\nHost: x\r\nBroken header\r\n\r\n")
    await writer.drain()
    await reader.read()
    writer.close()


async def test_cut_uploads_and_broken_requests_leave_no_address_or_traceback(
    pair: Pair,
) -> None:
    node = pair.node
    async with aiohttp.ClientSession() as http:
        peer = RawPeer(http, node.url)
        await peer.handshake()
        before = await stats(http, node.url)
        for _ in range(ROUNDS):
            await cut_upload(peer, node.port, pair.bob.mailbox)
            await broken_header(node.port)

        async def translated() -> bool:
            text = node.log.read_text(errors="replace")
            return "request failed (" in text

        await async_wait_until(translated, what="aiohttp's request errors to be logged")
        after = await stats(http, node.url)
        assert await messaging(pair) == 1
    lines = clean_log(node)
    text = "\n".join(lines)
    failed = [ln for ln in lines if "request failed (" in ln]
    assert 1 <= len(failed) <= LINES_PER_MINUTE, failed
    # bounded: start-up lines, at most LINES_PER_MINUTE per kind, nothing per request
    assert len(lines) < 30, lines
    for dev in (pair.alice, pair.bob):
        assert dev.mailbox.hex() not in text
        assert base64.b64encode(dev.mailbox).decode().rstrip("=") not in text
    assert "alice" not in text and "bob" not in text
    # nothing from the cut uploads was stored
    assert after["counts"]["pending_envelopes"] == before["counts"]["pending_envelopes"]
