"""Delivery under attack: bounded deliver frames, no head-of-line blocking, outbox quotas.

Each test reproduces one attack on real nodes and checks that it now fails while a legitimate
pair keeps messaging (docs/protocol.md §5.5 and §6, docs/operations.md §3).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import aiohttp

from client.device import Device, parse_invite
from federation import frames as F
from federation.devicelist import SignedDeviceList
from federation.sealing import unseal
from federation.wire import MAX_BODY, Envelope

from .harness import NodeProc, async_wait_until
from .rawpeer import RawDevice, RawIdentity, RawPeer, envelope, stats

MAX_DELIVER_BYTES = 1024 * 1024  # node.toml max_deliver_bytes (default)


def configure(node: NodeProc, **values: int) -> None:
    """Set integer keys in a stopped node's node.toml."""
    conf = node.home / "node.toml"
    text = conf.read_text()
    for key, value in values.items():
        text, n = re.subn(rf"^{key} = \d+$", f"{key} = {value}", text, flags=re.M)
        assert n == 1, key
    conf.write_text(text)


async def register_raw(http: aiohttp.ClientSession, node: NodeProc, name: str) -> RawIdentity:
    """A hand-made device for a new account ``name``, with 5 one-time keys published."""
    inv = parse_invite(node.invite(name))
    ident = RawIdentity(address=f"{inv['name']}@{node.host}")
    dev = await RawDevice.connect(http, node.url)
    reg = await dev.register(ident, inv["t"], ident.address)
    assert isinstance(reg, F.Registered), reg
    ok = await dev.request(F.PublishKeys(dev.next_rid(), ident.one_time_keys(5), (), None))
    assert isinstance(ok, F.Ok), ok
    await dev.close()
    return ident


async def signed_in(http: aiohttp.ClientSession, node: NodeProc, ident: RawIdentity) -> RawDevice:
    dev = await RawDevice.connect(http, node.url)
    assert isinstance(await dev.auth(ident), F.AuthOk)
    return dev


async def mailbox_of(dev: RawDevice, address: str) -> tuple[str, bytes]:
    """Node id and mailbox of ``address``, read from its public signed device list (this also
    makes the asking device's node know the destination node)."""
    keys = await dev.request(F.QueryKeys(dev.next_rid(), address, False))
    assert isinstance(keys, F.Keys), keys
    return keys.node_id, keys.device_list.open().devices[0].mailbox


async def send_raw(dev: RawDevice, dest: str, envs: list[Envelope]) -> F.Accepted:
    ans = await dev.request(F.Send(dev.next_rid(), tuple((dest, e) for e in envs)))
    assert isinstance(ans, F.Accepted), ans
    return ans


async def counts(http: aiohttp.ClientSession, node: NodeProc) -> dict[str, int]:
    return (await stats(http, node.url))["counts"]  # type: ignore[no-any-return]


async def errors(http: aiohttp.ClientSession, node: NodeProc, key: str) -> int:
    return int((await stats(http, node.url))["errors"].get(key, 0))


async def receive_texts(dev: Device, n: int) -> list[str]:
    """Receive (and ack) until ``n`` text messages arrived."""
    got: list[str] = []

    async def more() -> bool:
        got.extend(m.text for m in await dev.receive(wait_s=0.3) if m.kind == "text")
        return len(got) >= n

    await async_wait_until(more, what=f"{n} messages")
    return got


async def test_junk_backlog_over_4_mib_is_streamed_in_bounded_frames(
    tmp_path: Path, nodes: list[NodeProc]
) -> None:
    """Item 1: a peer stuffs a victim's mailbox with 80 junk envelopes of 64 KiB (5.2 MB).
    Before, the node pushed the whole backlog as one 5.2 MB deliver frame, which the
    reference client (4 MiB limit) drops: nothing arrived. Now it streams frames of at most
    ``max_deliver_bytes`` as the device acks, and a real message sent after the junk arrives."""
    node = NodeProc.create(tmp_path, "B")
    nodes.append(node.start())
    alice = Device(str(tmp_path / "alice"))
    try:
        await alice.join(node.invite("alice"))
        async with aiohttp.ClientSession() as http:
            victim = await register_raw(http, node, "victim")
            # The attacker reads the victim's mailbox id from the public device list.
            peer = RawPeer(http, node.url)
            await peer.handshake()
            ans = await peer.keys("victim", False)
            listed = SignedDeviceList.from_wire(ans.body["device_list"]).open()
            mailbox = listed.devices[0].mailbox
            junk = [envelope(mailbox, body=os.urandom(MAX_BODY)) for _ in range(80)]
            for i in range(0, len(junk), 20):
                ans = await peer.batch(junk[i : i + 20])
                assert ans.status == 200 and len(ans.body["accepted"]) == 20, ans.body
            await alice.send(victim.address, "a real message after the junk")
            assert (await counts(http, node))["pending_envelopes"] == 81

            dev = await RawDevice.connect(http, node.url)
            await dev.send_bytes(F.Auth(dev.next_rid(), victim.mailbox, dev.proof(victim)).encode())
            got: dict[bytes, Envelope] = {}
            sizes: list[int] = []
            while len(got) < 81:
                frame, size = await dev.recv_sized()
                if isinstance(frame, F.Deliver):  # a v1 device: ack each frame as it comes
                    sizes.append(size)
                    assert not set(got) & {e.id for e in frame.envs}, "delivered twice"
                    got |= {e.id: e for e in frame.envs}
                    await dev.send_bytes(F.Ack(tuple(e.id for e in frame.envs)).encode())
                else:
                    assert isinstance(frame, F.AuthOk), frame
            print(f"deliver frames: {len(sizes)}, largest {max(sizes)} bytes")
            assert max(sizes) <= MAX_DELIVER_BYTES, f"largest deliver frame {max(sizes)} bytes"
            assert len(sizes) >= 6  # 5.2 MB cannot fit fewer frames of 1 MiB
            junk_ids = {e.id for e in junk}
            assert junk_ids <= set(got)
            (real,) = [e for i, e in got.items() if i not in junk_ids]
            assert unseal(bytes(victim.sealing), real.body).sender == alice.address

            async def drained() -> bool:
                return (await counts(http, node))["pending_envelopes"] == 0

            await async_wait_until(drained, what="every acked envelope deleted")
            await dev.close()
    finally:
        alice.close()


async def test_full_mailbox_does_not_block_other_users_mail_to_that_node(
    tmp_path: Path, nodes: list[NodeProc]
) -> None:
    """Item 2: on A, mallory sends 250 envelopes to a victim on B whose mailbox holds at most 5.
    Before, the 245 refused ones stayed at the head of A's queue for B (batches of 200) and
    carol's 10 messages to dave on B were never delivered (0/10). Now 10/10 arrive while the
    refused ones wait in A's outbox on their own schedule."""
    a = NodeProc.create(tmp_path, "A")
    b = NodeProc.create(tmp_path, "B")
    configure(b, max_pending_per_mailbox=5)
    nodes += [a.start(), b.start()]
    carol, dave = Device(str(tmp_path / "carol")), Device(str(tmp_path / "dave"))
    try:
        await carol.join(a.invite("carol"))
        dave_addr = await dave.join(b.invite("dave"))
        async with aiohttp.ClientSession() as http:
            await register_raw(http, b, "victim")
            mallory = await register_raw(http, a, "mallory")
            dev = await signed_in(http, a, mallory)
            b_id, victim_mailbox = await mailbox_of(dev, f"victim@{b.host}")
            junk = [envelope(victim_mailbox) for _ in range(250)]
            assert len((await send_raw(dev, b_id, junk)).ids) == 250

            async def refused() -> bool:
                return await errors(http, a, "outbox_rejected.quota_exceeded") >= 245

            await async_wait_until(refused, what="B to refuse the envelopes over the quota")
            assert (await counts(http, b))["pending_envelopes"] == 5

            for i in range(10):
                await carol.send(dave_addr, f"m{i}")
            got = await receive_texts(dave, 10)
            assert sorted(got) == sorted(f"m{i}" for i in range(10))  # 10/10 delivered
            # the refused envelopes were neither lost nor delivered: they wait in A's outbox
            assert (await counts(http, a))["outbox_envelopes"] == 245
            assert await errors(http, b, "federation.quota_exceeded") >= 245
            await dev.close()
    finally:
        carol.close()
        dave.close()


async def test_outbox_quotas_refuse_growth_for_a_peer_that_is_down(
    tmp_path: Path, nodes: list[NodeProc]
) -> None:
    """Item 4: while B is down, one account on A tries to queue without bound. Before, every
    envelope was accepted (330,000 in 20 s, +490 MB). Now an account may queue
    ``max_outbox_per_account`` and all accounts together ``max_outbox_per_destination`` for one
    peer; the rest is refused with quota_exceeded, local mail keeps flowing, and the quota is
    free again once B is back and has taken the queue."""
    a = NodeProc.create(tmp_path, "A")
    b = NodeProc.create(tmp_path, "B")
    configure(a, max_outbox_per_account=25, max_outbox_per_destination=40)
    nodes += [a.start(), b.start()]
    carol, dave = Device(str(tmp_path / "carol")), Device(str(tmp_path / "dave"))
    try:
        await carol.join(a.invite("carol"))
        dave_addr = await dave.join(a.invite("dave"))
        async with aiohttp.ClientSession() as http:
            victim = await register_raw(http, b, "victim")
            mallory = await register_raw(http, a, "mallory")
            eve = await register_raw(http, a, "eve")
            dev_m, dev_e = await signed_in(http, a, mallory), await signed_in(http, a, eve)
            b_id, mailbox = await mailbox_of(dev_m, f"victim@{b.host}")
            b.stop()

            ans = await send_raw(dev_m, b_id, [envelope(mailbox) for _ in range(60)])
            assert len(ans.ids) == 25  # per account
            assert [c for _, c in ans.rejected] == ["quota_exceeded"] * 35
            ans = await send_raw(dev_e, b_id, [envelope(mailbox) for _ in range(30)])
            assert len(ans.ids) == 15  # per destination: 40 in all
            assert [c for _, c in ans.rejected] == ["quota_exceeded"] * 15
            assert (await counts(http, a))["outbox_envelopes"] == 40

            await carol.send(dave_addr, "local mail is not affected")
            assert await receive_texts(dave, 1) == ["local mail is not affected"]

            # B is back; its contact (a key query from a device on B) wakes A's queue.
            b.start()
            dev_v = await signed_in(http, b, victim)
            await mailbox_of(dev_v, f"carol@{a.host}")

            async def drained() -> bool:
                return (await counts(http, a))["outbox_envelopes"] == 0

            await async_wait_until(drained, what="A's queue for B to drain")
            assert (await counts(http, b))["pending_envelopes"] == 40
            ans = await send_raw(dev_m, b_id, [envelope(mailbox) for _ in range(5)])
            assert len(ans.ids) == 5 and ans.rejected == ()  # the quota was released
            for d in (dev_m, dev_e, dev_v):
                await d.close()
    finally:
        carol.close()
        dave.close()
