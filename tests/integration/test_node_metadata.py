"""Node metadata at rest (docs/operations.md §5, docs/threat-model.md).

- The node key can live off the data disk (``--key-file``) or wrapped under an operator secret
  (``--key-secret-file``, also as a systemd credential); the node serves, federates and rotates.
- Account creation and long-lived invites are stored at day granularity; device-link tokens
  never reach the disk (raw bytes of the database and its WAL).
- A personal node drops a peer pin unused for ``pin_ttl_days`` and pins it again (TOFU) on the
  owner's next contact.
- A peer outage with 50 queued envelopes logs state changes only.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from client.device import Device, ReceivedMessage, parse_invite
from client.linking import link_device
from federation import frames as F
from federation.signing import NodeKey
from node import nodekey
from node.client_api import invite_hash

from .harness import ROOT, NodeProc, haven, join, wait_until
from .rawpeer import set_node_config

DAY_MS = 86_400_000
DEADLINE_S = 30.0


async def device(node: NodeProc, base: Path, name: str) -> tuple[Device, str]:
    home, address = await asyncio.to_thread(join, node, base, name)
    return Device(str(home)), address


async def receive_one(dev: Device, match: Callable[[ReceivedMessage], bool]) -> ReceivedMessage:
    """Connect ``dev`` and process deliveries (acking them) until a matching message arrives."""
    conn = await dev.connect()
    try:
        async with asyncio.timeout(DEADLINE_S):
            while True:
                for m in await dev.process(conn, await conn.deliveries.get()):
                    if match(m):
                        return m
    finally:
        await conn.__aexit__(None, None, None)


def files_holding(root: Path, needle: bytes) -> list[str]:
    """Every file under ``root`` whose raw bytes contain ``needle``."""
    return [str(p) for p in root.rglob("*") if p.is_file() and needle in p.read_bytes()]


def serve_fails(node: NodeProc) -> list[str]:
    """Run ``serve`` expecting it to refuse to start; its stderr lines."""
    proc = haven("node", "serve", "--home", str(node.home), check=False, timeout=30)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()


def start_with(node: NodeProc, *extra: str) -> NodeProc:
    """``NodeProc.start`` with extra ``serve`` arguments (the test-only clock switch)."""
    logf = open(node.log, "ab")
    node.proc = subprocess.Popen(
        [sys.executable, "-m", "client.cli", "node", "serve", "--home", str(node.home), *extra],
        stdout=logf,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "HAVEN_TEST_CLOCK": "1"},
    )
    logf.close()
    wait_until(node._listening, 20, f"node {node.home.name} to listen")
    return node


def descriptor(node: NodeProc) -> bytes:
    with urllib.request.urlopen(node.url + "/.well-known/haven/node", timeout=10) as r:
        return bytes(r.read())


def node_id(node: NodeProc) -> str:
    return str(node.status()["node_id"])


def live_peers(node: NodeProc) -> list[str]:
    out = haven("node", "peers", "--home", str(node.home), "--json").stdout
    return [p["node_id"] for p in json.loads(out)]


# ---- the node key off the data disk -------------------------------------------------------------


async def test_key_file_keeps_the_node_key_off_the_data_disk(
    tmp_path: Path, nodes: list[NodeProc]
) -> None:
    vol = tmp_path / "keyvol"
    vol.mkdir()
    a = NodeProc.create(tmp_path, "A", "--key-file", str(vol / "a.key"))
    b = NodeProc.create(tmp_path, "B")
    nodes += [a, b]
    seed = (vol / "a.key").read_bytes()
    assert len(seed) == 32 and not (a.home / "node.key").exists()
    assert f'key_file = "{vol / "a.key"}"' in (a.home / "node.toml").read_text()
    a.start()
    b.start()
    alice, _ = await device(a, tmp_path, "alice")
    bob, bob_addr = await device(b, tmp_path, "bob")
    try:
        await alice.send(bob_addr, "over the off-disk key")
        got = await receive_one(bob, lambda m: m.text == "over the off-disk key")
        assert got.sender == alice.address
        a.stop()
        assert files_holding(a.home, seed) == []  # the data disk never held the seed

        # the key volume is not mounted: one clear line, no traceback
        shutil.move(vol / "a.key", tmp_path / "elsewhere.key")
        lines = serve_fails(a)
        assert len(lines) == 1 and "node key file" in lines[0], lines
        assert lines[0].endswith("(node_key_unavailable)"), lines
        shutil.move(tmp_path / "elsewhere.key", vol / "a.key")

        # rotation writes the new key to the same volume, never to the data disk
        old = NodeKey(seed).node_id
        out = json.loads(haven("node", "rotate-key", "--home", str(a.home), "--json").stdout)
        new_seed = (vol / "a.key").read_bytes()
        assert out == {"old_node_id": old, "node_id": NodeKey(new_seed).node_id} != old
        assert not (a.home / "node.key").exists() and files_holding(a.home, new_seed) == []
        a.start()
        assert out["node_id"].encode() in descriptor(a)
    finally:
        alice.close()
        bob.close()


async def test_wrapped_key_opens_with_a_secret_file_or_a_systemd_credential(
    tmp_path: Path, nodes: list[NodeProc], monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(os.urandom(32))
    a = NodeProc.create(tmp_path, "A", "--key-secret-file", str(secret))
    nodes.append(a)
    wrapped = (a.home / "node.key").read_bytes()
    assert len(wrapped) == nodekey.WRAPPED_SIZE and wrapped.startswith(nodekey.MAGIC)
    key = NodeKey(nodekey.unwrap_seed(wrapped, secret.read_bytes()))
    assert node_id(a) == key.node_id
    a.start()
    assert key.node_id.encode() in descriptor(a)
    a.stop()
    assert files_holding(a.home, key.seed) == []

    good = secret.read_bytes()
    secret.write_bytes(b"not the secret")
    lines = serve_fails(a)
    assert len(lines) == 1 and "does not unwrap" in lines[0], lines

    # systemd: LoadCredential=haven-node-secret:/etc/haven/secret -> $CREDENTIALS_DIRECTORY
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "haven-node-secret").write_bytes(good)
    secret.unlink()
    set_node_config(a.home, key_secret_file="credential:haven-node-secret")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    lines = serve_fails(a)
    assert len(lines) == 1 and "CREDENTIALS_DIRECTORY" in lines[0], lines
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    out = json.loads(haven("node", "rotate-key", "--home", str(a.home), "--json").stdout)
    assert out["old_node_id"] == key.node_id != out["node_id"]
    rewrapped = (a.home / "node.key").read_bytes()
    assert rewrapped.startswith(nodekey.MAGIC)
    assert NodeKey(nodekey.unwrap_seed(rewrapped, good)).node_id == out["node_id"]
    a.start()
    assert out["node_id"].encode() in descriptor(a)


# ---- coarse times, link tokens in memory --------------------------------------------------------


async def test_times_are_days_and_link_tokens_never_reach_the_disk(
    tmp_path: Path, nodes: list[NodeProc]
) -> None:
    a = NodeProc.create(tmp_path, "A").start()
    nodes.append(a)
    alice, alice_addr = await device(a, tmp_path, "alice")
    a.invite("bob")  # a long-lived operator invite (7 days)
    tokens: list[bytes] = []
    try:
        conn = await alice.connect()
        try:
            for _ in range(3):
                tok = await conn.request(F.MintLink(conn.next_rid()))
                assert isinstance(tok, F.LinkToken)
                tokens.append(tok.token)
        finally:
            await conn.__aexit__(None, None, None)
        # a real link still works: the token is redeemed from memory
        code: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        linker = asyncio.create_task(link_device(alice, code.set_result, timeout_s=30))
        laptop = Device(str(tmp_path / "alice-laptop"))
        try:
            assert await laptop.join(await code, name="laptop") == alice_addr
            await linker
            tokens.append(parse_invite(code.result())["t"])  # the redeemed one too
        finally:
            laptop.close()
    finally:
        alice.close()

    db = sqlite3.connect(f"file:{a.home / 'store.db'}?mode=ro", uri=True)
    try:
        created = [r[0] for r in db.execute("SELECT created FROM accounts")]
        invites = db.execute("SELECT kind, expires FROM invites").fetchall()
    finally:
        db.close()
    assert len(created) == 2 and all(c % DAY_MS == 0 for c in created), created
    assert [k for k, _ in invites] == ["invite"] and invites[0][1] % DAY_MS == 0, invites
    assert (a.home / "store.db-wal").stat().st_size > 0  # scanned while the node runs ...
    for stopped in (False, True):  # ... and once it has stopped
        if stopped:
            a.stop()
        for t in tokens:  # neither the token nor its hash, not even in a stale WAL frame
            assert files_holding(a.home, t) == [] and files_holding(a.home, invite_hash(t)) == []


# ---- personal nodes forget unused pins ----------------------------------------------------------


async def test_personal_node_drops_an_unused_pin_and_pins_again_on_contact(
    tmp_path: Path, nodes: list[NodeProc]
) -> None:
    a = NodeProc.create(tmp_path, "A")
    set_node_config(a.home, owner="alice")  # a personal node (LAN stays off in this test)
    a.start()
    b = NodeProc.create(tmp_path, "B").start()
    nodes += [a, b]
    alice, _ = await device(a, tmp_path, "alice")
    _, bob_addr = await device(b, tmp_path, "bob")
    b_id = node_id(b)
    try:
        conn = await alice.connect()
        try:
            await alice.fetch_contact(conn, bob_addr, claim=False)  # A pins B (TOFU)
        finally:
            await conn.__aexit__(None, None, None)
        assert live_peers(a) == [b_id]
        a.stop()
        start_with(a, "--clock-offset=+31d")  # a month without contact
        wait_until(lambda: live_peers(a) == [], what="the unused pin to be dropped")
        log = a.log.read_text()
        assert "dropped 1 peer pins unused for 30 days" in log and b_id not in log, log[-2000:]

        conn = await alice.connect()
        try:  # the owner's next contact pins it again
            contact, _, _ = await alice.fetch_contact(conn, bob_addr, claim=False)
        finally:
            await conn.__aexit__(None, None, None)
        assert contact.node_id == b_id and live_peers(a) == [b_id]
    finally:
        alice.close()


# ---- logs: state changes only -------------------------------------------------------------------


async def test_peer_outage_with_50_queued_logs_state_changes_only(
    tmp_path: Path, nodes: list[NodeProc]
) -> None:
    a = NodeProc.create(tmp_path, "A").start()
    b = NodeProc.create(tmp_path, "B").start()
    nodes += [a, b]
    alice, _ = await device(a, tmp_path, "alice")
    bob, bob_addr = await device(b, tmp_path, "bob")
    try:
        await alice.send(bob_addr, "before")
        await receive_one(bob, lambda m: m.text == "before")
        b.stop()
        before = a.log.read_text().splitlines()
        conn = await alice.connect()
        try:
            for i in range(50):
                await alice.send(bob_addr, f"queued {i}", conn=conn)
        finally:
            await conn.__aexit__(None, None, None)
        wait_until(lambda: a.status()["outbox_envelopes"] >= 50, what="50 queued at A")
        b.start()
        # B does not contact A, so A finds it back on its own backoff timer: after the ~15-30 s
        # outage of a loaded machine the next attempt may be 16-32 s away (federation/backoff.py)
        wait_until(lambda: a.status()["outbox_envelopes"] == 0, 120, what="the queue to drain")
        wait_until(lambda: b.status()["pending_envelopes"] >= 50, what="B to hold them")
        new = a.log.read_text().splitlines()[len(before) :]
        down = [line for line in new if "unreachable" in line]
        up = [line for line in new if "reachable again" in line]
        assert len(down) == 1 and len(up) == 1, new
        assert len(new) <= 4, new  # not one line per envelope, request or retry
        assert not any(
            "bob" in line or "127.0.0.1" in line or "Traceback" in line for line in new
        ), new
    finally:
        alice.close()
        bob.close()
