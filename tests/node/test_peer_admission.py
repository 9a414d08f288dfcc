"""The new-peer budget (node/peer_admission.py): pure, driven with a fake ``now``."""

from __future__ import annotations

import pytest

from federation.errors import RateLimited
from node.peer_admission import FRESH_BURST, NewPeerBudget, admit_origin


def flood(budget: NewPeerBudget, origins: list[str], start: int, ms: int, every: int) -> int:
    """Each origin sends one request every ``every`` ms for ``ms``; returns how many got in."""
    admitted = 0
    for t in range(start, start + ms, every):
        for o in origins:
            admitted += budget.admit(o, t)
    return admitted


def test_minting_keys_buys_no_rate() -> None:
    budget = NewPeerBudget(rate=20, burst=100)
    keys = [f"minted{i}" for i in range(500)]
    got = flood(budget, keys, 0, 10_000, 10)
    assert got <= 100 + 20 * 10 + 1
    assert got >= 100  # the burst was there to take


def test_a_fresh_origin_gets_in_while_a_few_keys_flood() -> None:
    budget = NewPeerBudget(rate=20, burst=100)
    keys = [f"minted{i}" for i in range(32)]
    got = flood(budget, keys, 0, 5_000, 1)  # 32 keys, one request per ms each: 160,000 tries
    assert got <= 100 + 20 * 5 + 1
    # the flood is held at the reserve, so a new origin's first requests all get in
    assert all(budget.admit("genuine", 5_000 + i) for i in range(int(FRESH_BURST)))
    flood(budget, keys, 5_005, 100, 1)
    assert budget.admit("genuine", 5_105) is False  # allowance used up: it is a heavy origin now


def test_a_fresh_key_per_request_cannot_exceed_the_bucket() -> None:
    budget = NewPeerBudget(rate=20, burst=100)
    got = sum(budget.admit(f"k{t}", t) for t in range(0, 5_000))
    assert got <= 100 + 20 * 5 + 1


def test_pinned_origins_are_not_charged() -> None:
    budget = NewPeerBudget(rate=1, burst=2)
    for t in range(1000):
        admit_origin(budget, {"pinned"}, "pinned", t)
    admit_origin(budget, {"pinned"}, "new", 0)
    admit_origin(budget, {"pinned"}, "new", 0)
    with pytest.raises(RateLimited):
        admit_origin(budget, {"pinned"}, "new", 0)
