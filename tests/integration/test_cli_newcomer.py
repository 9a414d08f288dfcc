"""What a newcomer hit on the command line (issue 9, item 3), with real processes.

A real node and real ``haven`` subprocesses: default homes under ``HAVEN_HOME``; the three
failures told apart — no such user on a reachable node, the node down (a closed port), and a
port where something other than a Haven node answers (``python -m http.server``); the short ids
that ``history`` prints accepted by ``edit`` and ``delete``, and device-id prefixes by
``device remove``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .forkcli import haven, invite, join
from .harness import NodeProc, wait_until


def _err(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "Error" not in p.stderr, p.stderr
    return p.stderr.strip()


def test_default_home_errors_and_short_ids(
    tmp_path: Path, nodes: list[NodeProc], monkeypatch: pytest.MonkeyPatch
) -> None:
    node = NodeProc.create(tmp_path, "A").start()
    nodes.append(node)
    monkeypatch.setenv("HAVEN_HOME", str(tmp_path / "hv"))  # alice uses the default home
    out = haven("join", invite(node, "alice"), "--json").stdout
    alice = json.loads(out)["address"]
    assert (tmp_path / "hv" / "device").is_dir()
    who = json.loads(haven("whoami", "--json").stdout)
    assert who["address"] == alice and who["node_url"] == node.url
    assert set(who) >= {"address", "device_id", "node_url", "display_name"}
    bob_home, bob = join(node, tmp_path, "bob")

    # no such user, on a node that answers
    nobody = _err(haven("send", f"nobody@{node.host}", "hi", check=False))
    assert nobody.endswith("(no_such_account)") and f"nobody@{node.host}" in nobody

    # short ids from history work with edit and delete
    haven("send", bob, "first")
    haven("send", bob, "second")
    lines = haven("history", bob, "--no-mark-read").stdout.splitlines()
    assert len(lines) == 2 and all(len(ln.split(" ", 1)[0]) == 8 for ln in lines), lines
    first_id, second_id = (ln.split(" ", 1)[0] for ln in lines)
    assert haven("edit", bob, first_id.upper(), "first, edited").stdout.strip() == "edited"
    assert haven("delete", bob, second_id).stdout.strip() == "deleted"
    short = _err(haven("edit", bob, first_id[:5], "x", check=False))
    assert short.endswith("(bad_argument)") and "at least 8" in short
    kinds: list[str] = []

    def bob_received(n: int) -> bool:  # short waits, repeated (no fixed 2 s quiet period)
        out = haven("recv", "--home", str(bob_home), "--json", "--wait", "0.3").stdout
        kinds.extend(json.loads(ln)["kind"] for ln in out.splitlines())
        return len(kinds) >= n

    wait_until(lambda: bob_received(4), 20, "bob's device to receive the four")
    kinds.sort()
    assert kinds == ["delete", "edit", "text", "text"], kinds  # bob's device applied both
    texts = [
        json.loads(ln)["text"]
        for ln in haven("history", bob, "--json", "--no-mark-read").stdout.splitlines()
    ]
    assert texts == ["first, edited"]

    # `haven timer` is shared with the contact: bob's next message disappears too
    timer = haven("timer", bob, "1h").stdout.strip()
    assert timer == f"new messages with {bob} disappear after 1h (for both of you)"
    # a text after the timer: once bob's device has it, it has applied the timer (one mailbox
    # delivers in order)
    haven("send", bob, "timer set")
    wait_until(lambda: bob_received(5), 20, "bob's device to receive the timer")
    haven("send", "--home", str(bob_home), alice, "after the timer")
    rows = haven("history", "--home", str(bob_home), alice, "--json", "--no-mark-read").stdout
    mine = [json.loads(ln) for ln in rows.splitlines() if '"after the timer"' in ln]
    assert len(mine) == 1 and mine[0]["expires_at"] is not None, mine

    # device ids: a prefix names this device (refused: remove it from another one); an
    # unknown prefix is not_found
    me = who["device_id"]
    own = _err(haven("device", "remove", me[:10], check=False))
    assert "another one" in own
    missing = _err(haven("device", "remove", "Zz" + me[:8], check=False))
    assert missing.endswith("(not_found)")

    # the node is down: its URL, and a hint
    node.stop()
    down = _err(haven("send", bob, "anyone there?", check=False))
    assert down == (
        f"error: cannot reach the node at {node.url} (connection refused: is it running, "
        "and is the port right?) (node_unreachable)"
    )

    # something else answers on the node's port: not a Haven node
    web = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(node.port), "--bind", "127.0.0.1"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _answers(node.port), 20, "http.server to listen")
        wrong = _err(haven("recv", "--wait", "0.2", check=False))
        assert wrong == f"error: {node.url} is not a Haven node (wrong port?) (not_a_haven_node)"
    finally:
        web.terminate()
        web.wait(timeout=20)
    assert not os.path.exists(tmp_path / "hv" / "node")  # only `node init` makes a node home


def _answers(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_scripts_run_starts_node_and_app(tmp_path: Path) -> None:
    """``scripts/run``: node + app for the owner, the app's URL printed, both stopped by TERM."""
    from .harness import ROOT, free_port

    helped = subprocess.run(
        ["bash", str(ROOT / "scripts" / "run"), "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: scripts/run")
    node_port, app_port = free_port(), free_port()
    env = os.environ | {"HAVEN_HOME": str(tmp_path / "hv"), "USER": "owner"}
    env.pop("HAVEN_PASSPHRASE", None)
    argv = ["--listen", f"127.0.0.1:{node_port}", "--app-listen", f"127.0.0.1:{app_port}"]
    run = subprocess.Popen(
        ["bash", str(ROOT / "scripts" / "run"), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        assert run.stdout is not None
        url = ""
        for line in run.stdout:
            if "#k=" in line:
                url = line.strip()
                break
        assert url.startswith(f"http://127.0.0.1:{app_port}/#k="), url
        device = tmp_path / "hv" / "device"
        assert haven("app", "--url", "--home", str(device)).stdout.strip() == url
        who = json.loads(haven("whoami", "--json", "--home", str(device)).stdout)
        assert who["address"] == f"owner@127.0.0.1:{node_port}"
        run.terminate()
        assert run.wait(timeout=30) == 143
        # both children stopped: the app removed its socket, the node's port is free
        wait_until(lambda: not (device / "app.sock").exists(), 20, "the app to stop")
        wait_until(lambda: not _answers(node_port), 20, "the node to stop")
    finally:
        if run.poll() is None:
            os.killpg(run.pid, 9)
            run.wait(timeout=20)
