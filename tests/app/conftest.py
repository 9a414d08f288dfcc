"""Shared fixtures for the app tests: real nodes and real ``haven app`` daemons.

- ``start_daemon(name, env=None)``: a daemon on ``tmp_path/dev-NAME`` (stopped afterwards).
- ``app_node``: one running node, shared by the tests of a module (each test uses its own
  account names on it, so a node start is paid once per module); ``two_nodes``: two federated
  nodes of the test's own (a test that kills a node must not share it).
- ``new_user(node, name, display_name)``: a daemon on an empty home, onboarded through the API.
- ``alice_bob``: alice on node A and bob on node B, each with the other's chat open.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.forkcli import create_node, invite
from tests.integration.harness import NodeProc

from .daemon import DaemonProc


@pytest.fixture
def daemons() -> Iterator[list[DaemonProc]]:
    """A list the test appends DaemonProc objects to; every one is killed afterwards."""
    started: list[DaemonProc] = []
    yield started
    for d in started:
        try:
            d.kill()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


@pytest.fixture
def start_daemon(tmp_path: Path, daemons: list[DaemonProc]) -> Callable[..., DaemonProc]:
    """Factory: ``start_daemon("alice", env={...})`` starts a daemon on ``tmp_path/dev-alice``."""

    def start(
        name: str, env: dict[str, str] | None = None, listen: str = "127.0.0.1:0"
    ) -> DaemonProc:
        d = DaemonProc(tmp_path / f"dev-{name}", env=env, listen=listen)
        daemons.append(d)
        return d.start()

    return start


@pytest.fixture(scope="module")
def _module_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    a = create_node(tmp_path_factory.mktemp("node"), "A").start()
    yield a
    a.kill()


@pytest.fixture
def app_node(_module_node: NodeProc) -> NodeProc:
    """The module's running node (started again if a test left it stopped). Account names
    must be unique within a module."""
    return _module_node.running()


@pytest.fixture
def two_nodes(tmp_path: Path, nodes: list[NodeProc]) -> tuple[NodeProc, NodeProc]:
    """Two running nodes on 127.0.0.1 (they federate on first contact)."""
    a = create_node(tmp_path, "A").start()
    b = create_node(tmp_path, "B").start()
    nodes += [a, b]
    return a, b


@pytest.fixture
def new_user(start_daemon: Callable[..., DaemonProc]) -> Callable[..., DaemonProc]:
    """Factory: ``new_user(node, "alice", "앨리스")`` — a daemon started on an empty home and
    onboarded through ``POST /api/join`` with an invite of ``node``."""

    def make(
        node: NodeProc, name: str, display_name: str = "", env: dict[str, str] | None = None
    ) -> DaemonProc:
        d = start_daemon(name, env=env)
        st = d.join(invite(node, name), display_name or name.capitalize())
        assert st["joined"] and st["me"]["address"] == f"{name}@{node.host}", st
        return d

    return make


@dataclass
class Pair:
    a: NodeProc
    b: NodeProc
    alice: DaemonProc
    bob: DaemonProc
    alice_addr: str
    bob_addr: str


@pytest.fixture
def alice_bob(two_nodes: tuple[NodeProc, NodeProc], new_user: Callable[..., DaemonProc]) -> Pair:
    """alice (node A) and bob (node B), joined through the API, each with the other's chat."""
    a, b = two_nodes
    alice = new_user(a, "alice", "Alice")
    bob = new_user(b, "bob", "Bob")
    alice_addr, bob_addr = alice.address, bob.address
    alice.open_chat(bob_addr)
    bob.open_chat(alice_addr)
    return Pair(a, b, alice, bob, alice_addr, bob_addr)
