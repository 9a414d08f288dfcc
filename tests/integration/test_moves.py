"""A node that moves to another host (docs/protocol.md §12.5), on loopback with two nodes.

Node A signs a locator change from its host ``127.0.0.1:PORT`` to ``localhost:PORT`` (what
``haven node move-relay`` does with a relay's host; here the same listener answers both). At
its next start it pushes the change to its pinned peers (B: alice wrote to bob), which re-pin:
the new host names A, the old host stays an alias of A (B does not re-pin it), and B's queue
for A drains. Alice's device follows the new address and re-signs her device list for it, and
tells bob (a ``moved`` notice): his contact and conversation take the new address, and a
forged notice (an address with another identity key) is refused. A notice that arrives while
the new host is unreachable is kept and followed once later (through bob's app, then through
his plain ``recv``), and after A moves back an older statement pushed again leaves B's pin
where it is (docs/protocol.md §12.5.1 and §12.5.2).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import aiohttp

from client import pending_moves
from client.device import Device
from client.payload import Payload
from federation.signing import LocatorChange, NodeKey
from federation.transport import PeerTransport
from node.app import load_node_key
from node.moves import load_locators, move_to
from tests.app.daemon import DaemonProc

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
    alice_new = f"alice@{new_host}"

    # her device told bob, but A is down when bob takes the notice in: his node cannot fetch
    # the new address's list, so the notice is kept (not dropped) and the contact stays
    wait_until(lambda: a.status()["outbox_envelopes"] == 0, timeout=60, what="A's queue drains")
    a.stop()
    first = recv(bob)
    assert "hello" in [m["text"] for m in first]
    assert [m for m in first if m["kind"] == "moved"] == []
    assert kept_moves(bob) == (1, [alice_old, bob_addr])
    a.start()

    # once A is back, bob's app (his daemon) follows the kept notice when it connects, and
    # ``recv`` through it prints the notice once; then his contact and conversation use the
    # new address
    notices: list[dict[str, object]] = []

    def notice() -> bool:
        notices.extend(m for m in recv(bob) if m["kind"] == "moved")
        return bool(notices)

    daemon = DaemonProc(bob).start()
    try:
        wait_until(notice, timeout=60, what="the address-change notice")
        assert [m for m in recv(bob) if m["kind"] == "moved"] == []  # printed once
    finally:
        daemon.stop()
    assert [(m["old"], m["new"], m["from"]) for m in notices] == [(alice_old, alice_new, alice_old)]
    assert kept_moves(bob) == (0, sorted([alice_new, bob_addr]))
    haven("send", "--home", str(bob), alice_new, "to the new address")
    assert [m["text"] for m in recv(alice, wait=5)] == ["to the new address"]
    haven("send", "--home", str(alice), bob_addr, "after the move")

    # then a forged notice from alice's device: "moved to carol" (another identity key)
    _, carol_addr = join(a, tmp_path, "carol")
    seen = asyncio.run(forge_and_receive(alice, bob, bob_addr, carol_addr))
    assert seen["drops"] == {"untrusted_key": 1}  # refused, and nothing changed:
    assert seen["received"] == [(alice_new, "after the move")]
    assert seen["contacts"] == sorted([alice_new, bob_addr])  # no alice_old, no carol
    assert seen["chats"] == [alice_new]  # one conversation, before and after the move
    before = ["before the move", "queued during the move", "to the old address", "hello"]
    assert seen["history"] == [*before, "to the new address", "after the move"]

    # A moves back (a newer statement): B follows; the older, public statement pushed again
    # by A's key (a replay) does not move the pin back, and is counted
    a.stop()
    key = load_node_key(str(a.home))
    back = move_to(str(a.home), key, a.url, 2_000)
    assert (back.old_host, back.new_host) == (new_host, a.host)
    a.start()
    wait_until(lambda: [p["host"] for p in peers_of(b)] == [a.host], timeout=60, what="back")
    asyncio.run(push_moves(key, b, (change,)))
    assert [(p["node_id"], p["host"]) for p in peers_of(b)] == [(a_id, a.host)]
    assert b.stats()["events"].get("peers.stale_locator_change") == 1

    # alice's device follows the move back and tells bob; A is down when his own ``recv``
    # (no app this time) takes the notice in: kept, then followed by a later ``recv``, once
    recv(alice)
    wait_until(lambda: a.status()["outbox_envelopes"] == 0, timeout=60, what="A's queue drains")
    a.stop()
    assert [m for m in recv(bob) if m["kind"] == "moved"] == []
    assert kept_moves(bob) == (1, sorted([alice_new, bob_addr]))
    a.start()
    back_notices: list[tuple[object, object]] = []

    def notice_back() -> bool:
        back_notices.extend((m["old"], m["new"]) for m in recv(bob) if m["kind"] == "moved")
        return bool(back_notices)

    wait_until(notice_back, timeout=60, what="the kept notice, followed")
    assert back_notices == [(alice_new, alice_old)]
    assert kept_moves(bob) == (0, sorted([alice_old, bob_addr]))


def kept_moves(home: Path) -> tuple[int, list[str]]:
    """How many ``moved`` notices the device keeps for another try, and its contacts."""
    dev = Device(str(home))
    try:
        kept = pending_moves.decode(dev.state.get(pending_moves.KV_KEY))
        return len(kept), sorted(c.address for c in dev.state.contacts())
    finally:
        dev.close()


async def push_moves(key: NodeKey, to: NodeProc, moves: tuple[LocatorChange, ...]) -> None:
    """``POST /federation/moved`` to ``to``, signed now by ``key`` (as the moving node)."""
    async with aiohttp.ClientSession() as session:
        dest = to.status()["node_id"]
        await PeerTransport(key, session).post_moved(to.url, dest, int(time.time() * 1000), moves)


async def forge_and_receive(
    sender: Path, receiver: Path, to: str, fake_new: str
) -> dict[str, object]:
    """``sender``'s device sends ``to`` a ``moved`` notice naming ``fake_new``; the receiver
    takes in everything up to it. Returns what the receiver then holds."""
    dev = Device(str(sender))
    try:
        p = Payload(os.urandom(16), "moved", to, dev.clock.now_ms(), text=fake_new, old=dev.address)
        await dev.send_payload(to, p, include_self=False)
    finally:
        dev.close()
    rx = Device(str(receiver))
    try:
        got: list[tuple[str, str]] = []
        deadline = time.monotonic() + 60
        while not (rx.move_drops and got) and time.monotonic() < deadline:
            new = await rx.receive(wait_s=0.5)
            assert [m for m in new if m.kind == "moved"] == []
            got += [(m.sender, m.text) for m in new if m.kind == "text"]
        chats = [c["address"] for c in rx.chats()]
        return {
            "drops": dict(rx.move_drops),
            "received": got,
            "contacts": [c.address for c in rx.state.contacts()],
            "chats": chats,
            "history": [r.text for r in rx.history(chats[0])] if chats else [],
        }
    finally:
        rx.close()
