"""Two real nodes on 127.0.0.1: federated exchange, offline delivery, restarts, kill -9, seizure."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from client.device import Device
from federation.errors import HavenError

from .harness import NodeProc, haven, join, recv, wait_until


@pytest.fixture
def pair(tmp_path: Path, nodes: list[NodeProc]) -> tuple[NodeProc, NodeProc]:
    a = NodeProc.create(tmp_path, "A").start()
    b = NodeProc.create(tmp_path, "B").start()
    nodes += [a, b]
    return a, b


def test_exchange_both_ways_offline_and_drained(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice, alice_addr = join(a, tmp_path, "alice")
    bob, bob_addr = join(b, tmp_path, "bob")
    assert alice_addr == f"alice@{a.host}" and bob_addr == f"bob@{b.host}"

    # bob is offline: B holds the envelopes until he connects.
    texts = [f"message {i} from alice" for i in range(5)]
    for t in texts:
        haven("send", "--home", str(alice), bob_addr, t)
    wait_until(lambda: b.status()["pending_envelopes"] == 5, what="B to hold 5 envelopes")
    assert a.status()["outbox_envelopes"] == 0

    got = recv(bob)
    assert [m["text"] for m in got] == texts  # all shown once, in order
    assert {m["from"] for m in got} == {alice_addr}
    assert all(isinstance(m["sent_at"], int) for m in got)
    assert recv(bob, wait=0.5) == []  # nothing shown twice

    haven("send", "--home", str(bob), alice_addr, "hello back")
    wait_until(lambda: a.status()["pending_envelopes"] >= 2, what="reply and receipts at A")
    assert [m["text"] for m in recv(alice)] == ["hello back"]

    hist = haven("history", "--home", str(bob), alice_addr, "--json").stdout.splitlines()
    assert len(hist) == 6

    # receipts are end-to-end messages too: once both devices have picked them up,
    # neither node holds anything
    wait_until(
        lambda: a.status()["outbox_envelopes"] == 0 and b.status()["outbox_envelopes"] == 0,
        what="receipts forwarded",
    )
    assert recv(alice) == [] and recv(bob) == []
    for n in (a, b):
        wait_until(lambda n=n: n.status()["pending_envelopes"] == 0, what="pending drained")
        st = n.status()
        assert st["outbox_envelopes"] == 0 and st["accounts"] == 1 and st["peers"] == 1


def test_unreachable_contact_is_keys_unavailable_then_known_contact_queues(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice, _ = join(a, tmp_path, "alice")
    bob, bob_addr = join(b, tmp_path, "bob")
    unknown = haven("send", "--home", str(alice), f"nobody@{b.host}", "hi", check=False)
    # no such user on a reachable node: told apart from a node that is down
    assert unknown.returncode != 0 and "no_such_account" in unknown.stderr

    haven("send", "--home", str(alice), bob_addr, "first")
    wait_until(lambda: b.status()["pending_envelopes"] == 1, what="delivery to B")
    assert [m["text"] for m in recv(bob)] == ["first"]
    b.stop()
    # bob's node is down: alice's node queues for a known contact.
    haven("send", "--home", str(alice), bob_addr, "while you were away")
    assert a.status()["outbox_envelopes"] == 1
    b.start()
    wait_until(lambda: a.status()["outbox_envelopes"] == 0, timeout=60, what="outbox drained")
    assert [m["text"] for m in recv(bob)] == ["while you were away"]


async def _send_all(dev: Device, to: str, texts: list[str]) -> list[str]:
    done = []
    for t in texts:
        try:
            await dev.send(to, t)
            done.append(t)
        except HavenError:
            pass
    return done


async def test_kill9_and_restart_lose_nothing_acked(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice_home, _ = join(a, tmp_path, "alice")
    bob_home, bob_addr = join(b, tmp_path, "bob")
    alice, bob = Device(str(alice_home)), Device(str(bob_home))
    try:
        accepted = await _send_all(alice, bob_addr, [f"m{i}" for i in range(10)])
        b.kill()  # recipient node dies mid-stream
        accepted += await _send_all(alice, bob_addr, [f"m{i}" for i in range(10, 20)])
        a.kill()  # sender node dies with envelopes in its outbox
        a.start()
        b.start()
        accepted += await _send_all(alice, bob_addr, [f"m{i}" for i in range(20, 25)])
        b.stop()  # clean restart as well
        b.start()
        wait_until(lambda: a.status()["outbox_envelopes"] == 0, timeout=60, what="outbox drained")
        received: list[str] = []
        for _ in range(3):
            received += [m.text for m in await bob.receive(wait_s=1.0)]
        assert len(accepted) == 25  # the node was up for every send
        assert received == accepted  # none lost, none twice, in order
        b.kill()  # kill again after delivery: nothing comes back
        b.start()
        assert await bob.receive(wait_s=0.5) == []
        assert b.status()["pending_envelopes"] == 0
    finally:
        alice.close()
        bob.close()


def test_seizure_reveals_no_text_sender_or_recipient(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice, alice_addr = join(a, tmp_path, "alicezq")
    bob, bob_addr = join(b, tmp_path, "bobxw")
    secret_ab = "SECRET-canary-from-alice-7d1f"
    secret_ba = "SECRET-canary-from-bob-93ac"
    for _ in range(3):
        haven("send", "--home", str(alice), bob_addr, secret_ab)
    wait_until(lambda: b.status()["pending_envelopes"] == 3, what="delivery to B")
    assert {m["text"] for m in recv(bob)} == {secret_ab}
    haven("send", "--home", str(bob), alice_addr, secret_ba)
    wait_until(lambda: a.status()["pending_envelopes"] >= 2, what="reply and receipt at A")
    assert [m["text"] for m in recv(alice)] == [secret_ba]
    wait_until(lambda: a.status()["outbox_envelopes"] == 0, what="receipt forwarded")
    assert recv(bob) == []  # picks up alice's delivered receipt
    for n in (a, b):
        wait_until(lambda n=n: n.status()["pending_envelopes"] == 0, what="delivery")
    # The WAL is never truncated (docs/operations.md §5.1): its stale frames are scanned too.
    forbidden = [
        (b, [secret_ab.encode(), secret_ba.encode(), b"alicezq"]),
        (a, [secret_ab.encode(), secret_ba.encode(), b"bobxw"]),
    ]
    for node, needles in forbidden:
        files = [p for p in node.home.rglob("*") if p.is_file()] + [node.log]
        assert len(files) >= 4
        for path in files:
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"{needle!r} found in {path.name}"
    assert os.stat(a.home / "node.key").st_mode & 0o077 == 0


async def test_kill9_cycles(tmp_path: Path, pair: tuple[NodeProc, NodeProc]) -> None:
    """Repeated SIGKILLs of both nodes while sending: every accepted message arrives once.

    CI runs a bounded number of cycles; ``scripts/test --long`` runs many more.
    """
    from tests.conftest import LONG

    cycles = 15 if LONG else 2
    a, b = pair
    alice_home, _ = join(a, tmp_path, "alice")
    bob_home, bob_addr = join(b, tmp_path, "bob")
    alice, bob = Device(str(alice_home)), Device(str(bob_home))
    accepted: list[str] = []
    received: list[str] = []
    try:
        for cycle in range(cycles):
            accepted += await _send_all(alice, bob_addr, [f"c{cycle}-{i}" for i in range(4)])
            victim = (a, b)[cycle % 2]
            victim.kill()
            victim.start()
            received += [m.text for m in await bob.receive(wait_s=0.3) if m.kind == "text"]
        wait_until(lambda: a.status()["outbox_envelopes"] == 0, timeout=60, what="outbox drained")
        for _ in range(3):
            received += [m.text for m in await bob.receive(wait_s=0.7) if m.kind == "text"]
        assert len(accepted) == 4 * cycles
        assert received == accepted
    finally:
        alice.close()
        bob.close()


def test_signed_key_rotation_is_followed_by_peers_and_devices(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    """``haven node rotate-key``: peers and the node's own devices accept the new key because
    the old key signed the rotation; queued envelopes move to the new id."""
    a, b = pair
    alice, alice_addr = join(a, tmp_path, "alice")
    bob, bob_addr = join(b, tmp_path, "bob")
    haven("send", "--home", str(alice), bob_addr, "before rotation")
    wait_until(lambda: b.status()["pending_envelopes"] == 1, what="delivery to B")
    assert [m["text"] for m in recv(bob)] == ["before rotation"]
    old_id = a.status()["node_id"]

    a.stop()
    haven("send", "--home", str(bob), alice_addr, "queued during rotation")
    assert b.status()["outbox_envelopes"] >= 1
    out = haven("node", "rotate-key", "--home", str(a.home), "--json").stdout
    new_id = json.loads(out)["node_id"]
    assert new_id != old_id
    a.start()

    # alice's device follows the signed rotation of its home node
    haven("send", "--home", str(alice), bob_addr, "after rotation")
    wait_until(lambda: b.status()["outbox_envelopes"] == 0, timeout=60, what="B's queue moved")
    got = recv(alice)
    assert [m["text"] for m in got] == ["queued during rotation"]
    wait_until(lambda: b.status()["pending_envelopes"] >= 1, what="delivery to B")
    assert [m["text"] for m in recv(bob)] == ["after rotation"]
    peers = json.loads(haven("node", "peers", "--home", str(b.home), "--json").stdout)
    assert [p["node_id"] for p in peers] == [new_id]
