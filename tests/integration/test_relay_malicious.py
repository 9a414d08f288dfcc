"""A malicious relay between a peer and its client: refusals and retries, never a forgery.

Real nodes on 127.0.0.1: a relay R, its client C (``haven node init --via-relay``, linked to R,
reached only as ``<label>.relay.test``), and the peer A (its process alone resolves that host,
through a private ``/etc/hosts``: tests/integration/hostsns.py). R's public port is the front
door :class:`~tests.integration.evil_relay.EvilRelay`, which passes requests on to R (and R over
its link to C) and the answers back, and misbehaves on demand: whatever it does, R could do in
its place. Alice (on A) writes to carol (on C) through it. For each misbehaviour: the client or
the peer refuses with its ordinary checks (``bad_signature``, ``replay``), A's outbox retries,
and once the relay behaves every message reaches carol once, once in her history. One world for
the module, many asserts.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.config import NodeConfig
from node.nodekey import load_key

from .evil_relay import EvilRelay
from .harness import NodeProc, free_port, haven, join, recv, wait_until
from .hostsns import HostsNode, hosts_file


@dataclass
class World:
    a: NodeProc
    c: NodeProc
    relay: EvilRelay
    alice: Path
    carol: Path
    carol_addr: str
    alice_addr: str


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    assert os.geteuid() == 0 and shutil.which("unshare"), "needs root and unshare, as CI has"
    base = tmp_path_factory.mktemp("evil")
    front, r_port, c_port = free_port(), free_port(), free_port()
    # the relay R listens on r_port; its public port is the misbehaving front door's
    haven(
        *("node", "init", "--home", str(base / "R"), "--relay", "--no-lan"),
        *("--public-url", f"http://127.0.0.1:{front}", "--listen", f"127.0.0.1:{r_port}"),
    )
    r = NodeProc(base / "R", r_port)
    cfg = r.home / "node.toml"
    cfg.write_text(cfg.read_text().replace('relay_domain = ""', 'relay_domain = "relay.test"'))
    code = json.loads(haven("node", "relay-invite", "--home", str(r.home), "--json").stdout)
    host = str(code["host"])
    haven(
        *("node", "init", "--home", str(base / "C"), "--via-relay", str(code["code"])),
        *("--listen", f"127.0.0.1:{c_port}", "--no-lan"),
    )
    c = NodeProc(base / "C", c_port)
    a = HostsNode.of(NodeProc.create(base, "A", "--no-lan"), hosts_file(base / "hosts", host))
    c_key = load_key(str(c.home), NodeConfig.load(str(c.home)))
    relay = EvilRelay(front, r.url, keep_host=True, client_key=c_key)
    try:
        relay.start()
        for n in (r, c, a):
            n.start()
        wait_until(lambda: _linked(r), 30, "the client's link to the relay")
        alice, alice_addr = join(a, base, "alice")
        carol, carol_addr = join(c, base, "carol")
        assert carol_addr == f"carol@{host}"  # C is reached only through the relay
        haven("send", "--home", str(alice), carol_addr, "before")
        wait_until(lambda: c.status()["pending_envelopes"] >= 1, what="the first message at C")
        assert [m["text"] for m in recv(carol)] == ["before"]
        out = haven("node", "relay-clients", "--home", str(r.home), "--json").stdout
        assert json.loads(out)[0]["bytes_in"] > 0  # it went over the relay's link
        yield World(a, c, relay, alice, carol, carol_addr, alice_addr)
    finally:
        for n in (a, c, r):
            n.stop()
        relay.stop()


def _linked(r: NodeProc) -> bool:
    out = haven("node", "relay-clients", "--home", str(r.home), "--json").stdout
    return any(row["connected"] for row in json.loads(out))


def _misbehave_then_recover(w: World, plan: list[str], text: str) -> None:
    """Send ``text`` while the relay misbehaves once per batch request as ``plan`` says; then
    check A retried after the last misbehaviour (it did not take a forged or lost answer for
    an acceptance) and carol got the message exactly once."""
    w.relay.mode = "pass"
    passed = w.relay.seen["pass"]
    w.relay.plan = list(plan)
    haven("send", "--home", str(w.alice), w.carol_addr, text)
    wait_until(lambda: not w.relay.plan, timeout=60, what=f"A to retry through {plan}")
    wait_until(
        lambda: w.a.status()["outbox_envelopes"] == 0, timeout=60, what=f"A's outbox after {plan}"
    )
    assert w.relay.seen["pass"] > passed  # A sent again once the relay behaved
    got = recv(w.carol)
    assert [m["text"] for m in got] == [text]  # nothing lost
    assert recv(w.carol, wait=0.3) == []  # nothing twice
    _history_once(w, text)


def _history_once(w: World, text: str) -> None:
    out = haven("history", "--home", str(w.carol), w.alice_addr, "--json").stdout
    assert out.count(json.dumps(text)) == 1  # carol's history holds the message once


def test_altered_bodies_and_dropped_answers(world: World) -> None:
    # an altered request is refused by C; a request C stored whose answer the relay drops is
    # sent again, and C keeps each envelope id once
    before = world.c.error_count("federation.bad_signature")
    _misbehave_then_recover(world, ["alter_request", "drop_response"], "altered, then dropped")
    assert world.c.error_count("federation.bad_signature") >= before + 1


def test_replayed_requests_are_refused(world: World) -> None:
    before = world.c.error_count("federation.replay")
    world.relay.replay_codes.clear()
    world.relay.mode = "replay"
    haven("send", "--home", str(world.alice), world.carol_addr, "once only")
    wait_until(lambda: world.relay.replay_codes, timeout=60, what="a replayed request")
    world.relay.mode = "pass"
    # every replay of a request C had already accepted was refused, and counted as a replay
    assert world.relay.replay_codes and all(c != 200 for c in world.relay.replay_codes)
    assert world.c.error_count("federation.replay") >= before + len(world.relay.replay_codes)
    wait_until(lambda: world.a.status()["outbox_envelopes"] == 0, timeout=60, what="A's outbox")
    assert [m["text"] for m in recv(world.carol)] == ["once only"]
    assert recv(world.carol, wait=0.3) == []
    _history_once(world, "once only")


def test_altered_and_replayed_answers_are_refused_by_the_peer(world: World) -> None:
    # C stores the envelope and answers; the relay alters that answer, then answers A's retry
    # with C's genuine earlier acceptance (of this very envelope, for the earlier request)
    # without forwarding: the answer signature binds the request nonce, so A refuses both.
    before = world.a.error_count("outbox.bad_signature")
    _misbehave_then_recover(world, ["alter_response", "forge_accept"], "answers tampered with")
    assert world.a.error_count("outbox.bad_signature") >= before + 2


def test_a_held_acceptance_needs_the_nodes_valid_statement(world: World) -> None:
    # The relay answers "all accepted" signed by its own key, as a held-mode relay does, but
    # with no statement, a statement it signed itself, one of C's that expired and one of C's
    # for another relay: A refuses every one (bad_signature) and keeps the envelope. Two
    # messages, two forgeries each: every delivery resets A's backoff.
    before = world.a.error_count("outbox.bad_signature")
    world.relay.seen["forge_held"] = 0
    for text in ("no forged acceptance", "nor this one"):
        _misbehave_then_recover(world, ["forge_held", "forge_held"], text)
    assert world.relay.seen["forge_held"] == 4
    assert world.a.error_count("outbox.bad_signature") >= before + 4
