"""TTL expiry with an injected clock, on a real node serving on 127.0.0.1 in this process."""

from __future__ import annotations

import asyncio
from pathlib import Path

from client.device import Device
from federation.clock import FakeClock, SystemClock
from node.app import Node, load_node_key, open_store
from node.cli import create_invite, init_node
from node.config import NodeConfig

from .harness import async_wait_until, free_port


async def start_node(
    home: Path, clock: FakeClock
) -> tuple[Node, asyncio.Event, asyncio.Task[None]]:
    port = free_port()
    init_node(str(home), f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", 7 * 86_400_000, False)
    config = NodeConfig.load(str(home))
    node = Node(str(home), config, load_node_key(str(home)), clock, open_store(str(home), config))
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    await node.ready.wait()
    return node, stop, task


async def two_users(node: Node, base: Path, clock: FakeClock) -> tuple[Device, Device, str]:
    """alice and bob on ``node``, both on the injected clock; returns bob's address too."""
    alice = Device(str(base / "alice"), clock=clock)
    bob = Device(str(base / "bob"), clock=clock)
    await alice.join(await create_invite(node.home, "alice", 600_000))
    return alice, bob, await bob.join(await create_invite(node.home, "bob", 600_000))


async def test_undelivered_envelope_expires_at_ttl(tmp_path: Path) -> None:
    clock = FakeClock(start_ms=SystemClock().now_ms())
    node, stop, task = await start_node(tmp_path / "node", clock)
    try:
        alice, bob, bob_addr = await two_users(node, tmp_path, clock)
        await alice.send(bob_addr, "short-lived", ttl_ms=60_000)
        await alice.send(bob_addr, "long-lived", ttl_ms=3_600_000)
        assert (await node.store.counts())["pending_envelopes"] == 2

        clock.advance(59_000)
        await node.sweeper.tick()
        assert (await node.store.counts())["pending_envelopes"] == 2  # not yet

        clock.advance(12_000)  # past expiry and past the sweep interval
        await async_wait_until(
            lambda: _pending_is(node, 1), what="the sweeper to expire the short-lived envelope"
        )
        got = await bob.receive(wait_s=0.5)
        assert [m.text for m in got] == ["long-lived"]

        alice.close()
        bob.close()
    finally:
        stop.set()
        await task


async def _pending_is(node: Node, n: int) -> bool:
    return (await node.store.counts())["pending_envelopes"] == n


async def test_epoch_keys_rotate_on_a_running_node(tmp_path: Path) -> None:
    """An hour later the pending envelope is re-sealed, the old key destroyed, delivery works."""
    clock = FakeClock(start_ms=SystemClock().now_ms())
    node, stop, task = await start_node(tmp_path / "node", clock)
    try:
        alice, bob, bob_addr = await two_users(node, tmp_path, clock)
        await alice.send(bob_addr, "waits across an epoch")
        keys = node.store.keys  # type: ignore[attr-defined]
        first = keys.epochs
        key_file = tmp_path / "node" / "epochs.key"
        old_bytes = key_file.read_bytes()
        clock.advance(3_600_000 + 11_000)
        await async_wait_until(lambda: _rotated(keys, first), what="epoch rotation")
        assert len(keys.epochs) == 1 and keys.epochs[0] > first[-1]
        new_bytes = key_file.read_bytes()
        for i in range(0, len(old_bytes), 40):  # every old key slot is gone from the file
            old_key = old_bytes[i + 8 : i + 40]
            if any(old_key):
                assert old_key not in new_bytes
        got = await bob.receive(wait_s=0.5)
        assert [m.text for m in got] == ["waits across an epoch"]
        alice.close()
        bob.close()
    finally:
        stop.set()
        await task


async def _rotated(keys: object, first: list[int]) -> bool:
    """The new key exists *and* the old one is destroyed (re-sealing finished)."""
    epochs: list[int] = getattr(keys, "epochs")  # noqa: B009
    return len(epochs) == 1 and epochs[0] > first[-1]
