"""Display names and shared disappearing timers, end to end with real nodes, plus the payload
rules that keep newer devices compatible (an unknown kind is ignored) and the v2 → v3 store
migration."""

from __future__ import annotations

import os
from pathlib import Path

import nacl.secret
import pytest

from client import devicedb
from client.device import Device, ReceivedMessage
from client.keyslots import KeySlots
from client.payload import Payload
from client.state import DeviceState, HistoryRow, OutboxItem, clean_name
from tests.integration.harness import NodeProc

from .devworld import incoming, linked, new_device, settle

NAME = "김민수"


@pytest.fixture
async def world(tmp_path: Path, node_a: NodeProc, node_b: NodeProc):  # type: ignore[no-untyped-def]
    """alice (two devices) and bob on two nodes (the module's; new accounts per test)."""
    alice = await new_device(node_a, tmp_path, "alice")
    bob = await new_device(node_b, tmp_path, "bob")
    alice2 = await linked(alice, tmp_path, "alice-laptop")
    await alice.send(bob.address, "hi")  # pins each other; sessions everywhere
    await settle([bob], lambda: incoming(bob, alice.address) == ["hi"])
    await settle([alice2], lambda: len(alice2.history(bob.address)) == 1)
    yield alice, alice2, bob
    for d in (alice, alice2, bob):
        d.close()


def kinds(got: list[ReceivedMessage], kind: str) -> list[ReceivedMessage]:
    return [m for m in got if m.kind == kind]


async def test_display_name_reaches_contact_and_own_device_once(world) -> None:  # type: ignore[no-untyped-def]
    alice, alice2, bob = world
    alice.set_display_name(NAME)
    assert alice.display_name == NAME
    # The name travels only inside the end-to-end payload (never to a node).
    assert (
        NAME
        in Payload.decode(Payload(os.urandom(16), "profile", "x@y", 1, name=NAME).encode()).name
    )
    conn = await alice.connect()
    try:
        alice.queue_text(bob.address, "first")
        await alice.flush_outbox(conn)  # the message, then our profile (its first since)
        alice.queue_text(bob.address, "second")
        await alice.flush_outbox(conn)  # profile_sent is current: no second profile
        await alice.share_profile(conn, alice.address)  # our other devices
    finally:
        await alice.release(conn)
    contact = alice.state.contact(bob.address)
    assert contact is not None and contact.profile_sent >= 1
    got = await settle([bob], lambda: incoming(bob, alice.address)[-1:] == ["second"])
    got += await settle([alice2], lambda: alice2.display_name == NAME)
    c = bob.state.contact(alice.address)
    assert c is not None and c.display_name == NAME
    profiles = [m for m in kinds(got, "profile") if m.sender == alice.address]
    assert [m.text for m in profiles].count(NAME) == 2  # bob once, alice-laptop once
    # A nickname stays local and survives a refetch of the contact's keys.
    bob.set_nickname(alice.address, "  민수\u202e씨 ")
    conn = await bob.connect()
    try:
        await bob.fetch_contact(conn, alice.address, claim=False)
    finally:
        await bob.release(conn)
    c = bob.state.contact(alice.address)
    assert c is not None and c.nickname == "민수 씨" and c.display_name == NAME
    # The direct send path (haven send) carries a changed profile too.
    bob.set_display_name("Bob Builder")
    await bob.send(alice.address, "yo")
    await settle(
        [alice],
        lambda: getattr(alice.state.contact(bob.address), "display_name", "") == "Bob Builder",
    )


async def test_received_names_are_cleaned(world) -> None:  # type: ignore[no-untyped-def]
    alice, _alice2, bob = world
    raw = "\x1b[31mMallory\u202e" + "가" * 80
    p = Payload(os.urandom(16), "profile", bob.address, alice.clock.now_ms(), name=raw)
    await alice.send_payload(bob.address, p, include_self=False)
    await settle([bob], lambda: getattr(bob.state.contact(alice.address), "display_name", "") != "")
    c = bob.state.contact(alice.address)
    assert c is not None and c.display_name == clean_name(raw)
    assert len(c.display_name) == 64 and "\x1b" not in c.display_name
    assert "\u202e" not in c.display_name


async def test_timer_is_shared_and_the_latest_setting_wins(world) -> None:  # type: ignore[no-untyped-def]
    alice, alice2, bob = world

    def timer(dev: Device, peer: str) -> int:
        c = dev.state.contact(peer)
        return -1 if c is None else c.timer_ms

    await alice.set_timer(bob.address, 60_000)
    assert timer(alice, bob.address) == 60_000
    got = await settle([bob], lambda: timer(bob, alice.address) == 60_000)
    assert [m.text for m in kinds(got, "timer")] == ["60000"]
    await settle([alice2], lambda: timer(alice2, bob.address) == 60_000)

    await bob.set_timer(alice.address, 5_000)  # later: wins on every device, both directions
    await settle(
        [alice, alice2], lambda: timer(alice, bob.address) == 5_000 == timer(alice2, bob.address)
    )

    # An older setting that arrives late changes nothing.
    c = alice.state.contact(bob.address)
    assert c is not None
    stale = Payload(os.urandom(16), "timer", bob.address, c.timer_at - 1, expires_in=1)
    await alice.send_payload(bob.address, stale)
    await alice.send(bob.address, "after the stale timer")
    await settle([bob], lambda: incoming(bob, alice.address)[-1:] == ["after the stale timer"])
    assert timer(bob, alice.address) == 5_000
    # The chat's timer applies to new messages.
    last = bob.history(alice.address)[-1]
    assert last.expires_in == 5_000


async def test_unknown_kind_is_ignored_and_acked(world) -> None:  # type: ignore[no-untyped-def]
    alice, _alice2, bob = world
    future = Payload(os.urandom(16), "poll", bob.address, alice.clock.now_ms(), text="?")
    assert not Payload.decode(future.encode()).known
    await alice.send_payload(bob.address, future, include_self=False)
    await alice.send(bob.address, "after the poll")
    got = await settle([bob], lambda: incoming(bob, alice.address)[-1:] == ["after the poll"])
    assert not [m for m in got if m.kind == "poll"]
    assert bob.state.message(future.id) is None
    assert incoming(bob, alice.address) == ["hi", "after the poll"]


def _v2_home(home: Path) -> bytes:
    """A device home as schema version 2 left it: one contact, one history row."""
    home.mkdir(mode=0o700)
    db_key = os.urandom(32)
    keys = KeySlots.create(str(home / devicedb.KEYS_FILE), db_key, None, False)
    db = devicedb.connect(str(home / devicedb.DB_FILE), db_key)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(devicedb.SCHEMA_V1)
    db.execute("ALTER TABLE history ADD COLUMN slot INTEGER NOT NULL DEFAULT -1")
    db.execute(
        "INSERT INTO contacts VALUES (?, ?, ?, ?, ?, ?, ?)",
        ("bob@x", b"k" * 32, "node", b"list", b"sig", 1, 30_000),
    )
    slot, key = keys.allocate()
    sealed = bytes(nacl.secret.SecretBox(key).encrypt(b"from version 2"))
    msg_id = b"v" * 16
    db.execute(
        "INSERT INTO history (msg_id, peer, outgoing, sender, text, sent_at, received_at, "
        "slot) VALUES (?, 'bob@x', 1, 'me@x', ?, 5, 5, ?)",
        (msg_id, sealed, slot),
    )
    keys.flush()
    keys.committed()
    db.execute("PRAGMA user_version=2")
    db.close()
    return msg_id


def test_migration_v2_to_v3(tmp_path: Path) -> None:
    home = tmp_path / "old"
    msg_id = _v2_home(home)
    s = DeviceState(str(home), create=False)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == devicedb.SCHEMA_VERSION == 5
    c = s.contact("bob@x")
    assert c is not None and c.verified and c.timer_ms == 30_000
    assert (c.display_name, c.nickname, c.timer_at, c.profile_sent) == ("", "", 0, 0)
    (row,) = s.history("bob@x")
    assert row.text == "from version 2" and row.ttl_at is None and row.error == ""
    assert row.seq == 1 and s.history_after(0) == [row] and s.history_after(1) == []
    assert not row.not_delivered(10**15)  # no TTL known for old rows
    assert s.outbox() == [] and s.cursor("cli") == 0
    with s.tx() as db:
        s.set_cursor(db, "cli", 1)
        s.update_contact(db, "bob@x", display_name=NAME)
        s.add_history(db, HistoryRow(b"n" * 16, "bob@x", True, "me@x", "new", 6, 6, status=-1))
        s.queue(db, OutboxItem(b"n" * 16, "bob@x", b"payload", 1000, 6))
    s.close()
    s = DeviceState(str(home), create=False)  # opens as v3 without migrating again
    assert s.cursor("cli") == 1 and s.contact("bob@x").display_name == NAME  # type: ignore[union-attr]
    assert [i.payload for i in s.outbox()] == [b"payload"]
    assert s.message(msg_id) is not None
    s.close()
