"""The NAT test world (tests/integration/natns.py): its negative control and the masquerade
measurement.

A node in ``home`` sits behind a router that masquerades and whose FORWARD policy drops all but
``ct state established,related`` and new connections from the home side. The public ``peer``
cannot open a connection to the home node (although it has a route to it), while ``home`` reaches
the peer's node by name. With masquerade alone (FORWARD policy accept) the peer does connect in:
masquerading is not a firewall. Closing the world leaves no namespace and no ``/etc/netns`` entry,
also when the test body fails.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .harness import wait_until
from .natns import NETNS_ETC, NatWorld, NsNode, nat_world

CONNECT_TIMEOUT = 1.0  # a dropped SYN is never answered: fail fast


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatWorld]:
    with nat_world(tmp_path_factory.mktemp("nat")) as w:
        yield w


@pytest.fixture(scope="module")
def nodes(world: NatWorld) -> dict[str, NsNode]:
    return {role: NsNode.create(world, role, f"node-{role}").start() for role in ("home", "peer")}


def _descriptor(world: NatWorld, role: str, url: str) -> bytes:
    """The signed descriptor of the node at ``url``, fetched from inside ``role``."""
    got = world.get(role, url + "/.well-known/haven/node")
    assert got["ok"] and got["status"] == 200, got
    return bytes(got["body"])


def test_peer_cannot_reach_home_but_home_reaches_peer(
    world: NatWorld, nodes: dict[str, NsNode]
) -> None:
    home, peer = nodes["home"], nodes["peer"]
    # the home node answers on its own address inside home: only the router stands in between
    assert world.connect("home", world.ip("home"), home.port)
    assert peer.public_url.encode() in _descriptor(world, "home", f"http://peer.test:{peer.port}")
    # negative control: the peer has a route to 198.51.100.0/24 via the router, which drops it
    assert not world.connect("peer", "home.test", home.port, CONNECT_TIMEOUT)
    assert not world.get("peer", home.url, timeout=CONNECT_TIMEOUT)["ok"]  # 198.51.100.2
    # nor can the relay, on the same public segment
    assert not world.connect("relay", world.ip("home"), home.port, CONNECT_TIMEOUT)


def test_masquerade_alone_lets_the_outside_in(world: NatWorld, nodes: dict[str, NsNode]) -> None:
    home = nodes["home"]
    with world.masquerade_only():
        assert "policy accept" in world.ruleset()
        assert home.public_url.encode() in _descriptor(world, "peer", home.url)
        assert world.connect("peer", world.ip("home"), home.port, CONNECT_TIMEOUT)
    assert "policy drop" in world.ruleset()
    assert not world.connect("peer", world.ip("home"), home.port, CONNECT_TIMEOUT)
    # outbound still works after the toggle (established/related and new-from-home accepted)
    assert world.connect("home", "peer.test", nodes["peer"].port)


def test_block_unplugs_home_without_stopping_it(world: NatWorld, nodes: dict[str, NsNode]) -> None:
    home, peer = nodes["home"], nodes["peer"]
    world.block("home")
    try:
        assert not world.connect("home", "peer.test", peer.port, CONNECT_TIMEOUT)
        assert home.proc is not None and home.proc.poll() is None
    finally:
        world.unblock("home")
    assert world.connect("home", "peer.test", peer.port)


def test_add_host_resolves_everywhere(world: NatWorld) -> None:
    world.add_host("k3j9x2abcd.relay.test", world.ip("relay"))
    for role in ("home", "peer", "relay2"):
        out = world.run(role, "getent", "hosts", "k3j9x2abcd.relay.test").stdout
        assert out.split()[0] == world.ip("relay"), (role, out)


def test_close_removes_everything_even_on_failure(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), NatWorld(tmp_path) as w:
        names = w.namespaces()
        dirs = [NETNS_ETC / w.ns(r) for r in ("home", "peer")]
        assert all(d.is_dir() for d in dirs)
        sleeper = w.popen("home", sys.executable, "-c", "input()", log=tmp_path / "s.log")
        raise RuntimeError("boom")
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in names if n in listed.split()]
    assert not any(d.exists() for d in dirs)
    assert sleeper.poll() is not None


def test_home_sends_out_but_nothing_comes_in(world: NatWorld, nodes: dict[str, NsNode]) -> None:
    home, peer = nodes["home"], nodes["peer"]
    alice, bob = home.join("alice"), peer.join("bob")
    assert alice.address == f"alice@home.test:{home.port}"
    # out: the home node pins the peer by name and its envelope arrives there
    alice.send(bob.address, "out through the NAT")
    assert home.peers()[f"peer.test:{peer.port}"]["reachable"] == "public"
    wait_until(
        lambda: peer.stats()["events"].get("federation.envelopes_in") == 1,
        30,
        "the peer node to take the home node's envelope",
    )
    # in: the peer's node cannot even fetch alice's keys from the home node (its connection
    # attempts to home.test time out: a few seconds, the price of a real negative control)
    p = world.haven("peer", "send", "--home", str(bob.home), alice.address, "in", check=False)
    assert p.returncode != 0 and "keys_unavailable" in p.stderr, p
    assert f"home.test:{home.port}" not in peer.peers()  # never verified: unreachable
