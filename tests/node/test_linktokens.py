"""Device-link tokens live in a bounded in-memory table (node/linktokens.py)."""

from __future__ import annotations

from node.linktokens import LinkTokens


def test_a_token_redeems_once_before_it_expires() -> None:
    t = LinkTokens(ttl_ms=300_000)
    assert t.mint(b"h1", "alice", 1_000) == 301_000
    assert t.redeem(b"h1", 2_000) == "alice"
    assert t.redeem(b"h1", 2_000) is None  # single use
    t.mint(b"h2", "alice", 1_000)
    assert t.redeem(b"h2", 301_000) is None  # expired (and gone)
    assert t.redeem(b"nope", 0) is None
    assert len(t) == 0


def test_the_table_is_bounded_and_expired_tokens_go_first() -> None:
    t = LinkTokens(ttl_ms=100, max_tokens=3)
    t.mint(b"a", "x", 0)
    t.mint(b"b", "x", 50)
    t.mint(b"c", "x", 60)
    t.mint(b"d", "y", 120)  # "a" has expired: purged, nothing live evicted
    assert len(t) == 3 and t.redeem(b"b", 120) == "x"
    t.mint(b"e", "y", 121)
    t.mint(b"f", "y", 122)  # full of live tokens: the oldest ("c") gives way
    assert len(t) == 3
    assert t.redeem(b"c", 122) is None
    assert [t.redeem(h, 125) for h in (b"d", b"e", b"f")] == ["y", "y", "y"]
