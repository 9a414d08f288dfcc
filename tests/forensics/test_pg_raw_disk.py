"""A seized disk of a PostgreSQL node reveals no conversations (docs/threat-model.md §8).

Node A keeps its rows in PostgreSQL (``haven node init --store postgresql://…``): the server's
data directory (heap and TOAST files, WAL segments, ``pg_xact``, ``pg_notify``, statistics, its
log) and the node's home (``epochs.key``, ``node.toml``, the node's log) live on one
loop-mounted ext4 image, ``fsync=on``. Node B is a federated peer on SQLite (off the image), so
messages cross nodes and A holds remote names, remote mailboxes and outbox rows. The workload is
tapped on the client side (``workload.tap``) and the live epoch keys are read during the run
(scoring only). Before each copy PostgreSQL writes everything out (``CHECKPOINT``), then the
image is frozen and copied (``LoopImage.snapshot``) and examined as a whole, unallocated blocks
included:

* (a) live, envelopes pending for an offline local device and in the outbox for a peer that is
  down: the positive control. Sealed values carved from the raw image
  (``pgcarve.carve_pg``: inline ``bytea``, WAL records, TOAST chunks) open under the keys read
  live, so every pending envelope is found;
* (b) live, after delivery (once no delivered row opens under a key still live);
* (c) live, with envelopes pending across an epoch (short ``epoch_ms``): they are re-sealed
  under a new key and the old key is destroyed;
* (d) live, after delivering those too and another epoch: no key is left.

For every copy: no text, envelope id, body or correspondent name (peer accounts, devices, the
remote addresses) and no remote mailbox id in clear; no dead envelope decryptable with a key
found on the image (``epochs.key`` extracted with Sleuth Kit, parsed as in ``test_raw_disk``);
no destroyed key's bytes anywhere; no clear column (keyed hashes, order keys, coarse expiries)
that groups the rows of one send or equals a mailbox id. The figures are printed as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from federation.clock import SystemClock
from tests import pgcluster

from ..conftest import LONG
from ..integration.harness import linked, new_device
from .carve import Record
from .disk import LoopImage, files_named, nonzero_blocks, tools_missing, unallocated
from .examine import (
    Ledger,
    NodeTruth,
    Scan,
    node_figures,
    parse_epoch_keys,
    present,
    sealed_rows,
)
from .pgcarve import HEAP, TOAST, Layout, TupleHead, carve_pg
from .test_raw_disk import NODE_ZERO, World, _tick, drain_all, status, text, wait_flushed
from .workload import ClockNode, read_epoch_keys, tap

N = 10 if LONG else 3  # messages per conversation and phase
IMAGE_MB = 256 if LONG else 128  # PostgreSQL's cluster is ~40 MB (one 16 MB WAL segment)
EPOCH_MS = 5_000  # node A's epoch: short, so that (c) and (d) come within the test
REMOTE = ("bobxw", "davejt")  # homed on B
# Columns before ``sealed`` in node/pg_store.py's outbox (idh, dh, mbh, ord, exp) and envelope
# (idh, mbh, ord, exp) tables: the clear values of inline candidates (pgcarve.Layout)
LAYOUTS = (Layout(("b16", "b16", "b16", "i8", "i8")), Layout(("b16", "b16", "i8", "i8")))


@dataclass
class PgWorld(World):
    cluster: pgcluster.Cluster | None = None
    mnt: Path | None = None


@pytest.fixture
async def pg_world(tmp_path: Path) -> AsyncIterator[PgWorld]:
    missing = tools_missing()
    assert not missing, f"seizure harness needs {missing} (scripts/test installs sleuthkit)"
    w = PgWorld(tmp_path)
    # the mount point must be reachable for the postgres user: not under pytest's 0700 basetemp
    mnt = Path(tempfile.mkdtemp(prefix="haven-seize-", dir="/tmp"))
    os.chmod(mnt, 0o755)
    w.mnt = mnt
    try:
        w.images["A"] = LoopImage(tmp_path / "A.img", mnt, IMAGE_MB).create()
        (mnt / "pg").mkdir()
        w.cluster = pgcluster.start(root=str(mnt / "pg"))
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
        if w.cluster is not None:
            w.cluster.stop("immediate")
        for img in w.images.values():
            img.unmount()
            img.path.unlink(missing_ok=True)  # 128 MiB: not kept in pytest's basetemp
        shutil.rmtree(mnt, ignore_errors=True)


def pg_files(w: PgWorld) -> bytes:
    """Every file of the live cluster and of node A's home, read through the filesystem."""
    assert w.mnt is not None
    out = []
    for p in sorted(w.mnt.rglob("*")):
        if p.is_file() and not p.is_symlink():
            try:
                out.append(p.read_bytes())
            except OSError:  # a file PostgreSQL just removed
                continue
    return b"".join(out)


def carver(buf: bytes) -> list[Record]:
    """Sealed candidates, with the clear columns of whichever table layout matches."""
    return list(carve_pg(buf, LAYOUTS))


def checkpoint(w: PgWorld) -> None:
    assert w.cluster is not None
    w.cluster.psql("CHECKPOINT")


def live_remnants(w: PgWorld) -> int:
    """Candidates in the live cluster's files, of envelopes no longer pending on A, that open
    under a key live right now (``test_raw_disk.live_remnants`` for PostgreSQL)."""
    assert w.a is not None
    read_epoch_keys(w.a.home, w.ledger)
    try:
        keys = parse_epoch_keys((w.a.home / "epochs.key").read_bytes())
    except FileNotFoundError:
        return 0
    if not keys:
        return 0
    checkpoint(w)
    states = w.ledger.state_on(status(w.a)["node_id"])
    dead = {i for i, s in states.items() if s != "pending"}
    open_rec = sealed_rows()
    n = 0
    for rec in carver(pg_files(w)):
        pts = [pt for _, pt in open_rec(rec, keys)]
        if pts and w.ledger.attribute(rec, pts) & dead:
            n += 1
    return n


async def wait_remnants_dead(w: PgWorld, timeout: float = 40) -> float:
    t = time.monotonic()
    while live_remnants(w):
        assert time.monotonic() - t < timeout, "A: delivered rows' key not destroyed"
        await _tick(w)
    return time.monotonic() - t


async def wait_epoch_passed(w: PgWorld, timeout: float = 6 * EPOCH_MS / 1000) -> float:
    """Until every key A had when this was called is destroyed (a rotation re-sealed what is
    pending under a newer key, or nothing is pending and every key is gone)."""
    assert w.a is not None
    path = w.a.home / "epochs.key"
    before = {k for _, k in parse_epoch_keys(path.read_bytes())}
    t = time.monotonic()
    while before & {k for _, k in parse_epoch_keys(path.read_bytes())}:
        assert time.monotonic() - t < timeout, "A: an epoch passed and its key is still there"
        await _tick(w)
    return time.monotonic() - t


def truth(w: PgWorld) -> NodeTruth:
    assert w.a is not None
    nid = status(w.a)["node_id"]
    remote_devs = [k for k in w.devs if k.startswith(("bob", "dave"))]
    names = [n.encode() for n in REMOTE] + [b"bob-tablet", b"bobxw-phone", b"davejt-phone"]
    names += [w.devs[k].address.encode() for k in ("bob1", "dave1")]
    return NodeTruth(
        nid,
        [t for ts in w.texts.values() for t in ts],
        names,
        [w.devs[k].mailbox for k in remote_devs],
        w.ledger.state_on(nid),
    )


def examine(w: PgWorld, label: str, waited: float | None = None) -> dict[str, Any]:
    """Copy image A now and score it (the figures of ``examine.node_figures`` plus the
    PostgreSQL ones)."""
    assert w.a is not None
    read_epoch_keys(w.a.home, w.ledger)
    t = truth(w)
    checkpoint(w)
    image = w.images["A"]
    canary = image.plant_canary()
    dest = w.base / f"copy-A-{label}.img"
    t0 = time.monotonic()
    image.snapshot(dest)
    # the copy without its zero blocks (a sparse image is mostly zeros): same findings, faster
    raw, free = nonzero_blocks(dest.read_bytes()), nonzero_blocks(unallocated(dest))
    records = carver(raw)
    scan = Scan(f"A{label}", dest, raw, free, records, len(carver(free)))
    t1 = time.monotonic()
    f = node_figures(scan, t, w.ledger, canary, open_record=sealed_rows())
    image_keys = [k for data in files_named(dest, "epochs.key") for _, k in parse_epoch_keys(data)]
    destroyed = [k for k in w.ledger.oracle_keys if k not in image_keys]
    on_a = set(t.states)
    envs = [e for e in w.ledger.envs.values() if e.id in on_a]
    opener = sealed_rows()
    oracle = [(e, k) for k, e in w.ledger.oracle_keys.items()]
    image_kv = [(0, k) for k in image_keys]
    mailboxes = {d.mailbox for d in w.devs.values()}
    local_mailboxes = [w.devs[k].mailbox for k in ("alice1", "carol1")]
    f |= {
        "image_mb": IMAGE_MB,
        "toast_candidates": sum(1 for r in scan.records if r.kind == TOAST),
        "opened_with_live_keys": sum(1 for r in scan.records if opener(r, oracle)),
        "opened_with_image_keys": sum(1 for r in scan.records if opener(r, image_kv)),
        "ids_clear": len(present(raw, [e.id for e in envs])),
        "bodies_clear": len(present(raw, [e.body_head for e in envs])),
        "keys_destroyed": len(destroyed),
        "destroyed_keys_on_image": len(present(raw, destroyed)),
        "local_mailboxes_clear": len(present(raw, local_mailboxes)),  # devices table: by design
        "mailbox_in_clear_columns": sum(
            1 for r in scan.records if any(v in mailboxes for v in r.values[:-1])
        ),
        "node_key_file": len(files_named(dest, "node.key")),
        "node_key_on_image": int(scan.found(node_key_bytes(w))),
    }
    f |= tuple_linkage(scan, t, w.ledger)
    if waited is not None:
        f["wait_s"] = round(waited, 1)  # not scored: how long the key took to die
    t2 = time.monotonic()
    print(f"A{label}: copy+carve {t1 - t0:.1f}s figures {t2 - t1:.1f}s, {len(records)} candidates")
    dest.unlink()
    w.figures[f"pg node A ({label})"] = f
    return f


def tuple_linkage(scan: Scan, t: NodeTruth, ledger: Ledger) -> dict[str, int]:
    """What heap tuple headers (``t_xmin``, ``t_ctid``) of carved rows say about sends: a send
    is linked by ``t_xmin`` when two or more of its envelopes, and no other envelope, carry one
    transaction id; by ``t_ctid`` when its envelopes sit at consecutive line pointers of one
    page. Attribution (which envelope a row is) uses the keys read live: scoring only."""
    opener = sealed_rows()
    oracle = [(e, k) for k, e in ledger.oracle_keys.items()]
    by_xid: dict[int, set[bytes]] = defaultdict(set)
    places: dict[int, dict[bytes, tuple[int, int]]] = defaultdict(dict)
    heads = 0
    for rec in scan.records:
        if rec.kind != HEAP or not rec.cell:
            continue
        head: TupleHead | None = LAYOUTS[rec.cell - 1].tuple_head(scan.raw, rec.offset)
        if head is None:
            continue
        heads += 1
        ids = ledger.attribute(rec, [pt for _, pt in opener(rec, oracle)]) & set(t.states)
        if len(ids) != 1:
            continue
        eid = next(iter(ids))
        by_xid[head.xmin].add(eid)
        places[ledger.envs[eid].send].setdefault(eid, (head.block, head.posid))
    multi = {ledger.envs[i].send for ids in by_xid.values() for i in ids}
    multi = {s for s in multi if len(places[s]) >= 2}
    xmin_linked = set()
    for ids in by_xid.values():
        sends = {ledger.envs[i].send for i in ids}
        if len(ids) >= 2 and len(sends) == 1:
            xmin_linked |= sends
    adjacent = set()
    for send, where in places.items():
        blocks = {b for b, _ in where.values()}
        pos = sorted(p for _, p in where.values())
        if len(pos) >= 2 and len(blocks) == 1 and pos[-1] - pos[0] == len(pos) - 1:
            adjacent.add(send)
    return {
        "tuple_headers": heads,
        "tuple_sends_multi": len(multi),
        "linked_xmin_sends": len(xmin_linked & multi),
        "linked_ctid_adjacent_sends": len(adjacent & multi),
    }


def node_key_bytes(w: PgWorld) -> bytes:
    return (w.base / "keys" / "A.node.key").read_bytes()


async def test_seized_postgresql_node_reveals_no_conversations(pg_world: PgWorld) -> None:
    w = pg_world
    assert w.cluster is not None and w.mnt is not None
    t_start = time.monotonic()
    dsn = pgcluster.fresh_database(w.cluster, "seize")
    (w.base / "keys").mkdir()
    a = ClockNode.create(
        w.mnt, "A", "--store", dsn, "--key-file", str(w.base / "keys" / "A.node.key")
    )
    b = ClockNode.create(w.base, "B")
    assert isinstance(a, ClockNode) and isinstance(b, ClockNode)
    from node.config import NodeConfig

    replace(NodeConfig.load(str(a.home)), epoch_ms=EPOCH_MS).save(str(a.home))
    w.a, w.b = a, b
    a.start()
    b.start()
    clock = SystemClock()
    D = w.base / "devices"  # devices are not examined here (test_raw_disk does)
    with tap(w.ledger, (a.home, b.home)):
        w.devs["alice1"] = await new_device(a, D / "a1", "alicezq", clock=clock)
        w.devs["carol1"] = await new_device(a, D / "c1", "carolvk", clock=clock)
        w.devs["bob1"] = await new_device(b, D / "b1", "bobxw", clock=clock)
        w.devs["dave1"] = await new_device(b, D / "d1", "davejt", clock=clock)
        w.devs["bob2"] = await linked(w.devs["bob1"], D / "b2", "bob-tablet", clock=clock)
        alice, carol, bob, dave = (w.devs[k] for k in ("alice1", "carol1", "bob1", "dave1"))
        print(f"setup {time.monotonic() - t_start:.1f}s")

        # phase 1, everyone online: both directions, cross-node
        for i in range(N):
            await alice.send(bob.address, text(w, "keep", i))
            await bob.send(alice.address, text(w, "keep", 100 + i))
            await carol.send(dave.address, text(w, "keep", 200 + i))
        await drain_all(w)
        # (a): envelopes pending on A for offline alice, and in A's outbox while B is down
        for i in range(N):
            await bob.send(alice.address, text(w, "keep", 300 + i))
        await wait_flushed(w, b)
        b.stop()
        for i in range(N):
            await carol.send(dave.address, text(w, "keep", 400 + i))  # 1 envelope a send
            await alice.send(bob.address, text(w, "keep", 500 + i))  # 2: bob1 and bob2
        fa = examine(w, "a")
        assert fa["pending"] >= 3 * N, fa  # (the harness kept them pending)
        # (b): B back, everything delivered
        b.start()
        await bob.send(alice.address, text(w, "keep", 599))  # B contacts A: A's backoff resets
        await drain_all(w)
        examine(w, "b", await wait_remnants_dead(w))
        # (c): pending for offline alice across an epoch of A
        pending = [text(w, "keep", 600 + i) for i in range(N)]
        for t in pending:
            await bob.send(alice.address, t)
        await wait_flushed(w, b)
        fc = examine(w, "c", await wait_epoch_passed(w))
        assert fc["pending"] == N, fc
        # (d): delivered, and no key left once nothing is pending
        got = [m.text for m in await alice.receive(wait_s=1.0) if m.kind == "text"]
        assert sorted(got) == sorted(pending), "pending envelopes lost across the re-seal"
        await drain_all(w)
        examine(w, "d", await wait_epoch_passed(w))

    print(json.dumps(w.figures, sort_keys=True))
    out_json = os.environ.get("HAVEN_FORENSIC_PG_JSON")
    if out_json:
        with open(out_json, "w") as fh:
            json.dump(w.figures, fh, indent=1, sort_keys=True)
    print(f"workload+scan {time.monotonic() - t_start:.0f}s, {len(w.ledger.envs)} envelopes")
    failures = check(w.figures)
    assert not failures, "PostgreSQL raw-disk examination:\n" + "\n".join(failures)


PG_ZERO = (
    *NODE_ZERO,
    "ids_clear",
    "bodies_clear",
    "destroyed_keys_on_image",
    "mailbox_in_clear_columns",
)
AFTER_EPOCH_ZERO = ("remote_mailboxes_by_index", "opened_unattributed")


def check(figures: dict[str, dict[str, Any]]) -> list[str]:
    """Every failing figure: the harness's own checks first (a blind scan passes nothing)."""
    out = []
    for name, f in sorted(figures.items()):
        if not f["canary"]:
            out.append(f"{name}: the planted canary was not found (the scan is blind)")
        if f["pending_seen"] != f["pending"]:
            out.append(f"{name}: harness attributed {f['pending_seen']}/{f['pending']} pending")
        if name.endswith("(a)") and not (f["sends_multi"] and f["opened_with_live_keys"]):
            out.append(f"{name}: positive control failed (nothing carved opens)")
        if name.endswith("(a)") and not f["tuple_sends_multi"]:
            out.append(f"{name}: no tuple header attributed (the t_xmin figure is blind)")
        bad = [f"{k}={f[k]}" for k in PG_ZERO if f[k]]
        if name.endswith(("(c)", "(d)")):
            bad += [f"{k}={f[k]}" for k in AFTER_EPOCH_ZERO if f[k]]
        if name.endswith("(d)"):
            bad += [f"{k}={f[k]}" for k in ("keys_on_image", "opened_with_image_keys") if f[k]]
        if bad:
            out.append(f"{name}: " + ", ".join(bad))
    return out
