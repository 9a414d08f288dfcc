"""Contacts' ``moved`` notices kept for another try (client/pending_moves.py, §12.5.2)."""

from __future__ import annotations

import os

from client import pending_moves as pm
from client.payload import Payload


def notice(n: int) -> pm.PendingMove:
    p = Payload(os.urandom(16), "moved", "bob@b.example", n, text="al@new.example", old="al@a")
    return pm.PendingMove(n, p)


def test_kept_notices_round_trip_once_per_id_and_the_newest_stay() -> None:
    first = notice(1)
    kept = pm.add(pm.add([], first), first)  # the same notice delivered twice: kept once
    assert pm.decode(pm.encode(kept)) == [first]
    many: list[pm.PendingMove] = []
    for i in range(pm.MAX_PENDING + 5):
        many = pm.add(many, notice(i))
    assert len(many) == pm.MAX_PENDING
    assert [m.received_at for m in many] == list(range(5, pm.MAX_PENDING + 5))


def test_a_week_old_notice_is_dropped_and_an_unreadable_row_is_empty() -> None:
    old, fresh = notice(0), notice(pm.KEEP_MS)
    assert pm.live([old, fresh], pm.KEEP_MS) == [old, fresh]
    assert pm.live([old, fresh], pm.KEEP_MS + 1) == [fresh]
    assert pm.decode(b"") == []
    assert pm.decode(b"\xc1garbage") == []
