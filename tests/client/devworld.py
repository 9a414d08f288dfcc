"""Real nodes and devices for the device-layer tests (outbox, drain, profile and timer).

A node costs a ``node init`` and a process start, so a module shares its nodes (the
``node_a`` and ``node_b`` fixtures of ``conftest.py``); each test's devices get account names no
other test uses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path

from client.device import Device, ReceivedMessage
from client.linking import link_device
from tests.integration.forkcli import invite
from tests.integration.harness import NodeProc

_ACCOUNTS = count(1)


async def new_device(node: NodeProc, base: Path, name: str, home: str = "") -> Device:
    """A device of a new account on ``node``: ``name`` plus a number no other test uses (the
    node may be shared)."""
    account = f"{name}{next(_ACCOUNTS)}"
    dev = Device(str(base / (home or f"dev-{name}")))
    await dev.join(invite(node, account), name=f"{name}-phone")
    return dev


async def node_with(node: NodeProc, base: Path, *names: str) -> tuple[NodeProc, list[Device]]:
    """The (module's) running ``node`` with one new device per name."""
    return node, [await new_device(node, base, n) for n in names]


async def linked(dev: Device, base: Path, home: str) -> Device:
    """A second device of ``dev``'s account (linked end to end)."""
    code: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    linker = asyncio.create_task(link_device(dev, code.set_result, timeout_s=30))
    new = Device(str(base / home))
    await new.join(await code, name=home)
    await linker
    return new


async def settle(
    devs: list[Device], cond: Callable[[], bool], timeout: float = 40
) -> list[ReceivedMessage]:
    """Receive on ``devs`` until ``cond()`` holds (or fail); every message received."""
    got: list[ReceivedMessage] = []
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("devices did not reach the expected state in time")
        for d in devs:
            got += await d.receive(wait_s=0.2)
    return got


def incoming(dev: Device, peer: str) -> list[str]:
    return [r.text for r in dev.history(peer) if not r.outgoing]
