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

from node.config import NodeConfig
from node.nodekey import load_key

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
    b_key = load_key(str(b.home), NodeConfig.load(str(b.home)))
    relay = EvilRelay(relay_port, b.url, client_key=b_key)
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


def _misbehave_then_recover(w: World, plan: list[str], text: str) -> None:
    """Send ``text`` while the relay misbehaves once per batch request as ``plan`` says; then
    check A retried after the last misbehaviour (it did not take a forged or lost answer for
    an acceptance) and bob got the message exactly once."""
    w.relay.mode = "pass"
    passed = w.relay.seen["pass"]
    w.relay.plan = list(plan)
    haven("send", "--home", str(w.alice), w.bob_addr, text)
    wait_until(lambda: not w.relay.plan, timeout=60, what=f"A to retry through {plan}")
    wait_until(
        lambda: w.a.status()["outbox_envelopes"] == 0, timeout=60, what=f"A's outbox after {plan}"
    )
    assert w.relay.seen["pass"] > passed  # A sent again once the relay behaved
    got = recv(w.bob)
    assert [m["text"] for m in got] == [text]  # nothing lost
    assert recv(w.bob, wait=0.3) == []  # nothing twice
    _history_once(w, text)


def _history_once(w: World, text: str) -> None:
    out = haven("history", "--home", str(w.bob), w.alice_addr, "--json").stdout
    assert out.count(json.dumps(text)) == 1  # bob's history holds the message once


def test_altered_bodies_and_dropped_answers(world: World) -> None:
    # an altered request is refused by B; a request B stored whose answer the relay drops is
    # sent again, and B keeps each envelope id once
    before = world.b.error_count("federation.bad_signature")
    _misbehave_then_recover(world, ["alter_request", "drop_response"], "altered, then dropped")
    assert world.b.error_count("federation.bad_signature") >= before + 1


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


def test_altered_and_replayed_answers_are_refused_by_the_peer(world: World) -> None:
    # B stores the envelope and answers; the relay alters that answer, then answers A's retry
    # with B's genuine earlier acceptance (of this very envelope, for the earlier request)
    # without forwarding: the answer signature binds the request nonce, so A refuses both.
    before = world.a.error_count("outbox.bad_signature")
    _misbehave_then_recover(world, ["alter_response", "forge_accept"], "answers tampered with")
    assert world.a.error_count("outbox.bad_signature") >= before + 2


def test_a_held_acceptance_needs_the_nodes_valid_statement(world: World) -> None:
    # The relay answers "all accepted" signed by its own key, as a held-mode relay does, but
    # with no statement, a statement it signed itself, one of B's that expired and one of B's
    # for another relay: A refuses every one (bad_signature) and keeps the envelope. Two
    # messages, two forgeries each: every delivery resets A's backoff.
    before = world.a.error_count("outbox.bad_signature")
    world.relay.seen["forge_held"] = 0
    for text in ("no forged acceptance", "nor this one"):
        _misbehave_then_recover(world, ["forge_held", "forge_held"], text)
    assert world.relay.seen["forge_held"] == 4
    assert world.a.error_count("outbox.bad_signature") >= before + 4
