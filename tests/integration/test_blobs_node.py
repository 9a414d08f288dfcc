"""Attachments across two real nodes (docs/protocol.md §8), driven by raw devices.

Alice's device uploads ciphertext chunks to node A; Bob's device on node B fetches them through
B with its token (B fetches from A over signed federation and keeps a fetched copy), then says
``blob_done``; afterwards neither node keeps a blob directory. Interruptions: the uploading
device disappears mid-upload and resumes (A's counters show no finished chunk sent twice); node
B is killed (SIGKILL) mid-download and restarted, and the download resumes from B's fetched
copy (A serves each chunk once). Bad input gets stable codes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import aiohttp
import pytest

from client.device import parse_invite
from federation import frames as F
from federation.transport import BLOB_DONE_PATH, BLOB_PATH
from federation.wire import CHUNK_SIZE, BlobFetch, BlobFetched, BlobRelease

from .harness import NodeProc, async_wait_until
from .rawpeer import RawDevice, RawIdentity, RawPeer, set_node_config, stats

MIB = 1024 * 1024
TTL = 3_600_000


@dataclass
class Upload:
    """A padded ciphertext as a device would upload it, with one token per recipient device."""

    size: int
    recipients: int = 2
    blob: bytes = field(default_factory=lambda: os.urandom(16))
    data: bytes = b""
    tokens: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.data = os.urandom(self.size)
        self.tokens = [os.urandom(32) for _ in range(self.recipients)]

    @property
    def chunks(self) -> list[bytes]:
        return [self.data[i : i + CHUNK_SIZE] for i in range(0, self.size, CHUNK_SIZE)]

    def new(self, rid: int, ttl: int = TTL) -> F.BlobNew:
        hashes = tuple(hashlib.sha256(c).digest() for c in self.chunks)
        tokens = tuple(hashlib.sha256(t).digest() for t in self.tokens)
        return F.BlobNew(rid, self.blob, self.size, hashes, tokens, ttl)


@dataclass
class World:
    a: NodeProc
    b: NodeProc
    alice: RawIdentity
    alice2: RawIdentity  # alice's second device (on A: fetches locally)
    bob: RawIdentity


async def register(node: NodeProc, name: str) -> RawIdentity:
    inv = parse_invite(node.invite(name))
    ident = RawIdentity(address=f"{inv['name']}@{node.host}")
    async with aiohttp.ClientSession() as http:
        dev = await RawDevice.connect(http, node.url)
        reg = await dev.register(ident, inv["t"], ident.address)
        assert isinstance(reg, F.Registered), reg
        await dev.close()
    return ident


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("blobs")
    a, b = NodeProc.create(base, "a"), NodeProc.create(base, "b")
    set_node_config(a.home, max_file_mb=8, max_blob_mb_per_account=40)
    a.start()
    b.start()
    try:
        alice = asyncio.run(register(a, "alice"))
        alice2 = asyncio.run(register(a, "alice2"))
        bob = asyncio.run(register(b, "bob"))
        yield World(a, b, alice, alice2, bob)
        assert a.proc is not None and a.proc.poll() is None, "node A died"
    finally:
        a.stop()
        b.stop()
    for n in (a, b):
        log = n.log.read_text()
        assert "Traceback" not in log, log[-3000:]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def signed_in(http: aiohttp.ClientSession, node: NodeProc, ident: RawIdentity) -> RawDevice:
    dev = await RawDevice.connect(http, node.url)
    ok = await dev.auth(ident)
    assert isinstance(ok, F.AuthOk), ok
    return dev


async def pipelined(dev: RawDevice, frames: list[F.Frame]) -> dict[int, F.Frame]:
    """Send every frame at once (as a device keeps puts in flight), then read every answer."""
    for fr in frames:
        await dev.send_bytes(fr.encode())
    answers: dict[int, F.Frame] = {}
    while len(answers) < len(frames):
        got = await dev.recv()
        answers[int(getattr(got, "rid", 0))] = got
    return answers


async def put(dev: RawDevice, up: Upload, indexes: list[int]) -> None:
    frames: list[F.Frame] = [F.BlobPut(dev.next_rid(), up.blob, i, up.chunks[i]) for i in indexes]
    answers = await pipelined(dev, frames)
    assert all(isinstance(a, F.Ok) for a in answers.values()), answers


async def upload(dev: RawDevice, up: Upload) -> None:
    ok = await dev.request(up.new(dev.next_rid()))
    assert isinstance(ok, F.BlobOk) and ok.have == (), ok
    await put(dev, up, list(range(len(up.chunks))))


async def fetch(
    dev: RawDevice, origin: NodeProc, up: Upload, token: bytes, indexes: list[int]
) -> dict[int, bytes]:
    node_id = await node_id_of(origin)
    frames: list[F.Frame] = [
        F.BlobGet(dev.next_rid(), up.blob, node_id, token, i, origin.host) for i in indexes
    ]
    answers = await pipelined(dev, frames)
    out = {}
    for a in answers.values():
        assert isinstance(a, F.BlobChunk), a
        assert a.chunks == len(up.chunks) and a.size == up.size
        out[a.index] = a.data
    return out


async def done(dev: RawDevice, origin: NodeProc, up: Upload, token: bytes) -> F.Frame:
    node_id = await node_id_of(origin)
    return await dev.request(F.BlobDone(dev.next_rid(), up.blob, node_id, token, origin.host))


def kill(dev: RawDevice) -> None:
    """The device process dies: its connection is reset without a WebSocket close."""
    conn = dev.ws._conn  # aiohttp has no public abort for a client WebSocket
    assert conn is not None and conn.transport is not None
    conn.transport.abort()


_IDS: dict[str, str] = {}


async def node_id_of(node: NodeProc) -> str:
    if node.url not in _IDS:
        async with aiohttp.ClientSession() as http:
            dev = await RawDevice.connect(http, node.url)
            _IDS[node.url] = dev.challenge.node_id
            await dev.close()
    return _IDS[node.url]


def blob_dirs(node: NodeProc) -> list[str]:
    root = node.home / "blobs"
    return sorted(os.listdir(root)) if root.exists() else []


async def events(http: aiohttp.ClientSession, node: NodeProc) -> dict[str, int]:
    return dict((await stats(http, node.url))["events"])


async def errors(http: aiohttp.ClientSession, node: NodeProc) -> dict[str, int]:
    return dict((await stats(http, node.url))["errors"])


def delta(after: dict[str, int], before: dict[str, int], key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


async def empty(node: NodeProc) -> bool:
    return not blob_dirs(node)


# ---- tests ---------------------------------------------------------------------------------------


async def test_fetch_across_nodes_then_nothing_is_left(
    world: World, http: aiohttp.ClientSession
) -> None:
    up = Upload(3 * CHUNK_SIZE + 4321)
    a_before = await events(http, world.a)
    alice = await signed_in(http, world.a, world.alice)
    ok = await alice.request(up.new(alice.next_rid()))
    assert isinstance(ok, F.BlobOk) and ok.have == ()
    bob = await signed_in(http, world.b, world.bob)
    # not complete yet: bob's node relays not_ready
    early = await bob.request(
        F.BlobGet(bob.next_rid(), up.blob, await node_id_of(world.a), up.tokens[0], 0, world.a.host)
    )
    assert isinstance(early, F.Error) and early.code == "not_ready", early
    await put(alice, up, list(range(len(up.chunks))))
    assert len(blob_dirs(world.a)) == 1

    # a wrong token is not_found, through B and locally alike (same as an unknown blob)
    for dev, token in ((bob, os.urandom(32)), (alice, os.urandom(32))):
        node_id = await node_id_of(world.a)
        bad = await dev.request(F.BlobGet(dev.next_rid(), up.blob, node_id, token, 0, world.a.host))
        assert isinstance(bad, F.Error) and bad.code == "not_found", bad
    unknown = await bob.request(
        F.BlobGet(bob.next_rid(), os.urandom(16), await node_id_of(world.a), up.tokens[0], 0)
    )
    assert isinstance(unknown, F.Error) and unknown.code == "not_found", unknown

    got = await fetch(bob, world.a, up, up.tokens[0], list(range(len(up.chunks))))
    data = b"".join(got[i] for i in range(len(up.chunks)))
    assert hashlib.sha256(data).digest() == hashlib.sha256(up.data).digest()
    assert len(blob_dirs(world.b)) == 1  # B's fetched copy, until bob says done
    assert isinstance(await done(bob, world.a, up, up.tokens[0]), F.Ok)
    assert await empty(world.b)
    assert len(blob_dirs(world.a)) == 1  # alice's other device has not fetched yet

    alice2 = await signed_in(http, world.a, world.alice2)
    got2 = await fetch(alice2, world.a, up, up.tokens[1], list(range(len(up.chunks))))
    assert b"".join(got2[i] for i in range(len(up.chunks))) == up.data
    assert isinstance(await done(alice2, world.a, up, up.tokens[1]), F.Ok)
    await async_wait_until(lambda: empty(world.a), 10, "A to delete the fetched blob")
    a_after = await events(http, world.a)
    assert delta(a_after, a_before, "blob.bytes_served_federation") == up.size
    assert delta(a_after, a_before, "blob.deleted_fetched") == 1
    assert (await stats(http, world.a.url))["blobs"]["uploads"] == 0
    for d in (alice, alice2, bob):
        await d.close()


async def test_upload_resumes_after_the_device_disappears(
    world: World, http: aiohttp.ClientSession
) -> None:
    up = Upload(6 * CHUNK_SIZE, recipients=1)
    before = await events(http, world.a)
    alice = await signed_in(http, world.a, world.alice)
    ok = await alice.request(up.new(alice.next_rid()))
    assert isinstance(ok, F.BlobOk) and ok.have == ()
    await put(alice, up, [0, 1, 2])
    # two more chunks in flight, then the device vanishes (TCP reset, no close handshake)
    for i in (3, 4):
        await alice.send_bytes(F.BlobPut(alice.next_rid(), up.blob, i, up.chunks[i]).encode())
    kill(alice)

    alice = await signed_in(http, world.a, world.alice)
    again = await alice.request(up.new(alice.next_rid()))  # the same blob_new resumes
    assert isinstance(again, F.BlobOk) and set(again.have) >= {0, 1, 2}, again
    assert set(again.have) <= {0, 1, 2, 3, 4}, again
    await put(alice, up, [i for i in range(len(up.chunks)) if i not in again.have])
    after = await events(http, world.a)
    # every chunk arrived exactly once: the finished ones were not sent again
    assert delta(after, before, "blob.chunk_bytes_in") == up.size
    assert delta(after, before, "blob.chunk_repeats") == 0
    bob = await signed_in(http, world.b, world.bob)
    got = await fetch(bob, world.a, up, up.tokens[0], list(range(len(up.chunks))))
    assert b"".join(got[i] for i in range(len(up.chunks))) == up.data
    assert isinstance(await done(bob, world.a, up, up.tokens[0]), F.Ok)
    await async_wait_until(lambda: empty(world.a), 10, "A to delete the fetched blob")
    await alice.close()
    await bob.close()


async def test_download_resumes_after_the_recipient_node_is_killed(
    world: World, http: aiohttp.ClientSession
) -> None:
    up = Upload(5 * CHUNK_SIZE + 1, recipients=1)
    alice = await signed_in(http, world.a, world.alice)
    await upload(alice, up)
    before = await events(http, world.a)
    bob = await signed_in(http, world.b, world.bob)
    first = await fetch(bob, world.a, up, up.tokens[0], [0, 1, 2])
    world.b.kill()  # SIGKILL mid-download
    world.b.start()
    bob = await signed_in(http, world.b, world.bob)
    rest = await fetch(bob, world.a, up, up.tokens[0], list(range(len(up.chunks))))
    assert all(rest[i] == first[i] for i in first)
    assert b"".join(rest[i] for i in range(len(up.chunks))) == up.data
    after = await events(http, world.a)
    # B kept what it had fetched before it died: A served every chunk once, not twice
    served = delta(after, before, "blob.bytes_served_federation")
    assert up.size <= served <= up.size + CHUNK_SIZE, served
    assert isinstance(await done(bob, world.a, up, up.tokens[0]), F.Ok)
    assert await empty(world.b)
    await async_wait_until(lambda: empty(world.a), 10, "A to delete the fetched blob")
    await alice.close()
    await bob.close()


async def test_refusals_have_stable_codes(world: World, http: aiohttp.ClientSession) -> None:
    before = await errors(http, world.a)
    alice = await signed_in(http, world.a, world.alice)

    async def code(frame: F.Frame) -> str | None:
        got = await alice.request(frame)
        return got.code if isinstance(got, F.Error) else None

    big = Upload(10 * CHUNK_SIZE, recipients=1)  # node A takes files up to 8 MB
    assert await code(big.new(alice.next_rid())) == "too_large"
    up = Upload(CHUNK_SIZE + 10, recipients=1)
    await alice.request(up.new(alice.next_rid()))
    other = Upload(CHUNK_SIZE + 11, recipients=1)
    other.blob = up.blob
    assert await code(other.new(alice.next_rid())) == "conflict"
    c0 = up.chunks[0]
    assert await code(F.BlobPut(alice.next_rid(), up.blob, 0, os.urandom(CHUNK_SIZE))) == (
        "hash_mismatch"
    )
    assert await code(F.BlobPut(alice.next_rid(), up.blob, 0, c0 + b"x")) == "too_large"
    assert await code(F.BlobPut(alice.next_rid(), up.blob, 0, c0[:-1])) == "malformed"
    assert await code(F.BlobPut(alice.next_rid(), up.blob, 1, c0[:10])) == "hash_mismatch"
    assert await code(F.BlobPut(alice.next_rid(), os.urandom(16), 0, c0)) == "not_found"
    # bytes in flight per account (40 MB on A): four more 9 MiB files do not fit
    held = [Upload(9 * MIB, recipients=1) for _ in range(5)]
    codes = [await code(h.new(alice.next_rid())) for h in held]
    assert codes[:4] == [None] * 4 and codes[4] == "quota_exceeded", codes
    after = await errors(http, world.a)
    for key, n in (
        ("blob.too_large", 2),
        ("blob.conflict", 1),
        ("blob.hash_mismatch", 2),
        ("blob.malformed", 1),
        ("blob.not_found", 1),
        ("blob.quota_exceeded", 1),
    ):
        assert delta(after, before, key) == n, (key, after)
    # nothing else was affected: the good chunks still go in and the blob is served
    await put(alice, up, [0, 1])
    got = await fetch(alice, world.a, up, up.tokens[0], [0, 1])
    assert got[0] + got[1] == up.data
    await alice.close()


async def test_unfetched_blob_expires_at_its_ttl(world: World, http: aiohttp.ClientSession) -> None:
    before = await events(http, world.a)
    alice = await signed_in(http, world.a, world.alice)
    up = Upload(1000, recipients=1)
    ok = await alice.request(up.new(alice.next_rid(), ttl=300))
    assert isinstance(ok, F.BlobOk)
    await put(alice, up, [0])
    n = len(blob_dirs(world.a))

    async def gone() -> bool:
        return delta(await events(http, world.a), before, "blob.deleted_ttl") >= 1

    await async_wait_until(gone, 15, "the blob to expire")
    assert len(blob_dirs(world.a)) == n - 1
    got = await alice.request(
        F.BlobGet(alice.next_rid(), up.blob, await node_id_of(world.a), up.tokens[0], 0)
    )
    assert isinstance(got, F.Error) and got.code == "not_found", got
    await alice.close()


async def test_federation_endpoints_check_the_token(
    world: World, http: aiohttp.ClientSession
) -> None:
    peer = RawPeer(http, world.a.url)
    desc = await peer.handshake()
    assert "blobs" in desc.features
    alice = await signed_in(http, world.a, world.alice)
    up = Upload(CHUNK_SIZE + 99, recipients=1)
    await upload(alice, up)
    await alice.close()
    before = await errors(http, world.a)
    wrong = await peer.post(BLOB_PATH, BlobFetch(up.blob, os.urandom(32), 0).encode())
    unknown = await peer.post(BLOB_PATH, BlobFetch(os.urandom(16), up.tokens[0], 0).encode())
    past_end = await peer.post(BLOB_PATH, BlobFetch(up.blob, up.tokens[0], 2).encode())
    for answer in (wrong, unknown, past_end):
        assert (answer.status, answer.code) == (404, "not_found"), answer
    bad = await peer.post(BLOB_PATH, b"\x93garbage")
    assert (bad.status, bad.code) == (400, "malformed"), bad
    assert delta(await errors(http, world.a), before, "federation.not_found") == 3
    good = await peer.post(BLOB_PATH, BlobFetch(up.blob, up.tokens[0], 1).encode())
    assert good.status == 200, good
    peer.check_signed(good)
    got = BlobFetched.decode(good.raw)
    assert (got.index, got.data, got.chunks, got.size) == (1, up.chunks[1], 2, up.size)
    assert 0 < got.ttl <= TTL
    miss = await peer.post(BLOB_DONE_PATH, BlobRelease(up.blob, os.urandom(32)).encode())
    assert (miss.status, miss.code) == (404, "not_found"), miss
    n = len(blob_dirs(world.a))
    done_ok = await peer.post(BLOB_DONE_PATH, BlobRelease(up.blob, up.tokens[0]).encode())
    assert done_ok.status == 200, done_ok
    peer.check_signed(done_ok)
    assert len(blob_dirs(world.a)) == n - 1  # the last token: deleted at once


async def test_release_reaches_an_origin_that_was_down(
    world: World, http: aiohttp.ClientSession
) -> None:
    up = Upload(CHUNK_SIZE // 2, recipients=1)
    alice = await signed_in(http, world.a, world.alice)
    await upload(alice, up)
    await alice.close()
    bob = await signed_in(http, world.b, world.bob)
    got = await fetch(bob, world.a, up, up.tokens[0], [0])
    assert got[0] == up.data
    n = len(blob_dirs(world.a))
    world.a.stop()  # the origin is down when bob's device says done
    assert isinstance(await done(bob, world.a, up, up.tokens[0]), F.Ok)
    assert await empty(world.b)  # B's fetched copy is gone at once
    await bob.close()
    world.a.start()  # B retries the release from memory; A deletes the blob (and reopened it)

    async def released() -> bool:
        return len(blob_dirs(world.a)) == n - 1

    await async_wait_until(released, 20, "the release to reach A")
