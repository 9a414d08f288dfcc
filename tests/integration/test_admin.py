"""The admin listener of real node processes (node/admin.py): ``/metrics`` parsed with
prometheus-client's parser, ``/healthz``, ``/readyz``, ``status --json``'s ``metrics_url``,
nothing of it on the public port, and ``--log-json`` writing only JSON lines on stderr.

Two nodes, A (started with ``--log-json``) and B; alice on A sends to bob on B, so A counts a
device submission and an outgoing federation request and B an incoming one and a delivery.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import ClientSession
from prometheus_client.parser import text_string_to_metric_families

from node.admin import AdminServer
from node.app import build
from node.cli import init_node

from .forkcli import haven, join, recv
from .harness import ROOT, NodeProc, wait_until

CODE = re.compile(r"[a-z][a-z0-9_]*")


@dataclass
class World:
    a: NodeProc
    b: NodeProc
    a_stderr: Path
    alice: Path
    bob: Path
    bob_addr: str


def start_json_logs(node: NodeProc, stderr: Path) -> None:
    """Like ``NodeProc.start``, with ``--log-json`` and stderr kept apart from stdout."""
    argv = [sys.executable, "-m", "client.cli", "node", "serve", "--log-json"]
    with open(node.log, "ab") as out, open(stderr, "ab") as err:
        node.proc = subprocess.Popen(
            [*argv, "--home", str(node.home)],
            stdout=out,
            stderr=err,
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
    wait_until(node._listening, 20, "node A to listen")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("admin")
    a = NodeProc.create(base, "A")
    b = NodeProc.create(base, "B").start()
    a_stderr = base / "A.stderr"
    try:
        start_json_logs(a, a_stderr)
        alice, _ = join(a, base, "alice")
        bob, bob_addr = join(b, base, "bob")
        yield World(a, b, a_stderr, alice, bob, bob_addr)
    finally:
        a.stop()
        b.stop()


def admin_url(node: NodeProc) -> str:
    def read() -> str | None:
        try:
            return str(json.loads((node.home / "admin.json").read_text())["url"])
        except (OSError, ValueError, KeyError):
            return None

    return str(wait_until(read, 20, "the admin runtime file"))


def get(url: str, method: str = "GET") -> tuple[int, str]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def scrape(node: NodeProc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, text = get(admin_url(node) + "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counters_move_after_a_message_is_sent_and_delivered(world: World) -> None:
    a0, b0 = scrape(world.a), scrape(world.b)
    haven("send", "--home", str(world.alice), world.bob_addr, "counted, never shown")

    def b_holds() -> bool:
        s = scrape(world.b)
        return value(s, "haven_pending_envelopes") >= 1 and value(
            s, "haven_federation_requests_total", direction="in", result="ok"
        ) > value(b0, "haven_federation_requests_total", direction="in", result="ok")

    wait_until(b_holds, 20, "B to count the incoming request and hold the envelope")
    moved = (
        ("haven_envelopes_accepted_total", {"surface": "client"}),
        ("haven_federation_requests_total", {"direction": "out", "result": "ok"}),
        ("haven_federation_envelopes_out_total", {}),
    )

    def a_counted() -> bool:  # A counts its request once B's answer is back
        a1 = scrape(world.a)
        return all(value(a1, name, **lb) > value(a0, name, **lb) for name, lb in moved)

    wait_until(a_counted, 20, "A to count the submission and the request out")
    b1 = scrape(world.b)
    accepted = ("haven_envelopes_accepted_total", {"surface": "federation"})
    assert value(b1, accepted[0], **accepted[1]) > value(b0, accepted[0], **accepted[1])

    wait_until(  # bob is offline: the envelope is stored, sealed under an epoch key
        lambda: value(scrape(world.b), "haven_epoch_keys") >= 1, 20, "B's epoch key gauge"
    )
    assert [m["text"] for m in recv(world.bob)] == ["counted, never shown"]
    wait_until(
        lambda: (
            value(scrape(world.b), "haven_envelopes_delivered_total")
            > value(b0, "haven_envelopes_delivered_total")
        ),
        20,
        "B to count the delivery",
    )
    wait_until(
        lambda: value(scrape(world.b), "haven_pending_envelopes") == 0, 20, "B's pending gauge"
    )
    assert value(b1, "haven_ready") == 1
    assert value(b1, "process_resident_memory_bytes") > 0  # process collector


def test_no_label_names_an_address_mailbox_node_or_account(world: World) -> None:
    node_ids = {
        json.loads(haven("node", "status", "--home", str(n.home), "--json").stdout)["node_id"]
        for n in (world.a, world.b)
    }
    forbidden = node_ids | {"alice", "bob", world.a.host, world.b.host, "127.0.0.1"}
    seen_labels = 0
    for node in (world.a, world.b):
        _, text = get(admin_url(node) + "/metrics")
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                for key, val in s.labels.items():
                    seen_labels += 1
                    assert CODE.fullmatch(key), (s.name, key)
                    assert CODE.fullmatch(val), (s.name, key, val)  # no '@', ':', '.', digits
                    assert val not in forbidden, (s.name, key, val)
                    assert len(val) < 40, (s.name, val)  # a node id or mailbox is longer
    assert seen_labels > 0


def test_health_ready_and_not_found(world: World) -> None:
    base = admin_url(world.b)
    assert get(base + "/healthz") == (200, "ok\n")
    assert get(base + "/readyz") == (200, "ready\n")
    assert get(base + "/")[0] == 404
    assert get(base + "/haven/v1/stats")[0] == 404
    assert get(base + "/metrics", method="POST")[0] == 404
    assert base.startswith("http://127.0.0.1:")  # loopback by default
    for path in ("/metrics", "/healthz", "/readyz"):  # nothing of it on the public port
        assert get(world.b.url + path)[0] == 404, path


def test_status_json_gives_a_metrics_url_that_answers(world: World) -> None:
    status = json.loads(haven("node", "status", "--home", str(world.a.home), "--json").stdout)
    url = status["metrics_url"]
    assert url == admin_url(world.a) + "/metrics"
    code, text = get(url)
    assert code == 200 and "haven_envelopes_accepted_total" in text


def test_json_logs_are_json_lines_only(world: World) -> None:
    # A broken request head makes the node log a line about it (aiohttp's request error).
    with socket.create_connection(("127.0.0.1", world.a.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nBroken header\r\n\r\n")
        s.recv(1024)
    assert world.a.proc is not None
    world.a.proc.send_signal(signal.SIGTERM)  # flush and close the log
    world.a.proc.wait(timeout=20)
    world.a.proc = None
    lines = world.a_stderr.read_text().splitlines()
    assert lines, "no log lines"
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for rec in records:
        assert isinstance(rec, dict)
        assert {"ts", "level", "logger", "msg"} <= set(rec), rec
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"]), rec
        assert "127.0.0.1" not in json.dumps(rec), rec
    assert any(r["logger"] == "haven.node" and r["msg"].endswith(" serving") for r in records)
    # the request error: one fixed line, no traceback, no address
    assert [r["msg"] for r in records if r["logger"] == "aiohttp.server"] == [
        "request failed (BadHttpMessage)"
    ]
    # stopped: the runtime file is gone and status has no metrics URL
    assert not (world.a.home / "admin.json").exists()
    status = json.loads(haven("node", "status", "--home", str(world.a.home), "--json").stdout)
    assert status["metrics_url"] is None


def test_readyz_is_503_until_the_node_serves(tmp_path: Path) -> None:
    """In process: a node built but not running answers ``starting``; then each other reason."""
    home = str(tmp_path / "n")
    init_node(home, "http://127.0.0.1:1", "127.0.0.1:1", 86_400_000, False)
    node = build(home)

    async def check() -> list[tuple[int, str]]:
        server = AdminServer("127.0.0.1", 0, node.metrics.registry, node.readiness)
        base = await server.start()
        out = []
        try:
            async with ClientSession() as http:
                for step in ("starting", "ready_without_store", "disk_full", "stopping"):
                    if step == "ready_without_store":
                        node.ready.set()  # "serving", but the store was never opened
                    if step == "disk_full" and node.mailboxes.disk is not None:
                        node.mailboxes.disk.full = True  # what DiskGuard.on_full sets
                    if step == "stopping":
                        node.stopping = True
                    async with http.get(base + "/readyz") as r:
                        out.append((r.status, (await r.text()).strip()))
                async with http.get(base + "/healthz") as r:
                    out.append((r.status, (await r.text()).strip()))
        finally:
            await server.stop()
        return out

    assert asyncio.run(check()) == [
        (503, "starting"),
        (503, "store"),
        (503, "disk_full"),
        (503, "stopping"),
        (200, "ok"),
    ]


def test_a_taken_admin_port_stops_serve_with_one_line(tmp_path: Path) -> None:
    node = NodeProc.create(tmp_path, "taken")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = f"127.0.0.1:{s.getsockname()[1]}"
        proc = haven(
            "node", "serve", "--home", str(node.home), "--admin-listen", taken, check=False
        )
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: admin listener {taken}: address already in use "
        "(set admin_listen or --admin-listen) (os_error)"
    )
    assert not (node.home / "admin.json").exists()
