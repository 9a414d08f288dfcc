"""Groups across three real nodes: six members (two of them with two linked devices) in one
module-scoped world.

Every message reaches every member device exactly once, in order per sender; read watermarks
bring a message's counter from 5 to 0; a removed member gets nothing sent after the removal and
cannot decrypt it when handed the ciphertext; a member added later cannot decrypt an earlier
message; two admins changing the same version converge on every device, the loser shown as
superseded. Node C runs with ``multi = false`` (a v1 peer): A and B fan submissions out with
``send_multi``/``/federation/multi`` and send C per-device envelopes, and the devices on C
(carol, frank, gina) submit per-device envelopes themselves; both paths are asserted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from client.device import Device
from client.group_receipts import count_unread
from client.groups import Groups
from client.linking import remove_device
from client.megolm import Inbound
from client.trust import verify
from federation.errors import HavenError
from federation.multi import INNER_MEGOLM, GroupInner
from federation.wire import Envelope, unpackb

from .harness import NodeProc, linked, new_device
from .rawpeer import set_node_config


@dataclass
class World:
    nodes: list[NodeProc]
    devs: dict[str, Device]  # alice, alice2, bob, bob2, carol, dave, erin, frank, gina
    addr: dict[str, str]  # account name -> address
    base: Path
    sent: list[GroupInner] = field(default_factory=list)  # what alice's devices submitted

    def members(self) -> list[str]:
        return [self.addr[n] for n in ("alice", "bob", "carol", "dave", "erin", "frank")]


async def _build(base: Path, nodes: list[NodeProc]) -> World:
    a, b, c = nodes
    devs: dict[str, Device] = {}
    for name, node in (("alice", a), ("bob", b), ("carol", c), ("dave", a), ("erin", b)):
        devs[name] = await new_device(node, base / name, name)
    for name, node in (("frank", c), ("gina", c)):
        devs[name] = await new_device(node, base / name, name)
    devs["alice2"] = await linked(devs["alice"], base / "alice2", "alice-laptop")
    devs["bob2"] = await linked(devs["bob"], base / "bob2", "bob-laptop")
    addr = {n: d.address for n, d in devs.items() if not n.endswith("2")}
    return World(nodes, devs, addr, base)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("groups")
    nodes = [NodeProc.create(base, n) for n in ("A", "B", "C")]
    set_node_config(nodes[2].home, multi=False)  # C: a "v1 peer", without the feature
    for n in nodes:
        n.start()
    try:
        w = asyncio.run(_build(base, nodes))
        yield w
        for d in w.devs.values():
            d.close()
    finally:
        for n in nodes:
            n.stop()


def _spy(w: World, dev: Device) -> None:
    """Record what a device submits (the real submission still runs)."""
    engine = dev.groups_engine
    real = engine.submit

    async def recording(conn, inner, devices, ttl_ms=Groups.submit.__defaults__[0]):  # type: ignore[no-untyped-def]
        w.sent.append(inner)
        return await real(conn, inner, devices, ttl_ms)

    engine.submit = recording  # type: ignore[method-assign]


async def until(w: World, names: list[str], pred: Callable[[], bool], what: str) -> None:
    """Receive on ``names`` until ``pred`` holds (deadline 30 s)."""
    deadline = time.monotonic() + 30
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        for n in names:
            await w.devs[n].receive(wait_s=0.2)


ALL = ["alice", "alice2", "bob", "bob2", "carol", "dave", "erin", "frank"]


def texts(dev: Device, gid: bytes) -> list[tuple[str, str]]:
    return [(r.sender, r.text) for r in dev.group_history(gid)]


async def test_group_world(world: World) -> None:
    w = world
    d, addr = w.devs, w.addr
    _spy(w, d["alice"])
    others = [addr[n] for n in ("bob", "carol", "dave", "erin", "frank")]
    info = await d["alice"].group_create("hikers", others)
    gid = info.gid
    assert info.ref == "group:" + gid.hex() and len(gid) == 16
    assert set(info.members) == set(w.members()) and info.admins == (addr["alice"],)

    # 1. the creation reaches every device, the other device of the creator included
    await until(w, ALL, lambda: all(d[n].group(gid) is not None for n in ALL), "the group")
    for n in ALL:
        g = d[n].group(gid)
        assert g is not None and g.version == 1 and g.active and g.name == "hikers"

    # an address with no account is refused (the 1:1 code), creating and changing nothing
    ghost_c = "nobody@" + addr["carol"].split("@", 1)[1]  # on C, asked through A by name
    ghost_a = "nobody@" + addr["alice"].split("@", 1)[1]
    for attempt in (
        d["alice"].group_add(gid, ghost_c),
        d["alice"].group_create("ghosts", [addr["bob"], ghost_a]),
    ):
        with pytest.raises(HavenError) as refused:
            await attempt
        assert refused.value.code == "no_such_account"
    assert [g.gid for g in d["alice"].groups()] == [gid]
    g = d["alice"].group(gid)
    assert g is not None and g.version == 1 and ghost_c not in g.members

    # 2. messages from two senders: every device has each exactly once, in order per sender
    engine = d["alice"].groups_engine
    await d["alice"].group_send(gid, "a0")
    asked = engine.list_queries
    for i in range(1, 3):
        await d["alice"].group_send(gid, f"a{i}")
    assert engine.list_queries == asked  # a1 and a2 reuse the verified lists
    for i in range(2):
        await d["bob"].group_send(gid, f"b{i}")
    await d["alice"].group_send(gid, "a3")
    want = {("a", f"a{i}") for i in range(4)} | {("b", f"b{i}") for i in range(2)}

    def complete() -> bool:
        return all(len(d[n].group_history(gid)) == len(want) for n in ALL)

    await until(w, ALL, complete, "all messages on all devices")
    for n in ALL:
        rows = texts(d[n], gid)
        assert len(rows) == len(want) == len(set(rows))
        by_alice = [t for s, t in rows if s == addr["alice"]]
        by_bob = [t for s, t in rows if s == addr["bob"]]
        assert by_alice == ["a0", "a1", "a2", "a3"] and by_bob == ["b0", "b1"]
        assert all(r.peer == info.ref for r in d[n].group_history(gid))
    for n in ALL:
        assert [m for m in await d[n].receive(wait_s=0.3) if m.kind == "text"] == []
        assert len(d[n].group_history(gid)) == len(want)  # nothing shown twice
    own = [r for r in d["alice2"].group_history(gid) if r.sender == addr["alice"]]
    assert own and all(r.outgoing for r in own)

    # 3. the counter of alice's first message falls from 5 to 0 as the others read
    first = d["alice"].group_history(gid)[0]
    assert first.text == "a0"
    unread, hidden = d["alice"].group_counts(gid)[first.msg_id]
    assert len(unread) == 5 and hidden == 0
    for step, reader in enumerate(("bob", "carol", "dave", "erin", "frank"), start=1):
        assert await d[reader].group_mark_read(gid) > 0

        def fell(step: int = step) -> bool:
            return len(d["alice"].group_counts(gid)[first.msg_id][0]) == 5 - step

        await until(w, ["alice"], fell, f"the counter at {5 - step}")
        assert addr[reader] not in d["alice"].group_counts(gid)[first.msg_id][0]
    assert d["alice"].group_counts(gid)[first.msg_id] == ((), 0)
    # the counter opens no message text, and agrees with one computed from the full rows
    row = engine._load(gid)
    assert row is not None and row.book.current is not None
    full = {
        r.msg_id: count_unread(r.sender, r.sent_at, row.book.current.members, row.marks, row.since)
        for r in d["alice"].group_history(gid)
    }
    opened: list[int] = []
    real_text = d["alice"].state._text

    def counting(*a: object) -> str:
        opened.append(1)
        return real_text(*a)  # type: ignore[arg-type]

    d["alice"].state._text = counting  # type: ignore[method-assign]
    try:
        counts = d["alice"].group_counts(gid)
    finally:
        del d["alice"].state._text
    assert opened == [] and len(counts) == len(want)
    assert counts == {m: (u.unread_members, u.receipts_hidden) for m, u in full.items()}
    # every member sees the counter: carol's copy agrees once the receipts reached her
    await until(
        w, ["carol"], lambda: d["carol"].group_counts(gid)[first.msg_id] == ((), 0), "carol"
    )
    # bob read on one device: his other device shows the rows read too
    await until(
        w,
        ["bob2"],
        lambda: all(r.read for r in d["bob2"].group_history(gid)),
        "bob's other device to mark read",
    )

    # 4. frank is removed; what alice sends afterwards does not reach him
    before_frank = len(d["frank"].group_history(gid))
    asked = engine.list_queries
    await d["alice"].group_remove(gid, addr["frank"])
    await until(
        w,
        ALL,
        lambda: all(addr["frank"] not in (d[n].group(gid) or info).members for n in ALL),
        "the removal everywhere",
    )
    g_frank = d["frank"].group(gid)
    assert g_frank is not None and not g_frank.active
    w.sent.clear()
    await d["alice"].group_send(gid, "after removal")
    assert engine.list_queries == asked + 1  # asked after the change; the send reuses them
    secret = [i for i in w.sent if i.kind == INNER_MEGOLM][-1]
    rest = [n for n in ALL if n != "frank"]
    # carol opens the new session's message before its key (they travel different paths):
    # the copy waits, sealed, and opens when the key comes
    carol = d["carol"]
    conn = await carol.connect()
    try:
        envs: list[Envelope] = []
        deadline = time.monotonic() + 30
        while len(envs) < 2:  # the group_key (1:1) and the group copy
            assert time.monotonic() < deadline, "carol's two envelopes"
            async with asyncio.timeout(30):
                envs += await conn.deliveries.get()
        waited = carol.groups_engine.waited
        got = await carol.process(conn, list(reversed(envs)))
        assert carol.groups_engine.waited == waited + 1
    finally:
        await carol.release(conn)
    assert [m.text for m in got if m.kind == "text"] == ["after removal"]
    assert got[-1].chat == info.ref and got[-1].peer == info.ref
    assert carol.state.db.execute("SELECT count(*) FROM group_pending").fetchone() == (0,)
    await until(
        w,
        rest,
        lambda: all(("after removal" in [t for _, t in texts(d[n], gid)]) for n in rest),
        "the message after removal",
    )
    await d["frank"].receive(wait_s=0.5)
    assert len(d["frank"].group_history(gid)) == before_frank
    assert "after removal" not in [t for _, t in texts(d["frank"], gid)]
    sid, message = unpackb(secret.data, max_len=len(secret.data))
    assert not _can_decrypt(d["frank"], secret.sender_device, message)
    assert d["frank"].state.db.execute(
        "SELECT count(*) FROM group_inbound WHERE session_id=?", (sid,)
    ).fetchone() == (0,)  # the rotated session's key never reached frank

    # 5. gina joins later with an invite code: she reads what follows, not what came before
    code = await d["alice"].group_invite(gid)
    assert code.startswith("haven:group:")
    joined = await d["gina"].group_join(code)
    assert joined == {"group_id": gid.hex(), "name": "hikers", "status": "requested"}
    await until(w, ["alice", "gina"], lambda: d["gina"].group(gid) is not None, "gina added")
    g = d["alice"].group(gid)
    assert g is not None and addr["gina"] in g.members
    assert await d["carol"].group_join(code) == {  # one use only: a second redemption fails
        "group_id": gid.hex(),
        "name": "hikers",
        "status": "requested",
    }
    await d["alice"].receive(wait_s=0.5)
    assert d["alice"].groups_engine.drops["invalid_group_invite"] == 1
    await d["alice"].group_send(gid, "welcome gina")
    await until(
        w,
        ["gina"],
        lambda: [t for _, t in texts(d["gina"], gid)] == ["welcome gina"],
        "gina's first message",
    )
    assert not _can_decrypt(d["gina"], secret.sender_device, message)  # same session, earlier
    assert d["gina"].state.db.execute(
        "SELECT count(*) FROM group_inbound WHERE session_id=?", (sid,)
    ).fetchone() == (1,)  # she holds that session, from a later index only

    # 6. two admins change the same version at once; every device converges
    await d["alice"].group_set_admin(gid, addr["bob"], True)
    everyone = [*rest, "gina"]
    await until(
        w,
        everyone,
        lambda: all(addr["bob"] in (d[n].group(gid) or info).admins for n in everyone),
        "bob an admin everywhere",
    )
    v = d["alice"].group(gid)
    assert v is not None
    r1 = await d["alice"].group_rename(gid, "by alice")
    r2 = await d["bob"].group_rename(gid, "by bob")
    assert r1.version == r2.version == v.version + 1

    def converged() -> bool:
        states = [d[n].group(gid) for n in everyone]
        return all(s is not None and len(s.superseded) == 1 for s in states) and (
            len({(s.name, s.version) for s in states if s is not None}) == 1
        )

    await until(w, everyone, converged, "the concurrent renames to converge")
    winner = d["carol"].group(gid)
    assert winner is not None and winner.name in ("by alice", "by bob")
    loser = "by bob" if winner.name == "by alice" else "by alice"
    for n in everyone:
        g = d[n].group(gid)
        assert g is not None and g.name == winner.name
        assert g.superseded[0]["version"] == v.version + 1
        assert "renamed" in g.superseded[0]["change"] and loser not in str(g.superseded)

    # 7. who can read this: every member device, with its verified flag
    readers = await d["alice"].group_readers(gid)
    assert {r["address"] for r in readers} == set(winner.members)
    assert sum(r["address"] == addr["bob"] for r in readers) == 2
    assert all(r["verified"] is False for r in readers if r["address"] != addr["alice"])
    await verify(d["alice"], addr["bob"], confirm=True)
    bob_rows = [r for r in await d["alice"].group_readers(gid) if r["address"] == addr["bob"]]
    assert len(bob_rows) == 2 and all(r["verified"] and not r["changed"] for r in bob_rows)

    # 8. bob removes his second device: alice's next message starts a new session that the
    # removed device never gets, and "who can read this" flags bob's changed list
    # bob's device tells the group (a ``devices`` notice, in a session of its own that bob2
    # never gets); alice's device drops its reused list of bob at once, not within 60 s
    bob_out = d["bob"].groups_engine._outbound(gid)
    assert bob_out is not None
    notices = engine.device_notices
    await d["alice"].group_send(gid, "before bob's device left")  # alice reuses this list
    assert any(addr["bob"] in key for key in engine._lists)
    await remove_device(d["bob"], d["bob2"].curve_key)
    bob_new = d["bob"].groups_engine._outbound(gid)
    assert bob_new is not None and bob_new.session_id != bob_out.session_id
    assert d["bob2"].curve_key not in bob_new.shared_with
    await until(w, ["alice"], lambda: engine.device_notices > notices, "bob's devices notice")
    assert not any(addr["bob"] in key for key in engine._lists)
    w.sent.clear()
    await d["alice"].group_send(gid, "after bob's device left")
    rotated = [i for i in w.sent if i.kind == INNER_MEGOLM][-1]
    sid2, message2 = unpackb(rotated.data, max_len=len(rotated.data))
    assert sid2 != sid  # rotated: a device was removed since the key was shared
    assert not _can_decrypt(d["bob2"], rotated.sender_device, message2)
    bob_rows = [r for r in await d["alice"].group_readers(gid) if r["address"] == addr["bob"]]
    assert len(bob_rows) == 1 and bob_rows[0]["changed"] and bob_rows[0]["verified"]
    assert d["bob2"].state.db.execute(
        "SELECT count(*) FROM group_inbound WHERE session_id=?", (sid2,)
    ).fetchone() == (0,)

    # 9. erin turns read receipts off: she counts as hidden, not as unread
    await until(
        w,
        ["erin"],
        lambda: "after bob's device left" in [t for _, t in texts(d["erin"], gid)],
        "erin's copy",
    )
    d["erin"].set_setting("read_receipts", "off")
    assert await d["erin"].group_mark_read(gid) > 0
    last = d["alice"].group_history(gid)[-1]
    assert last.text == "after bob's device left"

    def hidden() -> bool:
        unread, n_hidden = d["alice"].group_counts(gid)[last.msg_id]
        return n_hidden == 1 and addr["erin"] not in unread

    await until(w, ["alice"], hidden, "erin counted as hidden")
    assert d["alice"].groups_engine.drops["not_member"] == 0

    # 10. frank is added back: his device starts over from the hand-off and reads what follows
    await d["alice"].group_add(gid, addr["frank"])
    await d["alice"].group_send(gid, "welcome back")

    def back() -> bool:
        g = d["frank"].group(gid)
        return (
            g is not None and g.active and "welcome back" in [t for _, t in texts(d["frank"], gid)]
        )

    await until(w, ["frank"], back, "frank back in the group")
    assert "after removal" not in [t for _, t in texts(d["frank"], gid)]

    # 11. dave links a laptop: it gets the group in the hand-over (the superseded rename
    # too), reads what is sent after the link (not before) and sends to everyone once
    d["dave2"] = dave2 = await linked(d["dave"], w.base / "dave2", "dave-laptop")
    g1, g2 = d["dave"].group(gid), dave2.group(gid)
    assert g1 is not None and g2 is not None and g2.active
    assert (g2.name, g2.version, g2.members) == (g1.name, g1.version, g1.members)
    assert len(g2.superseded) == 1 and g2.superseded == g1.superseded
    assert dave2.group_counts(gid) == {}  # no history: nothing sent before the link
    now_in = [n for n in ALL if n != "bob2"] + ["gina"]
    await until(w, ["alice"], lambda: engine.device_notices > notices + 1, "dave's notice")
    await d["alice"].group_send(gid, "after dave's link")
    await d["dave"].group_send(gid, "from dave's phone")  # its key came right behind the link
    await until(
        w,
        ["dave2"],
        lambda: (
            sorted(t for _, t in texts(dave2, gid)) == ["after dave's link", "from dave's phone"]
        ),
        "the new device to read the group",
    )
    await dave2.group_send(gid, "from dave's laptop")
    await until(
        w,
        now_in,
        lambda: all("from dave's laptop" in [t for _, t in texts(d[n], gid)] for n in now_in),
        "the new device's message everywhere",
    )
    for n in now_in:
        assert [t for _, t in texts(d[n], gid)].count("from dave's laptop") == 1
    assert dave2.groups_engine.drops == {} and engine.drops["unknown_group"] == 0

    # 12. both submission paths ran: A used send_multi (and /federation/multi to B); C, the v1
    # peer, got per-device envelopes and its devices (whose reads counted above) sent their own
    a, b, c = (n.stats()["events"] for n in w.nodes)
    assert a.get("multi.submissions", 0) > 0 and a.get("multi.requests_out", 0) > 0
    assert b.get("multi.requests_in", 0) > 0
    assert c.get("multi.submissions", 0) == 0 and c.get("multi.requests_in", 0) == 0


def _can_decrypt(dev: Device, sender_device: str, message: bytes) -> bool:
    """Whether any inbound session ``dev`` holds for that sender device opens ``message``."""
    rows = dev.state.db.execute(
        "SELECT pickle FROM group_inbound WHERE sender_device=?", (sender_device,)
    ).fetchall()
    for (pickle,) in rows:
        inb = Inbound.from_pickle(pickle, dev.state.storage_key)
        try:
            inb.decrypt(message)
            return True
        except Exception:  # noqa: BLE001 - any refusal means "cannot read it"
            continue
    return False
