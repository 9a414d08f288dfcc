"""The client side of a relay link without a network (node/relay_client.py)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp

from federation.clock import SystemClock
from federation.relayauth import RelayAuth
from federation.relaylink import RelayInvite, Req, new_label
from federation.signing import Descriptor, NodeKey
from node.app import Node, load_node_key, open_store
from node.cli import init_node
from node.config import NodeConfig
from node.relay import host_suffixes, label_of_host
from node.relay_client import RelayInfo, RelayLink, link_url


def test_relay_json_round_trips_with_mode_0600(tmp_path: Path) -> None:
    label = new_label()
    inv = RelayInvite(
        url="https://relay.example:8443",
        node=NodeKey.generate().node_id,
        t=os.urandom(24),
        label=label,
        host=f"{label}.relay.example:8443",
    )
    info = RelayInfo.from_invite(inv)
    info.save(str(tmp_path))
    assert (tmp_path / "relay.json").stat().st_mode & 0o777 == 0o600
    assert RelayInfo.load(str(tmp_path)) == info
    assert info.public_url() == f"https://{label}.relay.example:8443"
    assert link_url(info.url) == "wss://relay.example:8443/haven/v1/relay/link"
    assert link_url("http://relay.test:8080") == "ws://relay.test:8080/haven/v1/relay/link"
    spent = RelayInfo(info.url, info.node, info.label, info.host)
    spent.save(str(tmp_path))
    assert "token" not in (tmp_path / "relay.json").read_text()
    assert RelayInfo.load(str(tmp_path / "none")) is None


async def test_only_federation_targets_reach_the_local_listener() -> None:
    """A relay cannot use the link to reach the node's loopback-only endpoints."""
    config = SimpleNamespace(listen_host="0.0.0.0", tls_cert="")
    node = cast(Any, SimpleNamespace(config=config, port=1))  # port 1: nothing listens
    link = RelayLink(node, RelayInfo("http://r", "n", "l", "h"))
    assert link.local_base() == "http://127.0.0.1:1"
    async with aiohttp.ClientSession() as s:
        for target in ("/haven/v1/stats", "/haven/v1/peers", "/haven/v1/client", "/metrics"):
            res = await link.replay(s, Req(id=3, m="GET", p=target, h=(), b=b""))
            assert (res.id, res.s, res.b) == (3, 404, b"")
        res = await link.replay(
            s, Req(id=4, m="DELETE", p="/haven/v1/federation/batch", h=(), b=b"")
        )
        assert res.s == 404
        # a federation target is replayed; nothing listens on port 1, so 503
        res = await link.replay(s, Req(id=5, m="POST", p="/haven/v1/federation/batch", h=(), b=b""))
        assert (res.id, res.s) == (5, 503)


def test_host_routing_names_a_label_under_the_relay_domain_only() -> None:
    https = host_suffixes("https://relay.example")
    assert https == (":443",)
    assert label_of_host("abcdefghij.relay.example", "relay.example", https) == "abcdefghij"
    assert label_of_host("ABCDEFGHIJ.Relay.Example:443", "relay.example", https) == "abcdefghij"
    for other in (
        "abcdefghij.relay.example:8443",  # another port
        "relay.example",  # the relay itself
        "abcdefghi1.relay.example",  # not base32
        "abcdefghijk.relay.example",  # 11 characters
        "x.abcdefghij.relay.example",
        "abcdefghij.relay.example.evil",
    ):
        assert label_of_host(other, "relay.example", https) is None, other
    test = host_suffixes("http://127.0.0.1:8080")
    assert label_of_host("abcdefghij.relay.test:8080", "relay.test", test) == "abcdefghij"
    assert label_of_host("abcdefghij.relay.test", "relay.test", test) == "abcdefghij"
    assert label_of_host("abcdefghij.relay.test:80", "relay.test", test) is None


def test_the_descriptor_publishes_the_statement_the_relay_last_accepted(tmp_path: Path) -> None:
    """``relay`` in the node's descriptor: absent before a link, then the link's statement."""
    home = str(tmp_path / "n")
    init_node(home, "http://l.relay.test:1", "127.0.0.1:1", 7 * 86_400_000, False)
    config = NodeConfig.load(home)
    node = Node(home, config, load_node_key(home), SystemClock(), open_store(home, config))
    assert Descriptor.verify_decode(node.descriptor_bytes()).relay == b""  # no relay
    relay = NodeKey.generate().node_id
    node.relay_link = RelayLink(node, RelayInfo("http://relay.test:1", relay, "l", "h"))
    assert Descriptor.verify_decode(node.descriptor_bytes()).relay == b""  # not linked yet
    auth = RelayAuth.make(node.key, relay, SystemClock().now_ms() + 1000)
    node.relay_link.statement = auth.encode()
    got = RelayAuth.decode(Descriptor.verify_decode(node.descriptor_bytes()).relay)
    got.check(node.key.node_id, relay, SystemClock().now_ms())
