"""Device-list freshness and one-time-key counts, with real nodes on 127.0.0.1.

- A device linked while the sender could not reach the recipient's node still gets every
  message: the sender encrypts to the last verified list and says so (``device_list_stale``),
  and the recipient's devices on that list forward what it missed (``sync`` payloads).
- The node's count of one-time keys per device is brought back to a constant after claims, so
  a seized node cannot tell how many devices started sessions with each device.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from client.connection import NodeConnection, expect
from client.device import OTK_TARGET, Device
from federation import frames as F
from federation.signing import device_auth_message

from .harness import NodeProc, linked, new_device, wait_until

N_AWAY = 25  # the figure: 25 messages sent while the recipient's node was down


@pytest.fixture
def pair(tmp_path: Path, nodes: list[NodeProc]) -> tuple[NodeProc, NodeProc]:
    a = NodeProc.create(tmp_path, "A").start()
    b = NodeProc.create(tmp_path, "B").start()
    nodes += [a, b]
    return a, b


def incoming(dev: Device, peer: str) -> list[str]:
    return [r.text for r in dev.history(peer) if not r.outgoing]


async def settle(devs: list[Device], cond: Callable[[], bool], timeout: float = 40) -> None:
    """Receive on ``devs`` until ``cond()`` holds, or fail."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("devices did not reach the expected state in time")
        for d in devs:
            await d.receive(wait_s=0.2)


async def test_device_linked_while_recipient_node_was_down_gets_every_message(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice = await new_device(a, tmp_path / "a1", "alice")
    bob1 = await new_device(b, tmp_path / "b1", "bob")
    bob2 = await linked(bob1, tmp_path / "b2", "bob-laptop")
    devs = [alice, bob1, bob2]
    ad, bd = alice.address, bob1.address
    try:
        res = await alice.send(bd, "before the outage")
        assert res.devices[bd]["total"] == 2 and res.warnings == ()
        await settle([bob1, bob2], lambda: all(incoming(d, ad) for d in (bob1, bob2)))

        b.stop()
        away = [f"away-{i}" for i in range(N_AWAY)]
        conn = await alice.connect()
        try:
            for text in away:
                res = await alice.send(bd, text, conn=conn)
                # the honest answer: the last verified list (2 devices) was used, and why
                assert res.devices[bd]["total"] == 2
                assert [w.code for w in res.warnings] == ["device_list_stale"]
                assert res.warnings[0].peer == bd
        finally:
            await conn.__aexit__(None, None, None)
        assert a.status()["outbox_envelopes"] == 2 * N_AWAY

        b.start()
        # bob links a third device from bob2 while bob1 is offline; alice's node does not
        # know yet, and her envelopes (for bob1 and bob2 only) are still in her outbox
        bob3 = await linked(bob2, tmp_path / "b3", "bob-new-tablet")
        devs.append(bob3)
        await bob2.send(ad, "back online")  # B contacts A, which drains its outbox to B
        wait_until(lambda: a.status()["outbox_envelopes"] == 0, timeout=60, what="A's outbox")

        await settle(
            [bob1, bob2, bob3],
            lambda: (
                len(incoming(bob3, ad)) >= N_AWAY
                and len(incoming(bob1, ad)) == len(incoming(bob2, ad)) == N_AWAY + 1
            ),
        )
        for d in (bob1, bob2, bob3):
            await d.receive(wait_s=0.5)  # whatever is still in flight (a second forward)
        # every message once on every device, the new one included; bob3 was linked after
        # "before the outage" had been delivered, so that one is history it does not have
        assert sorted(incoming(bob3, ad)) == sorted(away)
        assert (
            sorted(incoming(bob1, ad))
            == sorted(incoming(bob2, ad))
            == sorted(["before the outage", *away])
        )
        # once the list is fresh again, alice reaches all three directly, with no warning
        res = await alice.send(bd, "after")
        assert res.devices[bd]["total"] == 3 and res.warnings == ()
        await settle(devs[1:], lambda: all(incoming(d, ad)[-1:] == ["after"] for d in devs[1:]))
        assert len(incoming(bob3, ad)) == N_AWAY + 1
    finally:
        for d in devs:
            d.close()


async def node_otk_count(dev: Device) -> int:
    """What the node holds for ``dev`` (``auth_ok.otk_count``), without topping up."""
    async with NodeConnection(dev.node_url) as conn:
        ch = conn.challenge
        assert ch is not None
        sig = dev._sign(device_auth_message(ch.node_id, ch.nonce, dev.mailbox))
        ok = expect(await conn.request(F.Auth(conn.next_rid(), dev.mailbox, sig)), F.AuthOk)
        return int(ok.otk_count)


async def test_one_time_keys_are_refilled_to_a_constant_count(
    tmp_path: Path, nodes: list[NodeProc]
) -> None:
    a = NodeProc.create(tmp_path, "A").start()
    nodes.append(a)
    bob = await new_device(a, tmp_path / "bob", "bob")
    senders = [await new_device(a, tmp_path / n, n) for n in ("carol", "dave", "erin", "frank")]
    late = [await new_device(a, tmp_path / n, n) for n in ("gina", "hal")]
    devs = [bob, *senders, *late]
    try:
        assert await node_otk_count(bob) == OTK_TARGET
        # four devices start sessions while bob is offline: each claims one key
        for s in senders:
            await s.send(bob.address, f"hi from {s.address}")
        assert await node_otk_count(bob) == OTK_TARGET - len(senders)  # claims since top-up

        # on connect bob tops up to the constant again
        got = await bob.receive(wait_s=0.5)
        assert sorted(m.text for m in got) == sorted(f"hi from {s.address}" for s in senders)
        assert await node_otk_count(bob) == OTK_TARGET

        # while bob is connected: the batch that used keys is followed by a top-up
        conn = await bob.connect()
        try:
            for s in late:
                await s.send(bob.address, f"hi from {s.address}")
            seen: list[str] = []

            async def two() -> bool:
                seen.extend(m.text for m in await bob.process(conn, await conn.deliveries.get()))
                return len(seen) >= len(late)

            async with asyncio.timeout(20):  # bob did not receive both messages in time
                while not await two():
                    pass
            ok = expect(await conn.request(F.PublishKeys(conn.next_rid(), (), (), None)), F.Ok)
            assert ok.otk_count == OTK_TARGET
        finally:
            await conn.__aexit__(None, None, None)
        assert await node_otk_count(bob) == OTK_TARGET
        # and the senders, whose keys nobody claimed, still hold exactly the constant
        for s in senders + late:
            assert await node_otk_count(s) == OTK_TARGET
    finally:
        for d in devs:
            d.close()
