"""Every ``scripts/bench`` section runs at a tiny size and reports its figures.

One subprocess runs ``scripts/bench_node.py --quick --sections all`` (real nodes on 127.0.0.1;
``ui_latency`` drives the system chromium that ``scripts/test`` installs); ``group`` runs in a
subprocess of its own with one group of 5 members. No timing is
asserted: only that each section (or each of its variants) produced every required figure as a
positive, finite number, so a section that stops working fails the suite.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_node import ALL_SECTIONS  # noqa: E402

REQUIRED = ("msgs_per_s", "node_cpu_us_per_msg", "p50_ms", "p99_ms", "rss_mb")
# the sections kept from before issue 12 report what they measure (device_drain: no node RSS;
# ui_latency: browser to browser, no per-message node figures)
KEPT: dict[str, tuple[str, ...]] = {
    "node_only": REQUIRED,
    "one_node": REQUIRED,
    "two_nodes": REQUIRED,
    "device_drain": ("msgs_per_s", "node_cpu_us_per_msg", "p50_ms", "p99_ms"),
    "ui_latency": ("p50_ms", "p99_ms"),
    # attachments: MB/s and node CPU per MB (RSS growth of a 3 MB run may round to 0)
    "files": ("send_mb_per_s", "download_mb_per_s", "node_cpu_s_per_mb"),
}
VARIANTS = {
    "per_message": ("1to1", "50to50"),
    "growth": ("pending_small", "pending_big"),
    "org": ("sqlite", "pg_1worker", "pg_2workers"),
}


def sane(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(sane(v) for v in value)
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def check(name: str, figures: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    if "error" in figures:
        return [f"{name}: {figures['error']}"]
    return [f"{name}.{k} = {figures.get(k)!r}" for k in keys if not sane(figures.get(k))]


GROUP_FIGURES = (
    "setup_s", "upload_bytes_per_msg", "per_recipient_bytes", "fed_requests", "deliver_s_p50",
    "deliver_s_max", "receipt_bytes", "receipt_envelopes",
)  # fmt: skip
SEPARATE = ("group", "relay")  # run below at a tiny size of their own


@pytest.fixture(scope="module")
def bench() -> dict[str, Any]:
    sections = [s for s in ALL_SECTIONS if s not in SEPARATE]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_node.py"), "--quick",
         "--sections", ",".join(sections)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout)
    assert set(sections) <= set(result), proc.stderr[-4000:]
    return result


def test_every_section_reports_its_figures(bench: dict[str, Any]) -> None:
    problems = []
    for name in (s for s in ALL_SECTIONS if s not in SEPARATE):
        section = bench[name]
        if name in VARIANTS:
            if "error" in section:
                problems.append(f"{name}: {section['error']}")
            for v in VARIANTS[name]:
                problems += check(f"{name}.{v}", section.get(v, {"error": "missing"}), REQUIRED)
        else:
            problems += check(name, section, KEPT.get(name, REQUIRED))
    assert not problems, "\n".join(problems)


def test_backlog_sections_deliver_all_and_hold_connections(bench: dict[str, Any]) -> None:
    drain = bench["drain"]
    assert drain["complete"] and drain["mailboxes"] >= 100
    assert sane(bench["growth"]["throughput_ratio"])
    for v in VARIANTS["growth"]:
        assert bench["growth"][v]["epoch_rotation"]["initial_epochs"]  # rows were sealed
    org = bench["org"]
    for v in VARIANTS["org"][1:]:  # PostgreSQL's own CPU is measured, per message
        assert sane(org[v]["cpu_us_per_msg"]["postgresql"]), org[v]
    assert sane(org["ratios"]["msgs_per_s_pg2_over_pg1"])
    conns = bench["connections"]
    assert conns["connections_held"] == conns["connections_requested"]
    assert math.isfinite(conns["rss_per_connection_kib"])


def test_group_section_reports_its_figures() -> None:
    """One sender and a group of 5 (4 light members over 3 nodes): every member decrypted each
    message (the section fails otherwise), and each figure is there."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_node.py"), "--quick", "--sections",
         "group", "--group-sizes", "5", "--group-msgs", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    group = json.loads(proc.stdout)["group"]
    assert check("group", group, GROUP_FIGURES) == [], proc.stderr[-4000:]
    size = group["size_5"]
    assert size["members"] == 5 and size["recipient_devices"] == 4
    # per node: A, B, C (and D, the multi = false node of the comparison)
    assert len(size["envelopes_handled"]) >= 3 and sum(size["envelopes_handled"]) >= 4
    assert size["receipts"]["complete"] and size["receipts"]["readers"] == 4
    # each of the 4 readers' watermarks reached the 3 other members (and the sender)
    assert size["receipts"]["copies_decrypted_by_members"] == 4 * 3
    # the multi = false comparison: the Device's per-device path (and the bench-driven one)
    fallback = group["fallback"]
    got = [v for k, v in fallback.items() if k.endswith("ratios_5")]
    assert got and all(sane(r["upload_bytes_fallback_over_multi"]) for r in got), fallback
    assert all(r["upload_bytes_fallback_over_multi"] > 1 for r in got), fallback


def test_relay_section_reports_direct_and_relayed_figures() -> None:
    """Direct federation and federation through a relay, in one tiny run: both report every
    figure, and the comparison is there (no threshold: the bench measures, the suite checks
    it still works)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_node.py"), "--quick", "--sections",
         "relay", "--pm-n", "200", "--pm-warmup", "20"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    relay = json.loads(proc.stdout)["relay"]
    assert "skipped" not in relay and "error" not in relay, relay
    problems = check("relay.direct", relay["direct"], REQUIRED)
    problems += check("relay.relayed", relay["relayed"], REQUIRED)
    assert not problems, "\n".join(problems)
    assert len(relay["relayed"]["rss_mb"]) == 3  # sender's home, relay, relay's client
    assert relay["relay_bytes_in"] > 200 * 1024  # the relayed envelopes went through the relay
    assert sane(relay["throughput_ratio"])
    assert isinstance(relay["added_p50_ms"], float) and isinstance(relay["added_p99_ms"], float)
