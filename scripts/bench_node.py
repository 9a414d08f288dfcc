"""Haven node benchmark: prints ONE JSON object to stdout (progress goes to stderr).

Sections (select with ``--sections``):

* ``node_only``: one real node subprocess, one sender and one receiver device registered with
  :meth:`client.device.Device.join`. The driver (this process, plain asyncio) sends
  pre-built 1 KiB envelopes in ``Send`` frames over one long-lived authenticated WebSocket and
  acks every ``Deliver`` on a second one. Throughput comes from an unpaced run of ``--n``
  envelopes (``--inflight`` frames of ``--batch`` envelopes outstanding); latency (send ->
  receipt at the receiving connection, same process clock) from a run paced at ``--rate``/s.
* ``one_node``: end to end through the Python API (``Device.send`` / ``Device.process``, Olm,
  sealed sender and both devices' local stores included), alice and bob on one node.
* ``two_nodes``: the same with alice on node A and bob on node B (federation in the path).
* ``device_drain``: a backlog of ``--drain-n`` envelopes received, decrypted and stored by a
  device on connect (``scripts/bench_device.py``).
* ``ui_latency``: send in one browser page of the app, render in the other (two daemons, two
  nodes, headless system chromium; ``--ui-n`` messages; ``scripts/bench_ui.py``).

* ``per_message``, ``offline_store``, ``federated``, ``connections``, ``growth``, ``drain``: the
  paths users feel (issue 12), in ``scripts/bench_sections.py`` (devices from
  ``scripts/bench_raw.py``). ``--quick`` runs every section at a tiny size (the smoke test).
* ``org``: ``per_message`` on SQLite, on PostgreSQL with 1 worker and with 2 workers, CPU per
  component (node workers, PostgreSQL, driver) (issue 13, ``scripts/bench_org.py``).
* ``group``: one sender to groups of ``--group-sizes`` members over 3 nodes, light members that
  still decrypt; setup, upload per message, envelopes, receipts, delivery time; and the same
  through a ``multi = false`` node (issue 10, ``scripts/bench_group.py``).

Every node runs as ``python -m client.cli node serve`` on 127.0.0.1 with a free port, in a
temporary directory removed at the end (``--keep`` keeps it). ``--profile DIR`` attaches
``py-spy record`` to the node process(es) during each throughput run and adds the top frames to
the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.connection import NodeConnection  # noqa: E402
from client.device import Device  # noqa: E402
from tests.ports import free_port  # noqa: E402
from federation import frames as F  # noqa: E402
from federation.errors import HavenError  # noqa: E402
from federation.wire import Envelope, packb  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
DAY_MS = 86_400_000


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- processes --------------------------------------------------------------------------------

_children: list[subprocess.Popen[bytes]] = []


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


# ``--node-tracebacks``: serve through this wrapper, which prints the traceback of an error that
# ends the node (the CLI's last-resort handler prints only "internal error"); bench-side only.
TRACEBACK_WRAPPER = """
import sys, traceback
import node.cli as n
run = n._run
def _run(args):
    try:
        return run(args)
    except BaseException:
        traceback.print_exc()
        raise
n._run = _run
import runpy
runpy.run_module("client.cli", run_name="__main__", alter_sys=True)  # exactly as with -m
"""
NODE_TRACEBACKS = False
# --store-server: every node the bench creates gets a fresh database on this PostgreSQL server
STORE_SERVER = ""


def child_env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT)}


def haven(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "client.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=child_env(),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"haven {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


_LIBC = ctypes.CDLL("libc.so.6", use_errno=True)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process, all threads (its CPU-time clock, ns; else utime + stime ticks)."""
    clock = ctypes.c_int()
    if _LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0:
        with contextlib.suppress(OSError):
            return time.clock_gettime(clock.value)
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / CLK_TCK


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    return 0.0


@dataclass
class NodeProc:
    home: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    node_id: str = ""
    serve_args: tuple[str, ...] = ()  # extra ``node serve`` arguments (``org``: --workers)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def create(cls, base: Path, name: str, **config: Any) -> NodeProc:
        """``haven node init``; ``config`` overrides node.toml keys (docs/operations.md §3)."""
        port = free_port()
        home = base / name
        out = haven(
            "node",
            "init",
            "--home",
            str(home),
            "--public-url",
            f"http://127.0.0.1:{port}",
            "--listen",
            f"127.0.0.1:{port}",
            "--no-lan",
            "--json",
        )
        if STORE_SERVER and "store" not in config:
            config = {**config, "store": fresh_pg_database(STORE_SERVER, name)}
        if config:
            from dataclasses import replace

            from node.config import NodeConfig

            replace(NodeConfig.load(str(home)), **config).save(str(home))
        return cls(home, port, node_id=json.loads(out)["node_id"])

    def invite(self, name: str) -> str:
        out = haven("node", "invite", "--home", str(self.home), name, "--json")
        return str(json.loads(out.strip().splitlines()[-1])["invite"])

    def start(self, clock_offset_ms: int = 0) -> NodeProc:
        """Serve; ``clock_offset_ms`` shifts the node's clock (the test-only switch)."""
        logf = open(self.home.parent / f"{self.home.name}.log", "ab")
        entry = ["-c", TRACEBACK_WRAPPER] if NODE_TRACEBACKS else ["-m", "client.cli"]
        cmd = [sys.executable, *entry, "node", "serve", "--home", str(self.home), *self.serve_args]
        env = child_env()
        if clock_offset_ms:
            sign = "-" if clock_offset_ms < 0 else "+"
            cmd.append(f"--clock-offset={sign}{abs(clock_offset_ms)}ms")
            env["HAVEN_TEST_CLOCK"] = "1"
        self.proc = subprocess.Popen(
            cmd,
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
            preexec_fn=_die_with_parent,
        )
        _children.append(self.proc)
        logf.close()
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.home.name} exited early (see its log)")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"node {self.home.name} did not listen in time")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mb(self, field: str = "VmRSS") -> float:
        """Resident set (``VmHWM``: its peak) of the node process, MB.

        Raises:
            RuntimeError: the node has exited (with the end of its log, which never holds
                message contents or addresses).
        """
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = ""
            with contextlib.suppress(OSError):
                tail = (self.home.parent / f"{self.home.name}.log").read_text()[-1500:]
            raise RuntimeError(f"node {self.home.name} exited ({self.proc.returncode}): {tail}")
        return rss_mb(self.pid, field)

    def stats(self) -> dict[str, Any]:
        import urllib.request

        import msgpack

        with urllib.request.urlopen(self.url + "/haven/v1/stats", timeout=10) as r:
            return msgpack.unpackb(r.read())  # type: ignore[no-any-return]

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM (a clean stop re-seals what is pending), SIGKILL after ``timeout`` s."""
        p = self.proc
        if p is None:
            return
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        self.proc = None


def stop_children() -> None:
    for p in _children:
        if p.poll() is None:
            with contextlib.suppress(Exception):
                p.kill()
                p.wait(timeout=10)


# ---- profiling --------------------------------------------------------------------------------


class Profiler:
    """``py-spy record --format raw`` attached to one pid; stopped with SIGINT."""

    flags: ClassVar[list[str]] = []

    def __init__(self, out_dir: Path | None, name: str, pid: int) -> None:
        self.path = out_dir / f"{name}.txt" if out_dir else None
        self.proc: subprocess.Popen[bytes] | None = None
        if self.path is None:
            return
        spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which(
            "py-spy"
        )
        if spy is None:
            log("py-spy not found; profiling skipped (.venv/bin/pip install py-spy)")
            self.path = None
            return
        self.proc = subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "200",
             "--nonblocking", "--threads", *self.flags, "-o", str(self.path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        _children.append(self.proc)
        time.sleep(0.5)  # let it attach

    def stop(self) -> dict[str, Any] | None:
        if self.proc is None or self.path is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if not self.path.exists():
            return None
        return summarize_profile(self.path)


# Where node time goes, by the deepest frame on the stack that matches (first match wins).
CATEGORIES: list[tuple[str, str]] = [
    ("sqlite worker thread", "_connection_worker_thread"),
    ("at-rest sealing (EpochKeys.seal)", "EpochKeys.seal"),
    ("store.write rows", "SqliteStore.write"),
    ("aiosqlite calls (loop side)", "aiosqlite/core.py"),
    ("committer bookkeeping", "Mailboxes._commit_once"),
    ("frame decode (unpackb, Envelope.from_wire)", "decode_frame"),
    ("push + Deliver encode", "ClientSession.push"),
    ("submit_local (futures, dicts)", "Mailboxes.submit_local"),
    ("acks (on_ack, Mailboxes.acked)", "ClientSession.on_ack"),
    ("on_send rest (gather, Accepted)", "ClientSession.on_send"),
    ("key queries", "ClientSession.on_query"),
    ("ws writer (send_bytes)", "ClientSession.writer"),
    ("federation inbound (batch handler)", "federation_api"),
    ("federation outbound (outbox)", "node/outbox.py"),
    ("aiohttp websocket reader", "aiohttp/_websocket"),
    ("aiohttp http protocol", "aiohttp/"),
    ("client connection other", "ClientSession."),
    ("socket write", "_SelectorSocketTransport.write"),
    ("socket read", "_read_ready"),
    ("epoll wait", "EpollSelector.select"),
    ("event loop (callbacks, futures)", "asyncio/"),
]
_BORING = ("asyncio/", "threading.py", "<frozen", "client/cli.py", "node/cli.py", "selectors.py")


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self time by leaf frame, inclusive time of project/library frames, and categories."""
    leaf: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        total += count
        threads[frames[0].split(": ", 1)[-1]] += count
        short = [_short(f) for f in frames[1:]]
        if short:
            leaf[short[-1]] += count
        for fr in set(short):
            if not any(b in fr for b in _BORING):
                incl[fr] += count
        label = "other"
        for fr in reversed(frames):
            hit = next((lab for lab, sub in CATEGORIES if sub in fr), None)
            if hit is not None:
                label = hit
                break
        if "_connection_worker_thread" in stack:
            label = CATEGORIES[0][0]
        cats[label] += count

    def pct(c: int) -> float:
        return round(100.0 * c / total, 1) if total else 0.0

    return {
        "file": str(path),
        "samples": total,
        "threads_pct": {k: pct(v) for k, v in threads.most_common(6)},
        "categories_pct": {k: pct(v) for k, v in cats.most_common()},
        "self_pct": {k: pct(v) for k, v in leaf.most_common(top)},
        "inclusive_pct": {k: pct(v) for k, v in incl.most_common(top)},
    }


def _short(frame: str) -> str:
    # py-spy raw frames look like "func (path/to/file.py:123)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    file, _, line = where.rpartition(":")
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    return f"{name} ({file}:{line})" if file else name


# ---- helpers ----------------------------------------------------------------------------------


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(p / 100.0 * (len(s) - 1))))
    return round(s[k], 3)


def lat_summary(ms: list[float]) -> dict[str, Any]:
    return {
        "p50_ms": pct(ms, 50),
        "p90_ms": pct(ms, 90),
        "p99_ms": pct(ms, 99),
        "max_ms": round(max(ms), 3) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 3) if ms else None,
        "latency_samples": len(ms),
    }


def send_frame_bytes(rid: int, dest: str, envs: list[Envelope]) -> bytes:
    return packb({"t": "send", "rid": rid, "items": [[dest, e.to_wire()] for e in envs]})


async def join(node: NodeProc, base: Path, name: str) -> Device:
    dev = Device(str(base / f"dev-{name}-{node.home.name}"))
    await dev.join(node.invite(name))
    return dev


# ---- node_only --------------------------------------------------------------------------------


@dataclass
class Receiver:
    """Acks every delivered envelope; counts each sent id once (redeliveries are counted
    apart); records receipt times of tracked ids."""

    conn: NodeConnection
    received: int = 0
    pending: set[bytes] = field(default_factory=set)
    duplicates: int = 0
    sent_at: dict[bytes, float] = field(default_factory=dict)
    lat_ms: list[float] = field(default_factory=list)
    target: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    last_rx: float = 0.0

    async def run(self, conn: NodeConnection | None = None) -> None:
        """Ack what ``conn`` (default :attr:`conn`) receives; several may share one Receiver."""
        conn = conn or self.conn
        q = conn.deliveries
        while True:
            envs = await q.get()
            now = time.perf_counter()
            ids = [e.id for e in envs]
            await conn.ack(ids)
            pending = self.pending
            for i in ids:
                if i in pending:
                    pending.discard(i)
                    self.received += 1
                    self.last_rx = now
                else:
                    self.duplicates += 1
                t = self.sent_at.pop(i, None)
                if t is not None:
                    self.lat_ms.append((now - t) * 1000.0)
            if self.target and self.received >= self.target:
                self.done.set()


class Sender:
    def __init__(
        self, conn: NodeConnection, dest: str, mailbox: bytes | list[bytes], inflight: int
    ) -> None:
        self.conn = conn
        self.dest = dest
        self.mailboxes = [mailbox] if isinstance(mailbox, bytes) else mailbox
        self._next = 0
        self.inflight = inflight
        self.sem = asyncio.Semaphore(inflight)
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.outstanding = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._bodies = [os.urandom(1024) for _ in range(64)]  # bodies need not be unique

    def envelopes(self, k: int, expires: int) -> list[Envelope]:
        """``k`` envelopes with 1 KiB bodies, to this sender's mailboxes in turn."""
        mbs, bodies, i = self.mailboxes, self._bodies, self._next
        self._next += k
        return [
            Envelope(os.urandom(16), mbs[(i + j) % len(mbs)], expires, bodies[(i + j) % 64])
            for j in range(k)
        ]

    def _answered(self, n: int, fut: asyncio.Future[F.Frame]) -> None:
        self.sem.release()
        self.outstanding -= 1
        if not self.outstanding:
            self.idle.set()
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            self.rejected[getattr(exc, "code", "error")] += n
            return
        ans = fut.result()
        if isinstance(ans, F.Accepted):
            self.accepted += len(ans.ids)
            for _, code in ans.rejected:
                self.rejected[code] += 1
        else:
            self.rejected[getattr(ans, "code", ans.T)] += n

    async def submit(self, envs: list[Envelope]) -> None:
        """Send one frame once the window allows; the answer is counted by a callback (the
        connection's reader resolves it by rid, as :meth:`NodeConnection.request` does, but
        without a task and a timeout per frame: the driver must stay cheaper than the node)."""
        await self.sem.acquire()
        conn = self.conn
        rid = conn.next_rid()
        fut: asyncio.Future[F.Frame] = asyncio.get_running_loop().create_future()
        conn._waiters[rid] = fut  # the reader fails these if the link drops
        self.outstanding += 1
        self.idle.clear()
        fut.add_done_callback(functools.partial(self._answered, len(envs)))
        try:
            await conn.send_raw(send_frame_bytes(rid, self.dest, envs))
        except HavenError as exc:
            conn._waiters.pop(rid, None)
            if not fut.done():
                fut.set_exception(exc)

    async def drain(self, wait_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), wait_s)


async def wait_delivered(rcv: Receiver, hard_deadline: float, stall_s: float = 5.0) -> None:
    """Until all are delivered, the deadline passes, or nothing new arrives for ``stall_s``."""
    t = time.perf_counter()
    while not rcv.done.is_set():
        now = time.perf_counter()
        if now > hard_deadline or now - max(rcv.last_rx, t) > stall_s:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(rcv.done.wait(), 0.25)


async def unpaced(
    snds: list[Sender],
    rcv: Receiver,
    n: int,
    batch: int,
    max_s: float,
    track_every: int = 10,
    max_undelivered: int = 0,
) -> dict[str, Any]:
    """Send ``n`` envelopes as fast as the windows allow (frames round-robin over the sender
    connections); wait until all are delivered. ``max_undelivered`` > 0 also bounds the
    envelopes sent and not yet delivered (across nodes: below the sender's outbox quota)."""
    expires = int(time.time() * 1000) + DAY_MS
    rcv.received, rcv.lat_ms, rcv.sent_at, rcv.pending, rcv.duplicates = 0, [], {}, set(), 0
    rcv.target, rcv.done = n, asyncio.Event()
    acc0 = sum(s.accepted for s in snds)
    rej0 = sum((s.rejected for s in snds), Counter())
    t0 = time.perf_counter()
    deadline = t0 + max_s
    sent = 0
    while sent < n and time.perf_counter() < deadline:
        k = min(batch, n - sent)
        limit = max_undelivered or n + 1
        while len(rcv.pending) >= limit and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.001)  # polls the receiver's set: cheap, and no new event
        snd = snds[(sent // batch) % len(snds)]
        envs = snd.envelopes(k, expires)
        rcv.pending.update(e.id for e in envs)
        now = time.perf_counter()
        for e in envs[::track_every]:
            rcv.sent_at[e.id] = now
        await snd.submit(envs)
        sent += k
    t_sent = time.perf_counter()
    await wait_delivered(rcv, deadline + 10)
    for snd in snds:
        await snd.drain(15)
    t_end = max(rcv.last_rx, t_sent)
    wall = t_end - t0
    return {
        "n": n,
        "sent": sent,
        "delivered": rcv.received,
        "undelivered": len(rcv.pending),
        "redelivered": rcv.duplicates,
        "accepted": sum(s.accepted for s in snds) - acc0,
        "rejected": dict(sum((s.rejected for s in snds), Counter()) - rej0),
        "wall_s": round(wall, 3),
        "msgs_per_s": round(rcv.received / wall, 1) if wall > 0 else None,
        "complete": rcv.received >= n,
        "unpaced_latency": lat_summary(rcv.lat_ms),
    }


async def paced(snd: Sender, rcv: Receiver, rate: float, seconds: float) -> dict[str, Any]:
    """Offer ``rate`` envelopes/s for ``seconds``; every envelope timestamped."""
    expires = int(time.time() * 1000) + DAY_MS
    total = int(rate * seconds)
    rcv.received, rcv.lat_ms, rcv.sent_at, rcv.pending, rcv.duplicates = 0, [], {}, set(), 0
    rcv.target, rcv.done = total, asyncio.Event()
    frames = 0
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - t0) * rate) + 1) - sent
        if due <= 0:
            await asyncio.sleep(t0 + (sent + 0.0) / rate - now)
            continue
        envs = snd.envelopes(due, expires)
        rcv.pending.update(e.id for e in envs)
        now = time.perf_counter()
        for e in envs:
            rcv.sent_at[e.id] = now
        await snd.submit(envs)
        frames += 1
        sent += due
    t_sent = time.perf_counter()
    await wait_delivered(rcv, t_sent + 15)
    await snd.drain(15)
    return {
        "offered_rate": rate,
        "achieved_rate": round(sent / (t_sent - t0), 1),
        "sent": sent,
        "delivered": rcv.received,
        "undelivered": len(rcv.pending),
        "redelivered": rcv.duplicates,
        "frames": frames,
        "envelopes_per_frame": round(sent / frames, 2) if frames else None,
        **lat_summary(rcv.lat_ms),
    }


async def bench_node_only(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    node = NodeProc.create(base, "node-only")
    names = [f"sender{i}" for i in range(args.senders)]
    invites = [node.invite(nm) for nm in names]
    inv_r = node.invite("receiver")
    node.start()
    try:
        senders = [Device(str(base / f"dev-{nm}")) for nm in names]
        receiver = Device(str(base / "dev-receiver"))
        for dev, inv in zip(senders, invites, strict=True):
            await dev.join(inv)
        await receiver.join(inv_r)
        sconns = [await dev.connect() for dev in senders]
        rconn = await receiver.connect()
        rcv = Receiver(rconn)
        rtask = asyncio.create_task(rcv.run())
        snds = [Sender(c, node.node_id, receiver.mailbox, args.inflight) for c in sconns]
        try:
            log(f"node_only: warm-up {args.warmup} envelopes")
            await unpaced(snds, rcv, args.warmup, args.batch, 30)
            log(
                f"node_only: unpaced run, n={args.n}, batch={args.batch}, "
                f"inflight={args.inflight}, senders={args.senders}"
            )
            prof = Profiler(args.profile, "node_only", node.pid)
            c0, p0, w0 = node.cpu(), time.process_time(), time.perf_counter()
            runs = []
            for _ in range(args.repeats):
                runs.append(await unpaced(snds, rcv, args.n, args.batch, args.max_seconds))
                log(f"node_only: {runs[-1]['msgs_per_s']} msgs/s")
            c1, p1, w1 = node.cpu(), time.process_time(), time.perf_counter()
            profile = prof.stop()
            thr = sorted(runs, key=lambda r: r["msgs_per_s"] or 0)[len(runs) // 2]
            await asyncio.sleep(1.5)  # let the node commit the last deletions
            log(f"node_only: paced run at {args.rate}/s for {args.paced_seconds}s")
            lat = await paced(snds[0], rcv, args.rate, args.paced_seconds)
            await asyncio.sleep(1.5)
            counts = node.stats().get("counts", {})
            rss, hwm = node.rss_mb(), node.rss_mb("VmHWM")
        finally:
            rtask.cancel()
            for c in [*sconns, rconn]:
                await c.__aexit__(None, None, None)
            for dev in [*senders, receiver]:
                dev.close()
        delivered = max(sum(r["delivered"] for r in runs), 1)
        out: dict[str, Any] = {
            "msgs_per_s": thr["msgs_per_s"],
            "p50_ms": lat["p50_ms"],
            "p99_ms": lat["p99_ms"],
            "latency_note": f"paced at {args.rate}/s; send -> receipt on the receiving socket",
            "n": thr["n"],
            "repeats": args.repeats,
            "batch": args.batch,
            "inflight_frames": args.inflight,
            "sender_connections": args.senders,
            "body_bytes": 1024,
            "msgs_per_s_runs": [r["msgs_per_s"] for r in runs],
            "throughput_run": thr,
            "node_cpu_s": round(c1 - c0, 2),
            "node_cpu_util": round((c1 - c0) / (w1 - w0), 3),
            "node_cpu_us_per_msg": round((c1 - c0) / delivered * 1e6, 1),
            "rss_mb": rss,
            "rss_peak_mb": hwm,
            "driver_cpu_util": round((p1 - p0) / (w1 - w0), 3),
            "paced": lat,
            "node_counts_after": counts,
        }
        if profile:
            out["profile"] = profile
        return out
    finally:
        node.stop()


# ---- end to end through the device API -------------------------------------------------------


@dataclass
class E2EReceiver:
    dev: Device
    conn: NodeConnection
    received: int = 0
    lat_ms: list[float] = field(default_factory=list)
    target: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    last_rx: float = 0.0
    errors: int = 0

    async def run(self) -> None:
        while True:
            envs = await self.conn.deliveries.get()
            try:
                msgs = await self.dev.process(self.conn, envs)
            except HavenError:
                self.errors += 1
                continue
            now = time.perf_counter()
            for m in msgs:
                with contextlib.suppress(ValueError):
                    self.lat_ms.append((now - float(m.text.split(":", 1)[1])) * 1000.0)
            self.received += len(msgs)
            self.last_rx = now
            if self.target and self.received >= self.target:
                self.done.set()

    def reset(self, target: int) -> None:
        self.received, self.lat_ms, self.target, self.done = 0, [], target, asyncio.Event()


async def e2e_unpaced(
    alice: Device, conn: NodeConnection, to: str, rcv: E2EReceiver, n: int, conc: int, max_s: float
) -> dict[str, Any]:
    rcv.reset(n)
    errors: Counter[str] = Counter()
    seq = iter(range(n))
    t0 = time.perf_counter()
    deadline = t0 + max_s
    sent = 0

    async def worker() -> None:
        nonlocal sent
        for i in seq:
            if time.perf_counter() > deadline:
                return
            try:
                await alice.send(to, f"{i}:{time.perf_counter()!r}", conn=conn)
                sent += 1
            except HavenError as exc:
                errors[exc.code] += 1

    await asyncio.gather(*(worker() for _ in range(conc)))
    t_sent = time.perf_counter()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(30):
            while rcv.received < sent:
                rcv.target = sent
                await asyncio.wait_for(rcv.done.wait(), 30)
    wall = max(rcv.last_rx, t_sent) - t0
    return {
        "n": n,
        "sent": sent,
        "received": rcv.received,
        "send_errors": dict(errors),
        "concurrency": conc,
        "wall_s": round(wall, 3),
        "msgs_per_s": round(rcv.received / wall, 1) if wall > 0 else None,
        "send_only_msgs_per_s": round(sent / (t_sent - t0), 1),
        "unpaced_latency": lat_summary(rcv.lat_ms),
    }


async def e2e_paced(
    alice: Device,
    conn: NodeConnection,
    to: str,
    rcv: E2EReceiver,
    rate: float,
    seconds: float,
    max_conc: int,
) -> dict[str, Any]:
    """Open loop at ``rate``: one Device.send call started per tick, at most ``max_conc`` open."""
    total = int(rate * seconds)
    rcv.reset(total)
    sem = asyncio.Semaphore(max_conc)
    errors: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()
    late: list[float] = []

    async def one(i: int) -> None:
        try:
            await alice.send(to, f"{i}:{time.perf_counter()!r}", conn=conn)
        except HavenError as exc:
            errors[exc.code] += 1
        finally:
            sem.release()

    t0 = time.perf_counter()
    stop_at = t0 + seconds * 1.2  # a slower API is measured for the same time, not the same count
    started = 0
    for i in range(total):
        due = t0 + i / rate
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        await sem.acquire()
        if time.perf_counter() > stop_at:
            sem.release()
            break
        late.append(time.perf_counter() - due)
        started += 1
        t = asyncio.create_task(one(i))
        tasks.add(t)
        t.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(list(tasks), timeout=60)
    t_sent = time.perf_counter()
    rcv.target = started - sum(errors.values())
    if rcv.received >= rcv.target:
        rcv.done.set()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(20):
            await rcv.done.wait()
    ok = started - sum(errors.values())
    achieved = ok / (t_sent - t0)  # successful Device.send calls per second
    return {
        "offered_rate": rate,
        "achieved_rate": round(achieved, 1),
        "sustained": achieved >= 0.95 * rate and rcv.received >= 0.99 * total,
        "attempted": started,
        "sent": ok,
        "received": rcv.received,
        "send_errors": dict(errors),
        "max_concurrent_sends": max_conc,
        "start_lag_p99_ms": pct([x * 1000 for x in late], 99),
        **lat_summary(rcv.lat_ms),
    }


async def bench_e2e(args: argparse.Namespace, base: Path, federated: bool) -> dict[str, Any]:
    name = "two_nodes" if federated else "one_node"
    na = NodeProc.create(base, f"{name}-a")
    nb = NodeProc.create(base, f"{name}-b") if federated else na
    inv_a, inv_b = na.invite("alice"), nb.invite("bob")
    nodes = [na, nb] if federated else [na]
    for nd in nodes:
        nd.start()
    try:
        alice = Device(str(base / f"dev-alice-{name}"))
        bob = Device(str(base / f"dev-bob-{name}"))
        await alice.join(inv_a)
        await bob.join(inv_b)
        aconn, bconn = await alice.connect(), await bob.connect()
        rcv = E2EReceiver(bob, bconn)
        rtask = asyncio.create_task(rcv.run())
        to = bob.address
        try:
            log(f"{name}: warm-up (session setup)")
            rcv.reset(1)
            await alice.send(to, f"-1:{time.perf_counter()!r}", conn=aconn)
            async with asyncio.timeout(30):
                await rcv.done.wait()
            await e2e_unpaced(alice, aconn, to, rcv, args.e2e_warmup, args.e2e_concurrency, 30)
            log(f"{name}: unpaced run n={args.e2e_n} concurrency={args.e2e_concurrency}")
            profs = [
                Profiler(args.profile, f"{name}_node{i}", nd.pid) for i, nd in enumerate(nodes)
            ]
            dprof = Profiler(args.profile, f"{name}_driver", os.getpid())
            c0 = [nd.cpu() for nd in nodes]
            p0, w0 = time.process_time(), time.perf_counter()
            thr = await e2e_unpaced(
                alice, aconn, to, rcv, args.e2e_n, args.e2e_concurrency, args.e2e_max_seconds
            )
            c1 = [nd.cpu() for nd in nodes]
            p1, w1 = time.process_time(), time.perf_counter()
            rss = [nd.rss_mb() for nd in nodes]
            profiles = [p.stop() for p in profs]
            dprofile = dprof.stop()
            log(f"{name}: paced run at {args.rate}/s for {args.e2e_paced_seconds}s")
            lat = await e2e_paced(
                alice, aconn, to, rcv, args.rate, args.e2e_paced_seconds, args.e2e_max_conc
            )
            low = None
            if not lat["sustained"] and lat["achieved_rate"] >= 2:
                # Latency at 1,000/s offered is queueing; add it at half the achieved rate.
                r2 = max(1.0, round(lat["achieved_rate"] / 2))
                log(f"{name}: paced run at {r2}/s (half of the achieved rate)")
                low = await e2e_paced(alice, aconn, to, rcv, r2, 3.0, args.e2e_max_conc)
        finally:
            rtask.cancel()
            await aconn.__aexit__(None, None, None)
            await bconn.__aexit__(None, None, None)
            alice.close()
            bob.close()
        wall = w1 - w0
        got = max(thr["received"], 1)
        out: dict[str, Any] = {
            "msgs_per_s": thr["msgs_per_s"],
            "p50_ms": lat["p50_ms"],
            "p99_ms": lat["p99_ms"],
            "offered_rate": lat["offered_rate"],
            "achieved_rate": lat["achieved_rate"],
            "latency_note": (
                f"open loop at {args.rate}/s offered (Device.send call -> Device.process "
                "return at bob); if achieved_rate < offered_rate the API could not sustain it"
            ),
            "send_errors": dict(Counter(thr["send_errors"]) + Counter(lat["send_errors"])),
            "throughput_run": thr,
            "node_cpu_util": [round((b - a) / wall, 3) for a, b in zip(c0, c1, strict=True)],
            "node_cpu_us_per_msg": [
                round((b - a) / got * 1e6, 1) for a, b in zip(c0, c1, strict=True)
            ],
            "rss_mb": rss,
            "driver_cpu_util": round((p1 - p0) / wall, 3),
            "driver_cpu_us_per_msg": round((p1 - p0) / got * 1e6, 1),
            "paced": lat,
        }
        if low is not None:
            out["paced_half_achieved"] = low
        if any(profiles):
            out["profile_nodes"] = profiles
        if dprofile:
            out["profile_driver"] = dprofile
        return out
    finally:
        for nd in nodes:
            nd.stop()


# ---- main -------------------------------------------------------------------------------------


def pressure() -> dict[str, float]:
    """CPU and I/O pressure (PSI ``some avg10``, %): other load on the machine skews results."""
    out = {}
    for kind in ("cpu", "io"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/pressure/{kind}") as f:
                out[kind] = float(f.readline().split()[1].split("=")[1])
    return out


def env_info(args: argparse.Namespace) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for pkg in ("aiohttp", "PyNaCl", "aiosqlite", "msgpack", "vodozemac"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[pkg] = md.version(pkg)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    dirty = bool(
        subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout.strip()
    )
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nproc": os.cpu_count(),
        "loadavg_start": list(os.getloadavg()),
        "pressure_avg10_pct_start": pressure(),
        "versions": versions,
        "git_commit": commit,
        "git_dirty": dirty,
        "event_loop": f"driver: {args.driver_loop}; nodes: their own default",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


async def amain(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for section in args.sections:
        t = time.perf_counter()
        try:
            if section == "node_only":
                result[section] = await bench_node_only(args, base)
            elif section == "one_node":
                result[section] = await bench_e2e(args, base, federated=False)
            elif section == "two_nodes":
                result[section] = await bench_e2e(args, base, federated=True)
            elif section == "device_drain":
                from bench_device import device_drain

                drain_base = base / "drain"
                drain_base.mkdir()
                result[section] = await device_drain(args.drain_n, drain_base, 120.0)
            elif section == "ui_latency":
                from bench_ui import run_section

                result[section] = await run_section(args.ui_n)
            elif section == "group":
                from bench_group import group

                result[section] = await group(args, base)
            elif section == "relay":
                from bench_relay import relay

                result[section] = await relay(args, base)
            else:
                from bench_sections import SECTIONS

                result[section] = await SECTIONS[section](args, base)
        except Exception as exc:  # noqa: BLE001 - report the failure in the JSON, go on
            log(f"{section} failed: {type(exc).__name__}: {exc}")
            partial: dict[str, Any] = {}
            if section not in OLD_SECTIONS:
                from bench_sections import _BENCH_PARTIAL

                partial = _BENCH_PARTIAL.pop(section, {})
            result[section] = partial | {
                "error": f"{type(exc).__name__}: {exc}",
                "msgs_per_s": None,
                "p50_ms": None,
                "p99_ms": None,
            }
        result[section]["section_wall_s"] = round(time.perf_counter() - t, 1)
        keys = ("msgs_per_s", "node_cpu_us_per_msg", "p50_ms", "p99_ms", "rss_mb")
        parts = {section: result[section]}
        parts |= {
            f"{section}.{k}": v
            for k, v in result[section].items()
            if isinstance(v, dict) and "node_cpu_us_per_msg" in v
        }
        for label, fig in parts.items():
            if "msgs_per_s" in fig and "p99_ms" in fig:
                log(f"{label}: {json.dumps({k: fig.get(k) for k in keys})}")
    return result


OLD_SECTIONS = ("node_only", "one_node", "two_nodes", "device_drain", "ui_latency")
NEW_SECTIONS = ("per_message", "offline_store", "federated", "connections", "growth", "drain")
ORG_SECTIONS = ("org",)  # issue 13: scripts/bench_org.py
FILE_SECTIONS = ("files",)  # attachments (issue 11; bench_sections.files)
GROUP_SECTIONS = ("group",)  # issue 10: scripts/bench_group.py
RELAY_SECTIONS = ("relay",)  # issue 14: scripts/bench_relay.py (direct vs through a relay)
ALL_SECTIONS = (
    *OLD_SECTIONS[:3],
    *NEW_SECTIONS,
    *ORG_SECTIONS,
    *FILE_SECTIONS,
    *GROUP_SECTIONS,
    *RELAY_SECTIONS,
    *OLD_SECTIONS[3:],
)
DEFAULT_SECTIONS = "node_only,one_node,two_nodes"
# --quick: every section in seconds (tests/test_bench_smoke.py); explicit flags still win
QUICK = {
    "n": 300, "repeats": 1, "warmup": 50, "paced_seconds": 0.5, "rate": 400.0,
    "e2e_n": 10, "e2e_warmup": 2, "e2e_paced_seconds": 0.5, "e2e_max_seconds": 5.0,
    "drain_n": 30, "ui_n": 3, "pm_n": 300, "pm_repeats": 1, "pm_warmup": 20,
    "backlog_n": 400, "growth_small": 40, "rotation_wait_s": 0.0, "conn_n": 40,
    "conn_rate": 200.0, "max_seconds": 20.0, "files_mb": 3.0, "group_sizes": "10,100",
    "group_msgs": 2,
}  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--sections",
        default=DEFAULT_SECTIONS,
        help=f"comma-separated subset of {','.join(ALL_SECTIONS)}, or 'all'",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes for every section (the smoke test); explicit flags still apply",
    )
    p.add_argument(
        "--pm-n",
        type=int,
        default=100_000,
        help="per_message/federated/growth: "
        "envelopes per unpaced run; offline_store: envelopes accepted",
    )
    p.add_argument("--pm-repeats", type=int, default=3, help="unpaced runs; msgs_per_s = median")
    p.add_argument("--pm-warmup", type=int, default=2000)
    p.add_argument(
        "--backlog-n",
        type=int,
        default=1_000_000,
        help="drain: envelopes waiting; growth: the big backlog",
    )
    p.add_argument("--backlog-mailboxes", type=int, default=100, help=">= 100")
    p.add_argument("--growth-small", type=int, default=1000, help="growth: the small backlog")
    p.add_argument(
        "--rotation-wait-s",
        type=float,
        default=90.0,
        help="growth: keep measuring up to this long until the epoch rotation is done",
    )
    p.add_argument("--conn-n", type=int, default=10_000, help="connections: idle connections")
    p.add_argument(
        "--conn-rate", type=float, default=1000.0, help="connections: the live pair's paced rate"
    )
    p.add_argument("--ui-n", type=int, default=200, help="ui_latency messages (bench_ui.py)")
    p.add_argument("--drain-n", type=int, default=5000, help="device_drain backlog")
    p.add_argument("--n", type=int, default=100_000, help="node_only envelopes (unpaced run)")
    p.add_argument(
        "--repeats", type=int, default=3, help="node_only unpaced runs; msgs_per_s is their median"
    )
    p.add_argument("--warmup", type=int, default=3000, help="node_only warm-up envelopes")
    p.add_argument("--batch", type=int, default=100, help="envelopes per Send frame (<=256)")
    p.add_argument("--inflight", type=int, default=8, help="Send frames outstanding")
    p.add_argument(
        "--senders", type=int, default=1, help="node_only sender devices, one connection each"
    )
    p.add_argument("--rate", type=float, default=2000.0, help="offered rate of the paced runs")
    p.add_argument("--paced-seconds", type=float, default=5.0)
    p.add_argument(
        "--max-seconds",
        type=float,
        default=45.0,
        help="cap on each unpaced run; a slower system reports what it delivered",
    )
    p.add_argument("--e2e-n", type=int, default=2000, help="messages in the e2e unpaced runs")
    p.add_argument(
        "--e2e-max-seconds", type=float, default=15.0, help="cap on each e2e unpaced run"
    )
    p.add_argument("--e2e-warmup", type=int, default=100)
    p.add_argument(
        "--e2e-concurrency",
        type=int,
        default=1,
        help="concurrent Device.send calls in the e2e unpaced runs",
    )
    p.add_argument("--e2e-paced-seconds", type=float, default=5.0)
    p.add_argument(
        "--e2e-max-conc",
        type=int,
        default=64,
        help="cap on open Device.send calls in the e2e paced runs",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="attach py-spy to the nodes during throughput runs; raw stacks in DIR",
    )
    p.add_argument(
        "--profile-flags", default="", help="extra py-spy record flags, e.g. '--gil' or '--idle'"
    )
    p.add_argument(
        "--driver-loop",
        choices=("uvloop", "asyncio"),
        default="uvloop",
        help="this process's event loop (the nodes are unaffected); uvloop keeps the driver "
        "cheaper than the node it measures",
    )
    p.add_argument(
        "--node-tracebacks",
        action="store_true",
        help="print the traceback of an error that ends a node into its log (debugging)",
    )
    p.add_argument(
        "--store-server",
        default="",
        help="postgresql://USER@HOST:PORT/DB of a PostgreSQL server: every node keeps its "
        "store in a fresh database there (dropped at the end) instead of SQLite",
    )
    p.add_argument("--files-mb", type=float, default=100.0, help="files: file size (MB)")
    p.add_argument(
        "--group-sizes", default="10,100,1000", help="group: members per group (sender included)"
    )
    p.add_argument("--group-msgs", type=int, default=5, help="group: messages timed per size")
    p.add_argument(
        "--receipt-sample",
        type=int,
        default=50,
        help="group: readers in the receipt round above 100 members (the rest extrapolated)",
    )
    p.add_argument(
        "--fallback-1000",
        action="store_true",
        help="group: also run the multi = false comparison at 1,000 members",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)  # fmt: skip
    if args.quick:
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for key, value in QUICK.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    if args.sections == "all":
        args.sections = ",".join(ALL_SECTIONS)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    if "growth" in args.sections and "drain" in args.sections:  # drain reuses growth's backlog
        args.sections.remove("drain")
        args.sections.insert(args.sections.index("growth") + 1, "drain")
    bad = set(args.sections) - set(ALL_SECTIONS)
    if bad:
        p.error(f"unknown sections: {', '.join(sorted(bad))}")
    if not 1 <= args.batch <= 256:
        p.error("--batch must be 1..256")
    return args


_PG_DATABASES: list[str] = []


def fresh_pg_database(server: str, name: str) -> str:
    """A new empty database on ``server`` for the node ``name``; its DSN."""
    from urllib.parse import urlsplit

    db = f"bench_{name.replace('-', '_')}_{os.urandom(4).hex()}"
    subprocess.run(["psql", "-X", "-q", server, "-c", f"CREATE DATABASE {db}"], check=True)
    _PG_DATABASES.append(db)
    return urlsplit(server)._replace(path="/" + db).geturl()


def drop_pg_databases() -> None:
    for db in _PG_DATABASES:
        subprocess.run(
            ["psql", "-X", "-q", STORE_SERVER, "-c", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"],
            capture_output=True,
        )
    _PG_DATABASES.clear()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    global NODE_TRACEBACKS, STORE_SERVER
    NODE_TRACEBACKS = args.node_tracebacks
    STORE_SERVER = args.store_server
    if args.profile is not None:
        Profiler.flags = args.profile_flags.split()
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    base = Path(tempfile.mkdtemp(prefix="haven-bench-"))
    t0 = time.perf_counter()
    env = env_info(args)
    try:
        if args.driver_loop == "uvloop":
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                result = runner.run(amain(args, base))
        else:
            result = asyncio.run(amain(args, base))
    finally:
        stop_children()
        drop_pg_databases()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    env["total_wall_s"] = round(time.perf_counter() - t0, 1)
    env["loadavg_end"] = list(os.getloadavg())
    env["pressure_avg10_pct_end"] = pressure()
    env["note"] = (
        "shared 2-core machine: other processes (see loadavg/pressure) can halve these numbers; "
        "node_cpu_us_per_msg is the steadier figure"
    )
    result["env"] = env
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.modules.setdefault("bench_node", sys.modules["__main__"])  # one copy for bench_sections
    sys.exit(main())
