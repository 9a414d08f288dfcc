"""Strict wire grammar at a real node (docs/protocol.md §4.2-§4.4, §5.6), and replays across a
restart.

Every federation case below is *correctly signed* apart from the one spelling it bends, so a
node that parsed leniently (upper-case node ids, ``+``/leading zeros/``_`` in numbers, padded or
standard base64, the decoded path) would accept it; the strict node answers ``malformed``
(or ``bad_signature`` for the path), counts it, and stores nothing.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from client.connection import NodeConnection
from federation import frames as F
from federation.errors import HavenError
from federation.signing import (
    H_CREATED,
    H_DEST,
    H_NONCE,
    H_ORIGIN,
    H_SIG,
    H_VERSION,
    Descriptor,
    SignedRequest,
    b64e,
)
from federation.transport import DESCRIPTOR_PATH
from federation.wire import Batch

from .harness import ROOT, NodeProc, async_wait_until, haven, join, recv, wait_until
from .rawpeer import BATCH_PATH, Answer, RawDevice, RawPeer, envelope, now_ms, stats

# ---- one node for the grammar cases ---------------------------------------------------------


@dataclass
class World:
    node: NodeProc
    sink: bytes  # a mailbox whose device never connects: accepted envelopes stay pending


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    from client.device import Device

    base = tmp_path_factory.mktemp("wire-grammar")
    node = NodeProc.create(base, "node").start()
    try:
        home, _ = join(node, base, "sink")
        dev = Device(str(home))
        sink = dev.mailbox
        dev.close()
        yield World(node, sink)
        assert node.proc is not None and node.proc.poll() is None, "the node died"
        assert "Traceback" not in node.log.read_text(errors="replace")
    finally:
        node.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def peer(http: aiohttp.ClientSession, world: World) -> RawPeer:
    p = RawPeer(http, world.node.url)
    await p.handshake()
    return p


def moved(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    b, a = Counter(before["errors"]), Counter(after["errors"])
    return {k: a[k] - b[k] for k in set(a) | set(b) if a[k] != b[k]}


def pending(st: dict[str, Any]) -> int:
    return int(st["counts"]["pending_envelopes"])


def refused(ans: Answer, status: int, code: str) -> None:
    assert (ans.status, ans.code) == (status, code), (ans.status, ans.body)


def signed_with(peer: RawPeer, body: bytes, want: str) -> SignedRequest:
    """A fresh signed request whose base64url ``want`` header (nonce or signature) contains a
    ``-`` or ``_``, so its standard-base64 spelling differs (about half of them do)."""
    for _ in range(200):
        req = peer.sign(BATCH_PATH, body)
        text = b64e(req.nonce if want == "nonce" else req.signature)
        if "-" in text or "_" in text:
            return req
    raise AssertionError("no request with - or _ in 200 tries")


def standard_b64(text: str) -> str:
    return text.replace("-", "+").replace("_", "/")


def loose_bits(text: str) -> str:
    """The same bytes, spelled with non-zero unused low bits in the last character."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(text[-1])
    return text[:-1] + alphabet[last | 1]


async def expect_refused(
    world: World,
    http: aiohttp.ClientSession,
    peer: RawPeer,
    bend: Any,
    status: int = 400,
    code: str = "malformed",
) -> None:
    """Sign a one-envelope batch, let ``bend(req, headers)`` change the headers, POST it:
    refused with ``code``, counted once, nothing stored."""
    body = Batch((envelope(world.sink),)).encode()
    req = peer.sign(BATCH_PATH, body)
    headers = peer.headers(req)
    bend(req, headers)
    before = await stats(http, world.node.url)
    refused(await peer.post_raw(BATCH_PATH, body, headers, req), status, code)
    after = await stats(http, world.node.url)
    assert moved(before, after) == {f"federation.{code}": 1}
    assert pending(after) == pending(before)


# ---- node ids in their one canonical spelling -----------------------------------------------


@pytest.mark.parametrize(
    "spell",
    [str.upper, lambda s: s[:10].upper() + s[10:], lambda s: s + "===="],
    ids=["upper", "mixed", "padded"],
)
async def test_origin_node_id_must_be_canonical_lower_case(
    world: World, http: aiohttp.ClientSession, peer: RawPeer, spell: Any
) -> None:
    """Another spelling of the same key would get its own rate bucket and nonce window."""

    def bend(req: SignedRequest, h: dict[str, str]) -> None:
        h[H_ORIGIN] = spell(req.origin)

    await expect_refused(world, http, peer, bend)


async def test_nonce_used_in_lower_case_is_not_accepted_again_in_upper_case(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    env = envelope(world.sink)
    body = Batch((env,)).encode()
    req = peer.sign(BATCH_PATH, body)
    first = await peer.post_raw(BATCH_PATH, body, peer.headers(req), req)
    assert first.status == 200 and first.body["accepted"] == [env.id], first.body
    before = await stats(http, world.node.url)
    for spelling in (req.origin.upper(), req.origin[:5].upper() + req.origin[5:]):
        again = peer.headers(req, **{H_ORIGIN: spelling})
        refused(await peer.post_raw(BATCH_PATH, body, again, req), 400, "malformed")
    refused(await peer.post_raw(BATCH_PATH, body, peer.headers(req), req), 401, "replay")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.malformed": 2, "federation.replay": 1}
    assert pending(after) == pending(before)


async def test_destination_in_upper_case_is_malformed(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    def bend(req: SignedRequest, h: dict[str, str]) -> None:
        h[H_DEST] = req.destination.upper()

    await expect_refused(world, http, peer, bend)


# ---- numbers and base64 in their canonical form ---------------------------------------------


@pytest.mark.parametrize(
    "header,spell",
    [
        (H_CREATED, lambda v: "0" + v),
        (H_CREATED, lambda v: "+" + v),
        (H_CREATED, lambda v: v[:4] + "_" + v[4:]),
        (H_CREATED, lambda v: "0" * 17),
        (H_VERSION, lambda v: "0" + v),
        (H_VERSION, lambda v: "+" + v),
        (H_VERSION, lambda v: v + ".0"),
    ],
    ids=[
        "created-leading-0",
        "created-plus",
        "created-underscore",
        "created-17-digits",
        "version-leading-0",
        "version-plus",
        "version-fraction",
    ],
)
async def test_non_canonical_decimal_header_is_malformed(
    world: World, http: aiohttp.ClientSession, peer: RawPeer, header: str, spell: Any
) -> None:
    def bend(req: SignedRequest, h: dict[str, str]) -> None:
        h[header] = spell(h[header])

    await expect_refused(world, http, peer, bend)


async def test_negative_created_is_malformed_not_clock_skew(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    body = Batch((envelope(world.sink),)).encode()
    before = await stats(http, world.node.url)
    for created in (-1, -peer.node_now()):
        req = peer.sign(BATCH_PATH, body, created=created)  # signed over the negative time
        refused(await peer.post_raw(BATCH_PATH, body, peer.headers(req), req), 400, "malformed")
    assert moved(before, await stats(http, world.node.url)) == {"federation.malformed": 2}


@pytest.mark.parametrize(
    "want,spell",
    [
        ("nonce", lambda t: t + "=="),
        ("nonce", standard_b64),
        ("nonce", loose_bits),
        ("sig", lambda t: t + "=="),
        ("sig", standard_b64),
        ("sig", loose_bits),
    ],
    ids=[
        "nonce-padded",
        "nonce-standard-base64",
        "nonce-loose-bits",
        "sig-padded",
        "sig-standard-base64",
        "sig-loose-bits",
    ],
)
async def test_non_canonical_base64_header_is_malformed(
    world: World, http: aiohttp.ClientSession, peer: RawPeer, want: str, spell: Any
) -> None:
    body = Batch((envelope(world.sink),)).encode()
    req = signed_with(peer, body, want)
    name = H_NONCE if want == "nonce" else H_SIG
    headers = peer.headers(req)
    headers[name] = spell(headers[name])
    # the bent spelling still decodes (leniently) to the very bytes that were signed
    lenient = base64.b64decode(standard_b64(headers[name]).rstrip("=") + "==")
    assert lenient == (req.nonce if want == "nonce" else req.signature)
    before = await stats(http, world.node.url)
    refused(await peer.post_raw(BATCH_PATH, body, headers, req), 400, "malformed")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.malformed": 1}
    assert pending(after) == pending(before)


async def test_repeated_signature_header_is_malformed(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    body = Batch((envelope(world.sink),)).encode()
    req = peer.sign(BATCH_PATH, body)
    headers = [*peer.headers(req).items(), (H_CREATED, str(req.created + 1))]
    before = await stats(http, world.node.url)
    async with http.post(world.node.url + BATCH_PATH, data=body, headers=headers) as resp:
        assert resp.status == 400
    assert moved(before, await stats(http, world.node.url)) == {"federation.malformed": 1}


# ---- the raw path is what is signed ---------------------------------------------------------


async def test_signed_path_is_the_raw_request_target(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    encoded = BATCH_PATH.replace("/batch", "/%62atch")  # the same route, spelled differently
    env = envelope(world.sink)
    body = Batch((env,)).encode()
    before = await stats(http, world.node.url)
    # Signed over the decoded path, sent percent-encoded: the signature does not cover it.
    req = peer.sign(BATCH_PATH, body)
    ans = await peer.post_target(encoded, body, peer.headers(req), req)
    refused(ans, 401, "bad_signature")
    assert moved(before, await stats(http, world.node.url)) == {"federation.bad_signature": 1}
    # Signed over exactly what is sent: accepted.
    req = peer.sign(encoded, body)
    ans = await peer.post_target(encoded, body, peer.headers(req), req)
    assert ans.status == 200 and ans.body["accepted"] == [env.id], ans.body
    peer.check_signed(ans)
    assert pending(await stats(http, world.node.url)) == pending(before) + 1


# ---- the descriptor challenge ---------------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "c=%%%",
        "c=+/+/",
        "c=" + b64e(os.urandom(16)) + "==",
        "c=" + standard_b64(b64e(b"\xfb\xff" * 8)),
        "c=" + loose_bits(b64e(os.urandom(16))),
        "c=" + b64e(os.urandom(15)),
        "c=" + b64e(os.urandom(33)),
        "c=",
        "c=" + b64e(os.urandom(16)) + "&c=" + b64e(os.urandom(16)),
    ],
    ids=[
        "percent",
        "plus-slash",
        "padded",
        "standard-base64",
        "loose-bits",
        "15-bytes",
        "33-bytes",
        "empty",
        "repeated",
    ],
)
async def test_bad_descriptor_challenge_is_malformed(
    world: World, http: aiohttp.ClientSession, peer: RawPeer, query: str
) -> None:
    before = await stats(http, world.node.url)
    ans = await peer.get_target(f"{DESCRIPTOR_PATH}?{query}")
    refused(ans, 400, "malformed")
    assert moved(before, await stats(http, world.node.url)) == {"federation.malformed": 1}


@pytest.mark.parametrize("n", [16, 24, 32])
async def test_canonical_descriptor_challenge_is_echoed(
    world: World, peer: RawPeer, n: int
) -> None:
    challenge = os.urandom(n)
    ans = await peer.get_target(f"{DESCRIPTOR_PATH}?c={b64e(challenge)}")
    assert ans.status == 200
    assert Descriptor.verify_decode(ans.raw).challenge == challenge
    plain = await peer.get_target(DESCRIPTOR_PATH)
    assert plain.status == 200 and Descriptor.verify_decode(plain.raw).challenge == b""


# ---- unknown frame types answer the request's rid -------------------------------------------


async def test_unknown_frame_echoes_the_request_rid(
    world: World, http: aiohttp.ClientSession
) -> None:
    dev = await RawDevice.connect(http, world.node.url)
    try:
        before = await stats(http, world.node.url)
        cases = [
            ({"t": "subscribe", "rid": 9, "topic": "x"}, 9),
            ({"t": "subscribe", "rid": 2**53 - 1}, 2**53 - 1),
            ({"t": "subscribe"}, 0),  # no rid to echo
            ({"t": "subscribe", "rid": -4}, 0),  # not a valid rid
            ({"t": "subscribe", "rid": "9"}, 0),
        ]
        for frame, rid in cases:
            ans = await dev.request(frame)
            assert isinstance(ans, F.Error) and (ans.code, ans.rid) == ("unknown_frame", rid)
        assert moved(before, await stats(http, world.node.url)) == {"client.unknown_frame": 5}
    finally:
        await dev.close()


async def test_reference_client_fails_only_the_request_an_error_names() -> None:
    """A stand-in node answers every request with an error for rid 0 and one for a rid the
    client never sent, then the real answer: the client's request still succeeds; an error
    with the request's own rid fails exactly that request."""

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(F.Challenge("n" * 52, os.urandom(32), 1, now_ms()).encode())
        async for msg in ws:
            frame = F.decode_frame(msg.data)
            assert isinstance(frame, F.MintLink)
            await ws.send_bytes(F.Error(0, "malformed", "undecodable frame").encode())
            await ws.send_bytes(F.Error(frame.rid + 1000, "unknown_frame", "x").encode())
            if frame.rid % 2:
                await ws.send_bytes(F.LinkToken(frame.rid, b"t" * 24, 5).encode())
            else:
                await ws.send_bytes(F.Error(frame.rid, "rate_limited", "slow down").encode())
        return ws

    app = web.Application()
    app.router.add_get("/haven/v1/client", ws_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with NodeConnection(f"http://127.0.0.1:{port}", timeout_s=10) as conn:
            ok = await conn.request(F.MintLink(conn.next_rid()))  # rid 1
            assert isinstance(ok, F.LinkToken) and ok.rid == 1
            with pytest.raises(HavenError) as err:
                await conn.request(F.MintLink(conn.next_rid()))  # rid 2
            assert err.value.code == "rate_limited"
            both = await asyncio.gather(conn.request(F.MintLink(3)), conn.request(F.MintLink(5)))
            assert all(isinstance(f, F.LinkToken) for f in both)
    finally:
        await runner.cleanup()


# ---- replays across a restart ---------------------------------------------------------------


def start_with(node: NodeProc, *extra: str) -> NodeProc:
    """Like ``NodeProc.start`` with extra ``serve`` arguments (the test-only clock switch)."""
    logf = open(node.log, "ab")
    node.proc = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "node", "serve", "--home", str(node.home), *extra],
        stdout=logf,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "HAVEN_TEST_CLOCK": "1"},
    )
    logf.close()
    wait_until(node._listening, 20, f"node {node.home.name} to listen")
    return node


async def test_request_replayed_after_restart_is_refused_and_restamped_gets_through(
    tmp_path: Path, nodes: list[NodeProc], http: aiohttp.ClientSession
) -> None:
    node = NodeProc.create(tmp_path, "R").start()
    nodes.append(node)
    home, _ = await asyncio.to_thread(join, node, tmp_path, "sink")
    from client.device import Device

    dev = Device(str(home))
    sink = dev.mailbox
    dev.close()
    peer = RawPeer(http, node.url)
    await peer.handshake()
    env = envelope(sink)
    body = Batch((env,)).encode()
    req = peer.sign(BATCH_PATH, body)
    first = await peer.post_raw(BATCH_PATH, body, peer.headers(req), req)
    assert first.status == 200 and first.body["accepted"] == [env.id]
    refused(await peer.post_raw(BATCH_PATH, body, peer.headers(req), req), 401, "replay")

    node.stop()  # SIGTERM: the in-memory nonce window is gone
    await asyncio.to_thread(node.start)
    assert now_ms() - req.created < 60_000  # still inside the skew window
    base = pending(await stats(http, node.url))
    ans = await peer.post_raw(BATCH_PATH, body, peer.headers(req), req)
    refused(ans, 401, "clock_skew")  # created before the node's start
    assert moved({"errors": {}}, await stats(http, node.url)) == {"federation.clock_skew": 1}
    # An honest sender re-stamps with the node's clock from the refusal and gets through.
    fresh = await peer.post(BATCH_PATH, Batch((envelope(sink),)).encode(), created=ans.body["now"])
    assert fresh.status == 200 and len(fresh.body["accepted"]) == 1, fresh.body
    assert pending(await stats(http, node.url)) == base + 1


async def test_real_sender_restamps_after_the_peer_restarted_with_a_stepped_clock(
    tmp_path: Path, nodes: list[NodeProc], http: aiohttp.ClientSession
) -> None:
    """B restarts with its clock stepped 30 s ahead: A's measured offset is stale, its next
    request is stamped before B's start, refused ``clock_skew``; A re-stamps and delivers."""
    a = NodeProc.create(tmp_path, "A").start()
    b = NodeProc.create(tmp_path, "B").start()
    nodes += [a, b]
    alice, _ = await asyncio.to_thread(join, a, tmp_path, "alice")
    bob, bob_addr = await asyncio.to_thread(join, b, tmp_path, "bob")
    await asyncio.to_thread(haven, "send", "--home", str(alice), bob_addr, "before")
    await asyncio.to_thread(
        wait_until, lambda: b.status()["pending_envelopes"] == 1, 20, "first message at B"
    )
    assert [m["text"] for m in await asyncio.to_thread(recv, bob)] == ["before"]

    b.stop()
    await asyncio.to_thread(start_with, b, "--clock-offset=+30s")
    await asyncio.to_thread(haven, "send", "--home", str(alice), bob_addr, "after")

    async def refused_then_delivered() -> bool:
        st = await stats(http, b.url)
        return bool(st["errors"].get("federation.clock_skew", 0) >= 1) and (
            st["counts"]["pending_envelopes"] >= 1
        )

    await async_wait_until(refused_then_delivered, what="A to re-stamp and deliver to B")
    got = await asyncio.to_thread(recv, bob)
    assert [m["text"] for m in got] == ["after"]
    st = await stats(http, a.url)
    assert st["counts"]["outbox_envelopes"] == 0
