"""``haven`` CLI commands as real processes, without paying an interpreter start for each.

A session-wide fork server imports ``client.cli`` (and the node and app commands) once; every
command is then a fresh process forked from it: its own pid, stdin on /dev/null, stdout and
stderr captured, the caller's environment and working directory, and the exit status of
``client.cli.main``. That is what ``python -m client.cli ARGS`` does, minus the ~0.5 s of
start-up and imports (most of the time of a CLI-heavy test on a loaded machine).

:func:`haven` has the signature and result of :func:`tests.integration.harness.haven`;
:func:`create_node`, :func:`invite`, :func:`join` and :func:`recv` mirror ``NodeProc.create``,
``NodeProc.invite``, ``harness.join`` and ``harness.recv``.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from tests.integration.harness import ROOT, NodeProc, free_port

# The server: single-threaded, so forking it is safe. Per request it forks a keeper, which forks
# the command and reports its pid, then (once it exited) its status and output.
_SERVER = r"""
import json, os, select, socket, sys, tempfile, traceback
import client.cli, client.app.main, node.cli  # the imports every command would pay for

def command(req, out, err):
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    code = 1
    try:
        code = client.cli.main(req["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # what the interpreter would print on its way out
        traceback.print_exc()
    finally:
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        os._exit(code)

def keeper(conn):
    req = json.loads(conn.makefile("rb").readline())
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    pid = os.fork()
    if pid == 0:
        conn.close()
        command(req, out, err)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    _, status = os.waitpid(pid, 0)
    out.seek(0)
    err.seek(0)
    res = {"rc": os.waitstatus_to_exitcode(status),
           "out": out.read().decode("utf-8", "replace"),
           "err": err.read().decode("utf-8", "replace")}
    conn.sendall(json.dumps(res).encode() + b"\n")

srv = socket.socket(socket.AF_UNIX)
srv.bind(sys.argv[1])
srv.listen(16)
print("ready", flush=True)
while True:
    ready, _, _ = select.select([srv, sys.stdin], [], [])
    if sys.stdin in ready:  # the test process went away (or closed us): stop
        break
    conn, _ = srv.accept()
    if os.fork() == 0:
        srv.close()
        try:
            keeper(conn)
        finally:
            os._exit(0)
    conn.close()
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass
"""

_lock = threading.Lock()
_server: tuple[subprocess.Popen[bytes], str] | None = None


def _socket_path() -> str:
    global _server
    with _lock:
        if _server is None or _server[0].poll() is not None:
            d = tempfile.mkdtemp(prefix="haven-fork-", dir="/tmp")
            path = os.path.join(d, "s")
            proc = subprocess.Popen(
                [sys.executable, "-c", _SERVER, path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=ROOT,
                env=os.environ | {"PYTHONPATH": str(ROOT)},
            )
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != b"ready":
                raise AssertionError("the CLI fork server did not start")
            _server = (proc, path)
            atexit.register(_stop, proc, d)
        return _server[1]


def _stop(proc: subprocess.Popen[bytes], d: str) -> None:
    if proc.poll() is None:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    shutil.rmtree(d, ignore_errors=True)


def run(argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``haven ARGV`` as a forked process; raises ``subprocess.TimeoutExpired`` (after killing
    it) if it runs longer than ``timeout``."""
    req = {"argv": argv, "env": dict(os.environ | {"PYTHONPATH": str(ROOT)}), "cwd": str(ROOT)}
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(_socket_path())
        s.sendall(json.dumps(req).encode() + b"\n")
        f = s.makefile("rb")
        pid = int(json.loads(f.readline())["pid"])
        try:
            res: dict[str, Any] = json.loads(f.readline())
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            raise subprocess.TimeoutExpired(["haven", *argv], timeout) from None
    return subprocess.CompletedProcess(["haven", *argv], res["rc"], res["out"], res["err"])


def haven(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the ``haven`` CLI (as ``harness.haven`` does, in a forked process)."""
    proc = run(list(args), timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"haven {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def invite(node: NodeProc, name: str) -> str:
    """An invite for ``name`` on ``node`` (``NodeProc.invite``)."""
    return haven("node", "invite", "--home", str(node.home), name).stdout.strip().splitlines()[-1]


def join(node: NodeProc, base: Path, name: str) -> tuple[Path, str]:
    """Create a device for ``name`` on ``node``; returns (device home, address)."""
    home = base / f"dev-{name}"
    out = haven("join", invite(node, name), "--home", str(home)).stdout.strip().splitlines()[-1]
    return home, out


def recv(home: Path, wait: float = 1.0) -> list[dict[str, Any]]:
    """``haven recv --json`` on ``home`` (``harness.recv``)."""
    out = haven("recv", "--home", str(home), "--wait", str(wait), "--json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def create_node(base: Path, name: str, *extra: str) -> NodeProc:
    """``haven node init`` on a free port (``NodeProc.create``); not started yet."""
    port = free_port()
    home = base / name
    url = f"http://127.0.0.1:{port}"
    haven("node", "init", "--home", str(home), "--public-url", url, "--listen", url[7:], *extra)
    return NodeProc(home, port)
