"""``haven demo``: two throwaway nodes on loopback, two users, a federated exchange, cleanup."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile

from .device import Device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_demo() -> int:
    from node.app import build
    from node.cli import create_invite, init_node

    base = tempfile.mkdtemp(prefix="haven-demo-")
    stops: list[asyncio.Event] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        nodes = {}
        for label in ("A", "B"):
            port = _free_port()
            home = os.path.join(base, label)
            init_node(home, f"http://127.0.0.1:{port}", f"127.0.0.1:{port}", 7 * 86_400_000, False)
            node = build(home)
            stop = asyncio.Event()
            stops.append(stop)
            tasks.append(asyncio.create_task(node.run(stop)))
            await node.ready.wait()
            nodes[label] = node
            print(
                f"1. node {label} running at {node.config.public_url} (id {node.key.node_id[:12]}…)"
            )

        async def counts(label: str) -> str:
            c = await nodes[label].store.counts()
            return f"pending={c['pending_envelopes']} outbox={c['outbox_envelopes']}"

        alice = Device(os.path.join(base, "alice"))
        bob = Device(os.path.join(base, "bob"))
        a_addr = await alice.join(await create_invite(nodes["A"].home, "alice", 600_000))
        b_addr = await bob.join(await create_invite(nodes["B"].home, "bob", 600_000))
        print(f"2. alice joined as {a_addr}; bob joined as {b_addr}")

        await alice.send(b_addr, "Hi Bob! Only your device can read this.")
        await alice.send(b_addr, "Node B holds it only until you pick it up.")
        print("3. alice sent 2 messages; bob is offline")
        for _ in range(200):
            if (await nodes["B"].store.counts())["pending_envelopes"] == 2:
                break
            await asyncio.sleep(0.05)
        print(f"   node A: {await counts('A')}   node B: {await counts('B')}")

        for m in await bob.receive(wait_s=1.0):
            if m.kind == "text":
                print(f"4. bob received from {m.sender}: {m.text!r}")
        await bob.send(a_addr, "Got both. Nice to see nothing is kept.")
        for m in await alice.receive(wait_s=1.0):
            if m.kind == "text":
                print(f"5. alice received from {m.sender}: {m.text!r}")
        await bob.receive(wait_s=1.0)  # picks up alice's delivered receipt
        for row in bob.history(a_addr):
            if row.outgoing:
                status = ["sent", "delivered", "read"][row.status]
                print(f"   bob's history: {row.text!r} is {status} (an end-to-end receipt)")
        print(f"6. after delivery  node A: {await counts('A')}   node B: {await counts('B')}")
        alice.close()
        bob.close()
        print("7. done; removing the throwaway nodes")
        return 0
    finally:
        for s in stops:
            s.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        shutil.rmtree(base, ignore_errors=True)
