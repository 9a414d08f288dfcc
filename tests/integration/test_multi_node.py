"""Group fan-out across three real nodes (docs/protocol.md §11.3-11.4), driven by raw devices.

Node A (sender's home) and B list ``"multi"``; C runs with ``multi = false``, as a node without
the feature (a "v1 peer"). Alice's device on A asks for the keys of members on all three nodes
in one ``query_keys_multi`` (A asks B once with ``/keys_multi`` and C name by name with
``/keys``), then submits one ``send_multi`` for recipient devices on A, B and C: every device
gets exactly its composed copy once and opens it; A sends B one ``/multi`` request and C
per-device envelopes (``/batch``). Bad input gets stable codes and stores nothing; an
``accepted`` id survives a kill -9 of the home node.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from client.device import parse_invite
from federation import frames as F
from federation.fanout import KEYS_MULTI_PATH, MULTI_PATH, MultiBatch
from federation.multi import (
    FEATURE,
    HEADER_LEN,
    INNER_MEGOLM,
    MAX_RECIPIENTS,
    GroupInner,
    Sealed,
    open_copy,
    seal_multi,
)
from federation.signing import H_SIG, b64e
from federation.wire import packb

from .harness import NodeProc, async_wait_until
from .rawpeer import RawDevice, RawIdentity, RawPeer, now_ms, set_node_config, stats

TTL = 3_600_000


@dataclass
class World:
    a: NodeProc
    b: NodeProc
    c: NodeProc  # multi = false: a node without the feature
    ids: dict[str, str]  # node name -> node id
    alice: RawIdentity
    members: dict[str, RawIdentity]  # a1 on A, b1 b2 on B, c1 c2 on C


async def register(node: NodeProc, name: str) -> RawIdentity:
    """A raw device registered by invite (at the invite's host), two one-time keys published."""
    inv = parse_invite(node.invite(name))
    ident = RawIdentity(address=f"{inv['name']}@{inv['host']}")
    async with aiohttp.ClientSession() as http:
        dev = await RawDevice.connect(http, node.url)
        reg = await dev.register(ident, inv["t"], ident.address)
        assert isinstance(reg, F.Registered), reg
        ok = await dev.request(F.PublishKeys(dev.next_rid(), ident.one_time_keys(2)))
        assert isinstance(ok, F.Ok) and ok.otk_count == 2, ok
        await dev.close()
    return ident


async def node_id_of(node: NodeProc) -> str:
    async with aiohttp.ClientSession() as http:
        dev = await RawDevice.connect(http, node.url)
        await dev.close()
    return dev.challenge.node_id


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("multi")
    a, b, c = (NodeProc.create(base, n) for n in ("a", "b", "c"))
    set_node_config(c.home, multi=False)
    for n in (a, b, c):
        n.start()
    try:

        async def setup() -> World:
            ids = {k: await node_id_of(n) for k, n in (("a", a), ("b", b), ("c", c))}
            alice = await register(a, "alice")
            members = {}
            for name, node in (("a1", a), ("b1", b), ("b2", b), ("c1", c), ("c2", c)):
                members[name] = await register(node, name)
            return World(a, b, c, ids, alice, members)

        yield asyncio.run(setup())
        for n in (a, b, c):
            assert n.proc is not None and n.proc.poll() is None, f"node {n.home.name} died"
    finally:
        for n in (a, b, c):
            n.stop()
    for n in (a, b, c):
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


def events(s: dict[str, Any], name: str) -> int:
    return int(s["events"].get(name, 0))


def sealed_for(w: World, names: list[str], text: bytes = b"hello group") -> Sealed:
    inner = GroupInner(INNER_MEGOLM, w.alice.address, "alice-device", text)
    return seal_multi(inner, [bytes(w.members[n].sealing.public_key) for n in names])


def send_multi(
    rid: int, sealed: Sealed, dests: list[tuple[str, list[tuple[bytes, bytes, bytes]]]]
) -> F.SendMulti:
    return F.SendMulti(
        rid,
        sealed.eph,
        now_ms() + TTL,
        sealed.gbody,
        tuple((node_id, tuple(recips)) for node_id, recips in dests),
    )


async def delivered(dev: RawDevice, want: int) -> list[Any]:
    """Envelopes pushed to ``dev`` until ``want`` arrived (each acked)."""
    got: list[Any] = []
    async with asyncio.timeout(20):
        while len(got) < want:
            frame, _ = await dev.recv_sized()
            if isinstance(frame, F.Deliver):
                got.extend(frame.envs)
                await dev.send_bytes(F.Ack(tuple(e.id for e in frame.envs)).encode())
    return got


async def test_features_are_advertised(world: World, http: aiohttp.ClientSession) -> None:
    for node, has in ((world.a, True), (world.b, True), (world.c, False)):
        dev = await RawDevice.connect(http, node.url)
        assert (FEATURE in dev.challenge.features) is has
        await dev.close()
        peer = RawPeer(http, node.url)
        desc = await peer.handshake()
        assert (FEATURE in desc.features) is has


async def test_query_keys_multi_one_call_per_node(
    world: World, http: aiohttp.ClientSession
) -> None:
    w = world
    before = {k: await stats(http, n.url) for k, n in (("a", w.a), ("b", w.b), ("c", w.c))}
    asked = [
        w.members["a1"].address,
        w.members["b1"].address,
        w.members["b2"].address,
        f"nobody@{w.b.host}",
        w.members["c1"].address,
        w.members["c2"].address,
        f"nobody@{w.c.host}",
        "not an address",
    ]
    dev = await signed_in(http, w.a, w.alice)
    ans = await dev.request(F.QueryKeysMulti(dev.next_rid(), tuple(asked), True))
    await dev.close()
    assert isinstance(ans, F.KeysMulti), ans
    assert [r[0] for r in ans.results] == asked  # in the order asked
    codes = [r[4] for r in ans.results]
    assert codes == ["", "", "", "not_found", "", "", "not_found", "malformed"]
    node_of = {"a1": "a", "b1": "b", "b2": "b", "c1": "c", "c2": "c"}
    for (address, node_id, dl, claimed, _), name in zip(
        ans.results[:7], ["a1", "b1", "b2", "", "c1", "c2", ""], strict=True
    ):
        if not name:
            assert node_id == "" and dl is None and claimed == {}
            continue
        assert node_id == w.ids[node_of[name]]
        assert dl is not None and dl.open(expected_address=address).devices[0].mailbox == (
            w.members[name].mailbox
        )
        assert len(claimed) == 1  # one one-time key per hosted device
    after = {k: await stats(http, n.url) for k, n in (("a", w.a), ("b", w.b), ("c", w.c))}

    def delta(node: str, name: str) -> int:
        return events(after[node], name) - events(before[node], name)

    assert delta("a", "keys_multi.requests_out") == 1  # B only: C has no "multi"
    assert delta("b", "keys_multi.requests_in") == 1  # b1, b2 and nobody in one call
    assert delta("c", "keys_multi.requests_in") == 0
    assert after["c"]["counts"] == before["c"]["counts"]  # a key query stores nothing new


async def test_send_multi_fans_out(world: World, http: aiohttp.ClientSession) -> None:
    w = world
    # the keys query above pinned B and C at A (as a device's setup does)
    names = ["a1", "b1", "b2", "c1", "c2"]
    homes = {"a1": w.a, "b1": w.b, "b2": w.b, "c1": w.c, "c2": w.c}
    devs = {n: await signed_in(http, homes[n], w.members[n]) for n in names}
    before = {k: await stats(http, n.url) for k, n in (("a", w.a), ("b", w.b), ("c", w.c))}
    sealed = sealed_for(w, names)
    env_ids = {n: os.urandom(16) for n in names}
    recips = {n: (env_ids[n], w.members[n].mailbox, sealed.headers[i]) for i, n in enumerate(names)}
    dests = [
        (w.ids["a"], [recips["a1"]]),
        (w.ids["b"], [recips["b1"], recips["b2"]]),
        (w.ids["c"], [recips["c1"], recips["c2"]]),
    ]
    sender = await signed_in(http, w.a, w.alice)
    ans = await sender.request(send_multi(sender.next_rid(), sealed, dests))
    assert isinstance(ans, F.Accepted), ans
    assert sorted(ans.ids) == sorted(env_ids.values()) and ans.rejected == ()
    for i, n in enumerate(names):
        (env,) = await delivered(devs[n], 1)
        assert env.id == env_ids[n] and env.to == w.members[n].mailbox
        assert env.body == sealed.copy_for(i)
        ident = w.members[n]
        inner = open_copy(bytes(ident.sealing), bytes(ident.sealing.public_key), env.body)
        assert inner.data == b"hello group" and inner.sender == w.alice.address

    async def settled() -> bool:
        s = {k: await stats(http, n.url) for k, n in (("a", w.a), ("b", w.b), ("c", w.c))}
        return all(s[k]["counts"]["outbox_envelopes"] == 0 for k in s) and all(
            s[k]["counts"]["pending_envelopes"] == 0 for k in ("b", "c")
        )

    await async_wait_until(settled, what="outboxes to drain and copies to be acked")
    after = {k: await stats(http, n.url) for k, n in (("a", w.a), ("b", w.b), ("c", w.c))}

    def delta(node: str, name: str) -> int:
        return events(after[node], name) - events(before[node], name)

    assert delta("a", "multi.submissions") == 1 and delta("a", "multi.recipients") == 5
    assert delta("a", "multi.requests_out") == 1  # to B; C got per-device envelopes
    assert delta("b", "multi.requests_in") == 1
    assert delta("b", "federation.envelopes_in") == 2
    assert delta("c", "multi.requests_in") == 0
    assert delta("c", "federation.envelopes_in") == 2  # by /batch
    # exactly once: no second delivery before the answer to a later frame
    for n in names:
        dev = devs[n]
        await dev.send_bytes(F.PublishKeys(dev.next_rid()).encode())
        frame, _ = await dev.recv_sized()
        assert isinstance(frame, F.Ok), frame
        await dev.close()
    await sender.close()


async def test_send_multi_bad_input(world: World, http: aiohttp.ClientSession) -> None:
    w = world
    sender = await signed_in(http, w.a, w.alice)
    before = await stats(http, w.a.url)
    sealed = sealed_for(w, ["a1", "b1"])
    a1, b1 = w.members["a1"], w.members["b1"]
    same_id = os.urandom(16)
    cases: list[tuple[Any, str]] = [
        (  # the same envelope id twice
            send_multi(
                sender.next_rid(),
                sealed,
                [
                    (w.ids["a"], [(same_id, a1.mailbox, sealed.headers[0])]),
                    (w.ids["b"], [(same_id, b1.mailbox, sealed.headers[1])]),
                ],
            ),
            "malformed",
        ),
        (  # the same mailbox twice
            send_multi(
                sender.next_rid(),
                sealed,
                [
                    (
                        w.ids["a"],
                        [
                            (os.urandom(16), a1.mailbox, sealed.headers[0]),
                            (os.urandom(16), a1.mailbox, sealed.headers[1]),
                        ],
                    )
                ],
            ),
            "malformed",
        ),
        (  # more recipients than allowed
            send_multi(
                sender.next_rid(),
                sealed,
                [
                    (node, [(os.urandom(16), os.urandom(16), sealed.headers[0]) for _ in range(n)])
                    for node, n in ((w.ids["a"], 1000), (w.ids["b"], MAX_RECIPIENTS + 1 - 1000))
                ],
            ),
            "too_large",
        ),
        (  # more than allowed for one node
            send_multi(
                sender.next_rid(),
                sealed,
                [
                    (
                        w.ids["b"],
                        [
                            (os.urandom(16), os.urandom(16), sealed.headers[0])
                            for _ in range(MAX_RECIPIENTS + 1)
                        ],
                    )
                ],
            ),
            "too_large",
        ),
        (  # a header one byte short
            {
                "t": "send_multi",
                "rid": sender.next_rid(),
                "eph": sealed.eph,
                "expires": now_ms() + TTL,
                "body": sealed.gbody,
                "dests": [[w.ids["a"], [[os.urandom(16), a1.mailbox, bytes(HEADER_LEN - 1)]]]],
            },
            "malformed",
        ),
    ]
    for frame, code in cases:
        ans = await sender.request(frame)
        assert isinstance(ans, F.Error) and ans.code == code, (code, ans)
    # per envelope, like send: an unknown node, a mailbox nobody has
    bad_node, nobody = os.urandom(16), os.urandom(16)
    ans = await sender.request(
        send_multi(
            sender.next_rid(),
            sealed,
            [
                ("n" * 52, [(bad_node, b1.mailbox, sealed.headers[1])]),
                (w.ids["a"], [(nobody, os.urandom(16), sealed.headers[0])]),
            ],
        )
    )
    assert isinstance(ans, F.Accepted) and ans.ids == (), ans
    assert sorted(ans.rejected) == sorted(
        [(bad_node, "unknown_destination"), (nobody, "not_found")]
    )
    await sender.close()
    after = await stats(http, w.a.url)
    assert after["counts"] == before["counts"]  # nothing stored
    assert events(after, "multi.submissions") == events(before, "multi.submissions") + 1
    # a node without the feature refuses the frames harmlessly
    c1 = await signed_in(http, w.c, w.members["c1"])
    for frame in (
        send_multi(
            c1.next_rid(), sealed, [(w.ids["c"], [(os.urandom(16), nobody, sealed.headers[0])])]
        ),
        F.QueryKeysMulti(c1.next_rid(), (w.members["c2"].address,), False),
    ):
        ans = await c1.request(frame)
        assert isinstance(ans, F.Error) and ans.code == "unknown_frame", ans
    await c1.close()


async def test_federation_multi_bad_input(world: World, http: aiohttp.ClientSession) -> None:
    w = world
    sealed = sealed_for(w, ["b1"])
    peer = RawPeer(http, w.b.url)
    await peer.handshake()
    before = await stats(http, w.b.url)
    nobody = os.urandom(16)

    def body(recips: list[tuple[bytes, bytes, bytes]]) -> bytes:
        return MultiBatch(sealed.eph, now_ms() + TTL, sealed.gbody, tuple(recips)).encode()

    good = body([(os.urandom(16), nobody, sealed.headers[0])])
    req = peer.sign(MULTI_PATH, good)
    first = await peer.post_raw(MULTI_PATH, good, peer.headers(req), req)
    assert first.status == 200, first.body
    peer.check_signed(first)
    assert first.body["accepted"] == [] and first.body["rejected"][0][1] == "not_found"
    again = await peer.post_raw(MULTI_PATH, good, peer.headers(req), req)
    assert again.code == "replay"
    forged = peer.sign(MULTI_PATH, good)
    sig = bytearray(forged.signature)
    sig[17] ^= 0x01
    bad_sig = peer.headers(forged, **{H_SIG: b64e(bytes(sig))})
    assert (await peer.post_raw(MULTI_PATH, good, bad_sig)).code == "bad_signature"
    twice = os.urandom(16)
    dup = body([(twice, nobody, sealed.headers[0]), (twice, os.urandom(16), sealed.headers[0])])
    assert (await peer.post(MULTI_PATH, dup)).code == "malformed"
    short = packb(
        {
            "eph": sealed.eph,
            "expires": now_ms() + TTL,
            "body": sealed.gbody,
            "recips": [[os.urandom(16), nobody, bytes(HEADER_LEN - 1)]],
        }
    )
    assert (await peer.post(MULTI_PATH, short)).code == "malformed"
    after = await stats(http, w.b.url)
    assert after["counts"] == before["counts"]  # nothing stored
    # a node without the feature: 404 not_found on both endpoints
    v1 = RawPeer(http, w.c.url)
    await v1.handshake()
    for path, payload in (
        (MULTI_PATH, good),
        (KEYS_MULTI_PATH, packb({"names": ["c1"], "claim": False})),
    ):
        answer = await v1.post(path, payload)
        assert answer.status == 404 and answer.code == "not_found", path


async def test_accepted_survives_kill(world: World, http: aiohttp.ClientSession) -> None:
    w = world
    sealed = sealed_for(w, ["a1"], b"durable")
    eid = os.urandom(16)
    sender = await signed_in(http, w.a, w.alice)
    ans = await sender.request(
        send_multi(
            sender.next_rid(),
            sealed,
            [(w.ids["a"], [(eid, w.members["a1"].mailbox, sealed.headers[0])])],
        )
    )
    assert isinstance(ans, F.Accepted) and ans.ids == (eid,), ans
    w.a.kill()  # SIGKILL right after the answer
    w.a.start()
    a1 = await signed_in(http, w.a, w.members["a1"])
    (env,) = await delivered(a1, 1)
    assert env.id == eid and env.body == sealed.copy_for(0)
    await a1.close()
