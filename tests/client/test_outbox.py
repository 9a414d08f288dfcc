"""The durable outbox, with a real node: what is typed while the home node is down is kept as
``pending``, sent when it is back, stored exactly once by the receiver even if a flush is
retried, and a permanent failure of one item does not hold up the next."""

from __future__ import annotations

from pathlib import Path

import nacl.exceptions
import nacl.secret
import pytest

from client.connection import NodeConnection
from client.device import Device
from client.group_state import GroupError
from client.state import STATUS_PENDING, STATUS_SENT, DeviceState, HistoryRow, OutboxItem
from federation.errors import TransportError
from tests.integration.harness import NodeProc

from .devworld import incoming, node_with, settle


async def test_queued_while_node_down_then_sent_exactly_once(
    tmp_path: Path, node_a: NodeProc
) -> None:
    node, (alice, bob) = await node_with(node_a, tmp_path, "alice", "bob")
    sent = await alice.send(bob.address, "before the outage", ttl_ms=60_000)
    row = alice.state.message(sent.msg_id)
    assert row is not None and row.ttl_at is not None
    assert not row.not_delivered(row.ttl_at - 1) and row.not_delivered(row.ttl_at)

    node.stop()
    rows = [alice.queue_text(bob.address, f"typed offline {i}") for i in range(3)]
    assert [r.status for r in rows] == [STATUS_PENDING] * 3
    assert all(r.ttl_at is None and not r.error for r in rows)
    assert [i.msg_id for i in alice.state.outbox()] == [r.msg_id for r in rows]
    with pytest.raises(TransportError):
        conn = await alice.connect()
    # Still queued, and still there after the device is closed and opened again.
    alice.close()
    alice = Device(alice.home)
    assert [i.msg_id for i in alice.state.outbox()] == [r.msg_id for r in rows]
    assert {r.status for r in alice.history(bob.address)[1:]} == {STATUS_PENDING}

    node.start()
    kept: list[OutboxItem] = alice.state.outbox()
    conn = await alice.connect()
    try:
        changed = await alice.flush_outbox(conn)
        assert [r.msg_id for r in changed] == [r.msg_id for r in rows]
        assert all(r.status == STATUS_SENT and r.ttl_at is not None for r in changed)
        assert all(r.devices_total == 1 for r in changed)
        assert alice.state.outbox() == []
        # A retried flush (e.g. a crash after the node accepted, before the row was marked):
        # the same payloads go out again, with the same ids.
        with alice.state.tx() as db:
            for item in kept:
                alice.state.queue(db, item)
                alice.state.set_status(db, item.msg_id, STATUS_PENDING)
        again = await alice.flush_outbox(conn)
        assert [r.msg_id for r in again] == [r.msg_id for r in rows]
        # One mailbox delivers in order: once bob has this, he has processed the copies too.
        await alice.send(bob.address, "sentinel", conn=conn)
    finally:
        await alice.release(conn)

    want = ["before the outage"] + [f"typed offline {i}" for i in range(3)] + ["sentinel"]
    await settle([bob], lambda: "sentinel" in incoming(bob, alice.address))
    assert incoming(bob, alice.address) == want  # once each, in the order typed
    alice.close()
    bob.close()


async def test_permanent_failure_marks_the_row_and_the_next_item_is_sent(
    tmp_path: Path, node_a: NodeProc
) -> None:
    node, (alice, bob) = await node_with(node_a, tmp_path, "alice", "bob")
    nobody = f"nobody@{node.host}"
    bad = alice.queue_text(nobody, "to no one")
    good = alice.queue_text(bob.address, "to bob")
    conn = await alice.connect()
    seen: list[HistoryRow] = []
    try:
        changed = await alice.flush_outbox(conn, on_row=seen.append)
    finally:
        await alice.release(conn)
    assert seen == changed and len(changed) == 2
    by_id = {r.msg_id: r for r in changed}
    assert by_id[bad.msg_id].error == "no_such_account"
    assert by_id[bad.msg_id].not_delivered(alice.clock.now_ms())
    assert by_id[good.msg_id].status == STATUS_SENT and not by_id[good.msg_id].error
    assert not by_id[good.msg_id].not_delivered(alice.clock.now_ms())
    assert alice.state.outbox() == []
    await settle([bob], lambda: incoming(bob, alice.address) == ["to bob"])
    alice.close()
    bob.close()


async def test_deleting_or_editing_a_pending_message_rewrites_the_queue(
    tmp_path: Path, node_a: NodeProc
) -> None:
    node, (alice, bob) = await node_with(node_a, tmp_path, "alice", "bob")
    node.stop()
    gone = alice.queue_text(bob.address, "never mind")
    fixed = alice.queue_text(bob.address, "typo")
    await alice.delete(bob.address, gone.msg_id)  # nothing left the device: no network
    await alice.edit(bob.address, fixed.msg_id, "fixed")
    assert [i.msg_id for i in alice.state.outbox()] == [fixed.msg_id]
    node.start()
    conn = await alice.connect()
    try:
        await alice.flush_outbox(conn)
    finally:
        await alice.release(conn)
    await settle([bob], lambda: incoming(bob, alice.address) == ["fixed"])
    alice.close()
    bob.close()


def test_queued_text_is_sealed_under_its_message_key(tmp_path: Path) -> None:
    """The queued copy opens only with the row's own key: deleting the row shreds it too."""
    s = DeviceState(str(tmp_path / "h"))

    row = HistoryRow(b"m" * 16, "bob@x", True, "me@x", "secret", 1, 1, status=STATUS_PENDING)
    item = OutboxItem(row.msg_id, "bob@x", b"payload with secret", 1000, 1)
    with s.tx() as db:
        s.add_history(db, row)
        s.queue(db, item)
    assert s.outbox() == [item]
    sealed = s.db.execute("SELECT payload FROM outbox").fetchone()[0]
    slot = s.db.execute("SELECT slot FROM history").fetchone()[0]
    with pytest.raises(nacl.exceptions.CryptoError):
        s.open(sealed)  # not under the storage key
    assert nacl.secret.SecretBox(s.keys.key(slot)).decrypt(sealed) == item.payload
    with s.tx() as db:
        s.delete_history(db, row.msg_id)
    assert s.outbox() == [] and s.keys.key(slot) is None
    s.close()


async def test_daemon_mode_never_closes_the_lent_connection(
    tmp_path: Path, node_a: NodeProc
) -> None:
    _node, (alice, bob) = await node_with(node_a, tmp_path, "alice", "bob")
    lent = await alice.connect()
    opened = 0

    async def provider() -> NodeConnection:
        nonlocal opened
        opened += 1
        return lent

    alice.use_connection(provider)
    try:
        await alice.send(bob.address, "through the daemon's link")
        await alice.set_timer(bob.address, 60_000)  # queued, then flushed over the same link
        assert opened >= 2 and alice.state.outbox() == []
        assert lent._ws is not None and not lent._ws.closed
        alice.queue_text(bob.address, "queued")
        assert [r.text for r in await alice.flush_outbox(lent)] == ["queued"]
        await alice.release(lent)  # handing it back leaves the daemon's link open
        assert not lent._ws.closed
    finally:
        alice.use_connection(None)
        await lent.__aexit__(None, None, None)  # the daemon closes its own link
    await settle([bob], lambda: incoming(bob, alice.address)[-1:] == ["queued"])
    alice.close()
    bob.close()


async def test_queued_group_texts_keep_their_order_and_a_left_group_fails_with_its_code(
    tmp_path: Path, node_a: NodeProc
) -> None:
    _node, (alice, bob) = await node_with(node_a, tmp_path, "alice", "bob")
    info = await alice.group_create("queued", [bob.address])
    await settle([bob], lambda: bob.group(info.gid) is not None)
    queued = [alice.queue_group_text(info.gid, f"typed offline {i}") for i in range(2)]
    assert [(r.status, r.peer) for r in queued] == [(STATUS_PENDING, info.ref)] * 2
    # Only the payload is queued, sealed under the row's key: no Megolm message exists yet.
    assert alice.groups_engine._outbound(info.gid) is None
    conn = await alice.connect()
    try:
        changed = await alice.flush_outbox(conn)
    finally:
        await alice.release(conn)
    assert [r.msg_id for r in changed] == [r.msg_id for r in queued]
    assert all(r.status == STATUS_SENT and r.devices_total == 1 for r in changed)
    await settle([bob], lambda: len(bob.group_history(info.gid)) == 2)
    assert [r.text for r in bob.group_history(info.gid)] == ["typed offline 0", "typed offline 1"]

    # bob queues a text, then leaves before it is sent: it fails with a stable code, kept
    late = bob.queue_group_text(info.gid, "typed before I left")
    await bob.group_leave(info.gid)
    conn = await bob.connect()
    try:
        failed = await bob.flush_outbox(conn)
    finally:
        await bob.release(conn)
    assert [(r.msg_id, r.status, r.error) for r in failed] == [
        (late.msg_id, STATUS_PENDING, "not_member")
    ]
    assert bob.state.outbox() == [] and bob.state.message(late.msg_id) == failed[0]
    with pytest.raises(GroupError) as exc:  # and nothing more is queued for it
        bob.queue_group_text(info.gid, "again")
    assert exc.value.code == "not_member"
    alice.close()
    bob.close()
