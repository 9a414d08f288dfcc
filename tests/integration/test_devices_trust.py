"""Multi-device without server copies, verification, disappearing messages, receipts, edits."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import nacl.public
import pytest

from client.device import Device
from client.linking import link_device, list_devices, remove_device
from client.payload import Payload
from client.trust import verify
from federation import frames as F
from federation.clock import FakeClock, SystemClock
from federation.devicelist import DeviceInfo, DeviceList, SignedDeviceList
from federation.errors import HavenError, IdentityChanged
from federation.ids import new_envelope_id, new_mailbox_id
from federation.sealing import SealedContent, seal
from federation.wire import Envelope

from .harness import NodeProc, haven, linked, new_device


@pytest.fixture
def pair(tmp_path: Path, nodes: list[NodeProc]) -> tuple[NodeProc, NodeProc]:
    a = NodeProc.create(tmp_path, "A").start()
    b = NodeProc.create(tmp_path, "B").start()
    nodes += [a, b]
    return a, b


def texts(dev: Device, peer: str) -> list[str]:
    return [r.text for r in dev.history(peer)]


async def drain(*devs: Device) -> None:
    for d in devs:
        await d.receive(wait_s=0.7)


async def settle(devs: list[Device], cond: Callable[[], bool], timeout: float = 30) -> None:
    """Receive on ``devs`` until ``cond()`` holds (federation is asynchronous), or fail."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("devices did not reach the expected state in time")
        for d in devs:
            await d.receive(wait_s=0.2)


async def test_four_devices_all_see_everything_and_removed_device_gets_nothing(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice1 = await new_device(a, tmp_path / "a1", "alicezq")
    bob1 = await new_device(b, tmp_path / "b1", "bobxw")
    alice2 = await linked(alice1, tmp_path / "a2", "alice-laptop-7f3")
    bob2 = await linked(bob1, tmp_path / "b2", "bob-tablet-91c")
    assert alice2.address == alice1.address and bob2.address == bob1.address
    ad, bd = alice1.address, bob1.address
    try:
        res = await alice1.send(bd, "secret-one from alice")
        assert res.devices[bd] == {"total": 2, "verified": 0}
        assert res.devices[ad]["total"] == 1  # alice's other device
        await settle(
            [bob1, bob2, alice2],
            lambda: all(
                texts(d, p) == ["secret-one from alice"]
                for d, p in ((bob1, ad), (bob2, ad), (alice2, bd))
            ),
        )
        await bob2.send(ad, "secret-two from bob")
        await settle(
            [alice1, alice2, bob1],
            lambda: all(len(texts(d, p)) == 2 for d, p in ((alice1, bd), (alice2, bd), (bob1, ad))),
        )
        for dev, peer in ((alice1, bd), (alice2, bd), (bob1, ad), (bob2, ad)):
            assert texts(dev, peer) == ["secret-one from alice", "secret-two from bob"]
        own = [r.outgoing for r in alice2.history(bd)]
        assert own == [True, False]  # alice2 shows alice1's message as sent by her

        listed = await list_devices(bob1)
        assert sorted(d["name"] for d in listed) == ["bob-tablet-91c", "bobxw-phone"]
        assert [d["this_device"] for d in listed].count(True) == 1
        cli = haven("device", "list", "--home", str(tmp_path / "a2"), "--json").stdout
        assert '"this_device": true' in cli and "alice-laptop-7f3" in cli

        bob2_id = bob2.curve_key
        await remove_device(bob1, bob2_id)
        res = await alice1.send(bd, "secret-three after removal")
        assert res.devices[bd]["total"] == 1
        await settle([bob1], lambda: texts(bob1, ad)[-1] == "secret-three after removal")
        with pytest.raises(HavenError) as err:
            await bob2.receive(wait_s=0.5)
        assert err.value.code == "unauthorized"
        assert "secret-three after removal" not in texts(bob2, ad)
        await drain(alice1, alice2, bob1)
    finally:
        for d in (alice1, alice2, bob1, bob2):
            d.close()

    # seizure with all of this in use: no text, no device names, nobody's counterpart
    # (the WAL is never truncated: its stale frames are part of what is scanned)
    for node, other in ((a, b"bobxw"), (b, b"alicezq")):
        needles = [
            b"secret-one",
            b"secret-two",
            b"secret-three",
            b"alice-laptop",
            b"bob-tablet",
            b"-phone",
            other,
        ]
        for path in [p for p in node.home.rglob("*") if p.is_file()] + [node.log]:
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"{needle!r} in {path.name}"


async def test_node_forged_device_list_is_refused(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice = await new_device(a, tmp_path / "a", "alice")
    bob = await new_device(b, tmp_path / "b", "bob")
    try:
        await alice.send(bob.address, "first")
        # B (malicious) adds a device of its own to bob's list, keeping bob's signature
        db = sqlite3.connect(b.home / "store.db")
        blob, sig = db.execute("SELECT blob, sig FROM device_lists WHERE account='bob'").fetchone()
        real = SignedDeviceList(blob, sig).open()
        evil_sealing = nacl.public.PrivateKey.generate()
        evil = DeviceInfo(
            "evilcurvekeyAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "ed",
            bytes(evil_sealing.public_key),
            new_mailbox_id(),
            1,
        )
        forged = DeviceList(
            real.address, real.identity_key, real.version + 1, (*real.devices, evil)
        )
        db.execute(
            "UPDATE device_lists SET blob=?, version=? WHERE account='bob'",
            (forged.payload(), forged.version),
        )
        db.commit()
        db.close()
        res = await alice.send(bob.address, "second")
        assert res.devices[bob.address]["total"] == 1  # only bob's signed device
        assert any(w.code == "untrusted_device_list" for w in res.warnings)
        cli = haven("send", "--home", str(tmp_path / "a"), bob.address, "third", "--json")
        assert "not signed by its identity key" in cli.stderr
        got = [m.text for m in await bob.receive(wait_s=0.7) if m.kind == "text"]
        assert got == ["first", "second", "third"]
    finally:
        alice.close()
        bob.close()


async def test_safety_numbers_match_and_key_change_blocks_sending(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice = await new_device(a, tmp_path / "a", "alice")
    bob = await new_device(b, tmp_path / "b", "bob")
    try:
        await alice.send(bob.address, "hi")
        await drain(bob)
        sa = await verify(alice, bob.address)
        sb = await verify(bob, alice.address)
        assert sa["safety_number"] == sb["safety_number"] and not sa["verified"]
        assert len(sa["safety_number"].replace(" ", "")) == 60
        assert (await verify(alice, bob.address, confirm=True))["verified"]
        res = await alice.send(bob.address, "verified now")
        assert res.devices[bob.address] == {"total": 1, "verified": 1}
        cli = haven("verify", "--home", str(tmp_path / "a"), bob.address, "--json").stdout
        assert '"verified": true' in cli and sa["safety_number"] in cli
    finally:
        bob.close()
    # bob reinstalls: a new identity key for the same address
    haven("node", "remove-account", "--home", str(b.home), "bob")
    bob_new = await new_device(b, tmp_path / "b-new", "bob")
    try:
        with pytest.raises(IdentityChanged):
            await alice.send(bob_new.address, "blocked")
        fail = haven("send", "--home", str(tmp_path / "a"), bob_new.address, "x", check=False)
        assert fail.returncode != 0 and "identity_changed" in fail.stderr
        after = await verify(alice, bob_new.address, accept_new_key=True)
        assert not after["verified"] and after["safety_number"] != sa["safety_number"]
        await alice.send(bob_new.address, "accepted")
        await settle([bob_new], lambda: texts(bob_new, alice.address) == ["accepted"])
    finally:
        alice.close()
        bob_new.close()


async def test_disappearing_messages_vanish_from_history_and_files(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    clock = FakeClock(start_ms=SystemClock().now_ms())
    alice = await new_device(a, tmp_path / "a", "alice", clock=clock)
    bob = await new_device(b, tmp_path / "b", "bob", clock=clock)
    try:
        await alice.send(bob.address, "keep me")
        await alice.send(bob.address, "burn after an hour", expires_in=3_600_000)
        await settle([bob], lambda: len(texts(bob, alice.address)) == 2)
        row = bob.state.db.execute(
            "SELECT text FROM history WHERE expire_at IS NOT NULL"
        ).fetchone()
        sealed = bytes(row[0])
        clock.advance(3_500_000)
        assert texts(bob, alice.address) == ["keep me", "burn after an hour"]
        clock.advance(200_000)
        assert texts(bob, alice.address) == ["keep me"]
        assert texts(alice, bob.address) == ["keep me"]  # sender's timer started at sending
        for dev, home in ((alice, "a"), (bob, "b")):
            dev.state.scrub()
            for path in (tmp_path / home).rglob("*"):
                if path.is_file():
                    assert sealed not in path.read_bytes(), path.name
        # a per-conversation default timer
        await alice.set_timer(bob.address, 60_000)
        await alice.send(bob.address, "short by default")
        await settle([bob], lambda: len(texts(bob, alice.address)) == 2)
        clock.advance(61_000)
        assert texts(bob, alice.address) == ["keep me"]
    finally:
        alice.close()
        bob.close()


async def test_receipts_edits_deletes_and_forged_receipts(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice = await new_device(a, tmp_path / "a", "alice")
    bob = await new_device(b, tmp_path / "b", "bob")
    carol = await new_device(b, tmp_path / "c", "carol")
    try:
        res = await alice.send(bob.address, "how are you")
        status = lambda: alice.history(bob.address)[0].status  # noqa: E731
        assert status() == 0  # sent
        await settle([bob], lambda: len(bob.history(alice.address)) == 1)
        await settle([alice], lambda: status() == 1)  # delivered
        assert alice.chats()[0]["unread"] == 0 and bob.chats()[0]["unread"] == 1
        await bob.mark_read(alice.address)
        assert bob.chats()[0]["unread"] == 0
        await settle([alice], lambda: status() == 2)  # read

        # carol claims bob read a message she never received; a node forges one "from bob"
        res2 = await alice.send(bob.address, "second")
        fake = Payload(new_envelope_id(), "read", alice.address, 1, ids=(res2.msg_id,))
        await carol.send_payload(alice.address, fake, include_self=False)
        own = alice.state.contact(alice.address)
        assert own is not None
        a_dev = SignedDeviceList(own.device_list, own.sig).open().devices[0]
        forged = seal(a_dev.sealing, SealedContent(bob.address, bob.curve_key, 1, b"\x03garbage"))
        conn = await carol.connect()
        try:
            env = Envelope(new_envelope_id(), a_dev.mailbox, 2**60, forged)
            ans = await conn.request(F.Send(conn.next_rid(), ((a.status()["node_id"], env),)))
            assert isinstance(ans, F.Accepted) and ans.ids == (env.id,)
        finally:
            await conn.__aexit__(None, None, None)
        delivered_all = lambda: (  # noqa: E731 - both forgeries reached alice's device
            b.status()["outbox_envelopes"] == 0 and a.status()["pending_envelopes"] == 0
        )
        await settle([alice], delivered_all)
        assert alice.history(bob.address)[1].status == 0  # still only "sent"

        # edit and delete for everyone
        await alice.edit(bob.address, res.msg_id, "how are you, really?")
        await alice.delete(bob.address, res2.msg_id)
        await settle([bob], lambda: texts(bob, alice.address) == ["how are you, really?"])
        assert bob.history(alice.address)[0].edited
        # bob can't edit alice's message
        fake_edit = Payload(
            new_envelope_id(), "edit", alice.address, 1, text="pwned", target=res.msg_id
        )
        await bob.send_payload(alice.address, fake_edit)
        await settle([alice], delivered_all)
        assert texts(alice, bob.address) == ["how are you, really?"]

        # read receipts can be turned off
        bob.set_setting("read_receipts", "off")
        res3 = await alice.send(bob.address, "third")
        row3 = lambda: next(r for r in alice.history(bob.address) if r.msg_id == res3.msg_id)  # noqa: E731
        await settle([bob], lambda: "third" in texts(bob, alice.address))
        await bob.mark_read(alice.address)
        await settle([alice], lambda: row3().status == 1)
        await drain(alice)
        assert row3().status == 1  # delivered, never read

        # delivery receipts can be turned off too: the sender's history stays at "sent"
        cli = haven(
            "settings", "--home", str(tmp_path / "b"), "--delivery-receipts", "off", "--json"
        ).stdout
        assert '"delivery_receipts": "off"' in cli
        bob.close()
        bob = Device(str(tmp_path / "b"))
        res4 = await alice.send(bob.address, "fourth")
        await settle([bob], lambda: "fourth" in texts(bob, alice.address))
        await settle(
            [alice],
            lambda: a.status()["pending_envelopes"] == 0 and b.status()["outbox_envelopes"] == 0,
        )
        row4 = next(r for r in alice.history(bob.address) if r.msg_id == res4.msg_id)
        assert row4.status == 0
    finally:
        for d in (alice, bob, carol):
            d.close()


@pytest.fixture
async def _unused() -> AsyncIterator[None]:  # keeps pytest-asyncio's import used
    yield


async def test_node_substituted_one_time_keys_are_refused(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    """A node that swaps a device's one-time keys for its own cannot get a session started."""
    import vodozemac as vz

    from federation.errors import KeysExhausted

    a, b = pair
    alice = await new_device(a, tmp_path / "a", "alice")
    bob = await new_device(b, tmp_path / "b", "bob")
    try:
        evil = vz.Account()
        evil.generate_one_time_keys(1)
        evil_key = next(iter(evil.one_time_keys.values())).to_base64()
        evil_signed = (
            f"{evil_key}:{evil.sign(b'haven-otk-v1' + bytes(1) + evil_key.encode()).to_base64()}"
        )
        db = sqlite3.connect(b.home / "store.db")
        db.execute("UPDATE otks SET key=?", (evil_signed,))
        db.execute("UPDATE fallback SET key=?", (evil_key,))
        db.commit()
        db.close()
        with pytest.raises(KeysExhausted):
            await alice.send(bob.address, "to a forged key")
    finally:
        alice.close()
        bob.close()


async def test_history_transfer_to_a_linked_device_is_end_to_end(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice1 = await new_device(a, tmp_path / "a1", "alice")
    bob = await new_device(b, tmp_path / "b", "bob")
    try:
        texts_sent = [f"old-canary-{i:03d} " + "x" * 1000 for i in range(60)]  # > one chunk
        conn = await alice1.connect()
        try:
            for t in texts_sent:
                await alice1.send(bob.address, t, conn=conn)
        finally:
            await conn.__aexit__(None, None, None)
        code: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        linker = asyncio.create_task(
            link_device(alice1, code.set_result, timeout_s=30, with_history=True)
        )
        alice2 = Device(str(tmp_path / "a2"))
        await alice2.join(await code, name="laptop")
        res = await linker
        assert res["history_messages"] == 60
        assert texts(alice2, bob.address) == texts_sent
        alice2.close()
    finally:
        alice1.close()
        bob.close()
    for path in [p for p in a.home.rglob("*") if p.is_file()] + [a.log]:
        assert b"old-canary" not in path.read_bytes()
