"""A seized node disk keeps nothing of a delivered group chat (issue 10; docs/threat-model.md).

Three federated nodes whose homes are on loop-mounted ext4 images (``disk.LoopImage``); a group
with a distinctive name and members on every node (A: alicezq, erinpw; B: bobxw; C: carolvk,
davejt; bob has a second, linked device under ``--long``), messages from every node, read
receipts, a rename and a removal. A client-side tap records every ``send`` and ``send_multi``
frame the devices hand to their nodes: envelope ids, mailboxes, and for each multi-recipient
submission its shared ephemeral key and group body (the ground truth of "which mailboxes got one
submission"). Figures per raw image copy (every block, allocated or not, and records carved
from it; values opened with every epoch key found on the image):

- ``texts``, ``names`` (accounts not hosted on that node), ``remote_mailboxes``,
  ``linked_equal_sends`` / ``linked_adjacent_sends`` (submissions whose rows an examiner groups
  by an equal clear value or adjacent rowids), ``dead_decryptable``: the node figures of
  ``examine.node_figures``, scored against the tapped ledger;
- ``group_names``: the group's names (before and after the rename); ``group_ids``: its id, raw
  or in hex; ``group_refs``: the text ``group:<hex>``;
- ``subm_eph`` / ``subm_body``: submissions whose shared ephemeral key, or a sampled window of
  whose shared group body, is found (in clear or inside a value an image key opens): the bytes
  all copies of one submission have in common, so a find links the mailboxes that got it;
- ``canary``: the planted free-space marker was found (the scan sees unallocated blocks).

Positive control: image C copied while C still holds pending copies of a submission (carol and
dave not online yet) must show that submission's ephemeral key and body inside rows opened with
the live epoch key on the image (the examiner sees the association where it exists), and even
then no clear field links the copies (``linked_*`` are 0 while pending too). The same for
image A copied while C is down and A holds a submission's copies for C as outbox rows (the
fan-out's stored fallback). After delivery every figure above is 0 on all three images.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from client.connection import NodeConnection
from client.device import Device
from federation import frames as F

from ..conftest import LONG
from ..integration.harness import linked, new_device
from .carve import carve
from .disk import LoopImage, tools_missing
from .examine import (
    Env,
    Ledger,
    NodeTruth,
    Scan,
    node_epoch_keys,
    node_figures,
    parse_epoch_keys,
    present,
    sample_windows,
    sealed_rows,
)
from .workload import ClockNode, read_epoch_keys

N = 8 if LONG else 1  # messages per member and phase
IMAGE_MB = 128 if LONG else 64
HOSTED = {"A": ("alicezq", "erinpw"), "B": ("bobxw",), "C": ("carolvk", "davejt")}
ACCOUNT = {"bobxw2": "bobxw"}  # linked devices (``--long``) -> their account
BODY_WINDOWS = 4  # sampled 32-byte windows per shared group body


@dataclass
class Submission:
    """One ``send_multi`` frame: what every copy of it shares."""

    send: int
    eph: bytes
    body: bytes
    ids: list[bytes]


@dataclass
class World:
    base: Path
    images: dict[str, LoopImage] = field(default_factory=dict)
    nodes: dict[str, ClockNode] = field(default_factory=dict)
    node_ids: dict[str, str] = field(default_factory=dict)
    devs: dict[str, Device] = field(default_factory=dict)
    ledger: Ledger = field(default_factory=Ledger)
    subs: list[Submission] = field(default_factory=list)
    texts: list[bytes] = field(default_factory=list)
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    missing = tools_missing()
    assert not missing, f"seizure harness needs {missing} (scripts/test installs sleuthkit)"
    w = World(tmp_path)
    try:
        for name in HOSTED:
            img = LoopImage(tmp_path / f"{name}.img", tmp_path / f"m{name}", IMAGE_MB)
            w.images[name] = img.create()
        yield w
    finally:
        for d in w.devs.values():
            try:
                d.close()
            except Exception:  # noqa: BLE001 - best-effort cleanup
                pass
        for n in w.nodes.values():
            n.kill()
        for img in w.images.values():
            img.unmount()


@contextmanager
def group_tap(w: World) -> Iterator[None]:
    """Record every ``send`` item and every ``send_multi`` recipient into the ledger (one ledger
    send per frame), and the submission's shared parts; remember the live nodes' epoch keys
    before and after each (scoring only)."""
    orig = NodeConnection.request
    counter = iter(range(1, 10**9))

    def keys() -> None:
        for n in w.nodes.values():
            read_epoch_keys(n.home, w.ledger)

    async def request(self: NodeConnection, frame: F.Frame) -> F.Frame:
        home = self.challenge.node_id if self.challenge else ""
        if isinstance(frame, F.Send):
            send = next(counter)
            for dest, env in frame.items:
                w.ledger.add(Env(env.id, env.to, env.body[:32], send, home, dest))
        elif isinstance(frame, F.SendMulti):
            send = next(counter)
            ids = []
            for dest, recips in frame.dests:
                for env_id, mailbox, hdr in recips:
                    # the copy is eph || hdr || body: its first 32 bytes (eph) are shared, so
                    # the header attributes a copy to its envelope
                    w.ledger.add(Env(env_id, mailbox, hdr[:32], send, home, dest))
                    ids.append(env_id)
            w.subs.append(Submission(send, bytes(frame.eph), bytes(frame.body), ids))
        keys()
        reply = await orig(self, frame)
        keys()
        return reply

    NodeConnection.request = request  # type: ignore[method-assign]
    try:
        yield
    finally:
        NodeConnection.request = orig  # type: ignore[method-assign]


def counts(n: ClockNode) -> dict[str, int]:
    c: dict[str, int] = n.stats()["counts"]
    return c


async def _tick(w: World) -> None:
    """Poll interval of a deadline loop, not synchronisation; also remembers live epoch keys."""
    await asyncio.sleep(0.2)
    for n in w.nodes.values():
        read_epoch_keys(n.home, w.ledger)


async def wait_forwarded(w: World, timeout: float = 60) -> None:
    """Every node's outbox is empty: each copy is on its destination node."""
    deadline = time.monotonic() + timeout
    while any(counts(n)["outbox_envelopes"] for n in w.nodes.values()):
        assert time.monotonic() < deadline, "outboxes did not drain"
        await _tick(w)
    for e in w.ledger.envs.values():
        if e.sender_node != e.dest_node:
            e.forwarded = True


async def drain(w: World, devs: list[str], on: tuple[str, ...] = (), timeout: float = 90) -> None:
    """Receive on ``devs`` until no node (of ``on``: all by default) holds anything; then
    everything (for those nodes) is delivered."""
    nodes = [w.nodes[k] for k in on or w.nodes]
    deadline = time.monotonic() + timeout
    while True:
        await wait_forwarded(w)
        await asyncio.gather(*(w.devs[d].receive(wait_s=0.3) for d in devs))
        if not any(
            c["pending_envelopes"] or c["outbox_envelopes"] for c in (counts(n) for n in nodes)
        ):
            break
        assert time.monotonic() < deadline, "devices did not drain their mailboxes"
    ids = {w.node_ids[n.home.name] for n in nodes}
    for e in w.ledger.envs.values():
        if e.dest_node in ids:
            e.delivered = e.forwarded = True


def live_remnants(w: World, node: ClockNode) -> int:
    """Records in the live node's own database files of envelopes no longer pending there
    that open under a key live right now (they die at the next re-seal, ≤ 10 s)."""
    read_epoch_keys(node.home, w.ledger)
    try:
        keys = parse_epoch_keys((node.home / "epochs.key").read_bytes())
    except FileNotFoundError:
        return 0
    if not keys:
        return 0
    states = w.ledger.state_on(w.node_ids[node.home.name])
    dead = {i for i, s in states.items() if s != "pending"}
    open_rec = sealed_rows()
    raw = b"".join(p.read_bytes() for p in sorted(node.home.glob("store.db*")))
    return sum(
        1
        for rec in carve(raw)
        if (pts := [pt for _, pt in open_rec(rec, keys)]) and w.ledger.attribute(rec, pts) & dead
    )


async def wait_remnants_dead(w: World, timeout: float = 30) -> float:
    t = time.monotonic()
    for n in w.nodes.values():
        while live_remnants(w, n):
            assert time.monotonic() - t < timeout, f"{n.home.name}: delivered rows' key lives"
            await _tick(w)
    return time.monotonic() - t


def text(w: World, i: int) -> str:
    t = f"txt-grp-{i:03d}-{secrets.token_hex(6)}"  # the shape examine.TEXT finds
    w.texts.append(t.encode())
    return t


def examine(w: World, img: str, label: str, gid: bytes, names: list[str]) -> dict[str, Any]:
    """Copy image ``img`` (with a fresh canary) and score it."""
    node = w.nodes[img]
    read_epoch_keys(node.home, w.ledger)
    image = w.images[img]
    canary = image.plant_canary()
    dest = w.base / f"copy-{img}-{label}.img"
    image.snapshot(dest)
    t = time.monotonic()
    scan = Scan.of(f"{img}{label}", dest)
    local = set(HOSTED[img])
    remote_names = [a.encode() for k, accts in HOSTED.items() if k != img for a in accts]
    remote_mb = [d.mailbox for k, d in w.devs.items() if ACCOUNT.get(k, k) not in local]
    truth = NodeTruth(
        w.node_ids[img],
        w.texts,
        remote_names,
        remote_mb,
        w.ledger.state_on(w.node_ids[img]),
    )
    f = node_figures(scan, truth, w.ledger, canary, open_record=sealed_rows())
    # group data: in clear anywhere on the image, or inside a value an image key opens
    keys = node_epoch_keys(dest)
    open_rec = sealed_rows()
    opened = [pt for rec in scan.records for _, pt in open_rec(rec, keys)]
    corpus = [scan.raw, *opened]

    def found(needles: list[bytes]) -> set[bytes]:
        return set().union(*(present(c, needles) for c in corpus))

    gid_forms = [gid, gid.hex().encode(), gid.hex().upper().encode()]
    f["group_names"] = len(found([n.encode() for n in names]))
    f["group_ids"] = len(found(gid_forms))
    f["group_refs"] = len(found([b"group:" + gid.hex().encode()]))
    ephs = found([s.eph for s in w.subs])
    f["subm_eph"] = len(ephs)
    f["subm_eph_opened"] = len(
        set().union(*(present(pt, [s.eph for s in w.subs]) for pt in opened))
    )
    windows = {s.send: sample_windows(s.body, BODY_WINDOWS, 32, seed=s.send) for s in w.subs}
    hit = found([x for ws in windows.values() for x in ws])
    f["subm_body"] = sum(1 for ws in windows.values() if hit & set(ws))
    f["submissions"] = len(w.subs)
    f["scan_s"] = round(time.monotonic() - t, 1)
    dest.unlink()
    w.figures[f"node {img} ({label})"] = f
    print(f"{img}{label}: {f}")
    return f


NODE_ZERO = ("texts", "names", "remote_mailboxes", "linked_equal_sends", "linked_adjacent_sends")
AFTER_ZERO = (
    *NODE_ZERO,
    "dead_decryptable",
    "group_names",
    "group_ids",
    "group_refs",
    "subm_eph",
    "subm_body",
)


def check(figures: dict[str, dict[str, Any]]) -> list[str]:
    """Every failing figure: the harness's own checks, then what the images keep."""
    out = []
    for name, f in sorted(figures.items()):
        if not f["canary"]:
            out.append(f"{name}: the planted canary was not found (the scan is blind)")
        if f["pending_seen"] != f["pending"]:
            out.append(f"{name}: harness attributed {f['pending_seen']}/{f['pending']} pending")
        if name.endswith("(pending)") or name.endswith("(outbox)"):
            if not f["sends_multi"] or not f["subm_eph_opened"] or not f["subm_body"]:
                out.append(f"{name}: the pending submission was not seen (examiner blind)")
        keys = AFTER_ZERO if name.endswith("(after)") else NODE_ZERO
        out += [f"{name}: {k}={f[k]}" for k in keys if f[k]]
    return out


async def test_seized_nodes_keep_no_group_after_delivery(world: World) -> None:
    w = world
    t0 = time.monotonic()
    for img in HOSTED:
        w.nodes[img] = node = ClockNode.create(w.images[img].mnt, img)
        assert isinstance(node, ClockNode)
        node.start()
        w.node_ids[img] = node.status()["node_id"]
    base = w.base / "devices"  # device homes are not examined here (tests/forensics/test_raw_disk)
    with group_tap(w):
        for img, accts in HOSTED.items():
            for a in accts:
                w.devs[a] = await new_device(w.nodes[img], base / a, a)
        if LONG:
            w.devs["bobxw2"] = await linked(w.devs["bobxw"], base / "bobxw2", "bob-tablet")
        alice = w.devs["alicezq"]
        others = [w.devs[a].address for a in ("erinpw", "bobxw", "carolvk", "davejt")]
        name = f"Orchid-{secrets.token_hex(5)}"
        renamed = f"Harbor-{secrets.token_hex(5)}"
        info = await alice.group_create(name, others)
        gid = info.gid
        everyone = list(w.devs)
        not_c = [d for d in everyone if d not in HOSTED["C"]]
        await drain(w, everyone)
        for d in everyone:
            g = w.devs[d].group(gid)
            assert g is not None and g.name == name, f"{d} did not learn the group"

        # phase 1: every member writes; C's members stay offline, so C holds pending copies
        i = 0
        for _ in range(N):
            for d in not_c:
                await w.devs[d].group_send(gid, text(w, i))
                i += 1
        await drain(w, not_c, on=("A", "B"))  # delivered on A and B; pending on C
        assert counts(w.nodes["C"])["pending_envelopes"], "no pending copies on C (no control)"
        examine(w, "C", "pending", gid, [name, renamed])
        # C is down: A's fan-out to it fails, so A keeps the copies for C as outbox rows
        w.nodes["C"].stop()
        await alice.group_send(gid, text(w, i))
        i += 1
        sub = w.subs[-1]
        c_id = w.node_ids["C"]
        for_c = [e for e in (w.ledger.envs[x] for x in sub.ids) if e.dest_node == c_id]
        assert len(for_c) == len(HOSTED["C"]), "the submission has no copies for C"
        deadline = time.monotonic() + 30
        while counts(w.nodes["A"])["outbox_envelopes"] != len(for_c):  # B's copy: forwarded
            assert time.monotonic() < deadline, "A's outbox does not hold just C's copies"
            await _tick(w)
        for e in w.ledger.envs.values():
            if e.sender_node == w.node_ids["A"] and e.dest_node != c_id:
                e.forwarded = True
        examine(w, "A", "outbox", gid, [name, renamed])
        w.nodes["C"].start()
        await w.devs["carolvk"].group_send(gid, text(w, i))  # C contacts A: A retries C now
        i += 1
        await drain(w, everyone)
        for d in everyone:
            await w.devs[d].group_mark_read(gid)
        # phase 2: C writes back, a rename, a removal, more messages, another round of reads
        for _ in range(N):
            for d in HOSTED["C"]:
                await w.devs[d].group_send(gid, text(w, i))
                i += 1
        await alice.group_rename(gid, renamed)
        await drain(w, everyone)
        await alice.group_remove(gid, w.devs["davejt"].address)
        await drain(w, everyone)
        for _ in range(N):
            for d in ("alicezq", "bobxw", "carolvk"):
                await w.devs[d].group_send(gid, text(w, i))
                i += 1
        await drain(w, everyone)
        for d in everyone:
            if d != "davejt":
                await w.devs[d].group_mark_read(gid)
        await drain(w, everyone)
        carol = w.devs["carolvk"].group(gid)
        assert carol is not None and carol.name == renamed
        assert w.devs["davejt"].address not in carol.members
        got = [r.text for r in w.devs["carolvk"].group_history(gid)]
        assert set(t.decode() for t in w.texts) <= set(got), "carol misses group messages"
        waited = await wait_remnants_dead(w)
        print(f"workload {time.monotonic() - t0:.1f}s, remnants dead after {waited:.1f}s")
        for img in HOSTED:
            examine(w, img, "after", gid, [name, renamed])

    print(json.dumps(w.figures, sort_keys=True))
    out_json = os.environ.get("HAVEN_FORENSIC_JSON")
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(w.figures, fh, indent=1, sort_keys=True)
    print(
        f"groups raw-disk {time.monotonic() - t0:.0f}s, {len(w.subs)} submissions, "
        f"{len(w.ledger.envs)} envelopes"
    )
    assert w.subs, "no multi-recipient submission was tapped (the scoring is blind)"
    failures = check(w.figures)
    assert not failures, "group raw-disk examination:\n" + "\n".join(failures)
