"""CLI commands through a running ``haven app`` (client/app/ipc.py), with real processes.

One node; alice's device runs a daemon (a real ``haven app`` subprocess); bob uses the CLI
standalone. Alice's CLI commands must go through her daemon's Unix socket: they work, ``recv``
prints each message once per reader (a cursor), and the daemon's one node connection is never
replaced by a second one. The socket is 0600 and another uid is refused even when the file
mode would let it connect.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from tests.integration.forkcli import haven, invite, join
from tests.integration.harness import ROOT, NodeProc, wait_until

from .daemon import DaemonProc, EventSocket, wait_message

NOBODY = 65534
_WORLDS = count(1)
WHOAMI = b'{"cmd": "whoami", "args": {"json": true}, "client": "cli"}\n'


def ask_as(uid: int | None, path: Path, request: bytes) -> str:
    """Send ``request`` to the socket from a forked child running as ``uid`` (None: as we
    are) and return all it answered. A fork needs no interpreter the other uid could run
    (the venv's lives under /root); the peer uid is what the kernel reports at connect."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to uid, connect, relay the answer, exit at once
        try:
            os.close(r)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(20)
                s.connect(str(path))
                s.sendall(request)
                while chunk := s.recv(65536):
                    os.write(w, chunk)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent as text
            os.write(w, f"child failed: {exc}".encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return data.decode("utf-8", "replace")


@pytest.fixture
def base() -> Iterator[Path]:
    """A scratch folder others may traverse (0711), so another uid can reach the socket file
    once a test loosens its mode; tmp_path's parents are 0700."""
    d = Path(tempfile.mkdtemp(prefix="haven-ipc-", dir="/tmp"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def world(base: Path, app_node: NodeProc, daemons: list[DaemonProc]) -> dict[str, Any]:
    node = app_node  # the module's node: each test has account names of its own on it
    n = next(_WORLDS)
    alice_home, alice = join(node, base, f"alice-{n}")
    bob_home, bob = join(node, base, f"bob-{n}")
    # first contact both ways while standalone (pins keys, opens sessions)
    haven("send", "--home", str(bob_home), alice, "hello before the app")
    d = DaemonProc(alice_home)
    daemons.append(d)
    d.start()
    wait_message(d, bob, lambda m: m["text"] == "hello before the app", 20, "the daemon to receive")
    return {"node": node, "alice": alice, "bob": bob, "ah": alice_home, "bh": bob_home, "d": d}


def cli(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return haven(*args, "--home", str(home), check=check)


def recv_lines(home: Path, *extra: str) -> list[str]:
    out = cli(home, "recv", "--wait", "0.3", *extra).stdout
    return [line for line in out.splitlines() if line.strip()]


async def test_cli_through_the_daemon(world: dict[str, Any]) -> None:
    d: DaemonProc = world["d"]
    ah, bh, alice, bob = world["ah"], world["bh"], world["alice"], world["bob"]
    sock = ah / "app.sock"
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600

    # `haven app --url` asks the running daemon
    url = cli(ah, "app", "--url").stdout.strip()
    assert url == d.url and url.startswith("http://127.0.0.1:")

    async with EventSocket(d) as ws:
        # recv through the daemon: what arrived before it started was received by the daemon
        # (the standalone CLI never ran recv on alice's home), printed once per reader
        first = await asyncio.to_thread(recv_lines, ah)
        assert first == [f"{bob}: hello before the app"], first
        again = await asyncio.to_thread(cli, ah, "recv", "--wait", "0.3")
        assert again.stdout.strip() == "" and "no new messages" in again.stderr

        # send through the daemon: queued in its outbox, sent over its connection
        sent = await asyncio.to_thread(cli, ah, "send", bob, "hi bob from the CLI")
        assert sent.stdout.strip().startswith(f"sent to {bob}: readable by 1 device"), sent
        got = await asyncio.to_thread(recv_lines, bh)
        assert f"{alice}: hi bob from the CLI" in got, got

        # other commands run in the daemon with its device
        who = await asyncio.to_thread(cli, ah, "whoami", "--json")
        assert f'"address": "{alice}"' in who.stdout and '"display_name"' in who.stdout
        hist = (await asyncio.to_thread(cli, ah, "history", bob)).stdout.splitlines()
        assert any(f" > {alice}: hi bob from the CLI [" in line for line in hist), hist

        # right after those commands a new message still arrives at the daemon live
        await asyncio.to_thread(cli, bh, "send", alice, "still listening?")
        ev = await ws.next(
            lambda e: e["type"] == "message" and e["message"]["text"] == "still listening?"
        )
        assert ev["message"]["outgoing"] is False
        # ... over the same connection: it never went away while the CLI ran
        dropped = [
            e for e in ws.events if e["type"] == "state" and e["state"]["connection"] != "online"
        ]
        assert dropped == [], dropped

    # the default reader prints only the new one; another reader has its own cursor
    assert recv_lines(ah) == [f"{bob}: still listening?"]
    assert recv_lines(ah, "--client", "phone-script") == [
        f"{bob}: hello before the app",
        f"{bob}: still listening?",
    ]
    assert recv_lines(ah, "--client", "phone-script") == []

    # the daemon and the CLI share one store: a text typed in the app is in CLI history, with
    # a short id that `edit` accepts through the daemon
    msg = d.send(bob, "typed in the app")
    wait_message(d, bob, lambda m: m["id"] == msg["id"] and m["status"] != "pending")
    short = msg["id"][:8]
    lines = cli(ah, "history", bob, "--no-mark-read").stdout.splitlines()
    assert any(line.startswith(f"{short} > ") and "typed in the app" in line for line in lines)
    assert cli(ah, "edit", bob, short, "edited from the CLI").stdout.strip() == "edited"
    wait_message(d, bob, lambda m: m["id"] == msg["id"] and m["text"] == "edited from the CLI")

    # settings and verify go through the core: the app's own view changes at once
    out = json.loads(cli(ah, "settings", "--read-receipts", "off", "--json").stdout)
    assert out == {"read_receipts": "off", "delivery_receipts": "on"}
    assert d.state()["settings"]["read_receipts"] == "off"
    text = cli(ah, "verify", bob, "--confirm").stdout
    assert f"safety number with {bob}:" in text and text.strip().endswith("verified")
    contacts = {c["address"]: c for c in d.api("GET", "/api/contacts")[1]}
    assert contacts[bob]["verified"] is True


def test_another_uid_is_refused(world: dict[str, Any]) -> None:
    ah: Path = world["ah"]
    sock = ah / "app.sock"
    # loosen the modes so only SO_PEERCRED stands between another user and the daemon
    ah.chmod(0o711)
    sock.chmod(0o666)
    theirs = ask_as(NOBODY, sock, WHOAMI)
    assert "another user (forbidden)" in theirs and '"rc": 1' in theirs, theirs
    assert world["alice"] not in theirs  # nothing about the device leaked
    # the same request from our own uid is answered
    mine = ask_as(None, sock, WHOAMI)
    assert world["alice"] in mine and '"rc": 0' in mine, mine


def test_stale_socket_and_bad_requests(world: dict[str, Any]) -> None:
    d: DaemonProc = world["d"]
    ah: Path = world["ah"]
    sock = ah / "app.sock"
    # bad JSON and an oversized line get an error line, and the daemon keeps serving
    for payload in (b"not json\n", b"[1, 2]\n", b"{" + b"x" * (1 << 20) + b"\n"):
        r = subprocess.run(
            [sys.executable, "-c", _SEND_RAW, str(sock)],
            input=payload,
            capture_output=True,
            timeout=30,
        )
        assert b'"rc": 2' in r.stdout and b"error:" in r.stdout, r.stdout
    assert cli(ah, "whoami").stdout.startswith(world["alice"])

    # SIGKILL leaves the socket file behind: the CLI runs standalone, a new daemon replaces it
    d.kill()
    assert sock.exists()
    cli(world["bh"], "send", world["alice"], "while the app was down")
    standalone = cli(ah, "recv", "--wait", "0.5")
    assert standalone.stdout.strip() == f"{world['bob']}: while the app was down"
    url = cli(ah, "app", "--url", check=False)
    assert url.returncode == 1 and "no app running" in url.stderr
    d.start()
    wait_until(lambda: cli(ah, "app", "--url").stdout.strip() == d.url, 20, "the new daemon")
    # what the standalone recv printed is not printed again through the app (one cursor)
    assert recv_lines(ah) == []


_SEND_RAW = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
try:
    s.sendall(sys.stdin.buffer.read())
    s.shutdown(socket.SHUT_WR)
except OSError:
    pass  # the daemon stopped reading an oversized request; its answer is still there
sys.stdout.buffer.write(s.makefile("rb").read())
"""


def test_send_through_the_daemon_queues_while_the_node_is_down(world: dict[str, Any]) -> None:
    d: DaemonProc = world["d"]
    node: NodeProc = world["node"]
    ah, bh, alice, bob = world["ah"], world["bh"], world["alice"], world["bob"]
    node.stop()
    d.wait_state(lambda s: s["connection"] == "offline", 30, "the daemon to notice")
    queued = cli(ah, "send", bob, "typed while the node was down")
    assert queued.stdout.strip() == "queued"
    assert f"the home node at {node.url} is unreachable" in queued.stderr
    node.start()
    d.wait_state(lambda s: s["connection"] == "online", 30, "the daemon to reconnect")

    got: list[str] = []

    def arrived() -> bool:
        got.extend(recv_lines(bh))
        return f"{alice}: typed while the node was down" in got

    wait_until(arrived, 30, "bob to receive the queued text")
    assert got.count(f"{alice}: typed while the node was down") == 1


def test_device_link_and_remove_through_the_daemon(world: dict[str, Any], base: Path) -> None:
    ah: Path = world["ah"]
    argv = ["device", "link", "--home", str(ah), "--timeout", "1m"]
    link = subprocess.Popen(
        [sys.executable, "-m", "client.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert link.stdout is not None
        code = link.stdout.readline().strip()
        assert code.startswith("haven:link:"), code
        phone = base / "dev-phone"
        haven("join", "--link", code, "--name", "phone", "--home", str(phone))
        out, err = link.communicate(timeout=60)
        assert link.returncode == 0, err
        assert out.strip().startswith("linked phone (")
    finally:
        if link.poll() is None:
            link.kill()
            link.wait(timeout=20)
    phone_id = json.loads(haven("whoami", "--json", "--home", str(phone)).stdout)["device_id"]
    # a prefix of the phone's id removes it, through the daemon
    removed = cli(ah, "device", "remove", phone_id[:9])
    assert removed.stdout.strip() == f"removed {phone_id[:8]}"
    ids = [d["id"] for d in json.loads(cli(ah, "device", "list", "--json").stdout)]
    assert phone_id not in ids and len(ids) == 1


def test_commands_that_make_no_sense_through_the_daemon(
    base: Path, app_node: NodeProc, daemons: list[DaemonProc]
) -> None:
    node = app_node
    home = base / "dev-new"
    d = DaemonProc(home)  # an empty home: the app waits for onboarding
    daemons.append(d)
    d.start()
    wait_until(lambda: (home / "app.sock").exists(), 20, "the app socket")
    joined = cli(home, "join", invite(node, "carol"), check=False)
    assert joined.returncode == 1 and joined.stderr.strip().endswith("(app_running)")
    assert "join in its window" in joined.stderr
    who = cli(home, "whoami", check=False)
    assert who.returncode == 1 and who.stderr.strip().endswith("(not_joined)")
    assert d.state()["joined"] is False  # nothing was created behind the app's back
    d.join(invite(node, "dave"), "Dave")
    pw = cli(home, "passphrase", "--remove", check=False)
    assert pw.returncode == 1 and pw.stderr.strip().endswith("(app_running)")
    assert cli(home, "whoami").stdout.startswith(f"dave@{node.host}")
