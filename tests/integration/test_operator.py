"""Operator tools on real node processes (docs/cli.md "Accounts and invites").

Two nodes serve the module: ``node`` (invite-only, the default) and ``open_node`` (open
registration, a per-IP limit of 4 an hour, loopback not exempt so the limit applies to the
test's own 127.0.0.1). Every operator command runs as the real CLI against the running node's
home; account changes reach the running node through its loopback port, and the commands say
whether it confirmed (``node_notified``) before they return.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from client.device import parse_invite
from federation import frames as F

from .harness import NodeProc, haven
from .rawpeer import Answer, RawDevice, RawIdentity, RawPeer, envelope, set_node_config

OPEN_PER_IP = 4


@dataclass
class Nodes:
    node: NodeProc
    open_node: NodeProc
    base: Path


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    base = tmp_path_factory.mktemp("operator")
    node = NodeProc.create(base, "node")
    # every test's raw peer is a new, unpinned node key (test_peer_admission.py tests that)
    set_node_config(node.home, new_peer_rate=1_000_000, new_peer_burst=1_000_000)
    open_node = NodeProc.create(base, "open", "--open-registration")
    set_node_config(
        open_node.home, exempt_loopback=False, registrations_per_ip_per_hour=OPEN_PER_IP
    )
    node.start()
    open_node.start()
    try:
        yield Nodes(node, open_node, base)
        for n in (node, open_node):
            assert n.proc is not None and n.proc.poll() is None, "a node died"
    finally:
        node.stop()
        open_node.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def op(node: NodeProc, *args: str) -> Any:
    """An operator command with ``--json``; its parsed output."""
    out = haven("node", *args, "--home", str(node.home), "--json").stdout
    return json.loads(out)


def op_fails(node: NodeProc, *args: str) -> subprocess.CompletedProcess[str]:
    proc = haven("node", *args, "--home", str(node.home), check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc


def issue(node: NodeProc, name: str, *extra: str) -> tuple[bytes, int]:
    """A new invite's token and expiry (``haven node invite NAME …``)."""
    out = op(node, "invite", name, *extra)
    assert out["name"] == name
    return bytes(parse_invite(out["invite"])["t"]), int(out["expires"])


def invite(node: NodeProc, name: str, *extra: str) -> bytes:
    return issue(node, name, *extra)[0]


async def register(
    http: aiohttp.ClientSession, node: NodeProc, ident: RawIdentity, token: bytes, version: int = 1
) -> F.Frame:
    """Redeem ``token`` with a hand-made device; the connection is closed afterwards."""
    dev = await RawDevice.connect(http, node.url)
    try:
        return await dev.request(
            F.Register(
                dev.next_rid(),
                token,
                ident.mailbox,
                ident.auth_key,
                dev.proof(ident),
                ident.device_list(ident.address, version),
            )
        )
    finally:
        await dev.close()


async def register_open(
    http: aiohttp.ClientSession, node: NodeProc, name: str, ident: RawIdentity | None = None
) -> F.Frame:
    ident = ident or RawIdentity(address=f"{name}@{node.host}")
    dev = await RawDevice.connect(http, node.url)
    try:
        return await dev.request(
            F.Register(
                dev.next_rid(),
                b"",
                ident.mailbox,
                ident.auth_key,
                dev.proof(ident),
                ident.device_list(f"{name}@{node.host}"),
                name,
            )
        )
    finally:
        await dev.close()


async def user(http: aiohttp.ClientSession, node: NodeProc, name: str) -> RawIdentity:
    ident = RawIdentity(address=f"{name}@{node.host}")
    reg = await register(http, node, ident, invite(node, name))
    assert isinstance(reg, F.Registered) and reg.address == ident.address, reg
    return ident


async def signed_in(http: aiohttp.ClientSession, node: NodeProc, ident: RawIdentity) -> RawDevice:
    dev = await RawDevice.connect(http, node.url)
    ok = await dev.auth(ident)
    assert isinstance(ok, F.AuthOk), ok
    return dev


async def auth_answer(http: aiohttp.ClientSession, node: NodeProc, ident: RawIdentity) -> Any:
    dev = await RawDevice.connect(http, node.url)
    try:
        return await dev.auth(ident)
    finally:
        await dev.close()


async def peer(http: aiohttp.ClientSession, node: NodeProc) -> RawPeer:
    p = RawPeer(http, node.url)
    await p.handshake()
    return p


def refusal(answer: Answer) -> tuple[int, str, str]:
    """A federation refusal without its ``now`` stamp (the node's clock, different each time)."""
    body = dict(answer.body)
    assert set(body) == {"code", "message", "now"}, body
    return answer.status, body["code"], body["message"]


def error_of(frame: F.Frame) -> tuple[str, str]:
    assert isinstance(frame, F.Error), frame
    return frame.code, frame.message


# ---- accounts ----------------------------------------------------------------------------


async def test_accounts_list_shows_counts_and_no_correspondents(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    node = nodes.node
    alice = await user(http, node, "alice")
    bob = await user(http, node, "bob")
    a = await signed_in(http, node, alice)
    here = a.challenge.node_id
    items = tuple((here, envelope(bob.mailbox)) for _ in range(3))
    sent = await a.request(F.Send(a.next_rid(), items))
    assert isinstance(sent, F.Accepted) and len(sent.ids) == 3, sent
    await a.close()
    accounts = {x["name"]: x for x in op(node, "accounts", "list")}
    fields = {"name", "created", "created_day", "disabled", "quota", "devices", "pending"}
    assert all(set(x) == fields for x in accounts.values())
    day = time.strftime("%Y-%m-%d", time.gmtime())
    assert accounts["alice"] | {"created": 0} == {
        "name": "alice",
        "created": 0,
        "created_day": day,
        "disabled": False,
        "quota": 0,
        "devices": 1,
        "pending": 0,
    }
    assert accounts["bob"]["devices"] == 1 and accounts["bob"]["pending"] == 3
    assert accounts["bob"]["created"] % 86_400_000 == 0  # a day, not a moment
    # nothing about who wrote to whom, in either form
    text = haven("node", "accounts", "list", "--home", str(node.home)).stdout
    bob_line = next(line for line in text.splitlines() if line.startswith("bob "))
    assert "alice" not in bob_line and bob.mailbox.hex() not in text


async def test_disable_refuses_disconnects_and_hides_then_enable_restores(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    node = nodes.node
    dave = await user(http, node, "dave")
    stranger = RawIdentity(address=f"nobody@{node.host}")  # no such mailbox
    p = await peer(http, node)
    kept = envelope(dave.mailbox)  # pending when dave is disabled: kept until its TTL
    assert (await p.batch([kept])).body == {"accepted": [kept.id], "rejected": []}
    connected = await signed_in(http, node, dave)  # pushed `kept`; never acks it

    out = op(node, "accounts", "disable", "dave")
    assert out == {"name": "dave", "disabled": True, "node_notified": True}
    # the connected device is disconnected by the node (it applied the change before the
    # command returned)
    while (msg := await connected.recv_msg()).type == aiohttp.WSMsgType.BINARY:
        pass  # the delivery of `kept`
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    # signing in: exactly the answer a device with no account gets
    assert (
        error_of(await auth_answer(http, node, dave))
        == error_of(await auth_answer(http, node, stranger))
        == ("unauthorized", "unauthorized")
    )
    # peers: key queries and envelopes, exactly as for a missing name / mailbox
    disabled_keys, missing_keys = await p.keys("dave", False), await p.keys("nobody", False)
    assert refusal(disabled_keys) == refusal(missing_keys) == (404, "not_found", "no such user")
    env = envelope(dave.mailbox)
    missing = envelope(stranger.mailbox)
    got = (await p.batch([env, missing])).body
    assert got == {"accepted": [], "rejected": [[env.id, "not_found"], [missing.id, "not_found"]]}
    listed = {x["name"]: x for x in op(node, "accounts", "list")}
    assert listed["dave"]["disabled"] is True and listed["dave"]["pending"] == 1

    assert op(node, "accounts", "enable", "dave")["node_notified"] is True
    back = await signed_in(http, node, dave)
    delivered, _ = await back.recv_sized()  # what waited while disabled comes now
    assert isinstance(delivered, F.Deliver) and [e.id for e in delivered.envs] == [kept.id]
    await back.close()
    ok = await p.keys("dave", False)
    assert ok.status == 200, ok.body
    env = envelope(dave.mailbox)
    assert (await p.batch([env])).body == {"accepted": [env.id], "rejected": []}


async def test_unknown_account_is_not_found(nodes: Nodes) -> None:
    for args in (("disable", "ghost"), ("enable", "ghost"), ("quota", "ghost", "5")):
        proc = op_fails(nodes.node, "accounts", *args)
        assert proc.stderr.strip() == "error: no account 'ghost' (not_found)"


async def test_quota_overrides_the_node_default(nodes: Nodes, http: aiohttp.ClientSession) -> None:
    node = nodes.node
    carol = await user(http, node, "carol")
    assert op(node, "accounts", "quota", "carol", "2") == {
        "name": "carol",
        "quota": 2,
        "node_notified": True,
    }
    p = await peer(http, node)
    envs = [envelope(carol.mailbox) for _ in range(3)]
    got = (await p.batch(envs)).body
    assert got == {
        "accepted": [envs[0].id, envs[1].id],
        "rejected": [[envs[2].id, "quota_exceeded"]],
    }
    assert op(node, "accounts", "quota", "carol", "0")["node_notified"] is True  # node default
    more = envelope(carol.mailbox)
    assert (await p.batch([more])).body == {"accepted": [more.id], "rejected": []}
    assert {x["name"]: x["pending"] for x in op(node, "accounts", "list")}["carol"] == 3


# ---- invites -----------------------------------------------------------------------------


async def test_invite_with_uses_then_refused(nodes: Nodes, http: aiohttp.ClientSession) -> None:
    """``--uses 3``: three devices of one person (one identity key) register with the same
    invite; the fourth redemption is refused, and the invite is gone from the list."""
    node = nodes.node
    token = invite(node, "team", "--uses", "3")
    listed = [i for i in op(node, "invites", "list") if i["name"] == "team"]
    assert [(i["kind"], i["uses_left"]) for i in listed] == [("invite", 3)]
    first = RawIdentity(address=f"team@{node.host}")
    for version in (1, 2, 3):
        ident = RawIdentity(identity=first.identity, address=first.address)
        reg = await register(http, node, ident, token, version)
        assert isinstance(reg, F.Registered), reg
    fourth = RawIdentity(identity=first.identity, address=first.address)
    refused = await register(http, node, fourth, token, 4)
    assert error_of(refused)[0] == "invalid_invite"
    assert [i for i in op(node, "invites", "list") if i["name"] == "team"] == []
    assert {x["name"]: x["devices"] for x in op(node, "accounts", "list")}["team"] == 3


async def test_revoke_by_ref(nodes: Nodes, http: aiohttp.ClientSession) -> None:
    node = nodes.node
    token = invite(node, "erin")
    keep = invite(node, "frank")
    refs = {i["name"]: i["ref"] for i in op(node, "invites", "list")}
    assert len(refs["erin"]) == 12
    assert op(node, "invites", "revoke", refs["erin"]) == {"ref": refs["erin"], "revoked": 1}
    ident = RawIdentity(address=f"erin@{node.host}")
    assert error_of(await register(http, node, ident, token))[0] == "invalid_invite"
    proc = op_fails(node, "invites", "revoke", refs["erin"])
    assert proc.stderr.strip().endswith("(not_found)")
    assert op_fails(node, "invites", "revoke", "abc").stderr.strip().endswith("(bad_argument)")
    frank = RawIdentity(address=f"frank@{node.host}")
    assert isinstance(await register(http, node, frank, keep), F.Registered)


async def test_expired_invite_is_refused(nodes: Nodes, http: aiohttp.ClientSession) -> None:
    node = nodes.node
    token, expires = issue(node, "gina", "--expires", "1s")
    # wait (with a deadline) until the node's clock has passed the expiry
    deadline = time.monotonic() + 10
    while time.time() * 1000 <= expires + 50:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ident = RawIdentity(address=f"gina@{node.host}")
    assert error_of(await register(http, node, ident, token))[0] == "invalid_invite"
    assert all(i["name"] != "gina" for i in op(node, "invites", "list"))


# ---- open registration -------------------------------------------------------------------


async def test_invite_only_node_refuses_open_registration(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    got = await register_open(http, nodes.node, "walkin")
    assert error_of(got)[0] == "registration_closed"
    assert all(x["name"] != "walkin" for x in op(nodes.node, "accounts", "list"))


async def test_open_registration_names_and_per_ip_limit(
    nodes: Nodes, http: aiohttp.ClientSession
) -> None:
    """Four attempts with valid names count towards the hour's budget of 4 from this address
    (taken names too: probing names costs the same); an invalid name is refused before it."""
    node = nodes.open_node
    hana = RawIdentity(address=f"hana@{node.host}")
    first = await register_open(http, node, "hana", hana)
    assert isinstance(first, F.Registered) and first.address == f"hana@{node.host}", first
    assert error_of(await register_open(http, node, "hana"))[0] == "name_taken"
    bad = RawIdentity(address=f"Bad Name@{node.host}")
    assert error_of(await register_open(http, node, "Bad Name", bad))[0] == "invalid_name"
    # the client's own variant: `haven join --register NAME URL`
    home = nodes.base / "dev-ivan"
    out = haven("join", "--register", "ivan", node.url, "--home", str(home), "--json").stdout
    assert json.loads(out) == {"address": f"ivan@{node.host}"}
    assert isinstance(await register_open(http, node, "jun"), F.Registered)
    over = await register_open(http, node, "kim")
    assert error_of(over)[0] == "too_many_registrations"
    names = [x["name"] for x in op(node, "accounts", "list")]
    assert names == ["hana", "ivan", "jun"]
    # the account registered openly signs in like any other
    await (await signed_in(http, node, hana)).close()
