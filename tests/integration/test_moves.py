"""A node that moves to another host (docs/protocol.md §12.5), on loopback with two nodes.

Node A listens on a new port and signs a locator change from its old host to the new one (what
``haven node move-relay`` does with a relay's host). At its next start it pushes the change to
its pinned peers (B: alice wrote to bob), which re-pins: the new host names A, the old host stays an alias of A, and
B's queue for A (written while A was away) drains to the new locator.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from node.app import load_node_key
from node.config import NodeConfig
from node.moves import load_locators, move_to

from .harness import NodeProc, free_port, haven, join, wait_until


def peers_of(node: NodeProc) -> list[dict[str, object]]:
    out = haven("node", "peers", "--home", str(node.home), "--json").stdout
    return list(json.loads(out))


def test_peer_follows_a_signed_move_and_keeps_the_old_host(
    tmp_path: Path, nodes: list[NodeProc]
) -> None:
    a = NodeProc.create(tmp_path, "A").start()
    b = NodeProc.create(tmp_path, "B").start()
    nodes += [a, b]
    alice, alice_old = join(a, tmp_path, "alice")
    bob, bob_addr = join(b, tmp_path, "bob")
    a_id = a.status()["node_id"]
    haven("send", "--home", str(alice), bob_addr, "hello")  # A pins B: B is told of the move
    wait_until(lambda: b.status()["pending_envelopes"] == 1, what="delivery to B")
    haven("send", "--home", str(bob), alice_old, "before the move")
    wait_until(lambda: a.status()["pending_envelopes"] == 1, what="delivery to A")
    old_host = a.host

    a.stop()
    haven("send", "--home", str(bob), alice_old, "queued during the move")
    assert b.status()["outbox_envelopes"] == 1
    new_port = free_port()
    change = move_to(str(a.home), load_node_key(str(a.home)), f"http://127.0.0.1:{new_port}", 1_000)
    config = NodeConfig.load(str(a.home))
    dataclasses.replace(config, listen_port=new_port).save(str(a.home))
    assert load_locators(str(a.home)) == (change,)  # kept for the descriptor's moves
    assert (change.old_host, change.new_host) == (old_host, f"127.0.0.1:{new_port}")
    moved = NodeProc(a.home, new_port)
    nodes.append(moved)
    moved.start()

    # A pushed its move: B pins the new host to A's id and its queue drains there
    wait_until(
        lambda: [p["host"] for p in peers_of(b)] == [moved.host], timeout=60, what="B re-pins A"
    )
    wait_until(lambda: b.status()["outbox_envelopes"] == 0, timeout=60, what="B's queue drains")
    wait_until(lambda: moved.status()["pending_envelopes"] == 2, what="queued delivery to A")
    assert [p["node_id"] for p in peers_of(b)] == [a_id]

    # an address at the old host still reaches A through B's alias (nothing listens there)
    haven("send", "--home", str(bob), alice_old, "to the old address")
    wait_until(lambda: moved.status()["pending_envelopes"] == 3, what="delivery via the alias")
    assert b.status()["outbox_envelopes"] == 0
    assert [p["node_id"] for p in peers_of(b)] == [a_id]
