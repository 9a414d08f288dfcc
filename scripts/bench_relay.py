"""The ``scripts/bench`` section ``relay`` (issue 14): federation through a relay next to direct.

Four nodes on 127.0.0.1, in one run: A (alice's home, the sender), B (bob's home, reached
directly), a relay R (``relay = true``, ``relay_domain = "relay.test"``) and C (carol's home, a
client of R made with ``haven node init --via-relay``, reached only as
``<label>.relay.test:<R's port>``: A connects to R, R forwards over C's link). The same driver
as ``federated`` (raw envelopes, one per frame, 256 in flight, at most ``FED_IN_TRANSIT`` in
transit) runs A -> B, then A -> C, and reports both, ``throughput_ratio`` (relayed / direct)
and ``added_p50_ms`` / ``added_p99_ms`` (relayed - direct, paced latency send -> receiving
socket).

Only A needs to resolve ``<label>.relay.test``: it runs in a mount namespace of its own (``unshare
-m``) whose ``/etc/hosts`` is a bind-mounted file naming 127.0.0.1 for that host, as the NAT
test world's per-namespace hosts files do. No other address is used. Needs root (as the NAT
tests do); without it the section reports ``skipped``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench_node import (
    ROOT,
    NodeProc,
    Receiver,
    Sender,
    _children,
    _die_with_parent,
    child_env,
    free_port,
    haven,
    log,
)
from bench_sections import BENCH_CONFIG, FED_IN_TRANSIT, INFLIGHT, _strip_window, message_run

from client.device import Device

RELAY_DOMAIN = "relay.test"
# the wrapper run by ``unshare -m``: private /etc/hosts for this process tree only
HOSTS_WRAPPER = 'mount --bind "$0" /etc/hosts && exec "$@"'


class HostsNode(NodeProc):
    """A bench node whose process sees ``hosts`` as its ``/etc/hosts`` (a mount namespace)."""

    hosts: Path | None = None

    def start(self, clock_offset_ms: int = 0) -> NodeProc:
        """Serve in a private mount namespace; returns once the node listens."""
        assert self.hosts is not None
        logf = open(self.home.parent / f"{self.home.name}.log", "ab")
        cmd = [sys.executable, "-m", "client.cli", "node", "serve", "--home", str(self.home)]
        wrapped = ["unshare", "-m", "--propagation", "private", "sh", "-c", HOSTS_WRAPPER]
        self.proc = subprocess.Popen(
            [*wrapped, str(self.hosts), *cmd],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=child_env(),
            preexec_fn=_die_with_parent,
        )
        _children.append(self.proc)
        logf.close()
        _wait_listening(self)
        return self


def _wait_listening(node: NodeProc) -> None:
    import socket

    assert node.proc is not None
    deadline = time.monotonic() + 30
    while True:
        if node.proc.poll() is not None:
            raise RuntimeError(f"node {node.home.name} exited early (see its log)")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", node.port)) == 0:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"node {node.home.name} did not listen in time")
        time.sleep(0.05)


def _relay_world(base: Path) -> tuple[NodeProc, NodeProc, NodeProc, NodeProc]:
    """A (hosts-file node), B (direct), R (relay), C (R's client); none started."""
    r = NodeProc.create(base, "relay-r", **BENCH_CONFIG, relay=True, relay_domain=RELAY_DOMAIN)
    code = json.loads(haven("node", "relay-invite", "--home", str(r.home), "--json"))
    host = str(code["host"])
    c_port = free_port()
    c_home = base / "relay-c"
    out = haven(
        *("node", "init", "--home", str(c_home), "--via-relay", str(code["code"])),
        *("--listen", f"127.0.0.1:{c_port}", "--client-url", f"http://127.0.0.1:{c_port}"),
        *("--no-lan", "--json"),
    )
    from dataclasses import replace

    from node.config import NodeConfig

    replace(NodeConfig.load(str(c_home)), **BENCH_CONFIG).save(str(c_home))
    c = NodeProc(c_home, c_port, node_id=json.loads(out)["node_id"])
    hosts = base / "relay-a.hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {host.rsplit(':', 1)[0]}\n")
    a0 = NodeProc.create(base, "relay-a", **BENCH_CONFIG)
    a = HostsNode(a0.home, a0.port, node_id=a0.node_id)
    a.hosts = hosts
    b = NodeProc.create(base, "relay-b", **BENCH_CONFIG)
    return a, b, r, c


async def _pair_run(
    args: argparse.Namespace,
    nodes: list[NodeProc],
    alice: Device,
    to: Device,
    label: str,
) -> dict[str, Any]:
    aconn, tconn = await alice.connect(), await to.connect()
    task = None
    try:
        # each side looks the other up once, so the nodes resolve and pin each other
        await alice.send(to.address, "hello", conn=aconn)
        await to.send(alice.address, "hello", conn=tconn)
        rcv = Receiver(tconn)
        task = asyncio.create_task(rcv.run())
        snd = Sender(aconn, nodes[-1].node_id, to.mailbox, INFLIGHT)
        res = await message_run(args, nodes, [snd], rcv, label, max_undelivered=FED_IN_TRANSIT)
        _strip_window(res)
        return res
    finally:
        if task is not None:
            task.cancel()
        for conn in (aconn, tconn):
            await conn.__aexit__(None, None, None)


async def _wait_linked(r: NodeProc) -> None:
    deadline = time.monotonic() + 30
    while True:
        rows = json.loads(haven("node", "relay-clients", "--home", str(r.home), "--json"))
        if any(row["connected"] for row in rows):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the relay client did not link in time")
        await asyncio.sleep(0.1)


async def relay(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """Direct A -> B and relayed A -> R -> C federation in the same run."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return {"skipped": "needs root and unshare (a private /etc/hosts for the sender's node)"}
    a, b, r, c = _relay_world(base)
    invites = {n: nd.invite(n) for n, nd in (("alice", a), ("bob", b), ("carol", c))}
    devs = {n: Device(str(base / f"dev-{n}-relay")) for n in invites}
    started: list[NodeProc] = []
    try:
        for nd in (r, c, b, a):
            nd.start()
            started.append(nd)
        await _wait_linked(r)
        for n, inv in invites.items():
            await devs[n].join(inv)
        direct = await _pair_run(args, [a, b], devs["alice"], devs["bob"], "relay: direct")
        relayed = await _pair_run(args, [a, r, c], devs["alice"], devs["carol"], "relay: relayed")
        rows = json.loads(haven("node", "relay-clients", "--home", str(r.home), "--json"))
        ratio = relayed["msgs_per_s"] / direct["msgs_per_s"] if direct["msgs_per_s"] else None
        return {
            "direct": direct | {"nodes": ["A (sender's home)", "B (recipient's home)"]},
            "relayed": relayed | {"nodes": ["A (sender's home)", "R (relay)", "C (R's client)"]},
            "throughput_ratio": round(ratio, 3) if ratio is not None else None,
            "added_p50_ms": round(relayed["p50_ms"] - direct["p50_ms"], 3),
            "added_p99_ms": round(relayed["p99_ms"] - direct["p99_ms"], 3),
            # what the relay forwarded to its client (proof the relayed run went through it)
            "relay_bytes_in": sum(int(row["bytes_in"]) for row in rows),
            "note": "127.0.0.1 only; A resolves <label>.relay.test via a private /etc/hosts",
        }
    finally:
        for d in devs.values():
            d.close()
        for nd in reversed(started):
            nd.stop()
        log("relay: done")
