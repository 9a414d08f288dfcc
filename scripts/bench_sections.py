"""The ``scripts/bench`` sections for the paths users feel (issue 12).

Every section reports ``msgs_per_s``, ``node_cpu_us_per_msg``, ``p50_ms``, ``p99_ms`` and
``rss_mb`` (the node's resident set at the end of the measured window; ``rss_peak_mb`` is its
``VmHWM``), in sub-objects where a section has variants. Devices are :class:`bench_raw.RawDevice`
(real ``register``/``auth`` frames, no Olm), except in ``federated`` where alice and bob are
real :class:`client.device.Device` so that the nodes resolve and pin each other as in use.

* ``per_message``: one envelope per ``send`` frame, 256 frames in flight in all. ``1to1``: one
  sender connection, one receiver; ``50to50``: 50 sender devices, 50 receivers, each sender's
  envelopes spread over all receivers. Throughput from unpaced runs, latency (send -> receipt on
  the receiving socket) from a run paced at ``--rate``, one envelope per frame.
* ``offline_store``: recipients registered but offline; one sender, one envelope per frame, 256
  in flight; msgs/s of ``accepted`` (durable: committed with synchronous=FULL). Latency is the
  frame's send -> ``accepted`` round trip at ``--rate``.
* ``growth``: ``per_message`` 1to1 with ``--growth-small`` and then ``--backlog-n`` envelopes
  pending for ``--backlog-mailboxes`` OTHER (offline) mailboxes; ``throughput_ratio`` = big/small.
* ``drain``: ``--backlog-n`` envelopes waiting over ``--backlog-mailboxes`` mailboxes (the
  per-mailbox quota raised in the bench's node.toml); all recipients connect at once; msgs/s of
  delivery + ack; p50/p99 = time from the connect to a recipient's first ``deliver``. Reuses the
  backlog ``growth`` leaves when both run.
* ``federated``: alice on node A sends raw envelopes (one per frame, 256 in flight, at most
  ``FED_IN_TRANSIT`` sent and not yet delivered, below A's per-account outbox quota) to bob's
  mailbox on node B: A's outbox and federation, B's inbound batch path. CPU/msg per node.
* ``connections``: ``--conn-n`` signed-in idle device connections (one account and device each,
  registered with real invites, held by one lean aiohttp client), RSS per connection (node RSS
  delta / connections held), and a live pair's latency at ``--conn-rate`` meanwhile.

Backlogs are filled over the wire (``send`` frames of 100 envelopes, 8 in flight per sender),
never written into the store directly. ``growth`` and ``drain`` put ONE epoch rotation
(re-sealing every pending row, node/atrest.py) inside the measured window: the node is stopped
cleanly (which re-seals under a fresh key; ``shutdown_reseal_s``) and restarted with the
test-only clock switch set so that its clock is ``ROTATE_LEAD_S`` before the end of that key's
epoch; the sweeper's next pass (every 10 s) re-seals everything under a new key. The rotation is
observed in ``epochs.key`` (the epoch numbers of live keys, never the keys) and reported under
``epoch_rotation``; ``growth`` keeps measuring until it is done (up to ``--rotation-wait-s``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench_node import (
    DAY_MS,
    NodeProc,
    Profiler,
    Receiver,
    Sender,
    lat_summary,
    log,
    unpaced,
    wait_delivered,
)
from bench_raw import IdleHolder, RawDevice, close_all, connect_all, raw_devices, send_accept

from client.connection import NodeConnection
from client.device import Device

# bench-only node.toml keys: registering hundreds of bench devices in seconds
BENCH_CONFIG: dict[str, Any] = {"registrations_per_minute": 1_000_000}
INFLIGHT = 256  # frames in flight on the per-message path, in all
# variants finished before a section failed (bench_node.amain reports them next to the error)
_BENCH_PARTIAL: dict[str, dict[str, Any]] = {}
ROTATE_LEAD_S = 3.0
FED_IN_TRANSIT = 10_000  # half the default max_outbox_per_account
SLOT = 40  # epochs.key: 8-byte epoch number + 32-byte key per slot (node/atrest.py)


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return sorted(runs, key=lambda r: r["msgs_per_s"] or 0)[len(runs) // 2]


def _one(values: list[float]) -> float | list[float]:
    return values[0] if len(values) == 1 else values


# ---- epoch rotation ---------------------------------------------------------------------------


def live_epochs(node: NodeProc) -> tuple[int, ...]:
    """Epoch numbers of the node's live at-rest keys (read from epochs.key; no key bytes)."""
    try:
        data = (node.home / "epochs.key").read_bytes()
    except OSError:
        return ()
    return tuple(sorted(int.from_bytes(data[i : i + 8], "big") for i in range(0, len(data), SLOT)))


def _nonzero(epochs: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(e for e in epochs if e)


class EpochWatch:
    """Polls epochs.key: a rotation starts when a new key appears and is done when only keys
    that did not exist at :meth:`start` remain."""

    def __init__(self, node: NodeProc) -> None:
        self.node = node
        self.initial: tuple[int, ...] = ()
        self.t0 = 0.0
        self.started_at: float | None = None
        self.done_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.initial = _nonzero(live_epochs(self.node))
        self.t0 = time.perf_counter()
        self._task = asyncio.create_task(self._poll())

    @property
    def done(self) -> bool:
        return self.done_at is not None

    async def _poll(self) -> None:
        first = list(self.initial)
        while self.done_at is None:
            now = _nonzero(live_epochs(self.node))
            slots = list(now)
            if self.started_at is None and slots != first:
                self.started_at = time.perf_counter()
            if self.started_at is not None and slots and not set(slots) & set(first):
                self.done_at = time.perf_counter()  # only keys of a later epoch are left
            await asyncio.sleep(0.05)

    def report(self, window_start: float, window_end: float) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - window_start, 2)

        return {
            "started_s": rel(self.started_at),
            "done_s": rel(self.done_at),
            "window_s": round(window_end - window_start, 2),
            "in_window": self.started_at is not None
            and window_start <= self.started_at <= window_end,
            "initial_epochs": list(self.initial),
        }


def restart_for_rotation(node: NodeProc, epoch_ms: int) -> dict[str, Any]:
    """Stop cleanly, restart with the node's clock ``ROTATE_LEAD_S`` before the end of the
    epoch of the key everything pending is now sealed under (see the module docstring)."""
    t = time.perf_counter()
    node.stop(timeout=1800)
    stop_s = time.perf_counter() - t
    epochs = _nonzero(live_epochs(node))
    offset = 0
    if epochs:
        end_ms = max(epochs) * epoch_ms  # epoch numbers start at 1 (node/atrest.py)
        offset = end_ms - int(ROTATE_LEAD_S * 1000) - int(time.time() * 1000)
    t = time.perf_counter()
    node.start(clock_offset_ms=offset)
    return {
        "shutdown_reseal_s": round(stop_s, 2),
        "start_s": round(time.perf_counter() - t, 2),
        "clock_offset_ms": offset,
    }


# ---- per-message runs -------------------------------------------------------------------------


async def paced_frames(
    snds: Sequence[Sender], rcv: Receiver, rate: float, seconds: float
) -> dict[str, Any]:
    """Offer ``rate`` envelopes/s, ONE per frame, senders in turn; every envelope timed."""
    expires = int(time.time() * 1000) + DAY_MS
    total = max(1, int(rate * seconds))
    rcv.received, rcv.lat_ms, rcv.sent_at, rcv.pending, rcv.duplicates = 0, [], {}, set(), 0
    rcv.target, rcv.done = total, asyncio.Event()
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - t0) * rate) + 1) - sent
        if due <= 0:
            await asyncio.sleep(t0 + sent / rate - now)
            continue
        for _ in range(due):
            snd = snds[sent % len(snds)]
            env = snd.envelopes(1, expires)[0]
            rcv.pending.add(env.id)
            rcv.sent_at[env.id] = time.perf_counter()
            await snd.submit([env])
            sent += 1
    t_sent = time.perf_counter()
    await wait_delivered(rcv, t_sent + 15)
    for snd in snds:
        await snd.drain(15)
    return {
        "offered_rate": rate,
        "achieved_rate": round(sent / (t_sent - t0), 1),
        "sent": sent,
        "delivered": rcv.received,
        "undelivered": len(rcv.pending),
        **lat_summary(rcv.lat_ms),
    }


async def message_run(
    args: argparse.Namespace,
    nodes: Sequence[NodeProc],
    snds: Sequence[Sender],
    rcv: Receiver,
    label: str,
    until: Callable[[], bool] | None = None,
    wait_s: float = 0.0,
    max_undelivered: int = 0,
) -> dict[str, Any]:
    """Warm-up, ``--pm-repeats`` unpaced runs (more while ``until()`` is false, up to
    ``wait_s``), then the paced latency run."""
    snd_list = list(snds)
    await unpaced(snd_list, rcv, args.pm_warmup, 1, 30, max_undelivered=max_undelivered)
    log(f"{label}: unpaced, n={args.pm_n} x {args.pm_repeats}, 1 envelope/frame")
    tag = "".join(ch if ch.isalnum() else "_" for ch in label)
    profs = [Profiler(args.profile, f"{tag}_node{i}", nd.pid) for i, nd in enumerate(nodes)]
    c0, p0, w0 = [nd.cpu() for nd in nodes], time.process_time(), time.perf_counter()
    runs = []
    while True:
        runs.append(
            await unpaced(
                snd_list, rcv, args.pm_n, 1, args.max_seconds, max_undelivered=max_undelivered
            )
        )
        log(f"{label}: {runs[-1]['msgs_per_s']} msgs/s")
        if len(runs) < args.pm_repeats:
            continue
        if until is None or until() or time.perf_counter() - w0 > wait_s:
            break
    c1, p1, w1 = [nd.cpu() for nd in nodes], time.process_time(), time.perf_counter()
    rss = [nd.rss_mb() for nd in nodes]
    profiles = [p.stop() for p in profs]
    delivered = max(sum(r["delivered"] for r in runs), 1)
    log(f"{label}: paced at {args.rate}/s for {args.paced_seconds}s")
    lat = await paced_frames(snd_list, rcv, args.rate, args.paced_seconds)
    wall = sum(r["wall_s"] for r in runs)
    extra = {"profile_nodes": profiles} if any(profiles) else {}
    return extra | {
        "msgs_per_s": _median_run(runs)["msgs_per_s"],
        "node_cpu_us_per_msg": _one(
            [round((b - a) / delivered * 1e6, 1) for a, b in zip(c0, c1, strict=True)]
        ),
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "rss_mb": _one(rss),
        "rss_peak_mb": _one([nd.rss_mb("VmHWM") for nd in nodes]),
        "window_msgs_per_s": round(delivered / wall, 1) if wall > 0 else None,
        "msgs_per_s_runs": [r["msgs_per_s"] for r in runs],
        "node_cpu_util": _one([round((b - a) / (w1 - w0), 3) for a, b in zip(c0, c1, strict=True)]),
        "driver_cpu_util": round((p1 - p0) / (w1 - w0), 3),
        "senders": len(snd_list),
        "inflight_frames": sum(s.inflight for s in snd_list),
        "envelopes_per_frame": 1,
        "body_bytes": 1024,
        "max_undelivered": max_undelivered or None,
        "throughput_run": _median_run(runs),
        "latency_note": f"paced at {args.rate}/s, 1 envelope/frame; send -> receiving socket",
        "paced": lat,
        "window": (w0, w1),
    }


def _strip_window(d: dict[str, Any]) -> tuple[float, float]:
    w: tuple[float, float] = d.pop("window")
    return w


async def per_message(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    node = NodeProc.create(base, "per-message", **BENCH_CONFIG)
    devs = await raw_devices(node.home, node.host, "pm", 2 + 100)
    node.start()
    conns: list[NodeConnection] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        conns = await connect_all(devs, node.url, first=True)
        out: dict[str, Any] = {}
        # 1to1
        rcv = Receiver(conns[1])
        tasks.append(asyncio.create_task(rcv.run()))
        snd = Sender(conns[0], node.node_id, devs[1].mailbox, INFLIGHT)
        out["1to1"] = await message_run(args, [node], [snd], rcv, "per_message 1to1")
        _strip_window(out["1to1"])
        _BENCH_PARTIAL["per_message"] = out  # kept if 50to50 fails
        # 50to50: sender i starts at receiver i, so the mailboxes of each frame window spread
        s_conns, r_devs, r_conns = conns[2:52], devs[52:102], conns[52:102]
        rcv50 = Receiver(r_conns[0])
        tasks += [asyncio.create_task(rcv50.run(c)) for c in r_conns]
        mbs = [d.mailbox for d in r_devs]
        per = max(1, INFLIGHT // len(s_conns))
        snds = [Sender(c, node.node_id, mbs[i:] + mbs[:i], per) for i, c in enumerate(s_conns)]
        out["50to50"] = await message_run(args, [node], snds, rcv50, "per_message 50to50")
        _strip_window(out["50to50"])
        return out
    finally:
        for t in tasks:
            t.cancel()
        await close_all(conns)
        node.stop()


# ---- offline store ----------------------------------------------------------------------------


async def offline_store(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    recipients = 10
    paced_n = max(1, int(args.rate * args.paced_seconds))
    total = args.pm_n + args.pm_warmup + paced_n
    node = NodeProc.create(
        base, "offline", max_pending_per_mailbox=total // recipients + 1000, **BENCH_CONFIG
    )
    devs = await raw_devices(node.home, node.host, "off", 1 + recipients)
    node.start()
    conns: list[NodeConnection] = []
    try:
        conns = await connect_all(devs, node.url, first=True)
        await close_all(conns[1:])  # the recipients go offline
        mbs = [d.mailbox for d in devs[1:]]
        sc = conns[:1]
        await send_accept(sc, node.node_id, mbs, args.pm_warmup, 1, INFLIGHT)
        log(f"offline_store: n={args.pm_n}, 1 envelope/frame, {INFLIGHT} in flight")
        c0, w0 = node.cpu(), time.perf_counter()
        thr = await send_accept(sc, node.node_id, mbs, args.pm_n, 1, INFLIGHT)
        c1, w1 = node.cpu(), time.perf_counter()
        rss = node.rss_mb()
        log(f"offline_store: {thr['msgs_per_s']} msgs/s; paced at {args.rate}/s")
        lat = await send_accept(sc, node.node_id, mbs, paced_n, 1, INFLIGHT, rate=args.rate)
        loaded = lat_summary(thr.pop("lat_ms"))
        paced = lat_summary(lat.pop("lat_ms"))
        return {
            "msgs_per_s": thr["msgs_per_s"],
            "node_cpu_us_per_msg": round((c1 - c0) / max(thr["accepted"], 1) * 1e6, 1),
            "p50_ms": paced["p50_ms"],
            "p99_ms": paced["p99_ms"],
            "rss_mb": rss,
            "rss_peak_mb": node.rss_mb("VmHWM"),
            "node_cpu_util": round((c1 - c0) / (w1 - w0), 3),
            "recipients_offline": recipients,
            "latency_note": f"send -> accepted (durable), paced at {args.rate}/s, 1 per frame",
            "throughput_run": thr,
            "throughput_run_latency": loaded,
            "paced": {**lat, **paced},
        }
    finally:
        await close_all(conns[:1])
        node.stop()


# ---- backlog: growth and drain ----------------------------------------------------------------


class Backlog:
    """A node with envelopes pending for ``others`` (offline mailboxes), filled over the wire."""

    FILL_SENDERS = 4  # the send rate limit is per account (node/app.py: 50k/s)

    def __init__(self, args: argparse.Namespace, base: Path, name: str) -> None:
        self.m = max(100, args.backlog_mailboxes)
        self.node = NodeProc.create(
            base,
            name,
            max_pending_per_mailbox=args.backlog_n // self.m + 1000,
            **BENCH_CONFIG,
        )
        self.epoch_ms = 600_000  # the default; not overridden above
        self.others: list[RawDevice] = []
        self.fillers: list[RawDevice] = []
        self.pair: list[RawDevice] = []
        self.pending = 0
        self.fill_s = 0.0

    async def register(self) -> None:
        home, host = self.node.home, self.node.host
        self.others = await raw_devices(home, host, "bk", self.m)
        self.fillers = await raw_devices(home, host, "fill", self.FILL_SENDERS)
        self.pair = await raw_devices(home, host, "pair", 2)
        self.node.start()
        url = self.node.url
        await close_all(await connect_all([*self.others, *self.fillers, *self.pair], url, True))

    async def fill_to(self, n: int) -> dict[str, Any]:
        need = n - self.pending
        if need <= 0:
            return {}
        conns = await connect_all(self.fillers, self.node.url, first=False)
        try:
            log(f"backlog: filling {need} envelopes over {len(self.others)} mailboxes")
            t = time.perf_counter()
            mbs = [d.mailbox for d in self.others]
            r = await send_accept(conns, self.node.node_id, mbs, need, 100, 8 * len(conns))
            self.fill_s += time.perf_counter() - t
        finally:
            await close_all(conns)
        r.pop("lat_ms")
        self.pending += r["accepted"]
        log(f"backlog: {self.pending} pending ({r['msgs_per_s']} msgs/s accepted)")
        return r


_BACKLOG: dict[str, Backlog] = {}  # growth leaves its filled node to drain


async def growth(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    bk = Backlog(args, base, "growth")
    await bk.register()
    out: dict[str, Any] = {}
    keep = False
    try:
        for label, n in (("pending_small", args.growth_small), ("pending_big", args.backlog_n)):
            fill = await bk.fill_to(n)
            restart = restart_for_rotation(bk.node, bk.epoch_ms)
            conns = await connect_all(bk.pair, bk.node.url, first=False)
            rcv = Receiver(conns[1])
            task = asyncio.create_task(rcv.run())
            watch = EpochWatch(bk.node)
            watch.start()
            try:
                snd = Sender(conns[0], bk.node.node_id, bk.pair[1].mailbox, INFLIGHT)
                res = await message_run(
                    args,
                    [bk.node],
                    [snd],
                    rcv,
                    f"growth {label} ({bk.pending} pending)",
                    until=lambda w=watch: w.done,  # type: ignore[misc]
                    wait_s=args.rotation_wait_s,
                )
            finally:
                task.cancel()
                await close_all(conns)
            w0, w1 = _strip_window(res)
            res["pending_other_mailboxes"] = bk.pending
            res["epoch_rotation"] = {**watch.report(w0, w1), **restart}
            res["fill"] = fill
            out[label] = res
        small, big = out["pending_small"], out["pending_big"]
        out["throughput_ratio"] = round(big["msgs_per_s"] / small["msgs_per_s"], 3)
        out["window_throughput_ratio"] = round(
            big["window_msgs_per_s"] / small["window_msgs_per_s"], 3
        )
        keep = "drain" in args.sections
        if keep:
            _BACKLOG["growth"] = bk
        return out
    finally:
        if not keep:
            bk.node.stop(timeout=1800)


async def drain(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    bk = _BACKLOG.pop("growth", None)
    if bk is None or bk.pending < args.backlog_n * 0.99:
        if bk is not None:
            bk.node.stop(timeout=1800)
        bk = Backlog(args, base, "drain")
        await bk.register()
        await bk.fill_to(args.backlog_n)
    try:
        restart = restart_for_rotation(bk.node, bk.epoch_ms)
        return await _drain_window(args, bk, restart)
    finally:
        bk.node.stop(timeout=1800)


async def _drain_window(
    args: argparse.Namespace, bk: Backlog, restart: dict[str, Any]
) -> dict[str, Any]:
    node, expected = bk.node, bk.pending
    got = 0
    first_ms: list[float] = []
    done = asyncio.Event()
    sem = asyncio.Semaphore(64)

    async def recipient(dev: RawDevice) -> None:
        nonlocal got
        async with sem:  # sign-ins 64 at a time; the drain itself is not bounded
            t = time.perf_counter()
            conn = await dev.connect(node.url)
        first = True
        try:
            while True:
                envs = await conn.deliveries.get()
                if first:
                    first_ms.append((time.perf_counter() - t) * 1000.0)
                    first = False
                await conn.ack([e.id for e in envs])
                got += len(envs)
                if got >= expected:
                    done.set()
        finally:
            await conn.__aexit__(None, None, None)

    log(f"drain: {len(bk.others)} recipients connect for {expected} envelopes")
    watch = EpochWatch(node)
    watch.start()
    c0, t0 = node.cpu(), time.perf_counter()
    tasks = [asyncio.create_task(recipient(d)) for d in bk.others]
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(args.max_seconds * 10):
            await done.wait()
    t1, c1 = time.perf_counter(), node.cpu()
    rss, hwm = node.rss_mb(), node.rss_mb("VmHWM")
    rot = watch.report(t0, t1)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    wall = t1 - t0
    lat = lat_summary(first_ms)
    log(f"drain: {got}/{expected} in {wall:.1f}s")
    return {
        "msgs_per_s": round(got / wall, 1) if wall > 0 else None,
        "node_cpu_us_per_msg": round((c1 - c0) / max(got, 1) * 1e6, 1),
        "p50_ms": lat["p50_ms"],
        "p99_ms": lat["p99_ms"],
        "rss_mb": rss,
        "rss_peak_mb": hwm,
        "node_cpu_util": round((c1 - c0) / wall, 3) if wall > 0 else None,
        "expected": expected,
        "delivered": got,
        "complete": got >= expected,
        "mailboxes": len(bk.others),
        "wall_s": round(wall, 2),
        "fill_s": round(bk.fill_s, 1),
        "latency_note": "connect -> first deliver frame, per recipient",
        "first_deliver": lat,
        "epoch_rotation": {**rot, **restart},
    }


# ---- federated --------------------------------------------------------------------------------


async def federated(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    na = NodeProc.create(base, "fed-a", **BENCH_CONFIG)
    nb = NodeProc.create(base, "fed-b", **BENCH_CONFIG)
    inv_a, inv_b = na.invite("alice"), nb.invite("bob")
    na.start()
    nb.start()
    alice = Device(str(base / "dev-alice-fed"))
    bob = Device(str(base / "dev-bob-fed"))
    aconn = bconn = None
    task = None
    try:
        await alice.join(inv_a)
        await bob.join(inv_b)
        aconn, bconn = await alice.connect(), await bob.connect()
        # Each side looks the other up once, so each node resolves and pins the other.
        await alice.send(bob.address, "hello", conn=aconn)
        await bob.send(alice.address, "hello", conn=bconn)
        rcv = Receiver(bconn)
        task = asyncio.create_task(rcv.run())
        snd = Sender(aconn, nb.node_id, bob.mailbox, INFLIGHT)
        # Unpaced, A would accept far faster than it forwards and refuse the rest with
        # quota_exceeded (max_outbox_per_account): bound what is in transit below that quota.
        res = await message_run(
            args, [na, nb], [snd], rcv, "federated", max_undelivered=FED_IN_TRANSIT
        )
        _strip_window(res)
        res["nodes"] = ["A (sender's home, outbox)", "B (recipient's home, inbound)"]
        return res
    finally:
        if task is not None:
            task.cancel()
        for c in (aconn, bconn):
            if c is not None:
                await c.__aexit__(None, None, None)
        alice.close()
        bob.close()
        na.stop()
        nb.stop()


# ---- connections ------------------------------------------------------------------------------


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


async def connections(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    hard = raise_fd_limit()  # the node inherits it and keeps max_connections 256 below
    n = args.conn_n
    if n + 600 > hard - 256:
        raise RuntimeError(f"RLIMIT_NOFILE hard limit {hard} is too low for {n} connections")
    node = NodeProc.create(base, "connections", max_connections=n + 600, **BENCH_CONFIG)
    log(f"connections: {n + 2} accounts and invites")
    devs = await raw_devices(node.home, node.host, "c", n + 2)
    node.start()
    pair: list[NodeConnection] = []
    holder = IdleHolder(node.url)
    task = None
    try:
        pair = await connect_all(devs[:2], node.url, first=True)
        rcv = Receiver(pair[1])
        task = asyncio.create_task(rcv.run())
        snd = Sender(pair[0], node.node_id, devs[1].mailbox, INFLIGHT)
        await unpaced([snd], rcv, args.pm_warmup, 1, 30)
        await asyncio.sleep(1.0)
        rss0 = node.rss_mb()
        log(f"connections: opening {n} signed-in connections (node RSS {rss0} MB)")
        t = time.perf_counter()
        await holder.open_all(devs[2:])
        open_s = time.perf_counter() - t
        await asyncio.sleep(2.0)
        rss1, held = node.rss_mb(), holder.open_count
        log(f"connections: {held} held after {open_s:.1f}s; RSS {rss1} MB; paced pair")
        c0 = node.cpu()
        lat = await paced_frames([snd], rcv, args.conn_rate, args.paced_seconds)
        c1 = node.cpu()
        still = holder.open_count
        return {
            "msgs_per_s": lat["achieved_rate"],
            "node_cpu_us_per_msg": round((c1 - c0) / max(lat["delivered"], 1) * 1e6, 1),
            "p50_ms": lat["p50_ms"],
            "p99_ms": lat["p99_ms"],
            "rss_mb": rss1,
            "rss_peak_mb": node.rss_mb("VmHWM"),
            "connections_requested": n,
            "connections_held": held,
            "connections_held_after_paced_run": still,
            "open_failed": dict(holder.failed),
            "open_s": round(open_s, 2),
            "rss_before_mb": rss0,
            "rss_per_connection_kib": round((rss1 - rss0) * 1024 / max(held, 1), 2),
            "fd_hard_limit": hard,
            "connection_note": (
                "each idle connection is its own account and device (a real invite redeemed "
                "with a register frame), held signed in by one aiohttp client that answers "
                "pings; msgs/s and latency are a live pair paced at --conn-rate meanwhile"
            ),
            "paced": lat,
        }
    finally:
        if task is not None:
            task.cancel()
        await holder.close()
        await close_all(pair)
        node.stop(timeout=60)


async def org(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """The ``org`` section (PostgreSQL, workers): ``scripts/bench_org.py``."""
    from bench_org import org as run

    return await run(args, base)


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], Any]] = {
    "per_message": per_message,
    "offline_store": offline_store,
    "growth": growth,
    "drain": drain,
    "federated": federated,
    "connections": connections,
    "org": org,
}


# ---- files (issue 11): attachments through one node and across two --------------------------


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cli(home: Path, *argv: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "client.cli", *argv[:1], "--home", str(home), *argv[1:]]


async def _timed_cli(cmd: list[str]) -> dict[str, Any]:
    """Run a ``haven`` device command; wall seconds, CPU seconds and the process's peak RSS
    (``VmHWM``, polled until it exits) and its first RSS seen (after the interpreter start)."""
    import json as _json
    import os
    import subprocess
    import sys

    from bench_node import cpu_seconds

    root = Path(__file__).resolve().parents[1]
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=root,
        env=os.environ | {"PYTHONPATH": str(root)},
    )  # fmt: skip
    hwm = cpu = 0.0
    while proc.poll() is None:
        hwm = max(hwm, _status_kb(proc.pid, "VmHWM"))
        with contextlib.suppress(OSError):
            cpu = cpu_seconds(proc.pid)
        await asyncio.sleep(0.02)  # sampling interval of a measurement, not synchronisation
    out = proc.stdout.read().decode() if proc.stdout else ""
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:4])} exited {proc.returncode}")
    del sys
    rows = [_json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {"wall_s": wall, "cpu_s": cpu, "hwm_kb": hwm, "rows": rows}


async def _files_run(args: argparse.Namespace, base: Path, federated: bool) -> dict[str, Any]:
    import hashlib
    import os
    import subprocess

    from bench_node import NodeProc, cpu_seconds

    size = int(args.files_mb * 1_000_000)
    a = NodeProc.create(base, "a").start()
    b = NodeProc.create(base, "b").start() if federated else a
    nodes = {"a": a} | ({"b": b} if federated else {})
    try:
        root = Path(__file__).resolve().parents[1]
        env = os.environ | {"PYTHONPATH": str(root)}

        def join(node: NodeProc, name: str) -> tuple[Path, str]:
            home = base / f"dev-{name}"
            cmd = _cli(home, "join", node.invite(name))
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env, check=True)
            return home, out.stdout.strip().splitlines()[-1]

        alice, _ = join(a, "alicebf")
        bob, bob_addr = join(b, "bobbf")
        src, tiny = base / "big.bin", base / "tiny.bin"
        h = hashlib.sha256()
        with open(src, "wb") as f:
            for i in range(0, size, 1 << 20):
                block = os.urandom(min(1 << 20, size - i))
                h.update(block)
                f.write(block)
        tiny.write_bytes(os.urandom(1000))
        save = base / "save"

        async def send(path: Path) -> dict[str, Any]:
            return await _timed_cli(_cli(alice, "send", bob_addr, "--file", str(path), "--json"))

        async def fetch() -> dict[str, Any]:
            got = await _timed_cli(
                _cli(bob, "recv", "--wait", "1", "--json", "--auto-download", "0",
                     "--save-dir", str(save))
            )  # fmt: skip
            (row,) = [r for r in got["rows"] if r.get("kind") == "file"]
            return await _timed_cli(
                _cli(bob, "download", row["msg_id"], "--save-dir", str(save), "--json")
            )

        # baselines: the same commands with a 1 kB file (interpreter, imports, sign-in)
        base_send = await send(tiny)
        base_get = await fetch()
        pids = {n: p.proc.pid for n, p in nodes.items() if p.proc is not None}
        rss0 = {n: _status_kb(pid, "VmRSS") for n, pid in pids.items()}
        cpu0 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        up = await send(src)
        cpu1 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        down = await fetch()
        cpu2 = {n: cpu_seconds(pid) for n, pid in pids.items()}
        hwm = {n: _status_kb(pid, "VmHWM") for n, pid in pids.items()}
        path = down["rows"][0]["file"]["path"]
        with open(path, "rb") as fh:
            assert hashlib.file_digest(fh, "sha256").digest() == h.digest(), "corrupt file"
        mb = size / 1e6
        res: dict[str, Any] = {
            "file_mb": round(mb, 1),
            "send_mb_per_s": round(mb / up["wall_s"], 1),
            "send_mb_per_s_net": round(mb / max(1e-3, up["wall_s"] - base_send["wall_s"]), 1),
            "download_mb_per_s": round(mb / down["wall_s"], 1),
            "download_mb_per_s_net": round(mb / max(1e-3, down["wall_s"] - base_get["wall_s"]), 1),
            "send_wall_s": round(up["wall_s"], 2),
            "download_wall_s": round(down["wall_s"], 2),
            "sender_cpu_s_per_mb": round(up["cpu_s"] / mb, 4),
            "receiver_cpu_s_per_mb": round(down["cpu_s"] / mb, 4),
            "sender_rss_growth_mb": round((up["hwm_kb"] - base_send["hwm_kb"]) / 1024, 1),
            "receiver_rss_growth_mb": round((down["hwm_kb"] - base_get["hwm_kb"]) / 1024, 1),
        }
        for n in pids:
            res[f"node_{n}_cpu_s_per_mb_send"] = round((cpu1[n] - cpu0[n]) / mb, 4)
            res[f"node_{n}_cpu_s_per_mb_download"] = round((cpu2[n] - cpu1[n]) / mb, 4)
            res[f"node_{n}_rss_growth_mb"] = round((hwm[n] - rss0[n]) / 1024, 1)
        return res
    finally:
        for n in nodes.values():
            n.stop(timeout=60)


async def files(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """``files``: a ``--files-mb`` file sent with ``haven send --file`` (encrypt + upload) and
    fetched with ``haven download`` (fetch + verify + decrypt), each a device process of its
    own, through one node (``one_node``) and across two (``two_nodes``). MB/s are the file's
    size over the command's wall time (``_net``: minus the same command's time for a 1 kB file:
    interpreter start, sign-in); RSS growth of a device is its peak ``VmHWM`` minus that of the
    same command with the 1 kB file, of a node its ``VmHWM`` after minus its ``VmRSS`` before.
    The top-level figures are the one-node run's (``msgs_per_s`` there is files per second)."""
    out: dict[str, Any] = {}
    for label, fed in (("one_node", False), ("two_nodes", True)):
        sub = base / f"files-{label}"
        sub.mkdir()
        out[label] = await _files_run(args, sub, fed)
    one = out["one_node"]
    out |= {
        "send_mb_per_s": one["send_mb_per_s"],
        "download_mb_per_s": one["download_mb_per_s"],
        "node_cpu_s_per_mb": one["node_a_cpu_s_per_mb_send"],
        "rss_mb": one["node_a_rss_growth_mb"],
    }
    return out


SECTIONS["files"] = files
