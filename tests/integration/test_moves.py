"""A node that moves to another host (docs/protocol.md §12.5), on loopback with two nodes.

Node A signs a locator change from its host ``127.0.0.1:PORT`` to ``localhost:PORT`` (what
``haven node move-relay`` does with a relay's host; here the same listener answers both). At
its next start it pushes the change to its pinned peers (B: alice wrote to bob), which re-pin:
the new host names A, the old host stays an alias of A (B does not re-pin it), and B's queue
for A drains. Alice's device follows the new address and re-signs her device list for it.
"""

from __future__ import annotations

import json
from pathlib import Path

from node.app import load_node_key
from node.moves import load_locators, move_to

from .harness import NodeProc, haven, join, recv, wait_until


def peers_of(node: NodeProc) -> list[dict[str, object]]:
    out = haven("node", "peers", "--home", str(node.home), "--json").stdout
    return list(json.loads(out))


def test_peer_and_devices_follow_a_signed_move_and_the_old_host_keeps_working(
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

    a.stop()
    haven("send", "--home", str(bob), alice_old, "queued during the move")
    assert b.status()["outbox_envelopes"] == 1
    new_host = f"localhost:{a.port}"
    change = move_to(str(a.home), load_node_key(str(a.home)), f"http://{new_host}", 1_000)
    assert load_locators(str(a.home)) == (change,)  # served in the descriptor's moves
    assert (change.old_host, change.new_host) == (a.host, new_host)
    a.start()

    # A pushed its move: B pins the new host to A's id and its queue drains
    wait_until(lambda: [p["host"] for p in peers_of(b)] == [new_host], timeout=60, what="re-pin")
    wait_until(lambda: b.status()["outbox_envelopes"] == 0, timeout=60, what="B's queue drains")
    assert [p["node_id"] for p in peers_of(b)] == [a_id]

    # an address at the old host resolves through B's alias: no new pin, same node
    haven("send", "--home", str(bob), alice_old, "to the old address")
    wait_until(lambda: a.status()["pending_envelopes"] == 3, what="delivery via the alias")
    assert [(p["node_id"], p["host"]) for p in peers_of(b)] == [(a_id, new_host)]

    # alice's device follows: her address is at the new host, with a list signed for it
    got = [m["text"] for m in recv(alice)]
    assert got == ["before the move", "queued during the move", "to the old address"]
    who = json.loads(haven("whoami", "--home", str(alice), "--json").stdout)
    assert who["address"] == f"alice@{new_host}"
    haven("send", "--home", str(bob), f"alice@{new_host}", "to the new address")
    assert [m["text"] for m in recv(alice, wait=5)] == ["to the new address"]
