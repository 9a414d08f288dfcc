"""Bad group input at a real device: each case has a stable code, is counted, changes nothing.

One node and one group serve the whole module: alice (the admin), bob (the device under
attack), mallory (a member whose device misbehaves), rita (a member, removed half-way) and
oscar (not a member). The bad inputs are crafted with the pure modules (``client.group_state``,
``client.megolm``, ``federation.multi``), with the keys the malicious device really holds, and
submitted over a raw ``send`` frame as a malicious member device would: the node cannot tell
them from good ones. Each case checks three things on bob's device:

(a) the stable code, counted once in ``Groups.drops`` (and nothing else counted);
(b) nothing changed: the group as bob's device knows it (state, version, members) and its
    history are the same as before;
(c) the crafting is not what fails: the same path with a valid input is accepted (a message
    from mallory, and from rita before her removal, arrive through it).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from client import group_state as gs
from client import groups as groups_mod
from client.device import Device
from client.group_state import GroupError
from client.megolm import Outbound
from client.payload import Payload
from federation import frames as F
from federation.ids import new_envelope_id
from federation.multi import INNER_MEGOLM, INNER_STATE, GroupInner, seal_multi
from federation.wire import Envelope, packb

from .harness import NodeProc, new_device

TTL_MS = 3_600_000


@dataclass
class World:
    node: NodeProc
    devs: dict[str, Device]
    gid: bytes

    @property
    def bob(self) -> Device:
        return self.devs["bob"]


async def _drain(w: World) -> None:
    for d in w.devs.values():
        await d.receive(wait_s=0.4)


async def _build(base: Path, node: NodeProc) -> World:
    devs: dict[str, Device] = {}
    for name in ("alice", "bob", "mallory", "rita", "oscar"):
        devs[name] = await new_device(node, base / name, name)
    members = [devs[n].address for n in ("bob", "mallory", "rita")]
    info = await devs["alice"].group_create("bad-input", members)
    w = World(node, devs, info.gid)
    await _drain(w)
    for n in ("mallory", "rita"):  # their sessions reach bob over the normal path
        await devs[n].group_send(w.gid, f"hello from {n}")
    await _drain(w)
    got = [r.text for r in w.bob.group_history(w.gid)]
    assert sorted(got) == ["hello from mallory", "hello from rita"], got
    return w


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("group-bad")
    node = NodeProc.create(base, "A")
    node.start()
    try:
        w = asyncio.run(_build(base, node))
        yield w
        for d in w.devs.values():
            d.close()
    finally:
        node.stop()


async def inject(w: World, src: str, inner: GroupInner, to: str = "bob") -> None:
    """Seal ``inner`` to ``to``'s device and submit it from ``src``'s device in a raw ``send``."""
    dev, bob = w.devs[src], w.devs[to]
    conn = await dev.connect()
    try:
        _, dl, _ = await dev.fetch_contact(conn, bob.address, claim=False)
        target = next(d for d in dl.devices if d.device_id == bob.curve_key)
        sealed = seal_multi(inner, [target.sealing])
        env = Envelope(
            new_envelope_id(), target.mailbox, dev.clock.now_ms() + TTL_MS, sealed.copy_for(0)
        )
        node_id = conn.challenge.node_id if conn.challenge else ""
        ans = await conn.request(F.Send(rid=conn.next_rid(), items=((node_id, env),)))
        assert isinstance(ans, F.Accepted) and ans.ids == (env.id,), ans
    finally:
        await dev.release(conn)


async def refused(w: World, src: str, inner: GroupInner, code: str | None) -> None:
    """Submit ``inner`` and check bob's device drops it with ``code`` (None: ignores it,
    counting nothing), changing nothing."""
    bob = w.bob
    before = (bob.group(w.gid), [r.msg_id for r in bob.group_history(w.gid)])
    drops = Counter(bob.groups_engine.drops)
    await inject(w, src, inner)
    got = await bob.receive(wait_s=0.5)
    assert [m for m in got if m.chat] == [], f"{code}: bob's device applied {got}"
    after = Counter(bob.groups_engine.drops)
    after.subtract(drops)
    want = Counter({code: 1}) if code else Counter()
    assert +after == want, f"expected {dict(want)}, counted {dict(+after)}"
    assert (bob.group(w.gid), [r.msg_id for r in bob.group_history(w.gid)]) == before


def state_inner(dev: Device, signed: gs.SignedState) -> GroupInner:
    return GroupInner(INNER_STATE, dev.address, dev.curve_key, signed.encode())


def megolm_inner(dev: Device, out: Outbound, to: str, text: str) -> GroupInner:
    p = Payload(os.urandom(16), "text", to, dev.clock.now_ms(), text=text)
    data = packb([out.session_id, out.encrypt(p.encode())])
    return GroupInner(INNER_MEGOLM, dev.address, dev.curve_key, data)


def current(w: World) -> tuple[gs.GroupState, bytes]:
    """The admin's current state and its digest (the parent of a next version)."""
    book = w.devs["alice"].groups_engine._load(w.gid)
    assert book is not None and book.book.current_signed is not None
    signed = book.book.current_signed
    return signed.open(), signed.digest


def outbound(dev: Device, gid: bytes) -> Outbound:
    out = dev.groups_engine._outbound(gid)
    assert out is not None, "the device has no sending session for the group"
    return out


def keep_outbound(dev: Device, gid: bytes, out: Outbound) -> None:
    """Store a crafted session's advanced index, so the device's own next send does not reuse
    an index (which bob would rightly call a replay)."""
    with dev.state.tx() as db:
        dev.groups_engine._save_outbound(db, gid, out)


async def test_state_change_signed_by_a_non_admin_is_forged(world: World) -> None:
    w = world
    mallory = w.devs["mallory"]
    cur, digest = current(w)
    oscar = w.devs["oscar"].address
    grab = replace(
        cur,
        version=cur.version + 1,
        members=tuple(sorted({*cur.members, oscar})),
        admins=tuple(sorted({*cur.admins, mallory.address})),
        by=mallory.address,
        parent=digest,
        at=mallory.clock.now_ms(),
    )
    await refused(
        w, "mallory", state_inner(mallory, gs.sign_state(grab, mallory.identity())), "forged_state"
    )
    # the same change claimed as alice's, but signed with mallory's identity key
    as_alice = replace(grab, by=w.devs["alice"].address)
    await refused(
        w,
        "mallory",
        state_inner(mallory, gs.sign_state(as_alice, mallory.identity())),
        "forged_state",
    )


async def test_state_change_of_an_unknown_group(world: World) -> None:
    w = world
    mallory, alice, bob = w.devs["mallory"], w.devs["alice"], w.bob

    def state(gid: bytes, members: list[str]) -> gs.SignedState:
        st = gs.GroupState(
            gid,
            2,
            "elsewhere",
            tuple(sorted(members)),
            (alice.address,),
            mallory.address,  # a member, not an admin, signs a change of a group bob lacks
            os.urandom(32),
            mallory.clock.now_ms(),
        )
        return gs.sign_state(st, mallory.identity())

    gid = gs.new_gid()
    members = [alice.address, bob.address, mallory.address]
    await refused(w, "mallory", state_inner(mallory, state(gid, members)), "forged_state")
    assert bob.group(gid) is None
    # a state of an unknown group that does not list bob is what the parent in a newcomer's
    # hand-off looks like: ignored (not counted), and nothing kept
    other = gs.new_gid()
    await refused(w, "mallory", state_inner(mallory, state(other, members[::2])), None)
    assert bob.group(other) is None and w.gid in {g.gid for g in bob.groups()}


async def test_oversized_member_list_signed_by_the_admin(world: World) -> None:
    w = world
    alice = w.devs["alice"]
    cur, digest = current(w)
    host = alice.address.split("@", 1)[1]
    many = sorted({*cur.members, *(f"m{i:04d}@{host}" for i in range(gs.MAX_MEMBERS))})
    assert len(many) > gs.MAX_MEMBERS
    blob = packb(
        {
            "v": 1,
            "g": w.gid,
            "ver": cur.version + 1,
            "name": cur.name,
            "members": many,
            "admins": list(cur.admins),
            "by": alice.address,
            "parent": digest,
            "at": alice.clock.now_ms(),
        }
    )  # GroupState.blob() refuses to build it: the admin's device is the malicious one here
    signed = gs.SignedState(blob, alice.identity().sign(gs.STATE_TAG + blob).signature)
    await refused(w, "alice", state_inner(alice, signed), "too_many_members")
    # an honest device refuses to make one: before anything is signed or sent
    groups = len(alice.groups())
    with pytest.raises(GroupError) as err:
        await alice.group_create("too big", [m for m in many if m != alice.address])
    assert err.value.code == "too_many_members" and len(alice.groups()) == groups


async def test_repeated_index_with_other_content_is_a_replay(world: World) -> None:
    w = world
    mallory = w.devs["mallory"]
    ref = gs.ref_of(w.gid)
    first = outbound(mallory, w.gid)
    again = outbound(mallory, w.gid)  # the same session at the same index
    await inject(w, "mallory", megolm_inner(mallory, first, ref, "first at this index"))
    got = await w.bob.receive(wait_s=0.5)
    assert [m.text for m in got if m.chat] == ["first at this index"]  # (c): the path works
    keep_outbound(mallory, w.gid, first)
    await refused(
        w, "mallory", megolm_inner(mallory, again, ref, "other text, same index"), "megolm_replay"
    )


async def test_message_naming_another_group_is_refused(world: World) -> None:
    w = world
    mallory = w.devs["mallory"]
    out = outbound(mallory, w.gid)
    inner = megolm_inner(mallory, out, gs.ref_of(gs.new_gid()), "for a group bob is not in")
    keep_outbound(mallory, w.gid, out)
    await refused(w, "mallory", inner, "unknown_group")


async def test_removed_members_late_message(world: World) -> None:
    w = world
    rita = w.devs["rita"]
    kept = outbound(rita, w.gid)  # rita's device keeps its old session after the removal
    await w.devs["alice"].group_remove(w.gid, rita.address)
    await _drain(w)
    g = w.bob.group(w.gid)
    assert g is not None and rita.address not in g.members
    late = megolm_inner(rita, kept, gs.ref_of(w.gid), "rita, after her removal")
    await refused(w, "rita", late, "not_member")
    # nor may she make bob's device drop its reused member lists (a ``devices`` notice)
    engine = w.bob.groups_engine
    await w.bob.group_send(w.gid, "bob reuses these lists")
    lists, notices = dict(engine._lists), engine.device_notices
    assert lists
    p = Payload(os.urandom(16), "devices", gs.ref_of(w.gid), rita.clock.now_ms())
    notice = GroupInner(
        INNER_MEGOLM,
        rita.address,
        rita.curve_key,
        packb([kept.session_id, kept.encrypt(p.encode())]),
    )
    await refused(w, "rita", notice, "not_member")
    assert engine._lists == lists and engine.device_notices == notices


async def test_non_member_message(world: World) -> None:
    w = world
    oscar, bob = w.devs["oscar"], w.bob
    out = Outbound.new(oscar.clock.now_ms())
    gkey = packb({"g": w.gid, "s": out.session_id, "k": out.session_key()})
    key = Payload(os.urandom(16), "group_key", bob.address, oscar.clock.now_ms(), gkey=gkey)
    drops = Counter(bob.groups_engine.drops)
    await oscar.send_payload(bob.address, key, include_self=False)
    await bob.receive(wait_s=0.5)
    after = Counter(bob.groups_engine.drops)
    after.subtract(drops)
    assert +after == Counter({"not_member": 1}), f"oscar's key: counted {dict(+after)}"
    # and his message: no session for it, so it can never be applied (it waits, bounded, for
    # a key that bob's device will not take from a non-member)
    history = [r.msg_id for r in bob.group_history(w.gid)]
    await inject(w, "oscar", megolm_inner(oscar, out, gs.ref_of(w.gid), "oscar was never in"))
    got = await bob.receive(wait_s=0.5)
    assert [m for m in got if m.chat] == []
    assert [r.msg_id for r in bob.group_history(w.gid)] == history


async def test_the_group_still_works(world: World) -> None:
    w = world
    await w.devs["mallory"].group_send(w.gid, "still here")
    got = await w.bob.receive(wait_s=0.5)
    assert [m.text for m in got if m.chat] == ["still here"]
    assert not any(m.text.startswith("oscar") for m in w.bob.group_history(w.gid))


async def test_keys_for_unknown_groups_are_bounded(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    w, bob, mallory = world, world.bob, world.devs["mallory"]
    unknown = "SELECT count(*) FROM group_inbound WHERE gid NOT IN (SELECT gid FROM groups)"
    (before,) = bob.state.db.execute(unknown).fetchone()
    monkeypatch.setattr(groups_mod, "UNKNOWN_KEYS_MAX", before + 2)
    drops = Counter(bob.groups_engine.drops)
    for _ in range(3):  # three keys for random group ids, each a valid 1:1 group_key
        out = Outbound.new(mallory.clock.now_ms())
        gkey = packb({"g": os.urandom(16), "s": out.session_id, "k": out.session_key()})
        p = Payload(os.urandom(16), "group_key", bob.address, mallory.clock.now_ms(), gkey=gkey)
        await mallory.send_payload(bob.address, p, include_self=False)
    deadline = time.monotonic() + 20
    after = Counter()
    while after[groups_mod.UNKNOWN_KEYS] < 1 and time.monotonic() < deadline:
        await bob.receive(wait_s=0.3)
        after = Counter(bob.groups_engine.drops)
        after.subtract(drops)
    assert bob.state.db.execute(unknown).fetchone() == (before + 2,)
    assert +after == Counter({"unknown_group_keys": 1})
    assert bob.group(w.gid) is not None and bob.group(w.gid).active  # type: ignore[union-attr]


async def test_a_joiner_takes_its_first_state_only_from_the_inviting_admin(
    world: World,
) -> None:
    """A member who races the admin's hand-off with a chain of its own is refused."""
    w = world
    alice, mallory, oscar = w.devs["alice"], w.devs["mallory"], w.devs["oscar"]
    info = await alice.group_create("invite-only", [mallory.address])
    await mallory.receive(wait_s=0.4)
    code = await alice.group_invite(info.gid)
    await oscar.group_join(code)
    pending = oscar.groups_engine.pending_join(info.gid)
    assert pending is not None and pending[0] == alice.address
    st = mallory.groups_engine._load(info.gid)
    assert st is not None and st.book.current_signed is not None
    cur, digest = st.book.current_signed.open(), st.book.current_signed.digest
    forged = replace(  # mallory's own "add" of oscar, with mallory as admin
        cur,
        version=cur.version + 1,
        members=tuple(sorted({*cur.members, oscar.address})),
        admins=tuple(sorted({*cur.admins, mallory.address})),
        by=mallory.address,
        parent=digest,
        at=mallory.clock.now_ms(),
    )
    drops = Counter(oscar.groups_engine.drops)
    signed = gs.sign_state(forged, mallory.identity())
    await inject(w, "mallory", state_inner(mallory, signed), to="oscar")
    got = await oscar.receive(wait_s=0.5)
    after = Counter(oscar.groups_engine.drops)
    after.subtract(drops)
    assert +after == Counter({"forged_state": 1}), dict(+after)
    assert [m for m in got if m.chat] == [] and oscar.group(info.gid) is None
    assert oscar.groups_engine.pending_join(info.gid) is not None
    # the real admin redeems the code and hands oscar the chain: taken
    deadline = time.monotonic() + 20
    while oscar.group(info.gid) is None and time.monotonic() < deadline:
        await alice.receive(wait_s=0.2)
        await oscar.receive(wait_s=0.2)
    g = oscar.group(info.gid)
    assert g is not None and g.active and oscar.address in g.members
    assert g.admins == (alice.address,) and mallory.address in g.members
    assert oscar.groups_engine.pending_join(info.gid) is None


async def test_a_device_that_missed_changes_takes_an_admins_later_one(world: World) -> None:
    """Last in the module: bob's book moves ahead of alice's own."""
    w, bob, alice, mallory = world, world.bob, world.devs["alice"], world.devs["mallory"]
    cur, _ = current(w)
    ahead = replace(  # versions cur+1 .. cur+11 never reached bob (expired on the way)
        cur, version=cur.version + 12, parent=os.urandom(32), name="caught up", at=cur.at + 1
    )
    by_mallory = replace(ahead, by=mallory.address)  # a non-admin's word is not enough: kept aside
    await refused(
        w, "mallory", state_inner(mallory, gs.sign_state(by_mallory, mallory.identity())), None
    )
    jumps = bob.groups_engine.state_jumps
    await inject(w, "alice", state_inner(alice, gs.sign_state(ahead, alice.identity())))
    got = [m for m in await bob.receive(wait_s=0.5) if m.chat]
    g = bob.group(w.gid)
    assert g is not None and (g.version, g.name, g.members) == (
        ahead.version,
        "caught up",
        cur.members,
    )
    assert bob.groups_engine.state_jumps == jumps + 1
    assert [(m.kind, m.text) for m in got] == [
        ("group_state", f"{alice.address} renamed the group")
    ]
