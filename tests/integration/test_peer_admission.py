"""New peers and tokens under attack (docs/protocol.md §4.4, §4.7, §5.2, §5.4).

- A flood of ``mint_link`` is refused per account, a flood of invite guesses node-wide, and a
  real device link still goes through.
- Node keys this node has not pinned share one budget: minting keys buys no rate, a pinned peer
  keeps its own, and a genuine new node's first message gets in during the flood.
- A descriptor served at one host naming another ``public_url`` does not move traffic there.
- A peer whose key changed without a rotation is reported to the sender as a coded warning.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from client.device import Device, ReceivedMessage
from client.linking import link_device
from federation import frames as F
from federation.errors import HavenError
from federation.signing import Descriptor, b64e
from federation.transport import DESCRIPTOR_PATH
from federation.wire import packb
from node.admission import PREAUTH_FRAMES
from node.app import load_node_key
from node.cli import CARD_PREFIX
from node.config import NodeConfig

from .harness import NodeProc, async_wait_until, free_port, haven, join
from .rawpeer import RawDevice, RawIdentity, RawPeer, stats

DEADLINE_S = 30.0
DEFAULTS = NodeConfig(public_url="http://127.0.0.1:1")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def device(node: NodeProc, base: Path, name: str) -> tuple[Device, str]:
    home, address = await asyncio.to_thread(join, node, base, name)
    return Device(str(home)), address


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


def healthy(node: NodeProc) -> str:
    assert node.proc is not None and node.proc.poll() is None, "the node process exited"
    log = node.log.read_text(errors="replace")
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
    return log


def codes(results: list[object]) -> Counter[str]:
    """``ok`` for an answer frame, else the error's stable code."""
    return Counter(
        getattr(r, "code", "?") if isinstance(r, BaseException) else "ok" for r in results
    )


# ---- link tokens and registrations ---------------------------------------------------------------


async def test_token_floods_are_refused_and_a_real_link_still_works(
    tmp_path: Path, nodes: list[NodeProc], http: aiohttp.ClientSession
) -> None:
    a = NodeProc.create(tmp_path, "A").start()
    nodes.append(a)
    alice, alice_addr = await device(a, tmp_path, "alice")
    carol, _ = await device(a, tmp_path, "carol")
    try:
        # carol's device mints link tokens as fast as it can: 30 per hour per account.
        conn = await carol.connect()
        try:
            got = await asyncio.gather(
                *(conn.request(F.MintLink(conn.next_rid())) for _ in range(300)),
                return_exceptions=True,
            )
        finally:
            await conn.__aexit__(None, None, None)
        assert codes(got) == {"ok": DEFAULTS.link_tokens_per_hour, "rate_limited": 270}
        assert all(isinstance(r, F.LinkToken) for r in got if not isinstance(r, BaseException))

        # Someone guesses invite tokens: refused node-wide before the store is asked. A
        # stranger may send PREAUTH_FRAMES frames per connection, so the guesses come over
        # several connections.
        answers: list[F.Frame] = []
        t0 = time.monotonic()
        for _ in range(200 // PREAUTH_FRAMES + 1):
            raw = await RawDevice.connect(http, a.url)
            ident = RawIdentity(address=f"guess@{a.host}")
            n = min(PREAUTH_FRAMES, 200 - len(answers))
            frames = [
                F.Register(
                    raw.next_rid(),
                    os.urandom(24),
                    ident.mailbox,
                    ident.auth_key,
                    raw.proof(ident),
                    ident.device_list(ident.address),
                )
                for _ in range(n)
            ]
            for fr in frames:
                await raw.send_bytes(fr.encode())
            answers += [await raw.recv() for _ in frames]
            await raw.close()
        elapsed = time.monotonic() - t0
        seen = Counter(f.code for f in answers if isinstance(f, F.Error))
        assert set(seen) == {"invalid_invite", "rate_limited"} and seen.total() == 200, seen
        # the store saw at most the burst plus what refilled (1/s) while the guesses ran
        assert seen["invalid_invite"] <= DEFAULTS.registrations_per_minute + elapsed + 1, seen
        st = (await stats(http, a.url))["errors"]
        assert st["client.rate_limited"] == 270 + seen["rate_limited"]

        # alice, another account, links a new device while the registration bucket is empty:
        # her mint_link is her own budget, and the new device's register is retried shortly.
        code: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        linker = asyncio.create_task(link_device(alice, code.set_result, timeout_s=30))
        laptop = Device(str(tmp_path / "alice-laptop"))
        assert await laptop.join(await code, name="laptop") == alice_addr
        await linker
        laptop.close()
        healthy(a)
    finally:
        alice.close()
        carol.close()


# ---- new-peer budget -----------------------------------------------------------------------------


def card(node_id: str, url: str) -> str:
    return CARD_PREFIX + b64e(packb({"node": node_id, "url": url, "owner": ""}))


async def test_minted_keys_share_one_budget_pinned_and_new_peers_still_get_in(
    tmp_path: Path, nodes: list[NodeProc], http: aiohttp.ClientSession
) -> None:
    a = NodeProc.create(tmp_path, "A")
    c = NodeProc.create(tmp_path, "C").start()
    nodes += [a, c]
    pinned = RawPeer(http, a.url)  # pinned from a contact card before A starts
    unused = f"http://127.0.0.1:{free_port()}"
    await asyncio.to_thread(
        haven, "node", "pin", "--home", str(a.home), card(pinned.key.node_id, unused)
    )
    a.start()
    alice, alice_addr = await device(a, tmp_path, "alice")
    carl, _ = await device(c, tmp_path, "carl")
    minted = [RawPeer(http, a.url) for _ in range(32)]
    for p in [pinned, *minted]:
        await p.handshake()
    flood: Counter[int] = Counter()
    stop = asyncio.Event()

    async def hammer(peer: RawPeer) -> None:
        while not stop.is_set():
            flood[(await peer.keys("alice", claim=False)).status] += 1

    try:
        t0 = time.monotonic()
        tasks = [asyncio.create_task(hammer(p)) for p in minted for _ in range(3)]
        await async_wait_until(
            lambda: asyncio.sleep(0, flood[429] > 500), what="the flood to be refused"
        )
        # The pinned peer keeps its own per-peer budget (burst 200) during the flood.
        mine = await asyncio.gather(*(pinned.keys("alice", claim=False) for _ in range(150)))
        assert [x.status for x in mine] == [200] * 150, Counter(x.code for x in mine)
        # A genuine new node's first contact: key queries and a batch, during the flood.
        sent = await carl.send(alice_addr, "hello from a new node")
        got = await receive_one(alice, lambda m: m.msg_id == sent.msg_id)
        assert got.text == "hello from a new node"
        stop.set()
        await asyncio.gather(*tasks)
        elapsed = time.monotonic() - t0
    finally:
        stop.set()
        alice.close()
        carl.close()
    budget = DEFAULTS.new_peer_burst + DEFAULTS.new_peer_rate * elapsed
    print(f"\nminted-key flood: {flood[200]} answered of {flood.total()} in {elapsed:.1f} s")
    assert set(flood) == {200, 429} and flood[200] <= budget + 1, (flood, budget)
    assert (await stats(http, a.url))["errors"]["federation.rate_limited"] >= flood[429]
    healthy(a)
    healthy(c)


# ---- pins bound to where the descriptor came from ----------------------------------------------


async def serve(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


def relabelling_proxy(
    http: aiohttp.ClientSession, target: str, home: Path, claimed_url: str
) -> web.Application:
    """Forwards everything to ``target``, but serves its descriptor (re-signed with the node's
    own key) naming ``claimed_url`` as its public URL."""
    key = load_node_key(str(home))

    async def descriptor(request: web.Request) -> web.Response:
        async with http.get(target + DESCRIPTOR_PATH, params=request.query) as r:
            real = Descriptor.verify_decode(await r.read())
        fake = Descriptor(
            real.node_id,
            claimed_url,
            real.version,
            real.now,
            real.limits,
            real.rotations,
            real.challenge,
        )
        return web.Response(body=fake.sign(key), content_type="application/msgpack")

    async def forward(request: web.Request) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower().startswith("haven-")}
        headers["Content-Type"] = request.headers.get("Content-Type", "")
        async with http.post(
            target + request.path, data=await request.read(), headers=headers
        ) as r:
            keep = {k: v for k, v in r.headers.items() if k.lower().startswith("haven-")}
            return web.Response(
                status=r.status, body=await r.read(), headers=keep, content_type=r.content_type
            )

    app = web.Application()
    app.router.add_get(DESCRIPTOR_PATH, descriptor)
    app.router.add_post("/{tail:.*}", forward)
    return app


async def test_descriptor_naming_another_host_does_not_move_traffic(
    tmp_path: Path, nodes: list[NodeProc], http: aiohttp.ClientSession
) -> None:
    hits: list[str] = []

    async def victim_handler(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=404)

    victim = web.Application()
    victim.router.add_route("*", "/{tail:.*}", victim_handler)
    victim_port, front_port, b_port = free_port(), free_port(), free_port()
    runners = [await serve(victim, victim_port)]
    # B is reached (for federation, and in its users' addresses) at the front host; its
    # devices use B directly.
    b = NodeProc(tmp_path / "B", b_port)
    front = f"http://127.0.0.1:{front_port}"
    init = ["node", "init", "--home", str(b.home), "--public-url", front]
    init += ["--listen", b.host, "--client-url", b.url]
    await asyncio.to_thread(haven, *init)
    a = NodeProc.create(tmp_path, "A").start()
    nodes += [a, b.start()]
    proxy = relabelling_proxy(http, b.url, b.home, f"http://127.0.0.1:{victim_port}")
    runners.append(await serve(proxy, front_port))
    alice, _ = await device(a, tmp_path, "alice")
    bob, bob_addr = await device(b, tmp_path, "bob")
    try:
        assert bob_addr == f"bob@127.0.0.1:{front_port}"
        for text in ("first", "second"):
            sent = await alice.send(bob_addr, text)
            got = await receive_one(bob, lambda m, s=sent: m.msg_id == s.msg_id)  # type: ignore[misc]
            assert got.text == text
    finally:
        alice.close()
        bob.close()
        for r in runners:
            await r.cleanup()
    assert hits == []  # nothing went to the host the descriptor named
    assert (await stats(http, a.url))["errors"]["peers.public_url_ignored"] >= 1
    log = healthy(a)
    assert log.count("names another public URL") == 1
    assert str(victim_port) not in log and str(front_port) not in log


# ---- key changed without a rotation --------------------------------------------------------------


async def test_key_change_is_a_warning_object_in_send_json(
    tmp_path: Path, nodes: list[NodeProc], http: aiohttp.ClientSession
) -> None:
    a = NodeProc.create(tmp_path, "A").start()
    b = NodeProc.create(tmp_path, "B").start()
    nodes += [a, b]
    alice, alice_addr = await device(a, tmp_path, "alice")
    bob, bob_addr = await device(b, tmp_path, "bob")
    try:
        sent = await alice.send(bob_addr, "hi bob")  # A pins B; alice has a session with bob
        assert (await receive_one(bob, lambda m: m.msg_id == sent.msg_id)).text == "hi bob"
    finally:
        alice.close()
        bob.close()
    b_id = json.loads(haven("node", "peers", "--home", str(a.home), "--json").stdout)[0]["node_id"]

    b.stop()  # an impostor takes B's host and port with a key of its own
    impostor = NodeProc(tmp_path / "impostor", b.port)
    init = ["node", "init", "--home", str(impostor.home), "--public-url", b.url]
    await asyncio.to_thread(haven, *init, "--listen", b.host)
    nodes.append(impostor.start())

    out = await asyncio.to_thread(
        haven, "send", "--home", str(tmp_path / "dev-alice"), bob_addr, "still you?", "--json"
    )
    res = json.loads(out.stdout)
    changed = [w for w in res["warnings"] if w["code"] == "peer_key_changed"]
    assert [w["peer"] for w in changed] == [b.host], res
    assert "warning: the node of " + b.host in out.stderr
    assert (await stats(http, a.url))["counts"]["outbox_envelopes"] == 1  # queued, not sent on
    view = json.loads(haven("node", "peers", "--home", str(a.home), "--json").stdout)
    assert [(p["node_id"], p["key_changed"]) for p in view] == [(b_id, True)]

    # The real B comes back: once its pinned key answers again the state is cleared.
    impostor.stop()
    b.start()
    bob = Device(str(tmp_path / "dev-bob"))
    try:
        await bob.send(alice_addr, "back")
    except HavenError:
        pass  # only B contacting A matters here: it wakes A's outbox for B

    async def cleared() -> bool:
        st = await stats(http, a.url)
        peers = json.loads(
            (
                await asyncio.to_thread(haven, "node", "peers", "--home", str(a.home), "--json")
            ).stdout
        )
        return st["counts"]["outbox_envelopes"] == 0 and not peers[0]["key_changed"]

    try:
        await async_wait_until(cleared, timeout=DEADLINE_S, what="A to deliver and clear the state")
    finally:
        bob.close()
    healthy(a)
