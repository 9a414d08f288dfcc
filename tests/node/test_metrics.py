"""Node metrics (node/metrics.py) and their multiprocess aggregation (node/admin.py).

The multiprocess test runs real processes: a "supervisor" prepares the directory with
:func:`node.admin.setup_multiprocess`, two workers (one spawned with the environment it
inherits, one forked) count into it and exit, and the supervisor's registry reads the sums.
It runs in a subprocess of its own so the environment variable and prometheus-client's value
class switch never leak into this test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from node.metrics import GaugeSample, Metrics, label

ROOT = Path(__file__).resolve().parents[2]


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_label_values_outside_the_code_grammar_become_other() -> None:
    assert label("rate_limited") == "rate_limited"
    for bad in ("127.0.0.1", "alice@example.org", "A" * 10, "x" * 60, "", "a-b", "o23qu3j…"):
        assert label(bad) == "other"


def test_each_metrics_object_has_its_own_registry() -> None:
    a, b = Metrics(process=False), Metrics(process=False)
    a.error("client", "malformed")
    a.error("client", "malformed")
    a.error("store", "storage_error")
    a.event("client.envelopes_in", 3)
    a.request("in", "ok")
    a.error("peers", "203.0.113.9")  # a bug that passed an address: counted as "other"
    va = values(generate_latest(a.registry).decode())
    vb = values(generate_latest(b.registry).decode())
    refused = ("haven_refused_total", (("code", "malformed"), ("surface", "client")))
    assert va[refused] == 2
    assert refused not in vb
    assert va[("haven_refused_total", (("code", "other"), ("surface", "peers")))] == 1
    assert va[("haven_store_errors_total", (("code", "storage_error"),))] == 1
    assert va[("haven_envelopes_accepted_total", (("surface", "client"),))] == 3
    assert vb[("haven_envelopes_accepted_total", (("surface", "client"),))] == 0
    assert va[("haven_federation_requests_total", (("direction", "in"), ("result", "ok")))] == 1
    assert a.snapshot()["errors"] == {
        "client.malformed": 2,
        "store.storage_error": 1,
        "peers.203.0.113.9": 1,
    }


def test_gauges_take_the_sample() -> None:
    m = Metrics(process=False)
    m.sample(
        GaugeSample(
            devices=2,
            unauthenticated=5,
            open_connections=7,
            max_connections=100,
            known_peers=1,
            pending_envelopes=42,
            outbox_envelopes=3,
            epoch_keys=2,
            disk_full=True,
            ready=True,
        )
    )
    v = values(generate_latest(m.registry).decode())
    assert v[("haven_connections", (("kind", "device"),))] == 2
    assert v[("haven_connections", (("kind", "unauthenticated"),))] == 5
    assert v[("haven_pending_envelopes", ())] == 42
    assert v[("haven_outbox_envelopes", ())] == 3
    assert v[("haven_disk_full", ())] == 1


SUPERVISOR = r"""
import asyncio, json, os, subprocess, sys
import aiohttp
from prometheus_client import generate_latest
from node import admin

home = sys.argv[1]
stale = os.path.join(admin.multiprocess_dir(home), "counter_999999.db")
os.makedirs(os.path.dirname(stale), exist_ok=True)
open(stale, "wb").close()  # left by an earlier run: must be wiped
path = admin.setup_multiprocess(home)
assert not os.path.exists(stale)

WORKER = '''
import sys
from node.metrics import GaugeSample, Metrics
m = Metrics()
n, devices = int(sys.argv[1]), int(sys.argv[2])
for _ in range(n):
    m.error("client", "malformed")
m.event("federation.envelopes_in", n)
m.sample(GaugeSample(devices, 0, devices, 10, 1, 50 + n, 0, 1, False, True))
'''
spawned = subprocess.run([sys.executable, "-c", WORKER, "2", "3"], check=True)
pid = os.fork()
if pid == 0:  # a forked worker: uses the value class switched above
    try:
        sys.argv = ["worker", "5", "4"]
        exec(WORKER)
    finally:
        os._exit(0)
os.waitpid(pid, 0)
before = generate_latest(admin.multiprocess_registry()).decode()
admin.worker_exited(pid)  # the forked worker is gone: its live gauges leave the sums
after = generate_latest(admin.multiprocess_registry()).decode()
files = sorted(os.listdir(path))

async def scrape():  # the supervisor's listener serves the same sums over HTTP
    async def ready():
        return None
    server = await admin.start_supervisor_admin(home, "127.0.0.1:0", ready)
    try:
        url = admin.read_runtime(home) + "/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as r:
            return await r.text()
    finally:
        await admin.stop_supervisor_admin(home, server)

served = asyncio.run(scrape())
gone = admin.read_runtime(home) is None
print(json.dumps({"dir": path, "before": before, "after": after, "files": files,
                  "served": served, "gone": gone}))
"""


def test_two_worker_processes_are_summed_by_the_supervisor(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    proc = subprocess.run(
        [sys.executable, "-c", SUPERVISOR, str(tmp_path / "home")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env | {"PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["dir"] == str(tmp_path / "home" / "run" / "prometheus")
    assert any(f.startswith("counter_") for f in out["files"])
    before, after = values(out["before"]), values(out["after"])
    refused = ("haven_refused_total", (("code", "malformed"), ("surface", "client")))
    accepted = ("haven_envelopes_accepted_total", (("surface", "federation"),))
    device = ("haven_connections", (("kind", "device"),))
    assert before[refused] == 7  # 2 + 5, from two processes
    assert before[accepted] == 7
    assert before[device] == 7  # livesum: 3 + 4
    assert before[("haven_pending_envelopes", ())] == 55  # livemax: max(52, 55)
    assert after[refused] == 7  # counters of a dead worker still count
    assert after[device] == 3  # only the spawned worker's (not marked dead) remains
    assert after[("haven_pending_envelopes", ())] == 52
    served = values(out["served"])
    assert served[refused] == 7 and served[device] == 3
    assert served[("process_resident_memory_bytes", ())] > 0  # the supervisor's own
    assert out["gone"]  # runtime file removed at stop
