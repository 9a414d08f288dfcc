"""The ``org`` section of ``scripts/bench`` (issue 13): an organisation node on PostgreSQL.

``per_message`` 50to50 (50 sender devices, 50 receivers, one envelope per ``send`` frame, 256
frames in flight; :func:`bench_sections.message_run`) three times in one run, on three fresh
nodes:

* ``sqlite``: the embedded default, one process;
* ``pg_1worker``: the store on PostgreSQL (``store = "postgresql://…"`` in node.toml), one
  node process;
* ``pg_2workers``: the same with ``haven node serve --workers 2`` (the devices' connections
  spread over both workers by ``SO_REUSEPORT``).

The PostgreSQL server is started for the section by ``tests/pgcluster.py`` (127.0.0.1 only, a
``mkdtemp`` directory, ``fsync=on``, ``synchronous_commit=on``) and removed afterwards; each
PostgreSQL run gets its own database.

CPU is reported per component, in µs per delivered envelope over the throughput window:
``workers`` (the node's process tree: supervisor and workers), ``postgresql`` (the postmaster
and every child: backends, checkpointer, WAL writer; children that exited during the window
count through the postmaster's ``cutime``/``cstime``) and ``driver`` (this process: the
devices). Each live process's CPU clock (``clock_getcpuclockid``; utime + stime from
``/proc/<pid>/stat`` if that fails), plus the reaped children's ``cutime`` + ``cstime``.
``ratios``: PG 1 worker / SQLite and PG 2 workers / PG 1 worker, for msgs/s and for CPU per
message.

Reading them: on PostgreSQL each commit and each delete is a round trip to the server (and the
server's own CPU). With 2 workers an envelope whose recipient is connected to the other worker
(about half of them: ``SO_REUSEPORT`` spreads the 100 connections) is also announced by
``NOTIFY`` and read back from the table by that worker (a second query, a second opening of the
sealed row), and the order chains shared by the workers take advisory locks; so CPU per message
grows with the second worker, and throughput grows only where there are idle cores for it. On a
2-core machine that PostgreSQL and the driver share (and, in CI, other jobs), there are none.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_node import CLK_TCK, NodeProc, Receiver, Sender, cpu_seconds, log
from bench_raw import close_all, connect_all, raw_devices
from bench_sections import BENCH_CONFIG, INFLIGHT, _strip_window, message_run

from client.connection import NodeConnection
from tests import pgcluster

SENDERS = RECEIVERS = 50


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, own CPU s, reaped children's CPU s) of one process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ppid = int(parts[1])
    own = (int(parts[11]) + int(parts[12])) / CLK_TCK
    reaped = (int(parts[13]) + int(parts[14])) / CLK_TCK
    return ppid, own, reaped


def tree(root: int) -> list[int]:
    """``root`` and every descendant alive now (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                children.setdefault(st[0], []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds of a process tree: each live process's own time, plus what the processes
    reaped from children that already exited (so a backend that came and went counts)."""
    total = 0.0
    for pid in tree(root):
        st = _stat(pid)
        if st is None:
            continue
        try:
            own = cpu_seconds(pid)  # the process's CPU clock: ns, not 10 ms ticks
        except OSError:
            own = st[1]
        total += own + st[2]
    return total


def tree_rss_mb(root: int, fld: str = "VmRSS") -> float:
    total = 0.0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(fld + ":"):
                        total += int(line.split()[1]) / 1024
        except OSError:
            continue
    return round(total, 1)


@dataclass
class OrgNode(NodeProc):
    """A bench node whose CPU and RSS are its whole process tree (supervisor and workers)."""

    serve_args: tuple[str, ...] = field(default=())

    def cpu(self) -> float:
        return tree_cpu(self.pid)

    def rss_mb(self, field: str = "VmRSS") -> float:
        super().rss_mb(field)  # raises, with the log's end, if the node has exited
        return tree_rss_mb(self.pid, field)


@dataclass
class Component:
    """Something whose CPU :func:`message_run` samples like a node's (``cpu``, ``rss_mb``,
    ``pid``): the PostgreSQL cluster, or this driver process."""

    pid: int
    label: str

    def cpu(self) -> float:
        if self.pid == os.getpid():
            return time.process_time()
        return tree_cpu(self.pid)

    def rss_mb(self, field: str = "VmRSS") -> float:
        return tree_rss_mb(self.pid, field)


def postmaster_pid(cluster: pgcluster.Cluster) -> int:
    with open(os.path.join(cluster.data, "postmaster.pid")) as f:
        return int(f.readline())


async def _run(
    args: argparse.Namespace,
    base: Path,
    label: str,
    cluster: pgcluster.Cluster | None,
    workers: int,
) -> dict[str, Any]:
    # store = "" keeps the SQLite run on SQLite even under --store-server
    store = pgcluster.fresh_database(cluster, "bench") if cluster is not None else ""
    node = OrgNode.create(base, f"org-{label}", store=store, **BENCH_CONFIG)
    assert isinstance(node, OrgNode)
    if workers > 1:
        node.serve_args = ("--workers", str(workers))
    devs = await raw_devices(node.home, node.host, "org", SENDERS + RECEIVERS)
    node.start()
    comps: list[Any] = [node]
    if cluster is not None:
        comps.append(Component(postmaster_pid(cluster), "postgresql"))
    comps.append(Component(os.getpid(), "driver"))
    conns: list[NodeConnection] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        conns = await connect_all(devs, node.url, first=True)
        s_conns, r_devs, r_conns = conns[:SENDERS], devs[SENDERS:], conns[SENDERS:]
        rcv = Receiver(r_conns[0])
        tasks += [asyncio.create_task(rcv.run(c)) for c in r_conns]
        mbs = [d.mailbox for d in r_devs]
        per = max(1, INFLIGHT // len(s_conns))
        snds = [Sender(c, node.node_id, mbs[i:] + mbs[:i], per) for i, c in enumerate(s_conns)]
        res = await message_run(args, comps, snds, rcv, f"org {label}")
        _strip_window(res)
    finally:
        for t in tasks:
            t.cancel()
        await close_all(conns)
        node.stop(timeout=60)
    names = ["workers"] + [c.label for c in comps[1:]]
    cpu = res["node_cpu_us_per_msg"]
    util = res["node_cpu_util"]
    res["cpu_us_per_msg"] = dict(zip(names, cpu, strict=True))
    res["cpu_util"] = dict(zip(names, util, strict=True))
    res["cpu_us_per_msg_total"] = round(sum(cpu), 1)
    res["node_cpu_us_per_msg"] = cpu[0]  # the node's own (the other sections' figure)
    res["node_cpu_util"] = util[0]
    res["rss_mb"], res["rss_peak_mb"] = res["rss_mb"][0], res["rss_peak_mb"][0]
    res["store"] = "postgresql" if cluster is not None else "sqlite"
    res["workers"] = workers
    return res


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


async def org(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """SQLite, PostgreSQL with 1 worker and with 2 workers, one after the other."""
    out: dict[str, Any] = {"senders": SENDERS, "receivers": RECEIVERS}
    out["sqlite"] = await _run(args, base, "sqlite", None, 1)
    log("org: starting PostgreSQL (tests/pgcluster.py)")
    cluster = pgcluster.start()
    try:
        out["pg_1worker"] = await _run(args, base, "pg1", cluster, 1)
        out["pg_2workers"] = await _run(args, base, "pg2", cluster, 2)
    finally:
        cluster.stop()
    sq, p1, p2 = out["sqlite"], out["pg_1worker"], out["pg_2workers"]
    out["ratios"] = {
        "msgs_per_s_pg1_over_sqlite": _ratio(p1["msgs_per_s"], sq["msgs_per_s"]),
        "msgs_per_s_pg2_over_pg1": _ratio(p2["msgs_per_s"], p1["msgs_per_s"]),
        "cpu_us_per_msg_total_pg1_over_sqlite": _ratio(
            p1["cpu_us_per_msg_total"], sq["cpu_us_per_msg_total"]
        ),
        "cpu_us_per_msg_total_pg2_over_pg1": _ratio(
            p2["cpu_us_per_msg_total"], p1["cpu_us_per_msg_total"]
        ),
    }
    out["cores"] = os.cpu_count()
    return out
