"""Offline LAN: three nodes on three network-namespace hosts find each other only via mDNS.

Each host has a link-local address, no route out, and a public URL that cannot resolve
(``*.haven.invalid``). Nodes pin each other from contact cards (``haven node lan-invite`` /
``haven node pin``), discover each other by their blinded mDNS ids, prove their keys, and their
users exchange messages. Clocks differ by ±10 minutes. One host leaves and comes back; a fourth
host spoofs a known node's blinded id and gets nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import LONG

from .harness import ROOT, wait_until
from .netns import NetnsLan

PORT = 8765
OFFSETS = ["", "+10m", "-10m"]


class LanHost:
    def __init__(self, lan: NetnsLan, i: int, base: Path) -> None:
        self.lan, self.i = lan, i
        self.home = base / f"node{i}"
        self.dev = base / f"dev{i}"
        self.public_host = f"node{i}.haven.invalid:{PORT}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / f"node{i}.log"
        self.address = ""

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        cmd = [*self.lan.exec_prefix(self.i), sys.executable, "-m", "client.cli", *args]
        p = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
        if check and p.returncode != 0:
            raise AssertionError(f"{args} failed on host {self.i}:\n{p.stdout}\n{p.stderr}")
        return p.stdout

    def init(self) -> None:
        self.run(
            "node",
            "init",
            "--home",
            str(self.home),
            "--public-url",
            f"http://{self.public_host}",
            "--listen",
            f"0.0.0.0:{PORT}",
            "--client-url",
            f"http://127.0.0.1:{PORT}",
            "--lan",
        )

    def start(self) -> None:
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [
                *self.lan.exec_prefix(self.i),
                sys.executable,
                "-m",
                "client.cli",
                "node",
                "serve",
                "--home",
                str(self.home),
            ]
            + ([f"--clock-offset={OFFSETS[self.i]}"] if OFFSETS[self.i] else []),
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT), "HAVEN_TEST_CLOCK": "1"},
        )
        logf.close()
        wait_until(self._started, 30, f"node {self.i} to start")

    def _started(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node {self.i} exited:\n{self.log.read_text()}")
        return b"listening" in self.log.read_bytes()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def peers(self) -> dict[str, dict[str, Any]]:
        out = json.loads(self.run("node", "peers", "--home", str(self.home), "--json"))
        return {p["host"]: p for p in out}

    def recv(self) -> list[dict[str, Any]]:
        out = self.run("recv", "--home", str(self.dev), "--wait", "1.5", "--json")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def send(self, to: str, text: str) -> None:
        self.run("send", "--home", str(self.dev), to, text)


@pytest.fixture
def lan_hosts(tmp_path: Path) -> Iterator[tuple[NetnsLan, list[LanHost]]]:
    with NetnsLan(4) as lan:
        hosts = [LanHost(lan, i, tmp_path) for i in range(3)]
        try:
            yield lan, hosts
        finally:
            for h in hosts:
                h.stop()


def test_three_offline_hosts_message_via_mdns(
    lan_hosts: tuple[NetnsLan, list[LanHost]], tmp_path: Path
) -> None:
    lan, hosts = lan_hosts
    for h in hosts:
        h.init()
    cards = {
        h.i: json.loads(h.run("node", "lan-invite", "--home", str(h.home), "--json"))["card"]
        for h in hosts
    }
    for h in hosts:
        for j, card in cards.items():
            if j != h.i:
                h.run("node", "pin", "--home", str(h.home), card)
    for h in hosts:
        h.start()
    for h in hosts:
        invite = h.run("node", "invite", "--home", str(h.home), f"user{h.i}").splitlines()[-1]
        h.address = h.run("join", invite, "--home", str(h.dev)).splitlines()[-1]
        assert h.address == f"user{h.i}@{h.public_host}"

    # every node verifies the other two on the LAN (public URLs cannot resolve)
    for h in hosts:
        others = {o.public_host for o in hosts if o is not h}
        wait_until(
            lambda h=h, others=others: all(
                h.peers().get(o, {}).get("reachable") == "lan" for o in others
            ),
            60,
            f"host {h.i} to verify its LAN peers",
        )

    # everyone writes to everyone, across ±10 minute clock offsets
    for h in hosts:
        for o in hosts:
            if o is not h:
                h.send(o.address, f"from {h.i} to {o.i}")
    for h in hosts:
        got = sorted(m["text"] for m in h.recv())
        assert got == sorted(f"from {o.i} to {h.i}" for o in hosts if o is not h)

    # host 2 leaves: its messages wait in host 0's outbox
    lan.link_down(2)
    hosts[0].send(hosts[2].address, "while you were gone")
    assert (
        json.loads(hosts[0].run("node", "status", "--home", str(hosts[0].home), "--json"))[
            "outbox_envelopes"
        ]
        == 1
    )
    wait_until(
        lambda: hosts[0].peers()[hosts[2].public_host]["reachable"] == "unreachable",
        60,
        "host 2 to be marked unreachable",
    )
    if LONG:  # a long outage: host 0 forgets host 2's LAN address, then must rediscover it
        wait_until(
            lambda: not hosts[0].peers()[hosts[2].public_host]["lan"],
            120,
            "host 0 to drop host 2's LAN locator",
        )
    lan.link_up(2)
    wait_until(
        lambda: (
            json.loads(hosts[0].run("node", "status", "--home", str(hosts[0].home), "--json"))[
                "outbox_envelopes"
            ]
            == 0
        ),
        90,
        "host 0's outbox to drain when host 2 returns",
    )
    assert [m["text"] for m in hosts[2].recv()] == ["while you were gone"]
    assert hosts[2].recv() == []  # shown once

    # a fourth host announces host 1's blinded id with its own key: nothing is sent to it
    victim = json.loads(hosts[1].run("node", "status", "--home", str(hosts[1].home), "--json"))
    spoof = subprocess.Popen(
        [
            *lan.exec_prefix(3),
            sys.executable,
            str(ROOT / "tests/integration/spoof_probe.py"),
            "--victim",
            victim["node_id"],
            "--addr",
            lan.host_ip(3),
            "--port",
            str(PORT),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    try:
        wait_until(
            lambda: hosts[0].peers()[hosts[1].public_host]["spoofed"] >= 1,
            60,
            "host 0 to count the spoofer",
        )
        hosts[0].send(hosts[1].address, "after the spoof")
        assert [m["text"] for m in hosts[1].recv()] == ["after the spoof"]
    finally:
        out, _ = spoof.communicate(input=b"", timeout=30)
    assert json.loads(out.decode().splitlines()[-1]) == {"posts": 0}
    assert hosts[0].peers()[hosts[1].public_host]["reachable"] == "lan"
