"""A node with tight connection limits and a legitimate pair, for the admission and log tests.

Attackers connect from other loopback addresses (``127.0.0.2`` and up: Linux routes all of
127.0.0.0/8 to ``lo``), and the node sets ``exempt_loopback = false``, so each address is its
own source for the per-source caps while the legitimate devices use ``127.0.0.1``.
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client.connection import NodeConnection
from client.device import Device, ReceivedMessage

from .harness import ROOT, NodeProc, join, wait_until
from .rawpeer import stats

DEADLINE_S = 30.0


def limited_node(
    base: Path, name: str = "node", fd_limit: int = 0, **limits: int | bool
) -> NodeProc:
    """A node whose ``node.toml`` has ``limits`` set (``exempt_loopback`` false by default),
    started with RLIMIT_NOFILE (soft and hard) at ``fd_limit`` if given."""
    node = NodeProc.create(base, name)
    conf = node.home / "node.toml"
    text = conf.read_text()
    for key, value in ({"exempt_loopback": False} | limits).items():
        rendered = ("true" if value else "false") if isinstance(value, bool) else str(value)
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {rendered}", text)
        assert n == 1, key
    conf.write_text(text)
    return node.start() if not fd_limit else start_with_fd_limit(node, fd_limit)


def start_with_fd_limit(node: NodeProc, limit: int) -> NodeProc:
    """:meth:`NodeProc.start`, in a process whose file-descriptor limit is ``limit``."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with open(node.log, "ab") as logf:
        node.proc = subprocess.Popen(
            [sys.executable, "-m", "client.cli", "node", "serve", "--home", str(node.home)],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
            preexec_fn=cap,
        )
    wait_until(node._listening, 20, "the node to listen")
    return node


@dataclass
class Pair:
    node: NodeProc
    alice: Device
    alice_addr: str
    bob: Device
    bob_addr: str

    def close(self) -> None:
        self.alice.close()
        self.bob.close()


def make_pair(node: NodeProc, base: Path) -> Pair:
    alice_home, alice_addr = join(node, base, "alice")
    bob_home, bob_addr = join(node, base, "bob")
    return Pair(node, Device(str(alice_home)), alice_addr, Device(str(bob_home)), bob_addr)


async def next_match(
    dev: Device, conn: NodeConnection, match: Callable[[ReceivedMessage], bool]
) -> ReceivedMessage:
    async with asyncio.timeout(DEADLINE_S):
        while True:
            for m in await dev.process(conn, await conn.deliveries.get()):
                if match(m):
                    return m


async def messaging(
    pair: Pair,
    bob_conn: NodeConnection | None = None,
    *,
    reverse: bool = False,
    send_conn: NodeConnection | None = None,
) -> int:
    """alice sends bob a message and bob reads it (``reverse``: bob to alice). The reader uses
    ``bob_conn`` if given (else a fresh connection: a device has one live connection, a new one
    replaces it), the sender ``send_conn`` if given. Returns 1 per message delivered."""
    sender, to, to_addr = (
        (pair.bob, pair.alice, pair.alice_addr)
        if reverse
        else (
            pair.alice,
            pair.bob,
            pair.bob_addr,
        )
    )
    text = "still here " + os.urandom(4).hex()
    sent = await sender.send(to_addr, text, conn=send_conn)
    conn = bob_conn or await to.connect()
    try:
        got = await next_match(to, conn, lambda m: m.msg_id == sent.msg_id)
    finally:
        if bob_conn is None:
            await conn.__aexit__(None, None, None)
    assert (got.sender, got.text) == (sender.address, text)
    return 1


async def errors(http: Any, node: NodeProc) -> dict[str, int]:
    return dict((await stats(http, node.url))["errors"])


def rss_kb(node: NodeProc) -> int:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def clean_log(node: NodeProc) -> list[str]:
    """The node's log lines, after checking it is alive and wrote no address or traceback."""
    assert node.proc is not None and node.proc.poll() is None, "the node process exited"
    lines = node.log.read_text(errors="replace").splitlines()
    # The start-up banner names the node's own listen address (printed, not logged): allowed.
    text = "\n".join(ln for ln in lines if not ln.startswith("haven node "))
    for bad in ("127.0.0.", "Traceback", "Error handling request", "::1"):
        assert bad not in text, (bad, text[-3000:])
    return lines
