"""A malicious relay between a peer and a relayed node: refusals and retries, never a forgery.

Node B's ``public_url`` points at :class:`~tests.integration.evil_relay.EvilRelay`, which
forwards federation requests to B and its answers back exactly as a relay does (docs/protocol.md
§12), and misbehaves on demand. Alice (on A) writes to bob (on B) through it. For each
misbehaviour: the node or the peer refuses with its ordinary checks (``bad_signature``,
``replay``), A's outbox retries, and once the relay behaves every message reaches bob once.
One world for the module, many asserts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .evil_relay import EvilRelay
from .harness import NodeProc, free_port, haven, join, recv, wait_until


@dataclass
class World:
    a: NodeProc
    b: NodeProc
    relay: EvilRelay
    alice: Path
    bob: Path
    bob_addr: str
    alice_addr: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("evil")
    a = NodeProc.create(base, "A")
    relay_port, b_port = free_port(), free_port()
    haven(
        *("node", "init", "--home", str(base / "B")),
        *("--public-url", f"http://127.0.0.1:{relay_port}", "--listen", f"127.0.0.1:{b_port}"),
    )
    b = NodeProc(base / "B", b_port)
    relay = EvilRelay(relay_port, b.url)
    try:
        relay.start()
        a.start()
        b.start()
        alice, alice_addr = join(a, base, "alice")
        bob, bob_addr = join(b, base, "bob")
        assert bob_addr == f"bob@127.0.0.1:{relay_port}"  # B is reached only via the relay
        haven("send", "--home", str(alice), bob_addr, "before")
        wait_until(lambda: b.status()["pending_envelopes"] >= 1, what="the first message at B")
        assert [m["text"] for m in recv(bob)] == ["before"]
        yield World(a, b, relay, alice, bob, bob_addr, alice_addr)
    finally:
        for n in (a, b):
            n.stop()
        relay.stop()


def _misbehave_then_recover(w: World, mode: str, text: str) -> None:
    """Send ``text`` while the relay misbehaves in ``mode``; let A retry at least once; then
    let the relay behave and check bob gets the message exactly once."""
    w.relay.mode = mode
    w.relay.seen[mode] = 0
    haven("send", "--home", str(w.alice), w.bob_addr, text)
    wait_until(lambda: w.relay.seen[mode] >= 2, timeout=60, what=f"A to retry under {mode}")
    assert w.a.status()["outbox_envelopes"] >= 1  # refused, so still A's to deliver
    w.relay.mode = "pass"
    wait_until(
        lambda: w.a.status()["outbox_envelopes"] == 0, timeout=60, what=f"A's outbox after {mode}"
    )
    got = recv(w.bob)
    assert [m["text"] for m in got] == [text]  # nothing lost
    assert recv(w.bob, wait=0.3) == []  # nothing twice
    _history_once(w, text)


def _history_once(w: World, text: str) -> None:
    out = haven("history", "--home", str(w.bob), w.alice_addr, "--json").stdout
    assert out.count(json.dumps(text)) == 1  # bob's history holds the message once


def test_altered_bodies_are_refused_and_retried(world: World) -> None:
    before = world.b.error_count("federation.bad_signature")
    _misbehave_then_recover(world, "alter_request", "through a relay that alters")
    assert world.b.error_count("federation.bad_signature") >= before + 2


def test_replayed_requests_are_refused(world: World) -> None:
    before = world.b.error_count("federation.replay")
    world.relay.replay_codes.clear()
    world.relay.mode = "replay"
    haven("send", "--home", str(world.alice), world.bob_addr, "once only")
    wait_until(lambda: world.relay.replay_codes, timeout=60, what="a replayed request")
    world.relay.mode = "pass"
    # every replay of a request B had already accepted was refused, and counted as a replay
    assert world.relay.replay_codes and all(c != 200 for c in world.relay.replay_codes)
    assert world.b.error_count("federation.replay") >= before + len(world.relay.replay_codes)
    wait_until(lambda: world.a.status()["outbox_envelopes"] == 0, timeout=60, what="A's outbox")
    assert [m["text"] for m in recv(world.bob)] == ["once only"]
    assert recv(world.bob, wait=0.3) == []
    _history_once(world, "once only")


def test_dropped_responses_are_retried_without_duplicates(world: World) -> None:
    # B stores the envelope every time but A never hears so: A resends the same envelope ids,
    # B keeps each once, bob sees the message once.
    _misbehave_then_recover(world, "drop_response", "answer lost on the way back")


def test_altered_answers_are_refused_by_the_peer(world: World) -> None:
    before = world.a.error_count("outbox.bad_signature")
    _misbehave_then_recover(world, "alter_response", "answer altered on the way back")
    assert world.a.error_count("outbox.bad_signature") >= before + 2


def test_a_replayed_acceptance_is_not_an_acceptance(world: World) -> None:
    # The relay keeps B's last real, signed acceptance and answers new batches with it without
    # forwarding them: the signature binds the request nonce, so A refuses it and retries.
    before = world.a.error_count("outbox.bad_signature")
    _misbehave_then_recover(world, "forge_accept", "acceptance forged from an old one")
    assert world.a.error_count("outbox.bad_signature") >= before + 2
