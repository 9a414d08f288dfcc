"""Bad input at a real node: each case gets a stable code, is counted, and changes nothing else.

One node serves the whole module (users alice, bob, a never-connected ``sink`` mailbox that
collects raw envelopes, and ``mallory``, a device registered by hand with two one-time keys and
no fallback key). A malicious peer (:class:`RawPeer`) signs federation requests with its own
node key and bends one thing at a time; a malicious device (:class:`RawDevice`) sends raw
frames. Every test checks three things:

(a) the stable code: HTTP status plus the msgpack ``{code, message, now}`` body, an ``error``
    frame, or a per-envelope refusal in ``BatchResult.rejected`` / ``Accepted.rejected``;
(b) the count: ``GET /haven/v1/stats`` error counters moved by exactly that, nothing else;
(c) nothing else is affected: no envelope stored or stored twice, the node process alive with
    no traceback in its log, and a real exchange (alice -> bob, received and acked) still works.

The peer-key-change case runs on its own pair of nodes, because it replaces one of them.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from client.device import OTK_BATCH, Device, ReceivedMessage, parse_invite
from federation import frames as F
from federation.errors import HavenError
from federation.replay import SKEW_MS
from federation.signing import H_CREATED, H_DEST, H_NONCE, H_ORIGIN, H_SIG, H_VERSION, NodeKey, b64e
from federation.wire import MAX_BATCH_BYTES, MAX_BATCH_ENVELOPES, MAX_BODY, Batch, packb

from .harness import NodeProc, async_wait_until, haven, join
from .rawpeer import (
    BATCH_PATH,
    KEYS_PATH,
    Answer,
    RawDevice,
    RawIdentity,
    RawPeer,
    envelope,
    now_ms,
    set_node_config,
    stats,
    ws_declare_oversized,
)

DEADLINE_S = 30.0
DAY_MS = 86_400_000


# ---- the module's node and users -----------------------------------------------------------------


@dataclass
class World:
    node: NodeProc
    base: Path
    alice: Device
    alice_addr: str
    bob: Device
    bob_addr: str
    sink: bytes  # a real mailbox whose device never connects: raw envelopes stay pending there
    mallory: RawIdentity  # registered by hand: 2 one-time keys, no fallback key
    up_since: int = 0  # the node was serving by then (requests created earlier are refused)


async def register_raw(node: NodeProc, invite: str, otks: int) -> RawIdentity:
    """Redeem ``invite`` with a hand-made device and publish ``otks`` one-time keys, no fallback."""
    inv = parse_invite(invite)
    ident = RawIdentity(address=f"{inv['name']}@{node.host}")
    async with aiohttp.ClientSession() as http:
        dev = await RawDevice.connect(http, node.url)
        reg = await dev.register(ident, inv["t"], ident.address)
        assert isinstance(reg, F.Registered) and reg.address == ident.address, reg
        ok = await dev.request(F.PublishKeys(dev.next_rid(), ident.one_time_keys(otks), (), None))
        assert isinstance(ok, F.Ok) and ok.otk_count == otks, ok
        await dev.close()
    return ident


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("bad-input")
    node = NodeProc.create(base, "node")
    # Every test's raw peer is a new, unpinned node key: lift the shared new-peer budget here
    # (test_peer_admission.py tests it).
    set_node_config(node.home, new_peer_rate=1_000_000, new_peer_burst=1_000_000)
    node.start()
    up_since = now_ms()
    opened: list[Device] = []
    try:
        alice_home, alice_addr = join(node, base, "alice")
        bob_home, bob_addr = join(node, base, "bob")
        sink_home, _ = join(node, base, "sink")
        sink = Device(str(sink_home))
        sink_mailbox = sink.mailbox
        sink.close()
        mallory = asyncio.run(register_raw(node, node.invite("mallory"), otks=2))
        alice, bob = Device(str(alice_home)), Device(str(bob_home))
        opened += [alice, bob]
        yield World(node, base, alice, alice_addr, bob, bob_addr, sink_mailbox, mallory, up_since)
        assert node.proc is not None and node.proc.poll() is None, "the node died"
    finally:
        for d in opened:
            d.close()
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


# ---- helpers -------------------------------------------------------------------------------------


def moved(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    """Error counters that changed between two stats snapshots, with the change."""
    b, a = Counter(before["errors"]), Counter(after["errors"])
    return {k: a[k] - b[k] for k in set(a) | set(b) if a[k] != b[k]}


def pending(st: dict[str, Any]) -> int:
    return int(st["counts"]["pending_envelopes"])


def refused(ans: Answer, status: int, code: str) -> None:
    """An HTTP refusal with a stable code and the node's clock in the body."""
    assert (ans.status, ans.code) == (status, code), (ans.status, ans.body)
    assert isinstance(ans.body["message"], str) and isinstance(ans.body["now"], int)


def error_frame(frame: F.Frame, code: str, rid: int | None = None) -> F.Error:
    assert isinstance(frame, F.Error) and frame.code == code, frame
    if rid is not None:
        assert frame.rid == rid, frame
    return frame


async def receive_one(dev: Device, match: Callable[[ReceivedMessage], bool]) -> ReceivedMessage:
    """Connect ``dev`` and process deliveries (acking them) until a matching message arrives."""
    conn = await dev.connect()
    try:
        async with asyncio.timeout(DEADLINE_S):
            while True:
                for m in await dev.process(conn, await conn.deliveries.get()):
                    if match(m):
                        return m
    finally:
        await conn.__aexit__(None, None, None)


async def wait_pending(http: aiohttp.ClientSession, node: NodeProc, n: int, what: str) -> None:
    async def reached() -> bool:
        return pending(await stats(http, node.url)) == n

    await async_wait_until(reached, what=f"{what} ({node.home.name} to hold {n} envelopes)")


async def exchange(
    http: aiohttp.ClientSession,
    sender_node: NodeProc,
    sender: Device,
    to_node: NodeProc,
    to: Device,
    to_addr: str,
) -> None:
    """A real message reaches ``to``; its delivered receipt reaches ``sender``; both are deleted.

    A device connects only once the envelope it waits for is stored at its node (see the
    report on the refill race in node/mailbox.py: an envelope being committed while the device
    attaches is not pushed until the device reconnects).
    """
    same = sender_node is to_node
    base_to = pending(await stats(http, to_node.url))
    base_from = base_to if same else pending(await stats(http, sender_node.url))
    text = "still working " + os.urandom(4).hex()
    sent = await sender.send(to_addr, text)
    await wait_pending(http, to_node, base_to + 1, "the message to be stored")
    got = await receive_one(to, lambda m: m.msg_id == sent.msg_id)
    assert (got.sender, got.text, got.kind) == (sender.address, text, "text")
    # ``to`` acked the message (deleted) and answered with a delivered receipt (stored).
    if not same:
        await wait_pending(http, to_node, base_to, "the acked message to be deleted")
    await wait_pending(http, sender_node, base_from + 1, "the receipt to be stored")
    receipt = await receive_one(sender, lambda m: m.kind == "delivered")
    assert receipt.sender == to.address
    await wait_pending(http, sender_node, base_from, "the acked receipt to be deleted")


def node_healthy(node: NodeProc) -> None:
    assert node.proc is not None and node.proc.poll() is None, "the node process exited"
    log = node.log.read_text(errors="replace")
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]


async def still_serving(w: World, http: aiohttp.ClientSession) -> None:
    """(c): the node is alive, logged no traceback, and a real exchange still works."""
    node_healthy(w.node)
    await exchange(http, w.node, w.alice, w.node, w.bob, w.bob_addr)
    node_healthy(w.node)


# ---- federation: malformed bodies and headers ----------------------------------------------------

GARBAGE_BATCHES = {
    "not-msgpack": b"\xc1\xc1 this is not msgpack",
    "truncated": Batch((envelope(b"\x01" * 16),)).encode()[:-5],
    "trailing-bytes": packb({"envs": []}) + b"\x00",
    "not-a-map": packb([1, 2, 3]),
    "envs-not-a-list": packb({"envs": 7}),
    "envelope-short-id": packb({"envs": [[1, b"short", b"\x01" * 16, now_ms() + 60_000, b""]]}),
    "envelope-4-fields": packb({"envs": [[1, os.urandom(16), b"\x01" * 16, 5]]}),
    "envelope-bad-expiry": packb({"envs": [[1, os.urandom(16), b"\x01" * 16, "soon", b""]]}),
}


@pytest.mark.parametrize("body", GARBAGE_BATCHES.values(), ids=GARBAGE_BATCHES.keys())
async def test_signed_garbage_batch_is_malformed(
    world: World, http: aiohttp.ClientSession, peer: RawPeer, body: bytes
) -> None:
    before = await stats(http, world.node.url)
    refused(await peer.post(BATCH_PATH, body), 400, "malformed")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.malformed": 1}
    assert pending(after) == pending(before)
    await still_serving(world, http)


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1",
        packb(["alice", True]),
        packb({"name": 5, "claim": True}),
        packb({"name": "alice", "claim": "yes"}),
    ],
    ids=["not-msgpack", "not-a-map", "name-not-str", "claim-not-bool"],
)
async def test_signed_garbage_key_query_is_malformed(
    world: World, http: aiohttp.ClientSession, peer: RawPeer, body: bytes
) -> None:
    before = await stats(http, world.node.url)
    refused(await peer.post(KEYS_PATH, body), 400, "malformed")
    assert moved(before, await stats(http, world.node.url)) == {"federation.malformed": 1}
    await still_serving(world, http)


@pytest.mark.parametrize("header", [H_VERSION, H_ORIGIN, H_DEST, H_CREATED, H_NONCE, H_SIG, "all"])
async def test_missing_signature_header_is_malformed(
    world: World, http: aiohttp.ClientSession, peer: RawPeer, header: str
) -> None:
    body = Batch((envelope(world.sink),)).encode()
    req = peer.sign(BATCH_PATH, body)
    headers = peer.headers(req)
    for name in [H_VERSION, H_ORIGIN, H_DEST, H_CREATED, H_NONCE, H_SIG]:
        if header in (name, "all"):
            del headers[name]
    before = await stats(http, world.node.url)
    refused(await peer.post_raw(BATCH_PATH, body, headers), 400, "malformed")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.malformed": 1}
    assert pending(after) == pending(before)
    await still_serving(world, http)


@pytest.mark.parametrize(
    "override",
    [
        {H_NONCE: "!!not base64!!"},
        {H_NONCE: b64e(b"short")},
        {H_SIG: b64e(b"\x00" * 10)},
        {H_ORIGIN: "not-a-node-id"},
        {H_CREATED: "yesterday"},
    ],
    ids=[
        "nonce-not-base64",
        "nonce-short",
        "signature-short",
        "origin-not-a-node-id",
        "created-not-int",
    ],
)
async def test_misshapen_signature_header_is_malformed(
    world: World, http: aiohttp.ClientSession, peer: RawPeer, override: dict[str, str]
) -> None:
    body = Batch((envelope(world.sink),)).encode()
    headers = peer.headers(peer.sign(BATCH_PATH, body)) | override
    before = await stats(http, world.node.url)
    refused(await peer.post_raw(BATCH_PATH, body, headers), 400, "malformed")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.malformed": 1}
    assert pending(after) == pending(before)
    await still_serving(world, http)


# ---- federation: signatures, destination, version, time, replay ----------------------------------


async def test_flipped_signature_byte_is_bad_signature_and_burns_no_nonce(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    env = envelope(world.sink)
    body = Batch((env,)).encode()
    req = peer.sign(BATCH_PATH, body)
    sig = bytearray(req.signature)
    sig[17] ^= 0x01
    before = await stats(http, world.node.url)
    forged = peer.headers(req, **{H_SIG: b64e(bytes(sig))})
    refused(await peer.post_raw(BATCH_PATH, body, forged), 401, "bad_signature")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.bad_signature": 1}
    assert pending(after) == pending(before)
    # A forgery cannot burn the real request's nonce: the genuine one still goes through.
    ok = await peer.post_raw(BATCH_PATH, body, peer.headers(req), req)
    assert ok.status == 200 and ok.body == {"accepted": [env.id], "rejected": []}
    peer.check_signed(ok)
    assert pending(await stats(http, world.node.url)) == pending(before) + 1
    await still_serving(world, http)


async def test_signature_by_another_key_than_origin_is_bad_signature(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    body = Batch((envelope(world.sink),)).encode()
    impostor = NodeKey.generate()
    req = peer.sign(BATCH_PATH, body, signer=impostor)  # valid, but by the impostor's key
    headers = peer.headers(req, **{H_ORIGIN: peer.key.node_id})
    before = await stats(http, world.node.url)
    refused(await peer.post_raw(BATCH_PATH, body, headers), 401, "bad_signature")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.bad_signature": 1}
    assert pending(after) == pending(before)
    await still_serving(world, http)


async def test_body_changed_after_signing_is_bad_signature(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    signed_body = Batch((envelope(world.sink),)).encode()
    swapped = Batch((envelope(world.sink), envelope(world.sink))).encode()
    req = peer.sign(BATCH_PATH, signed_body)
    before = await stats(http, world.node.url)
    refused(await peer.post_raw(BATCH_PATH, swapped, peer.headers(req)), 401, "bad_signature")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.bad_signature": 1}
    assert pending(after) == pending(before)
    await still_serving(world, http)


async def test_request_for_another_node_is_wrong_destination(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    other = NodeKey.generate().node_id
    before = await stats(http, world.node.url)
    for path, body in (
        (BATCH_PATH, Batch((envelope(world.sink),)).encode()),
        (KEYS_PATH, packb({"name": "bob", "claim": True})),
    ):
        refused(await peer.post(path, body, dest=other), 421, "wrong_destination")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.wrong_destination": 2}
    assert pending(after) == pending(before)
    await still_serving(world, http)


async def test_federation_version_2_is_unsupported_version(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    body = Batch((envelope(world.sink),)).encode()
    headers = peer.headers(peer.sign(BATCH_PATH, body), **{H_VERSION: "2"})
    before = await stats(http, world.node.url)
    refused(await peer.post_raw(BATCH_PATH, body, headers), 400, "unsupported_version")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.unsupported_version": 1}
    assert pending(after) == pending(before)
    await still_serving(world, http)


async def test_envelope_version_2_refuses_the_whole_batch(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    good, future = envelope(world.sink), envelope(world.sink)
    body = packb({"envs": [good.to_wire(), [2, *future.to_wire()[1:]]]})
    before = await stats(http, world.node.url)
    refused(await peer.post(BATCH_PATH, body), 400, "unsupported_version")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.unsupported_version": 1}
    assert pending(after) == pending(before)  # not even the good envelope was stored
    await still_serving(world, http)


@pytest.mark.parametrize("skew_ms", [-120_000, 120_000], ids=["2min-behind", "2min-ahead"])
async def test_skewed_request_is_clock_skew_with_the_node_clock(
    world: World, http: aiohttp.ClientSession, peer: RawPeer, skew_ms: int
) -> None:
    env = envelope(world.sink)
    body = Batch((env,)).encode()
    before = await stats(http, world.node.url)
    t0 = now_ms()
    ans = await peer.post(BATCH_PATH, body, created=peer.node_now() + skew_ms)
    t1 = now_ms()
    refused(ans, 401, "clock_skew")
    # The node's clock, so the sender can correct itself (it is this machine's clock).
    assert t0 <= ans.body["now"] <= t1
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.clock_skew": 1}
    assert pending(after) == pending(before)
    # A sender that stamps the request in the node's clock (as a real peer does) gets through.
    ok = await peer.post(BATCH_PATH, body, created=ans.body["now"])
    assert ok.status == 200 and ok.body["accepted"] == [env.id]
    assert pending(await stats(http, world.node.url)) == pending(before) + 1
    await still_serving(world, http)


async def test_skew_inside_the_window_is_accepted(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    before = await stats(http, world.node.url)
    for skew in (-SKEW_MS // 2, SKEW_MS // 2):
        env = envelope(world.sink)
        # never before the node's start: that is refused as a possible replay (test_wire_grammar)
        created = max(peer.node_now() + skew, world.up_since)
        ans = await peer.post(BATCH_PATH, Batch((env,)).encode(), created=created)
        assert ans.status == 200 and ans.body["accepted"] == [env.id], ans.body
    after = await stats(http, world.node.url)
    assert moved(before, after) == {}
    assert pending(after) == pending(before) + 2


async def test_replayed_request_is_replay_and_stores_nothing_twice(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    env = envelope(world.sink)
    body = Batch((env,)).encode()
    req = peer.sign(BATCH_PATH, body)
    headers = peer.headers(req)
    before = await stats(http, world.node.url)
    first = await peer.post_raw(BATCH_PATH, body, headers, req)
    assert first.status == 200 and first.body == {"accepted": [env.id], "rejected": []}
    peer.check_signed(first)
    refused(await peer.post_raw(BATCH_PATH, body, headers, req), 401, "replay")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.replay": 1}
    assert pending(after) == pending(before) + 1
    await still_serving(world, http)


async def test_duplicate_envelope_is_accepted_every_time_and_stored_once(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    env, other = envelope(world.sink), envelope(world.sink)
    before = await stats(http, world.node.url)
    for _ in range(2):  # two requests, fresh nonces, same envelope
        ans = await peer.batch([env])
        assert ans.status == 200 and ans.body == {"accepted": [env.id], "rejected": []}
        peer.check_signed(ans)
    second_peer = RawPeer(http, world.node.url)  # the same envelope relayed by another node
    await second_peer.handshake()
    ans = await second_peer.batch([env, other, other])  # and twice within one batch
    assert ans.status == 200 and ans.body == {
        "accepted": [env.id, other.id, other.id],
        "rejected": [],
    }
    after = await stats(http, world.node.url)
    assert moved(before, after) == {}
    assert pending(after) == pending(before) + 2
    await still_serving(world, http)


# ---- federation: per-envelope refusals -----------------------------------------------------------


async def test_unknown_recipient_is_rejected_not_found_per_envelope(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    good, stray = envelope(world.sink), envelope(os.urandom(16))
    before = await stats(http, world.node.url)
    ans = await peer.batch([stray, good])
    assert ans.status == 200, ans.body
    assert ans.body == {"accepted": [good.id], "rejected": [[stray.id, "not_found"]]}
    peer.check_signed(ans)
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.not_found": 1}
    assert pending(after) == pending(before) + 1
    await still_serving(world, http)


async def test_expired_envelope_is_rejected_per_envelope_and_overlong_ttl_capped(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    good = envelope(world.sink)
    expired = envelope(world.sink, expires=peer.node_now() - 1000)
    overlong = envelope(world.sink, ttl_ms=15 * DAY_MS)  # over any node's cap: stored, capped
    before = await stats(http, world.node.url)
    ans = await peer.batch([expired, good, overlong])
    assert ans.status == 200, ans.body
    assert ans.body == {"accepted": [good.id, overlong.id], "rejected": [[expired.id, "expired"]]}
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.expired": 1}
    assert pending(after) == pending(before) + 2
    await still_serving(world, http)


async def test_key_query_for_unknown_user_is_not_found(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    before = await stats(http, world.node.url)
    refused(await peer.keys("nobody", claim=True), 404, "not_found")
    assert moved(before, await stats(http, world.node.url)) == {"federation.not_found": 1}
    known = await peer.keys("bob", claim=False)
    assert known.status == 200 and known.body["claimed"] == {}
    peer.check_signed(known)
    await still_serving(world, http)


# ---- federation: sizes ---------------------------------------------------------------------------


async def test_batch_body_over_the_limit_is_too_large(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    body = os.urandom(MAX_BATCH_BYTES + 1)
    before = await stats(http, world.node.url)
    refused(await peer.post(BATCH_PATH, body), 413, "too_large")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.too_large": 1}
    assert pending(after) == pending(before)
    await still_serving(world, http)


async def test_chunked_batch_body_over_the_limit_is_too_large(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    """No Content-Length to refuse up front: the node must stop reading at the limit."""
    body = os.urandom(MAX_BATCH_BYTES + 1)
    req = peer.sign(BATCH_PATH, body)

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(body), 256 * 1024):
            yield body[i : i + 256 * 1024]

    before = await stats(http, world.node.url)
    refused(await peer.post_raw(BATCH_PATH, chunks(), peer.headers(req)), 413, "too_large")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.too_large": 1}
    assert pending(after) == pending(before)
    await still_serving(world, http)


async def test_batch_of_max_size_is_accepted(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    """The limit is not a guess: a full batch just under MAX_BATCH_BYTES goes through."""
    size = (MAX_BATCH_BYTES - 64 * 1024) // MAX_BATCH_ENVELOPES
    envs = [envelope(world.sink, body=os.urandom(size)) for _ in range(MAX_BATCH_ENVELOPES)]
    encoded = Batch(tuple(envs)).encode()
    assert MAX_BATCH_BYTES - 128 * 1024 < len(encoded) <= MAX_BATCH_BYTES
    before = await stats(http, world.node.url)
    ans = await peer.post(BATCH_PATH, encoded)
    assert ans.status == 200, ans.body
    assert ans.body == {"accepted": [e.id for e in envs], "rejected": []}
    peer.check_signed(ans)
    after = await stats(http, world.node.url)
    assert moved(before, after) == {}
    assert pending(after) == pending(before) + MAX_BATCH_ENVELOPES


async def test_batch_with_too_many_envelopes_is_too_large(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    before = await stats(http, world.node.url)
    refused(
        await peer.batch([envelope(world.sink) for _ in range(MAX_BATCH_ENVELOPES + 1)]),
        413,
        "too_large",
    )
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.too_large": 1}
    assert pending(after) == pending(before)
    ok = await peer.batch([envelope(world.sink) for _ in range(MAX_BATCH_ENVELOPES)])
    assert ok.status == 200 and len(ok.body["accepted"]) == MAX_BATCH_ENVELOPES
    assert pending(await stats(http, world.node.url)) == pending(before) + MAX_BATCH_ENVELOPES
    await still_serving(world, http)


async def test_envelope_body_over_the_limit_is_too_large(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    before = await stats(http, world.node.url)
    big = envelope(world.sink, body=os.urandom(MAX_BODY + 1))
    refused(await peer.batch([envelope(world.sink), big]), 413, "too_large")
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.too_large": 1}
    assert pending(after) == pending(before)
    largest = envelope(world.sink, body=os.urandom(MAX_BODY))
    ok = await peer.batch([largest])
    assert ok.status == 200 and ok.body["accepted"] == [largest.id], ok.body
    await still_serving(world, http)


# ---- device API: frames --------------------------------------------------------------------------

GARBAGE_FRAMES = {
    "not-msgpack": b"\xc1\xc1\xc1",
    "truncated": F.Auth(1, b"\x01" * 16, b"\x02" * 64).encode()[:-10],
    "not-a-map": packb(["auth", 1]),
    "no-type": packb({"rid": 1}),
    "type-not-str": packb({"t": 7, "rid": 1}),
    "auth-missing-sig": packb({"t": "auth", "rid": 1, "mailbox": b"\x01" * 16}),
    "auth-short-mailbox": packb({"t": "auth", "rid": 1, "mailbox": b"\x01", "sig": b"\0" * 64}),
}


@pytest.mark.parametrize("data", GARBAGE_FRAMES.values(), ids=GARBAGE_FRAMES.keys())
async def test_garbage_frame_is_malformed_and_the_connection_survives(
    world: World, http: aiohttp.ClientSession, data: bytes
) -> None:
    dev = await RawDevice.connect(http, world.node.url)
    try:
        before = await stats(http, world.node.url)
        await dev.send_bytes(data)
        error_frame(await dev.recv(), "malformed", rid=0)  # undecodable: no rid to echo
        assert moved(before, await stats(http, world.node.url)) == {"client.malformed": 1}
        ok = await dev.auth(world.mallory)  # the same connection still authenticates
        assert isinstance(ok, F.AuthOk) and ok.address == world.mallory.address, ok
    finally:
        await dev.close()
    await still_serving(world, http)


async def test_text_frame_is_malformed(world: World, http: aiohttp.ClientSession) -> None:
    dev = await RawDevice.connect(http, world.node.url)
    try:
        before = await stats(http, world.node.url)
        await dev.ws.send_str('{"t": "auth"}')
        error_frame(await dev.recv(), "malformed", rid=0)
        assert moved(before, await stats(http, world.node.url)) == {"client.malformed": 1}
    finally:
        await dev.close()
    await still_serving(world, http)


async def test_unknown_frame_type_is_unknown_frame(
    world: World, http: aiohttp.ClientSession
) -> None:
    dev = await RawDevice.connect(http, world.node.url)
    try:
        before = await stats(http, world.node.url)
        error_frame(await dev.request({"t": "subscribe", "rid": 9}), "unknown_frame", rid=9)
        assert moved(before, await stats(http, world.node.url)) == {"client.unknown_frame": 1}
        assert isinstance(await dev.auth(world.mallory), F.AuthOk)
        # A known type that only the node may send is refused too, answering the request's rid.
        before = await stats(http, world.node.url)
        error_frame(await dev.request(F.Ok(41, 0)), "malformed", rid=41)
        assert moved(before, await stats(http, world.node.url)) == {"client.malformed": 1}
    finally:
        await dev.close()
    await still_serving(world, http)


async def test_frame_over_max_frame_is_too_large(world: World, http: aiohttp.ClientSession) -> None:
    before = await stats(http, world.node.url)
    challenge, close_code = await ws_declare_oversized(
        "127.0.0.1", world.node.port, F.MAX_FRAME + 1
    )
    assert isinstance(challenge, F.Challenge)
    assert close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG

    async def counted() -> bool:  # the node counts once its close handshake has finished
        return moved(before, await stats(http, world.node.url)) == {"client.too_large": 1}

    await async_wait_until(counted, what="client.too_large to be counted")
    await still_serving(world, http)


async def test_send_frame_with_bad_envelopes_is_refused(
    world: World, http: aiohttp.ClientSession
) -> None:
    dev = await RawDevice.connect(http, world.node.url)
    node_id = dev.challenge.node_id
    try:
        assert isinstance(await dev.auth(world.mallory), F.AuthOk)
        cases = [
            ([[node_id, envelope(world.sink).to_wire()]] * (MAX_BATCH_ENVELOPES + 1), "too_large"),
            ([[node_id, envelope(world.sink, body=b"\0" * (MAX_BODY + 1)).to_wire()]], "too_large"),
            ([[node_id, [2, *envelope(world.sink).to_wire()[1:]]]], "unsupported_version"),
            ([[node_id, ["not", "an", "envelope"]]], "malformed"),
        ]
        for items, code in cases:
            before = await stats(http, world.node.url)
            error_frame(await dev.request({"t": "send", "rid": 5, "items": items}), code)
            after = await stats(http, world.node.url)
            assert moved(before, after) == {f"client.{code}": 1}
            assert pending(after) == pending(before)
    finally:
        await dev.close()
    await still_serving(world, http)


async def test_device_send_refusals_are_per_envelope(
    world: World, http: aiohttp.ClientSession
) -> None:
    dev = await RawDevice.connect(http, world.node.url)
    node_id = dev.challenge.node_id
    good, stray = envelope(world.sink), envelope(os.urandom(16))
    expired = envelope(world.sink, expires=now_ms() - 1000)
    elsewhere = envelope(os.urandom(16))
    try:
        assert isinstance(await dev.auth(world.mallory), F.AuthOk)
        before = await stats(http, world.node.url)
        items = (
            (node_id, stray),
            (node_id, good),
            (node_id, expired),
            (NodeKey.generate().node_id, elsewhere),
        )
        ans = await dev.request(F.Send(dev.next_rid(), items))
        assert isinstance(ans, F.Accepted), ans
        assert ans.ids == (good.id,)
        assert sorted(ans.rejected) == sorted(
            [
                (stray.id, "not_found"),
                (expired.id, "expired"),
                (elsewhere.id, "unknown_destination"),
            ]
        )
        after = await stats(http, world.node.url)
        assert moved(before, after) == {
            "client.not_found": 1,
            "client.expired": 1,
            "client.unknown_destination": 1,
        }
        assert pending(after) == pending(before) + 1
    finally:
        await dev.close()
    await still_serving(world, http)


# ---- device API: authentication and invites ------------------------------------------------------


async def test_unknown_mailbox_and_bad_signature_get_the_same_unauthorized(
    world: World, http: aiohttp.ClientSession
) -> None:
    """No oracle: an unknown mailbox and a wrong key for a real one look exactly alike."""
    before = await stats(http, world.node.url)
    answers = []
    for mailbox in (os.urandom(16), world.bob.mailbox):
        dev = await RawDevice.connect(http, world.node.url)
        stranger = RawIdentity(mailbox=mailbox)  # signs correctly, but with a key nobody listed
        answers.append(await dev.auth(stranger))
        closed = await dev.recv_msg()
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closed
        await dev.close()
    unknown, wrong_key = (error_frame(a, "unauthorized", rid=1) for a in answers)
    assert unknown.message == wrong_key.message
    assert moved(before, await stats(http, world.node.url)) == {"client.unauthorized": 2}
    await still_serving(world, http)  # bob's real device still authenticates


async def test_request_before_auth_is_unauthorized(
    world: World, http: aiohttp.ClientSession
) -> None:
    dev = await RawDevice.connect(http, world.node.url)
    before = await stats(http, world.node.url)
    ans = await dev.request(F.QueryKeys(3, world.bob_addr, True))
    error_frame(ans, "unauthorized", rid=3)
    closed = await dev.recv_msg()
    assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), closed
    await dev.close()
    assert moved(before, await stats(http, world.node.url)) == {"client.unauthorized": 1}
    await still_serving(world, http)


async def test_random_invite_is_invalid_invite(world: World, http: aiohttp.ClientSession) -> None:
    ident = RawIdentity()
    dev = await RawDevice.connect(http, world.node.url)
    try:
        before = await stats(http, world.node.url)
        ans = await dev.register(ident, os.urandom(24), f"ghost@{world.node.host}")
        error_frame(ans, "invalid_invite", rid=dev.rid)
        after = await stats(http, world.node.url)
        assert moved(before, after) == {"client.invalid_invite": 1}
        assert after["counts"]["accounts"] == before["counts"]["accounts"]
    finally:
        await dev.close()
    await still_serving(world, http)


async def test_reused_invite_is_invalid_invite(world: World, http: aiohttp.ClientSession) -> None:
    invite = await asyncio.to_thread(world.node.invite, "erin")
    erin = Device(str(world.base / "dev-erin-1"))
    thief = Device(str(world.base / "dev-erin-2"))
    try:
        erin_addr = await erin.join(invite)
        before = await stats(http, world.node.url)
        with pytest.raises(HavenError) as err:
            await thief.join(invite)
        assert err.value.code == "invalid_invite"
        assert not thief.joined
        assert moved(before, await stats(http, world.node.url)) == {"client.invalid_invite": 1}
        # The real erin is unaffected.
        await exchange(http, world.node, world.alice, world.node, erin, erin_addr)
    finally:
        erin.close()
        thief.close()
    await still_serving(world, http)


async def test_concurrent_redemptions_of_one_invite_succeed_once(
    world: World, http: aiohttp.ClientSession
) -> None:
    inv = parse_invite(await asyncio.to_thread(world.node.invite, "frank"))
    address = f"frank@{world.node.host}"
    devs = [await RawDevice.connect(http, world.node.url) for _ in range(4)]
    try:
        before = await stats(http, world.node.url)
        answers = await asyncio.gather(
            *(d.register(RawIdentity(), inv["t"], address) for d in devs)
        )
        assert sum(isinstance(a, F.Registered) for a in answers) == 1, answers
        for a in answers:
            if not isinstance(a, F.Registered):
                error_frame(a, "invalid_invite")
        after = await stats(http, world.node.url)
        assert moved(before, after) == {"client.invalid_invite": 3}
    finally:
        for d in devs:
            await d.close()
    await still_serving(world, http)


# ---- one-time keys -------------------------------------------------------------------------------


async def test_exhausted_one_time_keys_fall_back_and_claims_are_atomic(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    dave_home, dave_addr = await asyncio.to_thread(join, world.node, world.base, "dave")
    dave = Device(str(dave_home))
    try:
        extra = 10
        before = await stats(http, world.node.url)
        answers = await asyncio.gather(
            *(peer.keys("dave", claim=True) for _ in range(OTK_BATCH + extra))
        )
        assert all(a.status == 200 for a in answers), [a.body for a in answers if a.status != 200]
        claimed = [tuple(k) for a in answers for k in a.body["claimed"].values()]
        assert len(claimed) == OTK_BATCH + extra  # every claim got a key
        uses = Counter(claimed)
        once = [k for k, n in uses.items() if n == 1]
        reused = [k for k, n in uses.items() if n > 1]
        # Each one-time key went to exactly one claimer; after them, only the fallback key.
        assert len(once) == OTK_BATCH and len(reused) == 1 and uses[reused[0]] == extra
        assert moved(before, await stats(http, world.node.url)) == {}
        # The fallback key really works: alice (no session yet) reaches dave through it.
        await exchange(http, world.node, world.alice, world.node, dave, dave_addr)
    finally:
        dave.close()
    await still_serving(world, http)


async def test_device_without_fallback_runs_dry_and_sender_gets_keys_exhausted(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    m = world.mallory  # published 2 one-time keys and never a fallback key
    name = m.address.split("@")[0]
    before = await stats(http, world.node.url)
    answers = await asyncio.gather(*(peer.keys(name, claim=True) for _ in range(3)))
    assert all(a.status == 200 for a in answers)
    claimed = [a.body["claimed"] for a in answers]
    keys = [tuple(c[m.account.curve25519_key.to_base64()]) for c in claimed if c]
    assert len(keys) == 2 and len(set(keys)) == 2  # two claims, two different keys
    assert claimed.count({}) == 1  # the third finds none: an empty claim, not an error
    assert moved(before, await stats(http, world.node.url)) == {}
    # A sender with no session cannot encrypt to mallory: the device says keys_exhausted.
    with pytest.raises(HavenError) as err:
        await world.alice.send(m.address, "anyone there?")
    assert err.value.code == "keys_exhausted"
    assert moved(before, await stats(http, world.node.url)) == {}
    # Once mallory tops up, the same sender gets through.
    dev = await RawDevice.connect(http, world.node.url)
    try:
        assert isinstance(await dev.auth(m), F.AuthOk)
        ok = await dev.request(F.PublishKeys(dev.next_rid(), m.one_time_keys(1), (), None))
        assert isinstance(ok, F.Ok) and ok.otk_count == 1
        base = pending(await stats(http, world.node.url))
        sent = await world.alice.send(m.address, "now there is a key")
        assert sent.envelopes == 1
        deliver = await dev.recv_msg()
        frame = F.decode_frame(deliver.data)
        assert isinstance(frame, F.Deliver) and len(frame.envs) == 1
        await dev.send_bytes(F.Ack((frame.envs[0].id,)).encode())

        async def acked() -> bool:
            return pending(await stats(http, world.node.url)) == base

        await async_wait_until(acked, what="mallory's ack to delete the envelope")
    finally:
        await dev.close()
    await still_serving(world, http)


async def test_key_queries_beyond_the_rate_are_rate_limited(
    world: World, http: aiohttp.ClientSession, peer: RawPeer
) -> None:
    """A peer's key queries are limited (20/s, burst 200); other peers are unaffected."""
    n = 600  # the node would have to take over 20 s to answer these for none to be limited
    before = await stats(http, world.node.url)
    answers = await asyncio.gather(*(peer.keys("bob", claim=False) for _ in range(n)))
    limited = [a for a in answers if a.status != 200]
    for a in limited:
        refused(a, 429, "rate_limited")
    assert limited and len(limited) < n
    for a in answers:
        if a.status == 200:
            peer.check_signed(a)
    after = await stats(http, world.node.url)
    assert moved(before, after) == {"federation.rate_limited": len(limited)}
    other = RawPeer(http, world.node.url)
    await other.handshake()
    ok = await other.keys("bob", claim=False)
    assert ok.status == 200, ok.body
    await still_serving(world, http)


# ---- a peer whose key changed --------------------------------------------------------------------


async def test_peer_whose_key_changed_is_refused_and_gets_nothing(
    tmp_path: Path, nodes: list[NodeProc], http: aiohttp.ClientSession
) -> None:
    a = NodeProc.create(tmp_path, "A").start()
    b = NodeProc.create(tmp_path, "B").start()
    nodes += [a, b]
    homes = {}
    for node, name in ((a, "alice"), (a, "carol"), (b, "bob")):
        homes[name] = await asyncio.to_thread(join, node, tmp_path, name)
    alice, carol, bob = (Device(str(homes[n][0])) for n in ("alice", "carol", "bob"))
    alice_addr, bob_addr = homes["alice"][1], homes["bob"][1]
    try:
        await exchange(http, a, alice, b, bob, bob_addr)  # A pins B's key for B's host
        assert (await stats(http, a.url))["counts"]["peers"] == 1

        b.stop()  # an impostor takes over B's host and port with a new key
        impostor = NodeProc(tmp_path / "impostor", b.port)
        init = ["node", "init", "--home", str(impostor.home), "--public-url", b.url]
        await asyncio.to_thread(haven, *init, "--listen", b.host)
        await asyncio.to_thread(impostor.start)
        nodes.append(impostor)

        # A contact never seen before: no keys can be had from the impostor.
        with pytest.raises(HavenError) as err:
            await carol.send(bob_addr, "hello bob?")
        assert err.value.code == "keys_unavailable"

        async def key_change_counted() -> bool:
            return bool((await stats(http, a.url))["errors"].get("peers.key_changed", 0) >= 1)

        await async_wait_until(key_change_counted, what="A to count peers.key_changed")
        # A known contact: the message waits in A's outbox for the pinned node, never sent on.
        queued = await alice.send(bob_addr, "are you still you?")
        assert (await stats(http, a.url))["counts"]["outbox_envelopes"] == 1
        fake = await stats(http, impostor.url)
        assert fake["counts"]["pending_envelopes"] == 0 and fake["counts"]["accounts"] == 0
        assert fake["events"].get("federation.envelopes_in", 0) == 0
        # A signs its requests for the pinned node id, so the impostor could not accept them.
        assert fake["errors"].get("federation.wrong_destination", 0) >= 1
        # Everything local to A is unaffected.
        await exchange(http, a, carol, a, alice, alice_addr)
        node_healthy(a)

        # The real B comes back: the queued message reaches bob after all.
        impostor.stop()
        await asyncio.to_thread(b.start)
        back = await bob.send(alice_addr, "back again")  # B contacts A: A's outbox wakes up

        async def drained() -> bool:
            return bool((await stats(http, a.url))["counts"]["outbox_envelopes"] == 0)

        await async_wait_until(drained, timeout=DEADLINE_S, what="A's outbox to drain to B")
        got = await receive_one(bob, lambda m: m.msg_id == queued.msg_id)
        assert (got.sender, got.text) == (alice_addr, "are you still you?")
        # At A for alice: bob's message and bob's delivered receipt for the queued one.
        await wait_pending(http, a, 2, "bob's message and receipt to reach A")
        got = await receive_one(alice, lambda m: m.msg_id == back.msg_id)
        assert (got.sender, got.text) == (bob_addr, "back again")
        for n in (a, b):
            node_healthy(n)
    finally:
        for d in (alice, carol, bob):
            d.close()
