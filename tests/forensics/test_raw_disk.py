"""A seized disk reveals no conversations: raw-image examination of two nodes and their devices.

Node homes and device homes live on their own loop-mounted ext4 images. The workload (two
federated nodes, multi-device and linked users, offline recipients, a peer outage, edits,
deletes, disappearing messages, a restart after more than an epoch) is tapped on the client
side for ground truth; each image is frozen and copied at three points: (a) live with
messages pending, (b) live after delivery, (c) after an epoch has passed on a stopped and
restarted node; also (s) while both are stopped. Every copy is examined as a whole
(unallocated blocks included), records are carved, and the figures are printed as a table
and as JSON (docs/threat-model.md §8).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from client.device import Device
from federation.clock import SystemClock

from ..conftest import LONG
from ..integration.harness import NodeProc, linked, new_device
from .carve import carve
from .disk import LoopImage, files_named, tools_missing
from .examine import (
    DeviceTruth,
    Ledger,
    NodeTruth,
    Scan,
    device_figures,
    node_figures,
    parse_epoch_keys,
    sealed_rows,
)
from .workload import ClockNode, read_epoch_keys, tap

N = 12 if LONG else 3  # messages per conversation and phase
ACCOUNTS = {"alice": "alicezq", "carol": "carolvk", "bob": "bobxw", "dave": "davejt"}
PASSPHRASE = "correct horse battery staple"  # bob1's device only (Argon2id costs seconds)


@dataclass
class World:
    base: Path
    images: dict[str, LoopImage] = field(default_factory=dict)
    a: ClockNode | None = None
    b: ClockNode | None = None
    devs: dict[str, Device] = field(default_factory=dict)
    ledger: Ledger = field(default_factory=Ledger)
    texts: dict[str, list[bytes]] = field(
        default_factory=lambda: {k: [] for k in ("keep", "del", "exp", "edit_old", "edit_new")}
    )
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    copies: int = 0
    t0: int = 0


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    missing = tools_missing()
    assert not missing, f"seizure harness needs {missing} (scripts/test installs sleuthkit)"
    w = World(tmp_path)
    try:
        scale = 2 if LONG else 1
        for name, size in (("A", 64), ("B", 64), ("D", 64), ("P", 32)):
            size *= scale
            w.images[name] = LoopImage(tmp_path / f"{name}.img", tmp_path / f"m{name}", size)
            w.images[name].create()
        yield w
    finally:
        for d in w.devs.values():
            try:
                d.close()
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass
        for n in (w.a, w.b):
            if n is not None:
                n.kill()
        for img in w.images.values():
            img.unmount()


def text(w: World, kind: str, i: int) -> str:
    t = f"txt-{kind}-{i:03d}-{secrets.token_hex(6)}"
    w.texts[kind].append(t.encode())
    return t


_IDS: dict[str, str] = {}


def status(n: NodeProc) -> dict[str, Any]:
    """Store counts of a running node (loopback stats endpoint) and its node id."""
    key = str(n.home)
    if key not in _IDS:
        _IDS[key] = n.status()["node_id"]
    return {"node_id": _IDS[key], **n.stats()["counts"]}


async def wait_flushed(w: World, *nodes: ClockNode, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for n in nodes:
        while status(n)["outbox_envelopes"]:
            if time.monotonic() >= deadline:
                stats = {x.home.name: x.stats()["counts"] for x in nodes}
                raise AssertionError(f"outbox of {n.home.name} did not drain: {stats}")
            await _tick(w)
        nid = status(n)["node_id"]
        for e in w.ledger.envs.values():
            if e.sender_node == nid and e.dest_node != nid:
                e.forwarded = True


async def _tick(w: World | None = None) -> None:
    """Poll interval of a deadline loop, not synchronisation. Each tick also remembers the live
    nodes' epoch keys (scoring only: keys minted and destroyed between two sends would leave
    their rows unattributed)."""
    await asyncio.sleep(0.2)
    if w is not None:
        for n in (w.a, w.b):
            if n is not None:
                read_epoch_keys(n.home, w.ledger)


async def drain_all(w: World, timeout: float = 60) -> None:
    """Receive on every device until both nodes hold nothing; then everything is delivered."""
    assert w.a and w.b
    deadline = time.monotonic() + timeout
    while True:
        await wait_flushed(w, w.a, w.b)
        await asyncio.gather(*(d.receive(wait_s=0.3) for d in w.devs.values()))
        sa, sb = status(w.a), status(w.b)
        if not (sa["pending_envelopes"] or sb["pending_envelopes"] or sa["outbox_envelopes"]):
            if not sb["outbox_envelopes"]:
                break
        assert time.monotonic() < deadline, "devices did not drain their mailboxes"
        read_epoch_keys(w.a.home, w.ledger)
        read_epoch_keys(w.b.home, w.ledger)
    for e in w.ledger.envs.values():
        if not e.expired:
            e.delivered = e.forwarded = True


def node_truth(w: World, node: ClockNode, local: set[str]) -> NodeTruth:
    nid = _IDS[str(node.home)]  # (works on a stopped node too)
    remote = [k for k in w.devs if ACCOUNTS[k[:-1]] not in local]
    names = [n.encode() for n in ("alicezq", "carolvk", "bobxw", "davejt") if n not in local]
    names += [b"alice-laptop", b"bob-tablet"] if "alicezq" not in local else [b"bob-tablet"]
    if "alicezq" in local:
        names = [n for n in names if n != b"alice-laptop"]
    return NodeTruth(
        nid,
        [t for ts in w.texts.values() for t in ts],
        names,
        [w.devs[k].mailbox for k in remote],
        w.ledger.state_on(nid),
    )


def copy_and_scan(w: World, img: str, label: str) -> tuple[Scan, bytes]:
    image = w.images[img]
    canary = image.plant_canary()
    w.copies += 1
    dest = w.base / f"copy-{img}-{label}.img"
    image.snapshot(dest)
    scan = Scan.of(f"{img}{label}", dest)
    return scan, canary


def live_remnants(w: World, node: ClockNode) -> int:
    """Records in the live node's own files (database and WAL, read through the mounted
    filesystem) of envelopes no longer pending there that open under a key live right now."""
    read_epoch_keys(node.home, w.ledger)
    try:
        keys = parse_epoch_keys((node.home / "epochs.key").read_bytes())
    except FileNotFoundError:
        return 0
    if not keys:
        return 0
    states = w.ledger.state_on(_IDS[str(node.home)])
    dead = {i for i, s in states.items() if s != "pending"}
    open_rec = sealed_rows()
    raw = b"".join(p.read_bytes() for p in sorted(node.home.glob("store.db*")))
    n = 0
    for rec in carve(raw):
        pts = [pt for _, pt in open_rec(rec, keys)]
        if pts and w.ledger.attribute(rec, pts) & dead:
            n += 1
    return n


async def wait_remnants_dead(w: World, node: ClockNode, timeout: float = 30) -> float:
    """Image (a) is taken as a seizure would find the node some seconds after its last
    delivery: rows delivered under the current key stay decryptable (WAL frames, freed pages)
    until the next sweep re-seals what is pending under a fresh key and destroys the old one
    (``RESEAL_AFTER_DELIVERY``, ``node/sqlite_store.py``; docs/threat-model.md §8, residual
    window). Poll until no such remnant opens under a live key; the time waited is reported."""
    t = time.monotonic()
    while live_remnants(w, node):
        assert time.monotonic() - t < timeout, (
            f"{node.home.name}: delivered rows' key not destroyed"
        )
        await _tick(w)
    return time.monotonic() - t


def examine_node(
    w: World, img: str, label: str, node: ClockNode, local: set[str], waited: float | None = None
) -> None:
    read_epoch_keys(node.home, w.ledger)
    truth = node_truth(w, node, local)
    t = time.monotonic()
    scan, canary = copy_and_scan(w, img, label)
    t2 = time.monotonic()
    w.figures[f"node {img} ({label})"] = f = node_figures(
        scan, truth, w.ledger, canary, open_record=sealed_rows()
    )
    f["node_key_file"] = len(files_named(scan.path, "node.key"))
    seed = node_key_bytes(w, img)  # the node was initialised with --key-file off the image
    f["node_key_on_image"] = int(bool(seed) and scan.found(seed))
    if waited is not None:
        f["remnant_wait_s"] = round(waited, 1)  # not scored: the residual window measured
    print(f"{img}{label}: copy+carve {t2 - t:.1f}s figures {time.monotonic() - t2:.1f}s")
    scan.path.unlink()


def node_key_path(w: World, img: str) -> Path:
    """Where node ``img`` keeps its key: off its data image (the recommended setup)."""
    return w.base / "keys" / f"{img}.node.key"


def node_key_bytes(w: World, img: str) -> bytes:
    try:
        return node_key_path(w, img).read_bytes()
    except FileNotFoundError:
        return b""


def examine_devices(w: World, img: str, contacts: list[bytes], peers: list[bytes]) -> None:
    keep = [t for t in w.texts["keep"]] + w.texts["edit_new"]
    truth = DeviceTruth(
        keep,
        w.texts["del"],
        w.texts["exp"],
        w.texts["edit_old"],
        contacts,
        peers,
        w.t0 - 60_000,
        int(time.time() * 1000) + 9 * 86_400_000,
    )
    t = time.monotonic()
    scan, canary = copy_and_scan(w, img, "b")
    print(f"{img}: copy+carve {time.monotonic() - t:.1f}s")
    phrase = PASSPHRASE if img == "P" else None
    w.figures[f"devices {img} (b)"] = device_figures(scan, truth, canary, phrase)
    scan.path.unlink()


def table(figures: dict[str, dict[str, Any]]) -> str:
    """One column per image copy, one row per figure (blank where it does not apply)."""
    names = sorted(figures, key=lambda n: (n.split()[0] != "node", n))
    rows = sorted({k for f in figures.values() for k in f})
    width = max(len(r) for r in rows)
    head = [n.replace("node ", "").replace("devices ", "dev ") for n in names]
    lines = [" " * width + "".join(f"{h:>10}" for h in head)]
    for r in rows:
        cells = "".join(f"{figures[n].get(r, ''):>10}" for n in names)
        lines.append(f"{r:<{width}}{cells}")
    return "\n".join(lines)


async def test_seized_disks_reveal_no_conversations(world: World) -> None:
    w = world
    t_start = time.monotonic()
    (w.base / "keys").mkdir()
    a, b = (
        ClockNode.create(w.images[n].mnt, n, "--key-file", str(node_key_path(w, n)))
        for n in ("A", "B")
    )
    assert isinstance(a, ClockNode) and isinstance(b, ClockNode)
    w.a, w.b = a, b
    a.start()
    b.start()
    clock = SystemClock()  # real time (sends get distinct ms), shifted to expire timers
    w.t0 = clock.now_ms()
    D, P = w.images["D"].mnt, w.images["P"].mnt
    with tap(w.ledger, (a.home, b.home)):
        w.devs["alice1"] = await new_device(a, D / "a1", "alicezq", clock=clock)
        w.devs["carol1"] = await new_device(a, D / "c1", "carolvk", clock=clock)
        w.devs["bob1"] = await new_device(b, P / "b1", "bobxw", clock=clock, passphrase=PASSPHRASE)
        w.devs["dave1"] = await new_device(b, D / "d1", "davejt", clock=clock)
        w.devs["alice2"] = await linked(w.devs["alice1"], D / "a2", "alice-laptop", clock=clock)
        w.devs["bob2"] = await linked(w.devs["bob1"], D / "b2", "bob-tablet", clock=clock)
        alice1, bob1, carol, dave = (w.devs[k] for k in ("alice1", "bob1", "carol1", "dave1"))
        print(f"setup {time.monotonic() - t_start:.1f}s")
        ad, bd, dd = alice1.address, bob1.address, dave.address

        # phase 1, everyone online: conversations, deletes, edits, disappearing messages
        for i in range(N):
            await alice1.send(bd, text(w, "keep", i))
            await bob1.send(ad, text(w, "keep", 100 + i))
            await carol.send(dd, text(w, "keep", 200 + i))
        dels = [await alice1.send(bd, text(w, "del", i)) for i in range(N)]
        edits = [await alice1.send(bd, text(w, "edit_old", i)) for i in range(N)]
        for i in range(N):
            await alice1.send(bd, text(w, "exp", i), expires_in=60_000)
        await drain_all(w)
        for r in dels:
            await alice1.delete(bd, r.msg_id)
        for i, r in enumerate(edits):
            await alice1.edit(bd, r.msg_id, text(w, "edit_new", i))
        await drain_all(w)
        clock.offset_ms += 61_000
        for d in w.devs.values():
            d.state.purge_expired(clock.now_ms())
        # phase 2: offline recipients (dave, alice's devices) -> pending; then a peer outage
        for i in range(N):
            await carol.send(dd, text(w, "keep", 300 + i))
            await bob1.send(ad, text(w, "keep", 400 + i))
        await wait_flushed(w, a, b)
        read_epoch_keys(a.home, w.ledger)
        waited = await wait_remnants_dead(w, b)
        examine_node(w, "B", "a", b, {"bobxw", "davejt"}, waited)
        b.stop()
        for i in range(N):
            await alice1.send(bd, text(w, "keep", 500 + i))
            await carol.send(dd, text(w, "keep", 600 + i))
        waited = await wait_remnants_dead(w, a)
        examine_node(w, "A", "a", a, {"alicezq", "carolvk"}, waited)
        b.start()
        await bob1.send(ad, text(w, "keep", 900))  # B contacts A: A's backoff for B resets
        await drain_all(w)
        examine_node(w, "A", "b", a, {"alicezq", "carolvk"})
        examine_node(w, "B", "b", b, {"bobxw", "davejt"})
        contacts = [ad.encode()]  # bob1's contact
        peers = [status(a)["node_id"].encode(), a.host.encode()]
        examine_devices(w, "P", contacts, peers)
        examine_devices(w, "D", [bd.encode(), dd.encode()], [status(b)["node_id"].encode()])

        print(f"phase 2 done {time.monotonic() - t_start:.1f}s")
        # phase 3: pending (7 d) and short-lived (30 min) envelopes for an offline dave, both
        # nodes stopped, restarted two hours later (more than an epoch), then delivered
        pending = [text(w, "keep", 700 + i) for i in range(N)]
        for t in pending:
            await carol.send(dd, t)
        short = [await carol.send(dd, text(w, "keep", 800 + i), ttl_ms=1_800_000) for i in range(N)]
        await wait_flushed(w, a)
        read_epoch_keys(b.home, w.ledger)
        short_ids = {
            e.id
            for e in w.ledger.envs.values()
            if e.send > max(w.ledger.sends) - len(short) and e.mailbox == dave.mailbox
        }
        a.stop()
        b.stop()
        examine_node(w, "A", "s", a, {"alicezq", "carolvk"})  # (s): seized while stopped
        examine_node(w, "B", "s", b, {"bobxw", "davejt"})
        a.start_offset("2h")
        b.start_offset("2h")
        expect = len(pending) * 1  # dave has one device
        deadline = time.monotonic() + 30
        while status(b)["pending_envelopes"] > expect:  # the short-lived ones are swept
            assert time.monotonic() < deadline, "expired envelopes were not swept"
            await _tick(w)
        for e in w.ledger.envs.values():
            if e.id in short_ids:
                e.expired = True
        examine_node(w, "A", "c", a, {"alicezq", "carolvk"})
        examine_node(w, "B", "c", b, {"bobxw", "davejt"})
        got = [m.text for m in await dave.receive(wait_s=1.0) if m.kind == "text"]
        assert sorted(got) == sorted(pending), "a restarted node lost pending envelopes"
        del short

    out = table(w.figures)
    print("\nraw-disk examination\n" + out)
    print(json.dumps(w.figures, sort_keys=True))
    out_json = os.environ.get("HAVEN_FORENSIC_JSON")  # e.g. for docs/threat-model.md §8
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(w.figures, fh, indent=1, sort_keys=True)
    print(f"workload+scan {time.monotonic() - t_start:.0f}s, {len(w.ledger.envs)} envelopes")

    failures = check(w.figures)
    assert not failures, "raw-disk examination:\n" + "\n".join(failures)


NODE_ZERO = (
    "texts",
    "names",
    "remote_mailboxes",
    "linked_equal_sends",
    "linked_adjacent_sends",
    "dead_decryptable",
    "pending_old_key",
    "node_key_file",
    "node_key_on_image",
)
DEVICE_ZERO = ("deleted", "expired", "edited_away")  # with every key on the image
# without the passphrase (the passphrase device only: image D's devices have none, so their
# database keys are in clear in device.keys, by design; their figures are reported)
NO_PHRASE_ZERO = (
    "keys_without_phrase",
    "contacts_clear",
    "peers_clear",
    "records_with_times",
    "texts_without_phrase",
)


def check(figures: dict[str, dict[str, Any]]) -> list[str]:
    """Every failing figure, grouped: the harness's own checks, devices, nodes."""
    harness, devices, nodes = [], [], []
    for name, f in sorted(figures.items()):
        if not f["canary"]:
            harness.append(f"{name}: the planted canary was not found (the scan is blind)")
        if name.startswith("node"):
            if f["pending_seen"] != f["pending"]:  # the harness must see every pending row
                harness.append(f"{name}: harness attributed {f['pending_seen']}/{f['pending']}")
            if name.endswith("(a)") and not f["sends_multi"]:
                harness.append(f"{name}: no multi-envelope send attributed (scoring is blind)")
            bad = [f"{k}={f[k]}" for k in NODE_ZERO if f[k]]
            if bad:
                nodes.append(f"{name}: " + ", ".join(bad))
            continue
        if not f["kept_readable"] or not f["keys_with_phrase"]:
            harness.append(f"{name}: with the key nothing is readable (examiner broken)")
        bad = [f"{k} {f[k]}/{f[k + '_total']}" for k in DEVICE_ZERO if f[k]]
        if name.startswith("devices P"):
            if f["key_files_protected"] != f["key_files"]:
                bad.append(f"unprotected key files {f['key_files'] - f['key_files_protected']}")
            bad += [f"without the passphrase {k}={f[k]}" for k in NO_PHRASE_ZERO if f[k]]
        if bad:
            devices.append(f"{name}: " + ", ".join(bad))
    out = []
    for title, lines in (("harness", harness), ("devices", devices), ("nodes", nodes)):
        if lines:
            out += [f"{title}:", *(f"  {line}" for line in lines)]
    return out
