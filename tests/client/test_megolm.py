"""Megolm sessions: sharing, rotation policy, and the duplicate / replay / gap rules."""

from __future__ import annotations

import os

import pytest
import vodozemac as vz

from client.group_state import GroupError
from client.megolm import (
    MAX_GAP,
    ROTATE_MESSAGES,
    ROTATE_MS,
    SEEN_WINDOW,
    Inbound,
    Outbound,
    message_index,
)

GID = os.urandom(16)
KEY = os.urandom(32)


def pair(now: int = 0) -> tuple[Outbound, Inbound]:
    out = Outbound.new(now)
    return out, Inbound.from_key(out.session_key(), sender_device="dev-a", gid=GID)


def code_of(inb: Inbound, msg: bytes) -> str:
    with pytest.raises(GroupError) as e:
        inb.decrypt(msg)
    return e.value.code


def test_messages_decrypt_once_in_any_order_and_duplicates_are_flagged() -> None:
    out, inb = pair()
    msgs = [out.encrypt(f"m{i}".encode()) for i in range(5)]
    assert [message_index(m) for m in msgs] == [0, 1, 2, 3, 4]
    for i in (3, 0, 4, 1, 2):
        assert inb.decrypt(msgs[i]) == (f"m{i}".encode(), i, False)
    assert inb.decrypt(msgs[3]) == (b"", 3, True)
    assert inb.highest == 4 and out.sent == 5


def test_another_message_at_a_seen_index_is_a_replay() -> None:
    out, inb = pair()
    pickled = out.pickle(KEY)
    first = out.encrypt(b"pay alice")
    twin = Outbound.from_pickle(pickled, KEY).encrypt(b"pay mallory")  # same key, same index
    assert message_index(first) == message_index(twin) == 0
    assert inb.decrypt(first)[0] == b"pay alice"
    assert code_of(inb, twin) == "megolm_replay"
    assert inb.decrypt(first) == (b"", 0, True)


def test_a_late_joiner_cannot_read_earlier_messages() -> None:
    out = Outbound.new(0)
    early = out.encrypt(b"before you came")
    inb = Inbound.from_key(out.session_key(), sender_device="dev-a", gid=GID)
    later = out.encrypt(b"welcome")
    assert inb.first_index == 1
    assert code_of(inb, early) == "undecryptable"
    assert inb.decrypt(later)[0] == b"welcome"


def test_absurd_jumps_and_foreign_or_garbage_messages_are_refused() -> None:
    out, inb = pair()
    far = Outbound.from_pickle(out.pickle(KEY), KEY)
    far.session = vz.GroupSession.from_pickle(out.session.pickle(KEY), KEY)
    for _ in range(MAX_GAP + 1):
        far.session.encrypt(b"")
    jump = far.encrypt(b"far ahead")
    assert message_index(jump) == MAX_GAP + 1
    assert code_of(inb, jump) == "megolm_gap"
    other, _ = pair()
    assert code_of(inb, other.encrypt(b"not this session")) == "undecryptable"
    assert code_of(inb, b"\x03garbage") == "undecryptable"
    assert code_of(inb, b"x" * (70 * 1024)) == "undecryptable"
    ok = out.encrypt(b"fine")
    assert inb.decrypt(ok)[0] == b"fine"  # refusals changed nothing


def test_the_seen_window_is_bounded_and_older_indices_are_refused() -> None:
    out, inb = pair()
    msgs = [out.encrypt(b"") for _ in range(SEEN_WINDOW + SEEN_WINDOW // 4)]
    for m in msgs[1:]:
        inb.decrypt(m)
    assert len(inb.seen) <= SEEN_WINDOW + SEEN_WINDOW // 8
    assert code_of(inb, msgs[0]) == "megolm_replay"  # unseen but too old to check
    assert inb.decrypt(msgs[-1])[2] is True


def test_rotation_policy() -> None:
    out = Outbound.new(1000)
    assert not out.needs_rotation(1000)
    assert out.needs_rotation(1000 + ROTATE_MS)
    for _ in range(ROTATE_MESSAGES - 1):
        out.encrypt(b"x")
    assert not out.needs_rotation(1001)
    out.encrypt(b"x")
    assert out.needs_rotation(1001)


def test_sessions_survive_pickling_under_the_storage_key() -> None:
    out, inb = pair(now=7)
    out.mark_shared(["d1", "d2"])
    assert out.missing(["d2", "d3", "d1"]) == ["d3"]
    m0 = out.encrypt(b"zero")
    inb.decrypt(m0)
    out2 = Outbound.from_pickle(out.pickle(KEY), KEY)
    inb2 = Inbound.from_pickle(inb.pickle(KEY), KEY)
    assert (out2.session_id, out2.created_at, out2.sent, out2.shared_with) == (
        out.session_id,
        7,
        1,
        {"d1", "d2"},
    )
    assert (inb2.sender_device, inb2.gid, inb2.highest, inb2.seen) == ("dev-a", GID, 0, inb.seen)
    assert inb2.decrypt(m0)[2] is True
    assert inb2.decrypt(out2.encrypt(b"one")) == (b"one", 1, False)
    assert b"dev-a" not in inb.pickle(KEY) and b"d1" not in out.pickle(KEY)
    with pytest.raises(GroupError):
        Inbound.from_pickle(inb.pickle(KEY), os.urandom(32))
    with pytest.raises(GroupError):
        Inbound.from_key("not a key", sender_device="d", gid=GID)
