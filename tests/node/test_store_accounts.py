"""Store contract for the operator tools: accounts (disable, quota, counts) and invites
(uses, listing, revocation). Only the Store interface, so every backend runs it; the schema
migration test at the end is SQLite's own."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from federation.wire import Envelope
from node import sqlite_store
from node.atrest import EpochKeys
from node.sqlite_store import SqliteStore
from node.store import DAY_MS, AccountInfo, InviteInfo, Store, WriteBatch


def h(label: str) -> bytes:
    return hashlib.blake2b(label.encode(), digest_size=32).digest()


async def test_list_accounts_counts_devices_and_pending_by_name(store: Store) -> None:
    await store.create_account("zoe", 5 * DAY_MS + 123)
    await store.create_account("amy", 3 * DAY_MS + 456)
    mb1, mb2, mb3 = os.urandom(16), os.urandom(16), os.urandom(16)
    await store.add_device("amy", mb1, os.urandom(32))
    await store.add_device("amy", mb2, os.urandom(32))
    await store.add_device("zoe", mb3, os.urandom(32))
    envs = [Envelope(os.urandom(16), mb, 10**13, b"x" * 50) for mb in (mb1, mb1, mb2)]
    await store.write(WriteBatch(envelopes=tuple(envs)), 1)
    assert await store.list_accounts() == [
        AccountInfo("amy", 3 * DAY_MS, False, 0, 2, 3),
        AccountInfo("zoe", 5 * DAY_MS, False, 0, 1, 0),
    ]


async def test_disable_enable_and_status(store: Store) -> None:
    await store.create_account("bob", 1)
    assert await store.account_status("bob") == "active"
    assert await store.account_status("nobody") is None
    assert await store.set_account_disabled("bob", True)
    assert await store.account_status("bob") == "disabled"
    assert [a.disabled for a in await store.list_accounts()] == [True]
    assert await store.set_account_disabled("bob", False)
    assert await store.account_status("bob") == "active"
    assert not await store.set_account_disabled("nobody", True)
    assert await store.account_status("nobody") is None  # not created by it


async def test_quota_set_and_reset(store: Store) -> None:
    await store.create_account("bob", 1)
    assert await store.set_account_quota("bob", 7)
    assert (await store.list_accounts())[0].quota == 7
    assert await store.set_account_quota("bob", 0)
    assert (await store.list_accounts())[0].quota == 0
    assert not await store.set_account_quota("nobody", 3)


async def test_disabled_and_quota_survive_account_recreate_attempt(store: Store) -> None:
    """``create_account`` on an existing name (a second invite) keeps its state."""
    await store.create_account("bob", 1)
    await store.set_account_disabled("bob", True)
    await store.set_account_quota("bob", 9)
    assert not await store.create_account("bob", 2)
    assert await store.list_accounts() == [AccountInfo("bob", 0, True, 9, 0, 0)]


async def test_invite_with_uses_redeems_n_times_then_is_gone(store: Store) -> None:
    await store.create_account("team", 1)
    await store.add_invite(h("a"), "team", 10_000, uses=3)
    assert [i.uses_left for i in await store.list_invites(0)] == [3]
    for left in (2, 1):
        assert await store.redeem_invite(h("a"), 10) == ("team", "invite")
        assert [i.uses_left for i in await store.list_invites(0)] == [left]
    assert await store.redeem_invite(h("a"), 10) == ("team", "invite")
    assert await store.list_invites(0) == []
    assert await store.redeem_invite(h("a"), 10) is None


async def test_concurrent_redemptions_get_exactly_the_uses_left(store: Store) -> None:
    await store.add_invite(h("last"), "bob", 10_000, uses=2)
    got = await asyncio.gather(*(store.redeem_invite(h("last"), 10) for _ in range(6)))
    assert sorted(g is not None for g in got) == [False] * 4 + [True] * 2


async def test_expired_invite_is_refused_and_not_listed(store: Store) -> None:
    await store.add_invite(h("old"), "bob", 1000, uses=5)
    assert await store.list_invites(999) != []
    assert await store.list_invites(1000) == []
    assert await store.redeem_invite(h("old"), 1000) is None


async def test_list_invites_by_expiry_with_refs(store: Store) -> None:
    await store.add_invite(h("late"), "bob", 9000)
    await store.add_invite(h("soon"), "amy", 5000, kind="invite", uses=4)
    assert await store.list_invites(0) == [
        InviteInfo(h("soon").hex()[:12], "amy", "invite", 5000, 4),
        InviteInfo(h("late").hex()[:12], "bob", "invite", 9000, 1),
    ]


async def test_revoke_by_ref_prefix(store: Store) -> None:
    await store.add_invite(h("one"), "bob", 9000)
    await store.add_invite(h("two"), "bob", 9000)
    ref = h("one").hex()
    assert await store.revoke_invite(ref[:7]) == 0  # too short: matches nothing
    assert await store.revoke_invite("zz" + ref[2:12]) == 0  # not hex
    assert await store.revoke_invite(ref[:12].upper()) == 1
    assert await store.redeem_invite(h("one"), 10) is None
    assert [i.ref for i in await store.list_invites(0)] == [h("two").hex()[:12]]
    assert await store.revoke_invite(ref[:12]) == 0  # already gone


async def test_remove_account_removes_its_invites_and_state(store: Store) -> None:
    await store.create_account("bob", 1)
    await store.set_account_disabled("bob", True)
    await store.add_invite(h("b"), "bob", 9000, uses=2)
    await store.remove_account("bob")
    assert await store.list_invites(0) == []
    assert await store.account_status("bob") is None
    assert await store.list_accounts() == []


# ---- SQLite schema migration (v3 -> v4) ---------------------------------------------------


async def test_sqlite_v3_store_migrates_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store made at schema 3 (the previous release) opens at 4: accounts active with the
    default quota, its invites single-use and still redeemable, pending rows intact."""
    path, keys = str(tmp_path / "store.db"), str(tmp_path / "epochs.key")
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", sqlite_store.MIGRATIONS[:3])
    old = SqliteStore(path, EpochKeys(keys))
    await old.open()
    await old.create_account("bob", 2 * DAY_MS)
    mb = os.urandom(16)
    await old.add_device("bob", mb, os.urandom(32))
    e = Envelope(os.urandom(16), mb, 10**13, b"y" * 40)
    await old.write(WriteBatch(envelopes=(e,)), 1)
    # the v3 code's own statement (no uses column yet)
    await old._exec(
        "INSERT INTO invites (token_hash, name, expires, kind) VALUES (?, ?, ?, ?)",
        (h("v3"), "bob", 10**13, "invite"),
    )
    await old.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 3
    monkeypatch.undo()

    new = SqliteStore(path, EpochKeys(keys))
    await new.open()
    try:
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == len(
            sqlite_store.MIGRATIONS
        )
        assert await new.list_accounts() == [AccountInfo("bob", 2 * DAY_MS, False, 0, 1, 1)]
        assert [i.uses_left for i in await new.list_invites(0)] == [1]
        assert await new.redeem_invite(h("v3"), 10) == ("bob", "invite")
        assert await new.redeem_invite(h("v3"), 10) is None
        assert await new.pending_for(mb, 10) == [e]
    finally:
        await new.close()
