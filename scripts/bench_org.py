"""``scripts/bench --sections org``: ``per_message`` on an organisation node (issue 13).

The ``per_message`` 50to50 path (50 sender devices, 50 receivers, one envelope per frame, 256
frames in flight; :func:`bench_sections.per_message`) measured three times in one run, next to
each other: SQLite (one process), PostgreSQL with one worker, PostgreSQL with two workers
(``serve --workers 2``, SO_REUSEPORT: the kernel spreads the devices' connections over both).
CPU is reported per component over the same measured window, in microseconds per delivered
message and in cores: ``node`` (the supervisor and its workers together; the single process for
the others), ``postgres`` (every process of the PostgreSQL server: backends, WAL writer,
checkpointer, ...) and ``driver`` (this bench process: the devices). ``ratio_2w_1w`` divides the
two-worker throughput by the one-worker one.

PostgreSQL is ``--store-server`` if given (each node gets a fresh database), else a throw-away
server started here (tests/pgcluster.py; ``fsync=on``), removed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_node
from bench_node import NodeProc, Receiver, Sender, cpu_seconds, log, rss_mb
from bench_raw import close_all, connect_all, raw_devices
from bench_sections import BENCH_CONFIG, INFLIGHT, _strip_window, message_run


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(p) for p in f.read().split()]
    return out


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            total += cpu_seconds(pid)
    return total


@dataclass
class WorkersNode(NodeProc):
    """A bench node whose CPU and memory are its supervisor's plus its workers'."""

    workers: int = 1

    def pids(self) -> list[int]:
        return [self.pid, *_children(self.pid)]

    def cpu(self) -> float:
        return _cpu(self.pids())

    def rss_mb(self, field: str = "VmRSS") -> float:
        return round(sum(rss_mb(p, field) for p in self.pids()), 1)


class ServerCpu:
    """The PostgreSQL server as a pseudo node for :func:`message_run`'s CPU accounting."""

    def __init__(self, postmaster: int) -> None:
        self.pid = postmaster

    def cpu(self) -> float:
        return _cpu([self.pid, *_children(self.pid)])

    def rss_mb(self, field: str = "VmRSS") -> float:
        return 0.0


@contextlib.contextmanager
def pg_server(args: argparse.Namespace) -> Iterator[tuple[str, int | None]]:
    """(server DSN, postmaster pid if this machine runs it)."""
    if args.store_server:
        yield args.store_server, None
        return
    from tests import pgcluster

    cluster = pgcluster.start()
    try:
        with open(os.path.join(cluster.data, "postmaster.pid")) as f:
            postmaster = int(f.readline())
        yield cluster.dsn, postmaster
    finally:
        cluster.stop()


async def _variant(
    args: argparse.Namespace, base: Path, name: str, store: str, workers: int, server: ServerCpu
) -> dict[str, Any]:
    config = dict(BENCH_CONFIG)
    if store:
        config["store"] = bench_node.fresh_pg_database(store, name)
    plain = NodeProc.create(base, name, **config)
    node = WorkersNode(plain.home, plain.port, node_id=plain.node_id, workers=workers)
    devs = await raw_devices(node.home, node.host, "o", 100)
    if workers > 1:
        node.serve_args = ("--workers", str(workers))
    node.start()
    if workers > 1:  # the first worker listening is not all of them
        deadline = time.monotonic() + 60
        log_path = node.home.parent / f"{node.home.name}.log"
        while b"workers)" not in log_path.read_bytes():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: workers did not start")
            await asyncio.sleep(0.1)
    conns = []
    tasks = []
    try:
        conns = await connect_all(devs, node.url, first=True)
        s_conns, r_devs, r_conns = conns[:50], devs[50:], conns[50:]
        rcv = Receiver(r_conns[0])
        tasks = [asyncio.create_task(rcv.run(c)) for c in r_conns]
        mbs = [d.mailbox for d in r_devs]
        per = max(1, INFLIGHT // len(s_conns))
        snds = [Sender(c, node.node_id, mbs[i:] + mbs[:i], per) for i, c in enumerate(s_conns)]
        nodes: list[Any] = [node, server] if store else [node]
        out = await message_run(args, nodes, snds, rcv, f"org {name}")
        _strip_window(out)
        cpu = out.pop("node_cpu_us_per_msg")
        util = out.pop("node_cpu_util")
        cpu_l = cpu if isinstance(cpu, list) else [cpu]
        util_l = util if isinstance(util, list) else [util]
        out["node_cpu_us_per_msg"] = cpu_l[0]
        out["cpu_us_per_msg"] = {"node": cpu_l[0]} | ({"postgres": cpu_l[1]} if store else {})
        out["cpu_cores"] = {"node": util_l[0], "driver": out.pop("driver_cpu_util")}
        if store:
            out["cpu_cores"]["postgres"] = util_l[1]
        out["rss_mb"] = out["rss_mb"][0] if isinstance(out["rss_mb"], list) else out["rss_mb"]
        out.pop("rss_peak_mb", None)
        out["workers"] = workers
        out["store"] = "postgresql" if store else "sqlite"
        return out
    finally:
        for t in tasks:
            t.cancel()
        await close_all(conns)
        node.stop()


async def org(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """SQLite, PostgreSQL x 1 worker, PostgreSQL x 2 workers, in this order, one run."""
    with pg_server(args) as (dsn, postmaster):
        server = ServerCpu(postmaster or 0)
        if postmaster is None:
            log("org: --store-server given: PostgreSQL CPU is not measured (not our process)")
        out: dict[str, Any] = {"cores": os.cpu_count()}
        variants = (("sqlite", "", 1), ("pg_1w", dsn, 1), ("pg_2w", dsn, 2))
        for name, store, workers in variants:
            out[name] = await _variant(args, base, f"org-{name}", store, workers, server)
        one, two = out["pg_1w"]["msgs_per_s"], out["pg_2w"]["msgs_per_s"]
        out["ratio_2w_1w"] = round(two / one, 2) if one and two else None
        out["ratio_pg_1w_sqlite"] = (
            round(one / out["sqlite"]["msgs_per_s"], 2)
            if one and out["sqlite"]["msgs_per_s"]
            else None
        )
        return out
