"""Device benchmark ``device_drain``: prints ONE JSON object to stdout (progress on stderr).

A real node subprocess and two devices (alice, bob) joined with :meth:`Device.join`. After one
exchange each way (so both hold an Olm session), bob goes offline and alice builds ``--n`` real
messages to him: Olm-encrypted with her stored session, sealed to bob's device (sealed sender),
padded, exactly as :meth:`Device.send` does but in one local transaction, and hands them to the
node in ``Send`` frames of at most 200. Then the clock starts: bob connects, and the node pushes
the backlog; bob's :meth:`Device.process` opens, verifies, decrypts, stores (SQLCipher, per-
message keys) and acks every batch and sends his delivered receipts. The clock stops when all
``--n`` messages are in bob's history.

``msgs_per_s`` is n / seconds over connect → all stored; ``p50_ms`` / ``p99_ms`` are the
times of one ``process`` call (one delivered batch, about 60 envelopes);
``device_cpu_us_per_msg`` (this process) and ``node_cpu_us_per_msg`` are steadier than wall
time on a shared machine. Run it as
``.venv/bin/python scripts/bench_device.py --n 5000`` or ``scripts/bench --sections
device_drain``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import vodozemac as vz  # noqa: E402
from bench_node import NodeProc, join, lat_summary, log, stop_children  # noqa: E402

from client.connection import expect  # noqa: E402
from client.device import Device  # noqa: E402
from client.payload import Payload  # noqa: E402
from federation import frames as F  # noqa: E402
from federation.devicelist import SignedDeviceList  # noqa: E402
from federation.ids import new_envelope_id  # noqa: E402
from federation.sealing import SealedContent, seal  # noqa: E402
from federation.wire import Envelope  # noqa: E402

FRAME = 200  # envelopes per Send frame, as Device.send uses
TTL_MS = 7 * 86_400_000


def stored(dev: Device) -> int:
    return int(dev.state.db.execute("SELECT count(*) FROM history").fetchone()[0])


def build_backlog(alice: Device, bob_address: str, n: int) -> list[Envelope]:
    """``n`` text messages to bob's one device, Olm-encrypted with alice's stored session in
    one transaction (one unpickle, one pickle), sealed and padded."""
    c = alice.state.contact(bob_address)
    assert c is not None
    dl = SignedDeviceList(c.device_list, c.sig).open(expected_address=bob_address)
    (dev,) = dl.devices
    key = alice.state.storage_key
    now = alice.clock.now_ms()
    envs: list[Envelope] = []
    with alice.state.tx() as db:
        session = vz.Session.from_pickle(alice.state.sessions(dev.device_id)[0][1], key)
        for i in range(n):
            data = Payload(os.urandom(16), "text", bob_address, now + i, text=f"message {i}")
            msg_type, olm = session.encrypt(data.encode()).to_parts()
            sc = SealedContent(alice.address, alice.curve_key, int(msg_type), bytes(olm))
            body = seal(dev.sealing, sc)
            envs.append(Envelope(new_envelope_id(), dev.mailbox, now + TTL_MS, body))
        alice.state.save_session(db, dev.device_id, session.session_id, session.pickle(key), now)
    return envs


async def device_drain(n: int, base: Path, max_seconds: float) -> dict[str, Any]:
    node = NodeProc.create(base, "node").start()
    try:
        alice = await join(node, base, "alice")
        bob = await join(node, base, "bob")
        await alice.send(bob.address, "hello")
        await bob.receive(wait_s=0.5)
        await bob.send(alice.address, "hello back")
        await alice.receive(wait_s=0.5)
        before = stored(bob)
        t = time.perf_counter()
        envs = build_backlog(alice, bob.address, n)
        build_s = time.perf_counter() - t
        conn = await alice.connect()
        try:
            # One small round trip first: the node lifts its pre-authentication frame cap
            # only once it has finished handling Auth, which can be after AuthOk reached us.
            await alice.refill_keys(conn)
            for i in range(0, n, FRAME):
                items = tuple((node.node_id, e) for e in envs[i : i + FRAME])
                ans = expect(await conn.request(F.Send(conn.next_rid(), items)), F.Accepted)
                if ans.rejected:
                    raise RuntimeError(f"node rejected {len(ans.rejected)} envelopes")
        finally:
            await conn.__aexit__(None, None, None)
        log(f"device_drain: {n} envelopes queued for bob (built in {build_s:.2f} s)")

        batch_ms: list[float] = []
        got = 0
        n0 = node.cpu()
        t0, c0 = time.perf_counter(), time.process_time()
        bconn = await bob.connect()
        try:
            while got < n:
                left = max_seconds - (time.perf_counter() - t0)
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        batch = await bconn.deliveries.get()
                except TimeoutError:
                    break
                tb = time.perf_counter()
                got += sum(1 for m in await bob.process(bconn, batch) if m.kind == "text")
                batch_ms.append((time.perf_counter() - tb) * 1000.0)
            seconds = time.perf_counter() - t0
            cpu_s = time.process_time() - c0
            node_cpu = node.cpu() - n0
        finally:
            await bconn.__aexit__(None, None, None)
        in_history = stored(bob) - before
        alice.close()
        bob.close()
    finally:
        node.stop()
    lat = lat_summary(batch_ms)
    return {
        "n": n,
        "stored": in_history,
        "msgs_per_s": round(in_history / seconds, 1) if seconds > 0 else None,
        "seconds": round(seconds, 3),
        # this process's CPU per stored message (the device's work; steadier than wall time
        # on a shared machine) and the node's
        "device_cpu_us_per_msg": round(cpu_s / max(in_history, 1) * 1e6, 1),
        "node_cpu_us_per_msg": round(node_cpu / max(in_history, 1) * 1e6, 1),
        "batches": len(batch_ms),
        "p50_ms": lat.get("p50_ms"),  # per delivered batch (one process() call)
        "p99_ms": lat.get("p99_ms"),
        "build_s": round(build_s, 3),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=5000, help="backlog of envelopes to drain")
    p.add_argument("--max-seconds", type=float, default=120.0, help="cap on the drain")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="haven-bench-device-"))
    try:
        result = asyncio.run(device_drain(args.n, base, args.max_seconds))
    finally:
        stop_children()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print(json.dumps({"device_drain": result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
