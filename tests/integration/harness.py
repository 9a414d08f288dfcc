"""Start real nodes (subprocesses of ``haven node serve``) on 127.0.0.1 with free ports.

Used by every integration test. Nodes are real processes: they can be stopped with SIGTERM,
killed with SIGKILL and restarted on the same home and port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgpack

from ..ports import free_port

if TYPE_CHECKING:
    from client.device import Device

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["free_port"]  # re-exported: tests import it from here


def haven(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the ``haven`` CLI in a subprocess (the same interpreter as the tests)."""
    proc = subprocess.run(
        [sys.executable, "-m", "client.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"haven {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def wait_until(pred: Any, timeout: float = 20, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def async_wait_until(pred: Any, timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@dataclass
class NodeProc:
    """A node home directory plus (while running) its ``haven node serve`` process."""

    home: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    scheme: str = "http"
    serve_args: tuple[str, ...] = ()  # extra ``node serve`` arguments (e.g. ``--workers 2``)
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.home.parent / f"{self.home.name}.log"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @classmethod
    def create(cls, base: Path, name: str, *extra: str, scheme: str = "http") -> NodeProc:
        port = free_port()
        home = base / name
        haven(
            "node",
            "init",
            "--home",
            str(home),
            "--public-url",
            f"{scheme}://127.0.0.1:{port}",
            "--listen",
            f"127.0.0.1:{port}",
            *extra,
        )
        return cls(home, port, scheme=scheme)

    def launcher(self) -> list[str]:
        """What runs before ``python -m client.cli node serve`` (nothing here; a subclass may
        wrap the node, e.g. in a mount namespace)."""
        return []

    def start(self) -> NodeProc:
        prefix = self.launcher()
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                *("-m", "client.cli", "node", "serve", "--home", str(self.home)),
                *self.serve_args,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
        logf.close()
        wait_until(self._listening, 20, f"node {self.home.name} to listen")
        return self

    def running(self) -> NodeProc:
        """This node, started again if it is not running (a test sharing it stopped it)."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def _listening(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node exited early:\n{self.log.read_text()}")
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=20)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.proc = None

    def invite(self, name: str) -> str:
        return (
            haven("node", "invite", "--home", str(self.home), name).stdout.strip().splitlines()[-1]
        )

    def status(self) -> dict[str, Any]:
        return json.loads(haven("node", "status", "--home", str(self.home), "--json").stdout)

    def stats(self) -> dict[str, Any]:
        """Aggregate counters from the running node (``GET /haven/v1/stats``, loopback only)."""
        import urllib.request

        with urllib.request.urlopen(self.url + "/haven/v1/stats", timeout=10) as r:
            return msgpack.unpackb(r.read())  # type: ignore[no-any-return]

    def error_count(self, key: str) -> int:
        return int(self.stats()["errors"].get(key, 0))


def join(node: NodeProc, base: Path, name: str) -> tuple[Path, str]:
    """Create a device for ``name`` on ``node``; returns (device home, address)."""
    home = base / f"dev-{name}"
    out = haven("join", node.invite(name), "--home", str(home)).stdout.strip().splitlines()[-1]
    return home, out


def recv(home: Path, wait: float = 1.0) -> list[dict[str, Any]]:
    out = haven("recv", "--home", str(home), "--wait", str(wait), "--json").stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def new_device(node: NodeProc, home: Path, name: str, **kw: Any) -> Device:
    """A device of a new account ``name`` on ``node`` (joined with a fresh invite); ``kw`` goes
    to :class:`client.device.Device` (a clock, for instance)."""
    from client.device import Device

    dev = Device(str(home), **kw)
    await dev.join(node.invite(name), name=f"{name}-phone")
    return dev


async def linked(dev: Device, home: Path, name: str, **kw: Any) -> Device:
    """A second device of ``dev``'s account, linked end to end (docs/protocol.md §3.5)."""
    from client.device import Device
    from client.linking import link_device

    code: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    linker = asyncio.create_task(link_device(dev, code.set_result, timeout_s=30))
    new = Device(str(home), **kw)
    await new.join(await code, name=name)
    await linker
    return new
