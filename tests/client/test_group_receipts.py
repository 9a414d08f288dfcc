"""The "1" counter: watermarks merge by max, hidden readers, members who joined later."""

from __future__ import annotations

import itertools

import pytest

from client.group_receipts import Watermarks, count_unread, watermarks_for
from client.group_state import GroupError

MEMBERS = ["alice@a", "bob@b", "carol@c", "dave@a", "erin@b", "fay@c"]


def test_the_counter_falls_from_five_to_zero_as_members_read() -> None:
    marks = Watermarks()
    counts = [count_unread("alice@a", 100, MEMBERS, marks).unread_by]
    for reader in MEMBERS[1:]:
        assert marks.update(reader, {"alice@a": 100})
        counts.append(count_unread("alice@a", 100, MEMBERS, marks).unread_by)
    assert counts == [5, 4, 3, 2, 1, 0]


def test_a_watermark_covers_earlier_messages_only_and_merges_by_max() -> None:
    updates = [("bob@b", 50), ("bob@b", 200), ("bob@b", 120), ("carol@c", 90)]
    results = set()
    for order in itertools.permutations(updates):
        marks = Watermarks()
        for reader, at in order:
            marks.update(reader, {"alice@a": at})
        results.add(tuple(count_unread("alice@a", t, MEMBERS, marks) for t in (80, 150, 250)))
    assert len(results) == 1
    early, mid, late = results.pop()
    assert early.unread_members == ("dave@a", "erin@b", "fay@c")
    assert mid.unread_members == ("carol@c", "dave@a", "erin@b", "fay@c")
    assert late.unread_by == 5
    marks = Watermarks()
    marks.update("bob@b", {"alice@a": 200})
    assert not marks.update("bob@b", {"alice@a": 100})  # lower: nothing changes
    assert marks.get("bob@b", "alice@a") == 200 and marks.get("bob@b", "carol@c") == 0


def test_hidden_readers_and_later_joiners() -> None:
    marks = Watermarks()
    marks.update("bob@b", {}, hide=True)
    marks.update("alice@a", {}, hide=True)  # the sender itself is never counted
    c = count_unread("alice@a", 100, MEMBERS, marks, {"fay@c": 101})
    assert c.receipts_hidden == 1 and "bob@b" not in c.unread_members
    assert c.unread_members == ("carol@c", "dave@a", "erin@b")
    assert marks.update("bob@b", {"alice@a": 1}, hide=False)
    assert count_unread("alice@a", 100, MEMBERS, marks).receipts_hidden == 0


def test_merge_forget_and_storage() -> None:
    a, b = Watermarks(), Watermarks()
    a.update("bob@b", {"alice@a": 10, "carol@c": 5}, hide=True)
    b.update("bob@b", {"alice@a": 30})
    b.update("dave@a", {"alice@a": 7})
    assert a.merge(b) and not a.merge(b)
    assert a.get("bob@b", "alice@a") == 30 and a.get("bob@b", "carol@c") == 5
    back = Watermarks.load(a.dump())
    assert back == a and back.hidden == {"bob@b"}
    back.forget(["bob@b"])
    assert back.get("bob@b", "alice@a") == 0 and back.hidden == set()
    with pytest.raises(GroupError):
        Watermarks.load(b"\x01")


def test_a_readers_payload_has_one_watermark_per_sender() -> None:
    rows = [("alice@a", 5), ("bob@b", 9), ("alice@a", 12), ("alice@a", 3)]
    assert watermarks_for(rows) == {"alice@a": 12, "bob@b": 9}
    many = watermarks_for((f"u{i}@h", i + 1) for i in range(1500))
    assert len(many) == 1000 and min(many.values()) == 501
