"""Node-side attachment throughput: raw devices upload and download a blob (docs/protocol.md §8).

Starts real nodes (``haven node serve``) on 127.0.0.1, uploads ``--mb`` MiB of random
"ciphertext" in 1 MiB chunks with ``--window`` puts in flight, downloads it through the same
node, then through a second node (federation, fetched copy), and prints MB/s and the nodes'
RSS growth (VmHWM, the peak, minus the RSS before). The device side here does no encryption:
this measures the node (hash + AEAD + fsync per chunk, federation fetch).

    .venv/bin/python scripts/bench_blobs_node.py --mb 100
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federation import frames as F  # noqa: E402
from federation.wire import CHUNK_SIZE  # noqa: E402
from tests.integration.harness import NodeProc  # noqa: E402
from tests.integration.rawpeer import RawDevice, set_node_config  # noqa: E402
from tests.integration.test_blobs_node import register  # noqa: E402

MIB = 1024 * 1024


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def windowed(dev: RawDevice, frames: list[F.Frame], window: int) -> list[F.Frame]:
    """Keep ``window`` requests in flight; answers in arrival order."""
    answers: list[F.Frame] = []
    sent = 0
    while sent < min(window, len(frames)):
        await dev.send_bytes(frames[sent].encode())
        sent += 1
    while len(answers) < len(frames):
        got = await dev.recv()
        if isinstance(got, F.Error):
            raise SystemExit(f"node refused: {got.code} {got.message}")
        answers.append(got)
        if sent < len(frames):
            await dev.send_bytes(frames[sent].encode())
            sent += 1
    return answers


async def ping(dev: RawDevice, address: str, n: int) -> list[float]:
    """Round trips (ms) of ``n`` local key queries: how long the node's loop makes others wait."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        got = await dev.request(F.QueryKeys(dev.next_rid(), address, False))
        assert isinstance(got, F.Keys), got
        out.append((time.perf_counter() - t) * 1000)
    return out


async def ping_until(dev: RawDevice, address: str, stop: asyncio.Event) -> list[float]:
    out: list[float] = []
    while not stop.is_set():
        out += await ping(dev, address, 1)
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--window", type=int, default=8)
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="bench-blobs-", dir=os.environ.get("TMPDIR", "/tmp")))
    a, b = NodeProc.create(base, "a"), NodeProc.create(base, "b")
    for n in (a, b):
        set_node_config(n.home, new_peer_rate=100_000, new_peer_burst=100_000)
    a.start()
    b.start()
    try:
        alice = await register(a, "alice")
        bob = await register(b, "bob")
        carol = await register(a, "carol")
        size = args.mb * MIB
        data = os.urandom(size)
        chunks = [data[i : i + CHUNK_SIZE] for i in range(0, size, CHUNK_SIZE)]
        hashes = tuple(hashlib.sha256(c).digest() for c in chunks)
        tokens = [os.urandom(32), os.urandom(32)]
        blob = os.urandom(16)
        assert a.proc is not None and b.proc is not None
        rss0 = {n: rss_kb(p.proc.pid, "VmRSS") for n, p in (("a", a), ("b", b)) if p.proc}
        async with aiohttp.ClientSession() as http:
            dev = await RawDevice.connect(http, a.url)
            await dev.auth(alice)
            node_a = dev.challenge.node_id
            th = tuple(hashlib.sha256(t).digest() for t in tokens)
            ok = await dev.request(F.BlobNew(dev.next_rid(), blob, size, hashes, th, 3_600_000))
            assert isinstance(ok, F.BlobOk), ok
            pinger = await RawDevice.connect(http, a.url)
            await pinger.auth(carol)
            idle = await ping(pinger, carol.address, 50)
            puts: list[F.Frame] = [
                F.BlobPut(dev.next_rid(), blob, i, c) for i, c in enumerate(chunks)
            ]
            stop = asyncio.Event()
            busy_task = asyncio.create_task(ping_until(pinger, carol.address, stop))
            t0, c0 = time.perf_counter(), cpu_s(a.proc.pid)
            await windowed(dev, puts, args.window)
            up_s, up_cpu = time.perf_counter() - t0, cpu_s(a.proc.pid) - c0
            stop.set()
            busy = await busy_task
            await pinger.close()
            del puts

            async def download(node: NodeProc, who: object, token: bytes) -> float:
                d = await RawDevice.connect(http, node.url)
                await d.auth(who)  # type: ignore[arg-type]
                gets: list[F.Frame] = [
                    F.BlobGet(d.next_rid(), blob, node_a, token, i, a.host)
                    for i in range(len(chunks))
                ]
                t = time.perf_counter()
                got = await windowed(d, gets, args.window)
                elapsed = time.perf_counter() - t
                h = hashlib.sha256()
                for fr in sorted(got, key=lambda f: f.index):  # type: ignore[attr-defined]
                    h.update(fr.data)  # type: ignore[attr-defined]
                assert h.digest() == hashlib.sha256(data).digest(), "corrupt download"
                await d.close()
                return elapsed

            c0 = cpu_s(a.proc.pid)
            local_s = await download(a, carol, tokens[1])
            local_cpu = cpu_s(a.proc.pid) - c0
            c0, cb = cpu_s(a.proc.pid), cpu_s(b.proc.pid)
            fed_s = await download(b, bob, tokens[0])
            fed_cpu = (cpu_s(a.proc.pid) - c0, cpu_s(b.proc.pid) - cb)
            await dev.close()
        hwm = {n: rss_kb(p.proc.pid, "VmHWM") for n, p in (("a", a), ("b", b)) if p.proc}
        mb = size / 1e6
        print(f"blob {args.mb} MiB, window {args.window}")
        print(
            f"  upload to A            {mb / up_s:8.1f} MB/s  "
            f"({up_s:.2f} s; A used {up_cpu:.2f} s CPU)"
        )
        print(
            f"  download through A     {mb / local_s:8.1f} MB/s  "
            f"({local_s:.2f} s; A used {local_cpu:.2f} s CPU)"
        )
        print(
            f"  download A -> B -> dev {mb / fed_s:8.1f} MB/s  "
            f"({fed_s:.2f} s; A used {fed_cpu[0]:.2f} s, B {fed_cpu[1]:.2f} s CPU)"
        )
        for label, rtts in (("idle", idle), ("during upload", busy)):
            rtts.sort()
            p50, p99 = rtts[len(rtts) // 2], rtts[int(len(rtts) * 0.99)]
            print(
                f"  another device's key query on A, {label}: p50 {p50:.1f} ms, "
                f"p99 {p99:.1f} ms, max {rtts[-1]:.1f} ms ({len(rtts)} queries)"
            )
        for name in ("a", "b"):
            print(f"  node {name} RSS peak growth {(hwm[name] - rss0[name]) / 1024:6.1f} MB")
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(base, ignore_errors=True)  # the blobs stay until their TTL otherwise


if __name__ == "__main__":
    asyncio.run(main())
