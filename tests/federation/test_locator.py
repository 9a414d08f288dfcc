"""Locator change statements (docs/protocol.md §12.5): signing, codec, refusals."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from federation.errors import BadSignature, LocalProtocolError, MalformedFrame
from federation.signing import (
    Descriptor,
    LocatorChange,
    NodeKey,
    decode_moved,
    decode_moves,
    encode_moved,
    plan_moves,
)
from federation.wire import packb
from node.moves import load_locators, record_move


def test_statement_round_trips_and_verifies_only_under_its_node_key() -> None:
    key, other = NodeKey.generate(), NodeKey.generate()
    change = LocatorChange.make(key, "Old.Example", "new.example:8443", 5)
    assert (change.old_host, change.new_host) == ("old.example", "new.example:8443")
    change.verify()
    assert decode_moved(encode_moved((change,))) == (change,)
    with pytest.raises(BadSignature):
        dataclasses.replace(change, node_id=other.node_id).verify()
    with pytest.raises(BadSignature):
        dataclasses.replace(change, new_host="evil.example").verify()


def test_descriptor_carries_moves_and_omits_the_key_when_there_are_none() -> None:
    key = NodeKey.generate()
    change = LocatorChange.make(key, "a.example", "b.example", 7)
    base = Descriptor(key.node_id, "https://b.example", 1, 0, {})
    assert Descriptor.verify_decode(dataclasses.replace(base, moves=(change,)).sign(key)).moves == (
        change,
    )
    plain = base.sign(key)
    assert b"moves" not in plain
    assert Descriptor.verify_decode(plain).moves == ()


@pytest.mark.parametrize(
    "bad",
    [
        "x",
        [["n", "a", "b", 1, b"s" * 64]],  # not a node id
        [[NodeKey.generate().node_id, "a", "a", 1, b"s" * 64]],  # same host
        [[NodeKey.generate().node_id, "A", "b", 1, b"s" * 64]],  # not lower-case
        [[NodeKey.generate().node_id, "a", "b", True, b"s" * 64]],  # bool as created
        [[NodeKey.generate().node_id, "a", "b", 1, b"s" * 63]],  # short signature
        [[NodeKey.generate().node_id, "a", "b" * 300, 1, b"s" * 64]],  # host too long
    ],
)
def test_malformed_statements_are_refused(bad: object) -> None:
    with pytest.raises(MalformedFrame):
        decode_moves(bad)
    with pytest.raises(MalformedFrame):
        decode_moved(packb({"moves": bad}))


def test_moved_body_must_hold_only_moves() -> None:
    with pytest.raises(MalformedFrame):
        decode_moved(packb({"moves": [], "extra": 1}))


def test_plan_follows_a_chain_and_skips_statements_not_newer_than_the_last_followed() -> None:
    key = NodeKey.generate()
    a_to_b = LocatorChange.make(key, "a.example", "b.example", 10)
    b_to_a = LocatorChange.make(key, "b.example", "a.example", 20)
    plan = plan_moves((a_to_b, b_to_a), key.node_id, "a.example", 0)
    assert (plan.follow, plan.bad, plan.replayed) == ((a_to_b, b_to_a), 0, 0)
    # back at A after both: a replay of the public A→B is refused and counted
    replay = plan_moves((a_to_b,), key.node_id, "a.example", 20)
    assert (replay.follow, replay.replayed) == ((), 1)
    # the descriptor's full history is not a replay: nothing to follow, nothing counted
    history = plan_moves((a_to_b, b_to_a), key.node_id, "a.example", 20)
    assert (history.follow, history.replayed) == ((), 0)
    # a newer move from A is followed
    a_to_c = LocatorChange.make(key, "a.example", "c.example", 30)
    assert plan_moves((a_to_b, b_to_a, a_to_c), key.node_id, "a.example", 20).follow == (a_to_c,)


def test_plan_counts_bad_signatures_and_ignores_other_nodes_and_hosts() -> None:
    key, other = NodeKey.generate(), NodeKey.generate()
    forged = dataclasses.replace(LocatorChange.make(key, "a.example", "b.example", 10), created=11)
    elsewhere = LocatorChange.make(key, "x.example", "y.example", 12)
    foreign = LocatorChange.make(other, "a.example", "z.example", 13)
    plan = plan_moves((forged, elsewhere, foreign), key.node_id, "A.example", 0)
    assert (plan.follow, plan.bad, plan.replayed) == ((), 1, 0)


def test_a_node_refuses_to_sign_a_move_not_newer_than_its_last(tmp_path: Path) -> None:
    key = NodeKey.generate()
    record_move(str(tmp_path), key, "https://a.example", "https://b.example", 100)
    with pytest.raises(LocalProtocolError):
        record_move(str(tmp_path), key, "https://b.example", "https://a.example", 100)
    assert [m.created for m in load_locators(str(tmp_path))] == [100]
    record_move(str(tmp_path), key, "https://b.example", "https://a.example", 101)
    assert [m.created for m in load_locators(str(tmp_path))] == [100, 101]
