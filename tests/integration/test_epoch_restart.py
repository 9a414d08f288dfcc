"""A node stopped for longer than an epoch still delivers every pending envelope after restart.

Real ``haven node serve`` processes on 127.0.0.1. The clean stop re-seals what is pending under a
fresh at-rest key and destroys the others; the restart, three epochs later (the test-only clock
switch ``--clock-offset`` with ``HAVEN_TEST_CLOCK=1``), re-seals it again under that epoch's key
and destroys the stopped node's key; delivery then leaves no key at all.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from client.device import Device

from .harness import ROOT, NodeProc, wait_until

EPOCH_MS = 600_000  # the default epoch_ms


def slot_keys(path: Path) -> set[bytes]:
    """The live keys in an epochs.key file (40-byte slots: 8-byte epoch + 32-byte key)."""
    data = path.read_bytes()
    return {data[i + 8 : i + 40] for i in range(0, len(data), 40) if any(data[i : i + 8])}


def start_shifted(node: NodeProc, offset: str) -> NodeProc:
    """``NodeProc.start`` with the test-only clock switch."""
    logf = open(node.log, "ab")
    node.proc = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "node", "serve", "--home", str(node.home), offset],
        stdout=logf,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "HAVEN_TEST_CLOCK": "1"},
    )
    logf.close()
    wait_until(node._listening, 20, f"node {node.home.name} to listen")
    return node


def clock_offset(minutes: int) -> str:
    return f"--clock-offset=+{minutes}m"


async def test_node_stopped_longer_than_an_epoch_delivers_everything(
    tmp_path: Path, nodes: list[NodeProc]
) -> None:
    node = NodeProc.create(tmp_path, "A")
    assert f"epoch_ms = {EPOCH_MS}" in (node.home / "node.toml").read_text()
    nodes.append(node.start())
    key_file = node.home / "epochs.key"
    alice, bob, carol = (Device(str(tmp_path / n)) for n in ("alice", "bob", "carol"))
    try:
        await alice.join(node.invite("alice"))
        bob_addr = await bob.join(node.invite("bob"))
        carol_addr = await carol.join(node.invite("carol"))
        conn = await alice.connect()
        try:
            for i in range(8):
                await alice.send(bob_addr, f"to bob {i}", conn=conn)
                await alice.send(carol_addr, f"to carol {i}", conn=conn)
        finally:
            await conn.__aexit__(None, None, None)
        assert node.status()["pending_envelopes"] == 16  # an offline command: keys untouched
        live = slot_keys(key_file)
        assert len(live) == 1

        node.stop()  # clean shutdown: pending re-sealed under a fresh key, every other destroyed
        stopped = slot_keys(key_file)
        assert len(stopped) == 1 and not stopped & live

        start_shifted(node, clock_offset(3 * EPOCH_MS // 60_000))  # three epochs later
        wait_until(
            lambda: len(slot_keys(key_file)) == 1 and not slot_keys(key_file) & stopped,
            what="the start to re-seal under this epoch's key and destroy the stopped one's",
        )
        got_bob = sorted(m.text for m in await bob.receive(wait_s=1.0))
        got_carol = sorted(m.text for m in await carol.receive(wait_s=1.0))
        assert got_bob == sorted(f"to bob {i}" for i in range(8))
        assert got_carol == sorted(f"to carol {i}" for i in range(8))
        await alice.receive(wait_s=0.5)  # bob's and carol's devices answered alice's sessions
        wait_until(
            lambda: node.stats()["counts"]["pending_envelopes"] == 0, what="everything delivered"
        )
        wait_until(lambda: not any(key_file.read_bytes()), what="no key once nothing is pending")
        node.stop()
        assert not any(key_file.read_bytes())  # a stopped node with nothing pending: no key
    finally:
        for d in (alice, bob, carol):
            d.close()
