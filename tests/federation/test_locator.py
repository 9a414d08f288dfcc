"""Locator change statements (docs/protocol.md §12.5): signing, codec, refusals."""

from __future__ import annotations

import dataclasses

import pytest

from federation.errors import BadSignature, MalformedFrame
from federation.signing import (
    Descriptor,
    LocatorChange,
    NodeKey,
    decode_moved,
    decode_moves,
    encode_moved,
)
from federation.wire import packb


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
