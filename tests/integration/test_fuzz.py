"""Live fuzzing of every endpoint of a real node (``tests/integration/fuzz.py`` builds the inputs).

Two real nodes: ``A`` is fuzzed, ``B`` is a real peer that ``A`` has pinned (alice on A and bob on
B have exchanged a message first). The fuzzer signs federation requests with B's node key (so
they pass the new-peer limits and reach the decoders) and with fresh keys; it holds two devices
registered by hand on A (one authenticated for post-auth frames, one for valid pre-auth
``auth`` frames). All endpoints are fuzzed at once, each with a few concurrent workers over
keep-alive connections.

N inputs per endpoint: ``HAVEN_FUZZ_N`` if set, else 100,000 under ``scripts/test --long``
(``HAVEN_LONG=1``), else :data:`CI_N`. The seed is ``HAVEN_FUZZ_SEED`` if set, else fixed for the
bounded run and random for the long run; it is printed, with a JSON summary (inputs, status
histogram and codes per endpoint), also written to ``HAVEN_FUZZ_SUMMARY`` if set.

Per endpoint the test asserts: every input ran; no 5xx (503 only as ``storage_error``); every
4xx of the federation endpoints is ``{code, message, now}`` with a known code and its status;
every ``error`` frame has a known code; no hang; no dropped connection for a well-framed input.
Then: both node processes alive, no line with "Traceback", "Error handling request" or
"127.0.0.1" in either node's log since start-up, and a legitimate exchange still works.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from client.device import parse_invite
from federation import frames as F
from federation.signing import NodeKey
from node.app import load_node_key
from tests.conftest import LONG

from . import fuzz as Z
from .harness import NodeProc, haven, join, recv, wait_until
from .rawpeer import RawDevice, RawIdentity

CI_N = 2500
LONG_N = 100_000
CI_SEED = 20261201
POOL_KEYS = 8
WORKERS = {
    "descriptor": 3,
    "batch": 4,
    "keys": 2,
    "ws_preauth": 2,
    "ws_postauth": 1,  # one authenticated device: frames are answered in order
    "stats": 2,
    "peers": 2,
    "unknown": 2,
    "tcp": 2,
}
LOG_FORBIDDEN = ("Traceback", "Error handling request", "127.0.0.1")


def fuzz_n() -> int:
    if os.environ.get("HAVEN_FUZZ_N"):
        return int(os.environ["HAVEN_FUZZ_N"])
    return LONG_N if LONG else CI_N


def fuzz_seed() -> int:
    if os.environ.get("HAVEN_FUZZ_SEED"):
        return int(os.environ["HAVEN_FUZZ_SEED"])
    return random.SystemRandom().randrange(2**32) if LONG else CI_SEED


@dataclass
class Run:
    a: NodeProc
    b: NodeProc
    base: Path
    alice: Path
    alice_addr: str
    bob: Path
    bob_addr: str
    log_start: dict[str, int]
    tally: Z.Tally
    n: int


def log_since(node: NodeProc, offset: int) -> list[str]:
    return node.log.read_bytes()[offset:].decode("utf-8", "replace").splitlines()


def started(node: NodeProc) -> int:
    """Log offset once the node has printed its start-up lines (which name its address)."""
    wait_until(lambda: b"listening on" in node.log.read_bytes(), what="start-up line")
    return len(node.log.read_bytes())


async def register_raw(node: NodeProc, name: str) -> RawIdentity:
    inv = parse_invite(node.invite(name))
    ident = RawIdentity(address=f"{name}@{node.host}")
    async with aiohttp.ClientSession() as http:
        dev = await RawDevice.connect(http, node.url)
        reg = await dev.register(ident, inv["t"], ident.address)
        assert isinstance(reg, F.Registered), reg
        await dev.close()
    return ident


async def fuzz_all(run: Run, pinned: NodeKey, pre: RawIdentity, post: RawIdentity) -> None:
    a, tally, n = run.a, run.tally, run.n
    seed_rng = random.Random(tally.seed)
    pool_keys = [NodeKey(seed_rng.randbytes(32)) for _ in range(POOL_KEYS)]
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections to it are refused
    dead_host = f"127.0.0.1:{dead.getsockname()[1]}"
    fed = Z.FedTargets(
        a_id(a), (post.mailbox, pre.mailbox), ("alice", "fzpost", "fzpre"), POOL_KEYS
    )
    wst = Z.WsTargets(
        node_id=fed.node_id,
        host=a.host,
        remote_node_id=pinned.node_id,
        remote_host=run.b.host,
        dead_host=dead_host,
        hosted=(post.mailbox, pre.mailbox),
        names=("alice", "fzpost", "fzpre", "bob"),
    )
    connector = aiohttp.TCPConnector(limit=64, force_close=False)
    try:
        async with aiohttp.ClientSession(connector=connector) as http:
            peer = await Z.FedPeer.connect(http, a.url, pinned, pool_keys)
            device = Z.Device("127.0.0.1", a.port, post)

            def rng(ep: str, i: int) -> random.Random:
                tally[ep].inputs += 1
                return Z.rng_for(tally.seed, ep, i)

            runners = {
                "descriptor": lambda i: Z.run_http(
                    http, a.url, Z.gen_descriptor(rng("descriptor", i)), tally["descriptor"]
                ),
                "batch": lambda i: Z.run_signed(
                    peer, Z.gen_batch(rng("batch", i), fed), tally["batch"]
                ),
                "keys": lambda i: Z.run_signed(
                    peer, Z.gen_keys(rng("keys", i), fed), tally["keys"]
                ),
                "ws_preauth": lambda i: Z.run_ws_preauth(
                    "127.0.0.1",
                    a.port,
                    Z.gen_ws_preauth(rng("ws_preauth", i), wst, pre),
                    tally["ws_preauth"],
                ),
                "ws_postauth": lambda i: device.run(
                    Z.gen_ws_postauth(rng("ws_postauth", i), wst), tally["ws_postauth"]
                ),
                "stats": lambda i: Z.run_http(
                    http, a.url, Z.gen_view(Z.STATS_PATH)(rng("stats", i)), tally["stats"]
                ),
                "peers": lambda i: Z.run_http(
                    http, a.url, Z.gen_view(Z.PEERS_PATH)(rng("peers", i)), tally["peers"]
                ),
                "unknown": lambda i: Z.run_http(
                    http, a.url, Z.gen_unknown(rng("unknown", i)), tally["unknown"]
                ),
                "tcp": lambda i: Z.run_tcp(
                    "127.0.0.1", a.port, Z.gen_tcp(rng("tcp", i)), tally["tcp"]
                ),
            }
            async with asyncio.TaskGroup() as tg:
                for ep in Z.ENDPOINTS:
                    tg.create_task(Z.pool(n, WORKERS[ep], runners[ep], tally[ep]))
            await device.drop()
    finally:
        dead.close()


def a_id(node: NodeProc) -> str:
    return str(node.status()["node_id"])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    base = tmp_path_factory.mktemp("fuzz")
    a = NodeProc.create(base, "A")
    b = NodeProc.create(base, "B")
    try:
        a.start()
        b.start()
        log_start = {"A": started(a), "B": started(b)}
        alice, alice_addr = join(a, base, "alice")
        bob, bob_addr = join(b, base, "bob")
        # A pins B (alice looks bob up), so B's key is a known peer of A.
        haven("send", "--home", str(alice), bob_addr, "before the fuzz")
        assert [m["text"] for m in recv(bob)] == ["before the fuzz"]
        pre = asyncio.run(register_raw(a, "fzpre"))
        post = asyncio.run(register_raw(a, "fzpost"))
        seed, n = fuzz_seed(), fuzz_n()
        print(f"fuzz seed {seed}, {n} inputs per endpoint", file=sys.stderr)
        r = Run(a, b, base, alice, alice_addr, bob, bob_addr, log_start, Z.Tally(seed), n)
        t0 = time.monotonic()
        asyncio.run(fuzz_all(r, load_node_key(str(b.home)), pre, post))
        summary = {"n": n, "elapsed_s": Z.elapsed(t0)} | r.tally.compact()
        text = Z.dumps(summary)
        print("fuzz summary " + text, file=sys.stderr)
        (base / "fuzz-summary.json").write_text(Z.dumps(summary | r.tally.summary()))
        if os.environ.get("HAVEN_FUZZ_SUMMARY"):
            Path(os.environ["HAVEN_FUZZ_SUMMARY"]).write_text(Z.dumps(summary | r.tally.summary()))
        yield r
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("endpoint", Z.ENDPOINTS)
def test_fuzzed_endpoint_gives_only_stable_answers(run: Run, endpoint: str) -> None:
    t = run.tally[endpoint]
    assert t.inputs == run.n, (endpoint, t.inputs)
    assert not t.failures, f"seed {run.tally.seed}: {endpoint} failed: " + Z.dumps(t.summary())
    # Inputs the HTTP client itself refused to send are not tested: keep them a small minority.
    refused = sum(v for k, v in t.notes.items() if k.startswith("client_refused"))
    assert refused <= run.n // 20, (endpoint, refused)


def exception_names(lines: list[str]) -> Iterator[str]:
    """The exception class that ends each traceback in ``lines``."""
    inside = False
    for line in lines:
        if line.startswith("Traceback"):
            inside = True
        elif inside and line and not line.startswith(" "):
            inside = False
            yield line.split(":")[0]


def test_nodes_survive_fuzzing_with_clean_logs(run: Run) -> None:
    for node in (run.a, run.b):
        assert node.proc is not None and node.proc.poll() is None, f"{node.home.name} died"
    report: dict[str, dict[str, object]] = {}
    for name, node in (("A", run.a), ("B", run.b)):
        lines = log_since(node, run.log_start[name])
        counts = {w: sum(w in line for line in lines) for w in LOG_FORBIDDEN}
        kinds = Counter(exception_names(lines))
        if any(counts.values()):
            report[name] = {"lines": counts, "exceptions": dict(kinds.most_common(12))}
    assert not report, report


def test_exchange_still_works_after_fuzzing(run: Run) -> None:
    haven("send", "--home", str(run.alice), run.bob_addr, "after the fuzz")
    assert [m["text"] for m in recv(run.bob)] == ["after the fuzz"]
    haven("send", "--home", str(run.bob), run.alice_addr, "still here")
    assert "still here" in [m["text"] for m in recv(run.alice)]


def test_inputs_are_a_function_of_the_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The printed seed replays a run: the same (seed, endpoint, index) builds the same input
    (expiries and created times are relative to the clock, frozen here)."""
    monkeypatch.setattr(Z, "now_ms", lambda: 1_800_000_000_000)
    tg = Z.FedTargets(NodeKey(b"\x01" * 32).node_id, (b"\x02" * 16,), ("alice",), POOL_KEYS)

    def inputs(seed: int) -> list[object]:
        out: list[object] = []
        for i in range(200):
            out.append(Z.gen_descriptor(Z.rng_for(seed, "descriptor", i)).path)
            b = Z.gen_batch(Z.rng_for(seed, "batch", i), tg)
            out += [b.desc, b.body, b.signed_body, b.ops, b.created_delta_ms]
            out.append(Z.gen_keys(Z.rng_for(seed, "keys", i), tg).body)
            c = Z.gen_tcp(Z.rng_for(seed, "tcp", i))  # WebSocket masks are fresh
            out += [c.desc, len(c.data) if c.ws_upgrade else c.data]
            u = Z.gen_unknown(Z.rng_for(seed, "unknown", i))
            out += [u.method, u.path, u.body]
        return out

    assert inputs(5) == inputs(5)
    assert inputs(5) != inputs(6)
