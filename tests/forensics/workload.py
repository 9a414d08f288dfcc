"""Workload helpers for seizure tests: nodes with a test clock, a client-side envelope tap.

The tap wraps :meth:`client.connection.NodeConnection.request` for the duration of a test and
records every ``send`` frame a device hands to its node: envelope id, mailbox, the head of the
body, which frame (one payload = one send) and the home and destination node. That is the
ground truth the examination is scored against; nothing in the node or client code changes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from client.connection import NodeConnection
from federation import frames as F

from ..integration.harness import ROOT, NodeProc, wait_until
from .examine import Env, Ledger, parse_epoch_keys

_SERVE = (sys.executable, "-m", "client.cli", "node", "serve")


class ClockNode(NodeProc):
    """A :class:`NodeProc` that can be (re)started with the test-only ``--clock-offset``."""

    def start_offset(self, offset: str) -> NodeProc:
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*_SERVE, "--home", str(self.home), "--clock-offset", offset],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT), "HAVEN_TEST_CLOCK": "1"},
        )
        logf.close()
        wait_until(self._listening, 20, f"node {self.home.name} to listen")
        return self


@contextmanager
def tap(ledger: Ledger, homes: tuple[Path, ...] = ()) -> Iterator[None]:
    """Record every envelope sent through any :class:`NodeConnection` into ``ledger``; at each
    send also remember the live epoch keys of the nodes in ``homes`` (scoring only)."""
    orig = NodeConnection.request
    counter = iter(range(1, 10**9))

    async def request(self: NodeConnection, frame: F.Frame) -> F.Frame:
        if isinstance(frame, F.Send):
            send = next(counter)
            home = self.challenge.node_id if self.challenge else ""
            for dest, env in frame.items:
                ledger.add(Env(env.id, env.to, env.body[:32], send, home, dest))
            for h in homes:
                read_epoch_keys(h, ledger)
        reply = await orig(self, frame)
        if isinstance(frame, F.Send):  # and after: the node may have minted a key for it
            for h in homes:
                read_epoch_keys(h, ledger)
        return reply

    NodeConnection.request = request  # type: ignore[method-assign]
    try:
        yield
    finally:
        NodeConnection.request = orig  # type: ignore[method-assign]


def read_epoch_keys(home: Path, ledger: Ledger) -> None:
    """Scoring only: remember every epoch key the live node has had."""
    try:
        data = (home / "epochs.key").read_bytes()
    except FileNotFoundError:
        return
    for epoch, key in parse_epoch_keys(data):
        ledger.oracle_keys.setdefault(key, epoch)
