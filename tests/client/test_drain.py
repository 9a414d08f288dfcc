"""The batched drain (``Device.process``), with a real node: a backlog from two senders with
forged envelopes in the middle, a duplicate and an edit, handled as ONE batch: every good
message stored once, in order; the forgeries dropped without losing the others; the sessions
saved once at the end still decrypt what comes next."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from client.connection import NodeConnection, expect
from client.device import Device
from federation import frames as F
from federation.devicelist import SignedDeviceList
from federation.ids import new_envelope_id
from federation.sealing import SealedContent, seal
from federation.wire import Envelope
from tests.integration.harness import NodeProc

from .devworld import incoming, node_with, settle

PER_SENDER = 20


async def forge(alice: Device, conn: NodeConnection, bob: str, device_key: str) -> None:
    """An envelope sealed to bob's device claiming to be from ``alice`` with ``device_key``,
    holding an Olm message no session of bob's can open."""
    c = alice.state.contact(bob)
    assert c is not None
    (dev,) = SignedDeviceList(c.device_list, c.sig).open(expected_address=bob).devices
    body = seal(dev.sealing, SealedContent(alice.address, device_key, 1, os.urandom(120)))
    env = Envelope(new_envelope_id(), dev.mailbox, alice.clock.now_ms() + 60_000, body)
    ans = expect(await conn.request(F.Send(conn.next_rid(), ((c.node_id, env),))), F.Accepted)
    assert not ans.rejected


async def collect(conn: NodeConnection, n: int) -> list[Envelope]:
    """Everything the node pushes until ``n`` envelopes arrived (without acking them)."""
    envs: list[Envelope] = []
    async with asyncio.timeout(30):
        while len(envs) < n:
            envs += await conn.deliveries.get()
    return envs


async def test_one_batch_from_two_senders_with_forgeries(tmp_path: Path, node_a: NodeProc) -> None:
    # bob is offline from here on, until the drain
    _node, (alice, carol, bob) = await node_with(node_a, tmp_path, "alice", "carol", "bob")

    a_conn, c_conn = await alice.connect(), await carol.connect()
    try:
        a_ids = []
        for i in range(PER_SENDER):
            a_ids.append((await alice.send(bob.address, f"a{i}", conn=a_conn)).msg_id)
            await carol.send(bob.address, f"c{i}", conn=c_conn)
            if i == PER_SENDER // 2:
                await forge(alice, a_conn, bob.address, alice.curve_key)  # undecryptable
                await forge(alice, a_conn, bob.address, carol.curve_key)  # not alice's device
        await alice.edit(bob.address, a_ids[3], "a3 edited")  # in the same backlog
    finally:
        await alice.release(a_conn)
        await carol.release(c_conn)

    total = 2 * PER_SENDER + 2 + 1
    b_conn = await bob.connect()
    try:
        envs = await collect(b_conn, total)
        envs.insert(5, envs[4])  # a redelivered envelope inside the same batch
        got = await bob.process(b_conn, envs)
    finally:
        await bob.release(b_conn)

    texts = [m for m in got if m.kind == "text"]
    assert len(texts) == 2 * PER_SENDER  # once each; the forgeries are not among them
    want_a = [f"a{i}" for i in range(PER_SENDER)]
    want_a[3] = "a3 edited"
    assert incoming(bob, alice.address) == want_a
    assert incoming(bob, carol.address) == [f"c{i}" for i in range(PER_SENDER)]
    assert [m.kind for m in got].count("edit") == 1

    # The sessions saved at the end of the batch decrypt what comes next, both ways.
    await alice.send(bob.address, "after the drain")
    await bob.send(alice.address, "reply")
    await settle([bob], lambda: incoming(bob, alice.address)[-1:] == ["after the drain"])
    await settle([alice], lambda: incoming(alice, bob.address) == ["reply"])
    for d in (alice, bob, carol):
        d.close()


async def test_a_batch_survives_a_reopen(tmp_path: Path, node_a: NodeProc) -> None:
    """The batch is one transaction: after it, a fresh process on the home sees all of it."""
    _node, (alice, bob) = await node_with(node_a, tmp_path, "alice", "bob")
    conn = await alice.connect()
    try:
        for i in range(10):
            await alice.send(bob.address, f"m{i}", conn=conn)
    finally:
        await alice.release(conn)
    await settle([bob], lambda: len(incoming(bob, alice.address)) == 10)
    bob.close()
    again = Device(bob.home)
    assert incoming(again, alice.address) == [f"m{i}" for i in range(10)]
    await alice.send(again.address, "next")
    await settle([again], lambda: incoming(again, alice.address)[-1:] == ["next"])
    again.close()
    alice.close()
