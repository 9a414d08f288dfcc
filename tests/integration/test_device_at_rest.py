"""A seized device home: nothing readable without the key; with it, no deleted texts.

Two devices on a real node exchange messages, then delete, edit and let one disappear. The
homes are then examined: raw bytes (no key), and every page carved and decrypted with the
database key, as an examiner holding the passphrase would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nacl.exceptions
import nacl.secret

from client import devicedb
from client.device import Device
from client.keyslots import HEADER_SIZE, SLOT_SIZE, KeySlots
from federation.clock import FakeClock
from tests.client.sqlcipher_pages import carve

from .harness import ROOT, NodeProc

GONE = ("gone-deleted-q7zv", "gone-edited-q7zv", "gone-expiring-q7zv")


def home_bytes(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(home.iterdir()) if p.is_file())


def live_keys(home: Path, db_key: bytes) -> list[bytes]:
    data = (home / "device.keys").read_bytes()
    keys = [
        data[HEADER_SIZE + i * SLOT_SIZE : HEADER_SIZE + (i + 1) * SLOT_SIZE]
        for i in range((len(data) - HEADER_SIZE) // SLOT_SIZE)
    ]
    return [k for k in keys if any(k)] + [devicedb.storage_key_for(db_key)]


def snapshot(home: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("device.db", "device.db-wal"):
        if (home / name).exists():
            shutil.copy(home / name, dest / name)
    return dest / "device.db"


async def settle(devs: list[Device], cond: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("devices did not reach the expected state in time")
        for d in devs:
            await d.receive(wait_s=0.2)


def whoami(home: Path, passphrase: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HAVEN_")}
    env |= {"PYTHONPATH": str(ROOT)} | ({"HAVEN_PASSPHRASE": passphrase} if passphrase else {})
    out = subprocess.run(
        [sys.executable, "-m", "client.cli", "whoami", "--home", str(home), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        check=True,
    ).stdout
    return dict(json.loads(out))


async def test_seized_device_homes(tmp_path: Path, nodes: list[NodeProc]) -> None:
    node = NodeProc.create(tmp_path, "A").start()
    nodes.append(node)
    ha, hb = tmp_path / "alice", tmp_path / "bob"
    clock = FakeClock(int(time.time() * 1000))  # the disappearing timer runs on it
    alice = Device(str(ha), clock=clock, passphrase="alice's passphrase")
    bob = Device(str(hb), clock=clock)  # no passphrase: its database key is in clear
    await alice.join(node.invite("alicezq"), name="alicezq-phone")
    await bob.join(node.invite("bobxw"), name="bobxw-phone")
    ad, bd = alice.address, bob.address
    try:
        sent = {}
        for text in ("canary-kept-q7zv", *GONE):
            expires = 60_000 if "expiring" in text else 0
            sent[text] = (await alice.send(bd, text, expires_in=expires)).msg_id
        await settle([bob], lambda: len(bob.history(ad)) == 4)
        before = {h: snapshot(h, tmp_path / f"before-{h.name}") for h in (ha, hb)}
        clock.advance(120_000)
        await alice.delete(bd, sent["gone-deleted-q7zv"])
        await alice.edit(bd, sent["gone-edited-q7zv"], "now-edited-q7zv")
        await settle(
            [bob],
            lambda: [r.text for r in bob.history(ad)] == ["canary-kept-q7zv", "now-edited-q7zv"],
        )
        assert [r.text for r in alice.history(bd)] == ["canary-kept-q7zv", "now-edited-q7zv"]
    finally:
        alice.close()
        bob.close()

    assert whoami(ha, "alice's passphrase")["protected"] is True
    info = whoami(hb, None)
    assert info["protected"] is False and info["protection"] == "none"

    keys = {ha: KeySlots(str(ha / "device.keys")).unwrap("alice's passphrase")}
    keys[hb] = KeySlots(str(hb / "device.keys")).unwrap(None)
    for home, db_key in keys.items():
        raw = home_bytes(home)
        # without the key: no header, no names, no texts
        for needle in (b"SQLite format", b"alicezq", b"bobxw", b"-q7zv"):
            assert needle not in raw, (home.name, needle)
        # with the key, every page carved from the home and from the copy taken before the
        # deletes (a stand-in for whatever freed blocks kept): metadata, but never a text
        pages = carve(db_key, raw) + carve(db_key, home_bytes(before[home].parent))
        peer = b"bobxw" if home == ha else b"alicezq"
        assert any(peer in p for p in pages)  # the carve works: the contact is there
        assert not any(b"-q7zv" in p for p in pages)  # texts are sealed even inside the pages
        # the sealed texts as they were before the deletes, tried under every key on disk
        old = devicedb.connect(str(before[home]), db_key)
        sealed = [r[0] for r in old.execute("SELECT text FROM history")]
        old.close()
        assert len(sealed) == 4
        opened = []
        for blob in sealed:
            for k in live_keys(home, db_key):
                try:
                    opened.append(bytes(nacl.secret.SecretBox(k).decrypt(blob)))
                except nacl.exceptions.CryptoError:
                    continue
        assert opened == [b"canary-kept-q7zv"], (home.name, opened)
