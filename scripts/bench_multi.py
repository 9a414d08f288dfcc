"""Node-side group fan-out benchmark (docs/protocol.md §11.3-11.4): one ``send_multi`` to N
recipient devices spread over three real nodes, with raw devices that decrypt what they get.

    .venv/bin/python scripts/bench_multi.py --members 10,100,1000 [--v1] [--json]

For each N it registers N receiver devices (open registration, round robin over nodes A, B, C;
the sender is on A) that stay connected, asks for all their keys in one ``query_keys_multi``,
then submits one group message and measures: the key query's time and federation calls, the
bytes of the ``send_multi`` frame (and per recipient), the time to ``accepted`` and until every
receiver has opened its copy (``federation.multi.open_copy``), and the requests the nodes
handled (``/multi`` and envelopes per node). ``--v1`` runs node C with ``multi = false``.

Importable: :func:`run` returns the same dict (for ``scripts/bench`` section ``group``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from federation import frames as F  # noqa: E402
from federation.multi import INNER_MEGOLM, GroupInner, open_copy, seal_multi  # noqa: E402
from tests.integration.harness import NodeProc  # noqa: E402
from tests.integration.rawpeer import (  # noqa: E402
    RawDevice,
    RawIdentity,
    now_ms,
    set_node_config,
    stats,
)

DEADLINE_S = 60.0


class Receiver:
    """A connected raw device that acks and opens every copy pushed to it."""

    def __init__(self, ident: RawIdentity, dev: RawDevice) -> None:
        self.ident = ident
        self.dev = dev
        self.got: dict[bytes, float] = {}  # envelope id -> monotonic time it was opened
        self.task: asyncio.Task[None] | None = None

    async def read(self) -> None:
        sec, pub = bytes(self.ident.sealing), bytes(self.ident.sealing.public_key)
        while True:
            msg = await self.dev.ws.receive()
            if msg.type != aiohttp.WSMsgType.BINARY:
                return
            frame = F.decode_frame(msg.data, 2 * F.MAX_FRAME)
            if isinstance(frame, F.Deliver):
                for env in frame.envs:
                    open_copy(sec, pub, env.body)  # raises if not sealed to this device
                    self.got[env.id] = time.monotonic()
                await self.dev.send_bytes(F.Ack(tuple(e.id for e in frame.envs)).encode())


async def register_open(http: aiohttp.ClientSession, node: NodeProc, name: str) -> Receiver:
    ident = RawIdentity(address=f"{name}@{node.host}")
    dev = await RawDevice.connect(http, node.url)
    reg = await dev.request(
        F.Register(
            dev.next_rid(),
            b"",
            ident.mailbox,
            ident.auth_key,
            dev.proof(ident),
            ident.device_list(ident.address),
            name,
        )
    )
    assert isinstance(reg, F.Registered), reg
    return Receiver(ident, dev)


async def one_size(
    http: aiohttp.ClientSession, nodes: list[NodeProc], ids: list[str], n: int, tag: str
) -> dict[str, Any]:
    sender = await register_open(http, nodes[0], f"s{tag}")
    receivers = []
    for i in range(n):
        receivers.append(await register_open(http, nodes[i % 3], f"r{tag}x{i}"))
    for r in receivers:
        r.task = asyncio.create_task(r.read())
    before = [await stats(http, nd.url) for nd in nodes]
    # setup: one batched key query for every member
    t0 = time.monotonic()
    ans = await sender.dev.request(
        F.QueryKeysMulti(sender.dev.next_rid(), tuple(r.ident.address for r in receivers), False)
    )
    keys_s = time.monotonic() - t0
    assert isinstance(ans, F.KeysMulti), type(ans).__name__
    failed = Counter(res[4] for res in ans.results if res[4])
    if failed:  # e.g. rate_limited names of a node without "multi"
        raise SystemExit(f"key query: {dict(failed)} of {n} addresses failed")
    sealing = [ans.results[i][2].open().devices[0].sealing for i in range(n)]  # type: ignore[union-attr]
    # one group message
    inner = GroupInner(INNER_MEGOLM, sender.ident.address, "bench", os.urandom(200))
    sealed = seal_multi(inner, sealing)
    env_ids = [os.urandom(16) for _ in range(n)]
    dests: dict[str, list[tuple[bytes, bytes, bytes]]] = {}
    for i, r in enumerate(receivers):
        dests.setdefault(ids[i % 3], []).append((env_ids[i], r.ident.mailbox, sealed.headers[i]))
    frame = F.SendMulti(
        sender.dev.next_rid(),
        sealed.eph,
        now_ms() + 3_600_000,
        sealed.gbody,
        tuple((d, tuple(rs)) for d, rs in dests.items()),
    )
    data = frame.encode()
    t0 = time.monotonic()
    await sender.dev.send_bytes(data)
    got = await sender.dev.recv()
    accepted_s = time.monotonic() - t0
    assert isinstance(got, F.Accepted) and len(got.ids) == n, got
    deadline = t0 + DEADLINE_S
    while sum(len(r.got) for r in receivers) < n:
        if time.monotonic() > deadline:
            raise AssertionError("not every receiver got its copy")
        await asyncio.sleep(0.005)
    delivered_s = max(t for r in receivers for t in r.got.values()) - t0
    after = [await stats(http, nd.url) for nd in nodes]

    def delta(k: int, name: str) -> int:
        return int(after[k]["events"].get(name, 0)) - int(before[k]["events"].get(name, 0))

    for r in receivers:
        if r.task is not None:
            r.task.cancel()
        await r.dev.close()
    await sender.dev.close()
    return {
        "members": n,
        "keys_query_s": round(keys_s, 3),
        "keys_multi_requests_out": delta(0, "keys_multi.requests_out"),
        "send_multi_bytes": len(data),
        "bytes_per_recipient": round((len(data) - len(sealed.gbody)) / n, 1),
        "copy_bytes": len(sealed.copy_for(0)),
        "accepted_s": round(accepted_s, 3),
        "all_delivered_s": round(delivered_s, 3),
        "multi_requests_out": delta(0, "multi.requests_out"),
        "multi_requests_in": [delta(k, "multi.requests_in") for k in (1, 2)],
        "federation_envelopes_in": [delta(k, "federation.envelopes_in") for k in (1, 2)],
    }


async def run(sizes: list[int], base: Path, v1: bool = False) -> dict[str, Any]:
    """Start nodes A, B, C under ``base``, measure each size, stop them; the results."""
    nodes = [NodeProc.create(base, n) for n in ("a", "b", "c")]
    for i, node in enumerate(nodes):
        set_node_config(
            node.home,
            open_registration=True,
            registrations_per_minute=1_000_000,
            multi=not (v1 and i == 2),
        )
        node.start()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            ids = []
            for node in nodes:
                dev = await RawDevice.connect(http, node.url)
                ids.append(dev.challenge.node_id)
                await dev.close()
            results = [await one_size(http, nodes, ids, n, str(k)) for k, n in enumerate(sizes)]
    finally:
        for node in nodes:
            node.stop()
    return {"v1_peer": v1, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", default="10,100,1000")
    ap.add_argument("--v1", action="store_true", help="node C without the multi feature")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    sizes = [int(x) for x in args.members.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-multi-") as tmp:
        out = asyncio.run(run(sizes, Path(tmp), args.v1))
    if args.json:
        print(json.dumps(out))
        return
    for r in out["results"]:
        print(
            f"{r['members']:>5} members: keys {r['keys_query_s']:.3f} s "
            f"({r['keys_multi_requests_out']} /keys_multi), upload {r['send_multi_bytes']} B "
            f"({r['bytes_per_recipient']} B/recipient), accepted {r['accepted_s']:.3f} s, "
            f"all delivered {r['all_delivered_s']:.3f} s, /multi out {r['multi_requests_out']}, "
            f"envelopes in B,C {r['federation_envelopes_in']}"
        )


if __name__ == "__main__":
    main()
