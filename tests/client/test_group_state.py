"""Signed group state: codec bounds, validity rules, convergence of concurrent admin changes."""

from __future__ import annotations

import itertools
import os
from dataclasses import replace

import msgpack
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from client.group_state import (
    MAX_MEMBERS,
    GroupError,
    GroupState,
    SignedState,
    StateBook,
    changed,
    create,
    invite_code,
    parse_invite_code,
    sign_state,
)

NAMES = ["alice@a", "bob@b", "carol@c", "dave@a", "erin@b"]
KEYS = {n: nacl.signing.SigningKey(bytes([i + 1]) * 32) for i, n in enumerate(NAMES)}
PINNED = {n: bytes(k.verify_key) for n, k in KEYS.items()}
GID = bytes(range(16))


def key_of(address: str) -> bytes | None:
    return PINNED.get(address)


def signed(state: GroupState) -> SignedState:
    return sign_state(state, KEYS[state.by])


def base() -> tuple[SignedState, SignedState]:
    """v1: alice creates with bob, carol, dave; v2: alice makes bob and carol admins."""
    v1 = signed(create(GID, "team", ["bob@b", "carol@c", "dave@a"], "alice@a", at=1))
    v2 = signed(changed(v1, by="alice@a", at=2, admin=("bob@b", True)))
    v2 = signed(replace(v2.open(), admins=("alice@a", "bob@b", "carol@c")))
    return v1, v2


def book_of(*states: SignedState) -> StateBook:
    book = StateBook(GID)
    for s in states:
        book.add(s, key_of)
    return book


def test_a_signed_state_round_trips_and_keeps_its_lists_sorted() -> None:
    v1 = create(GID, " team ", ["dave@a", "bob@b", "bob@b"], "alice@a", at=5)
    assert v1.members == ("alice@a", "bob@b", "dave@a") and v1.admins == ("alice@a",)
    assert v1.name == "team" and v1.version == 1 and v1.parent == b""
    s = signed(v1)
    back = SignedState.decode(s.encode())
    assert back == s and back.open() == v1
    back.verify(PINNED["alice@a"])
    with pytest.raises(GroupError) as e:
        back.verify(PINNED["bob@b"])
    assert e.value.code == "forged_state"


def _blob(**change: object) -> bytes:
    obj: dict[str, object] = {
        "v": 1,
        "g": GID,
        "ver": 1,
        "name": "n",
        "members": ["alice@a", "bob@b"],
        "admins": ["alice@a"],
        "by": "alice@a",
        "parent": b"",
        "at": 0,
    }
    obj.update(change)
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"v": 2}, "malformed"),
        ({"members": ["bob@b", "alice@a"]}, "malformed"),
        ({"members": ["alice@a", "alice@a"]}, "malformed"),
        ({"admins": ["carol@c"]}, "malformed"),
        ({"admins": []}, "malformed"),
        ({"parent": b"x" * 32}, "malformed"),
        ({"ver": 2}, "malformed"),
        ({"name": "x" * 65}, "malformed"),
        ({"g": b"short"}, "malformed"),
        ({"members": [f"u{i:04}@h" for i in range(MAX_MEMBERS + 1)]}, "too_many_members"),
    ],
)
def test_bad_states_are_refused_with_a_stable_code(change: dict[str, object], code: str) -> None:
    GroupState.from_blob(_blob())  # the unchanged blob is fine
    with pytest.raises(GroupError) as e:
        GroupState.from_blob(_blob(**change))
    assert e.value.code == code
    book = StateBook(GID)
    res = book.add(SignedState(_blob(**change), bytes(64)), key_of)
    assert res.code == code and not res.ok and book.current is None


def test_random_bytes_raise_only_group_errors() -> None:
    for n in range(200):
        raw = os.urandom(n % 90)
        with pytest.raises(GroupError):
            SignedState.decode(raw).open()


def test_concurrent_admin_changes_converge_in_every_delivery_order() -> None:
    v1, v2 = base()
    by_bob = signed(changed(v2, by="bob@b", at=3, add=["erin@b"]))
    by_carol = signed(changed(v2, by="carol@c", at=3, rename="team two"))
    winner, loser = (
        (by_bob, by_carol) if PINNED["bob@b"] > PINNED["carol@c"] else (by_carol, by_bob)
    )
    later = signed(changed(winner, by=winner.open().by, at=4, remove=["dave@a"]))
    ends_two, ends_three = set(), set()
    for order in itertools.permutations([v1, v2, by_bob, by_carol]):
        book = book_of(*order)
        ends_two.add(book.current_signed)
        assert [s["version"] for s in book.superseded()] == [3]
    for order in itertools.permutations([v1, v2, by_bob, by_carol, later]):
        book = book_of(*order)
        ends_three.add(book.current_signed)
        lost = book.superseded()
        assert len(lost) == 1 and lost[0]["by"] == loser.open().by
    assert ends_two == {winner} and ends_three == {later}
    gone = set(winner.open().members) - set(later.open().members)
    assert gone == {"dave@a"} and later.open().version == 4


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_any_tree_of_changes_converges_on_the_greatest(data: st.DataObject) -> None:
    v1, v2 = base()
    states = [v1, v2]
    for i in range(data.draw(st.integers(1, 6))):
        parent = data.draw(st.sampled_from(states[1:]))
        p = parent.open()
        leavers = sorted(set(p.members) - set(p.admins))
        if leavers and data.draw(st.booleans()):
            who = data.draw(st.sampled_from(leavers))
            states.append(signed(changed(parent, by=who, at=10 + i, leave=who)))
        else:
            by = data.draw(st.sampled_from(p.admins))
            states.append(signed(changed(parent, by=by, at=10 + i, rename=f"n{i}")))
    books = [book_of(*data.draw(st.permutations(states))) for _ in range(2)]
    best = max(states, key=lambda s: (s.open().version, PINNED[s.open().by], s.digest))
    assert books[0].current_signed == books[1].current_signed == best
    assert books[0].superseded() == books[1].superseded()
    assert len(books[0].superseded()) == len(states) - best.open().version


def test_each_result_says_what_happened() -> None:
    v1, v2 = base()
    book = StateBook(GID)
    first = book.add(v1, key_of)
    assert first.outcome == "current" and first.changed and first.current == v1.open()
    assert book.add(v1, key_of).outcome == "duplicate"
    v3 = signed(changed(v2, by="alice@a", at=3, add=["erin@b"]))
    by_dave = signed(replace(changed(v2, by="alice@a", at=3, rename="d"), by="dave@a"))
    early = book.add(by_dave, key_of)  # parent v2 not here yet, and dave is no admin: kept aside
    assert (early.outcome, early.code, early.current) == ("pending", "stale_state", v1.open())
    late = book.add(v2, key_of)  # it comes, and the change waiting on it is judged: forged
    assert late.outcome == "current" and late.current == v2.open() and late.accepted == (v2.open(),)
    book = book_of(v1)
    jump = book.add(v3, key_of)  # parent v2 not here: alice, an admin of v1, vouches for it
    assert (jump.outcome, jump.jumped, jump.current) == ("current", True, v3.open())
    assert book.add(v2, key_of).outcome == "ancestor" and book.current == v3.open()
    skip = signed(replace(v3.open(), version=5, parent=v3.digest))
    assert book.add(skip, key_of).code == "stale_state" and book.current == v3.open()


def test_forged_changes_are_refused_and_change_nothing() -> None:
    v1, v2 = base()
    book = book_of(v1, v2)
    add = changed(v2, by="bob@b", at=3, add=["erin@b"])
    wrong_key = sign_state(add, KEYS["erin@b"])
    non_admin = signed(replace(add, by="dave@a"))
    other_gid = signed(create(os.urandom(16), "x", ["bob@b"], "alice@a", at=3))
    refound = signed(create(GID, "mine", ["bob@b"], "erin@b", at=3))
    unsigned_by = SignedState(add.blob(), bytes(64))
    for bad, code in [
        (wrong_key, "forged_state"),
        (non_admin, "forged_state"),
        (unsigned_by, "forged_state"),
        (other_gid, "unknown_group"),
        (refound, "forged_state"),
    ]:
        res = book.add(bad, key_of)
        assert res.code == code and not res.ok and res.current == v2.open()
    assert book.superseded() == ()
    stranger = sign_state(replace(add, by="zed@z"), KEYS["erin@b"])
    res = book.add(stranger, key_of)
    assert res.outcome == "forged" and book.current == v2.open()


def test_a_member_may_sign_only_its_own_leave() -> None:
    v1, v2 = base()
    book = book_of(v1, v2)
    with pytest.raises(GroupError) as e:
        changed(v2, by="dave@a", at=3, add=["erin@b"])
    assert e.value.code == "not_admin"
    with pytest.raises(GroupError) as e:
        changed(v2, by="dave@a", at=3, leave="bob@b")
    assert e.value.code == "not_admin"
    leave = changed(v2, by="dave@a", at=3, leave="dave@a")
    sneaky = signed(replace(leave, name="mine"))
    assert book.add(sneaky, key_of).code == "forged_state"
    swap = signed(replace(leave, members=("alice@a", "bob@b", "carol@c", "erin@b")))
    assert book.add(swap, key_of).code == "forged_state"
    res = book.add(signed(leave), key_of)
    assert res.outcome == "current" and "dave@a" not in res.current.members  # type: ignore[union-attr]


def test_the_last_admin_leaving_hands_the_group_on() -> None:
    v1 = signed(create(GID, "t", ["bob@b", "carol@c"], "alice@a", at=1))
    gone = changed(v1, by="alice@a", at=2, leave="alice@a")
    assert gone.members == ("bob@b", "carol@c") and gone.admins == ("bob@b",)
    for kw, code in [
        ({"admin": ("alice@a", False)}, "last_admin"),
        ({"remove": ["erin@b"]}, "not_member"),
        ({"add": ["bob@b"]}, "no_change"),
        ({"rename": "  "}, "invalid_name"),
        ({"add": [f"u{i:04}@h" for i in range(MAX_MEMBERS)]}, "too_many_members"),
    ]:
        with pytest.raises(GroupError) as e:
            changed(v1, by="alice@a", at=2, **kw)  # type: ignore[arg-type]
        assert e.value.code == code
    with pytest.raises(GroupError) as e:
        changed(v1, by="erin@b", at=2, leave="erin@b")
    assert e.value.code == "not_member"


def test_a_new_member_follows_from_the_handoff_and_sees_the_race() -> None:
    v1, v2 = base()
    admin_book = book_of(v1, v2)
    add = signed(changed(v2, by="alice@a", at=3, add=["erin@b"]))
    rival = signed(changed(v2, by="carol@c", at=3, rename="other"))
    admin_book.add(add, key_of)
    chain = admin_book.handoff()
    assert chain == [add, v2]
    admin_book.add(rival, key_of)
    for rival_first in (True, False):  # the rival may come before the root's parent, or after
        joiner = StateBook(GID)
        assert joiner.add(chain[0], key_of, root=True).outcome == "current"
        if rival_first:
            assert joiner.add(rival, key_of).outcome == "pending"
        parent = joiner.add(chain[1], key_of)
        assert parent.ok and parent.outcome in ("ancestor", "current")
        assert v2.open() not in parent.accepted  # not news
        if not rival_first:
            joiner.add(rival, key_of)
        assert joiner.current_signed == admin_book.current_signed
        assert joiner.superseded() == admin_book.superseded()
    assert StateBook(GID).add(signed(replace(v2.open(), by="dave@a")), key_of, root=True).code == (
        "forged_state"
    )
    assert StateBook(GID).add(v2, lambda a: None, root=True).outcome == "unknown_signer"
    refound = signed(create(GID, "mine", ["bob@b"], "erin@b", at=3))
    fresh = StateBook(GID)
    fresh.add(add, key_of, root=True)
    assert fresh.add(refound, key_of).outcome == "old"  # no creation to judge it against
    assert joiner.add(v1, key_of).outcome == "ancestor"  # the chain back to the creation
    assert joiner.add(refound, key_of).code == "forged_state"


def test_a_linked_device_rebuilds_the_book_from_its_transfer() -> None:
    v1, v2 = base()
    book = book_of(v1, v2)
    add = signed(changed(v2, by="alice@a", at=3, add=["erin@b"]))
    rival = signed(changed(v2, by="carol@c", at=3, rename="other"))
    for s in (add, rival):
        book.add(s, key_of)
    later = signed(changed(book.current_signed, by="alice@a", at=4, rename="later"))  # type: ignore[arg-type]
    for extra in ((), (later,)):  # the race at the top, then one version below the top
        for s in extra:
            assert book.add(s, key_of).outcome == "current"
        sent = book.transfer()
        assert sent[0] == book.current_signed and len(sent) == len(set(sent))
        linked = StateBook(GID)
        assert linked.add(sent[0], key_of, root=True).outcome == "current"
        for s in sent[1:]:
            assert linked.add(s, key_of).ok
        assert linked.current_signed == book.current_signed
        assert len(linked.superseded()) == 1 and linked.superseded() == book.superseded()
    assert StateBook(GID).transfer() == []


def test_a_device_that_missed_many_versions_catches_up_on_an_admins_word() -> None:
    v1, v2 = base()
    chain = [v1, v2]
    for i in range(3, 15):  # v3..v14: more than the KEEP_VERSIONS any book keeps
        chain.append(signed(changed(chain[-1], by="bob@b", at=i, rename=f"n{i}")))
    book = book_of(v1, v2)  # this device missed v3..v13 for good
    assert book.add(signed(replace(chain[-1].open(), by="dave@a")), key_of).code == "stale_state"
    forged = SignedState(chain[-1].blob, bytes(64))
    assert book.add(forged, key_of).code == "forged_state"
    assert book.current == v2.open()  # a non-admin's or a forged jump changes nothing
    res = book.add(chain[-1], key_of)  # bob, an admin of v2, vouches for the jump
    assert (res.outcome, res.jumped, res.changed) == ("current", True, True)
    assert book.current_signed == chain[-1] and res.accepted == (chain[-1].open(),)
    assert book.superseded() == ()  # the versions below are history, not lost changes
    nxt = signed(changed(chain[-1], by="alice@a", at=20, add=["erin@b"]))
    assert book.add(nxt, key_of).outcome == "current" and book.current == nxt.open()
    assert book.add(chain[3], key_of).outcome == "old"  # below the kept window now
    lower = signed(replace(chain[5].open(), parent=os.urandom(32), version=9))
    assert book.add(lower, key_of).outcome == "pending"  # no jump backwards
    back = StateBook.load(book.dump())
    assert back.current_signed == nxt and back.superseded() == ()


def test_a_book_survives_dump_and_load() -> None:
    v1, v2 = base()
    by_bob = signed(changed(v2, by="bob@b", at=3, add=["erin@b"]))
    by_carol = signed(changed(v2, by="carol@c", at=3, rename="two"))
    ahead = signed(changed(by_bob, by="bob@b", at=9, remove=["erin@b"]))
    ahead = signed(replace(ahead.open(), version=5, parent=os.urandom(32), by="dave@a"))
    book = book_of(v1, v2, by_bob, by_carol, ahead)
    back = StateBook.load(book.dump())
    assert back.current_signed == book.current_signed and back.superseded() == book.superseded()
    assert back.add(ahead, key_of).outcome == "pending"  # still waiting, not lost
    with pytest.raises(GroupError):
        StateBook.load(b"\x93\x01\x02")


def test_invite_codes_round_trip_and_garbage_is_refused() -> None:
    secret = os.urandom(32)
    code = invite_code(GID, "alice@a", secret, "team")
    assert code.startswith("haven:group:")
    inv = parse_invite_code("  " + code + "\n")
    assert (inv.gid, inv.admin, inv.secret, inv.name) == (GID, "alice@a", secret, "team")
    for bad in [
        "",
        "haven:link:abc",
        "haven:group:",
        "haven:group:!!!!",
        code[:-8],
        code + "x" * 2000,
    ]:
        with pytest.raises(GroupError) as e:
            parse_invite_code(bad)
        assert e.value.code == "invalid_group_invite"


def test_the_book_keeps_a_bounded_window_of_versions() -> None:
    v1, v2 = base()
    book = book_of(v1, v2)
    chain = [v1, v2]
    for i in range(12):
        chain.append(signed(changed(chain[-1], by="alice@a", at=3 + i, rename=f"n{i}")))
        book.add(chain[-1], key_of)
    assert book.current_signed == chain[-1] and book.current.version == 14  # type: ignore[union-attr]
    late = signed(changed(chain[2], by="bob@b", at=99, rename="late"))  # a rival of version 4
    assert book.add(late, key_of).outcome == "old" and book.get(chain[1].digest) is None
    rival = signed(changed(chain[-3], by="carol@c", at=99, rename="rival"))  # of version 13
    assert book.add(rival, key_of).outcome == "superseded"
    assert len(msgpack.unpackb(book.dump())["s"]) <= 10
