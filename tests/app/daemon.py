"""``DaemonProc``: a real ``haven app`` daemon as a subprocess, for the app tests.

The daemon is started with ``--listen 127.0.0.1:0``; the first line it prints on stdout is the
URL ``http://127.0.0.1:PORT/#k=SECRET``, from which :attr:`DaemonProc.port` and
:attr:`DaemonProc.secret` come. Its stderr goes to a log file (``stderr_text()``), so tests can
check that the secret never appears there. Only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.integration.harness import ROOT, wait_until


class ApiError(AssertionError):
    """An API call answered with an unexpected status."""


class DaemonProc:
    """A device home plus (while running) its ``haven app`` process.

    Args:
        home: the device home (may not exist yet: the daemon then starts unjoined).
        env: extra environment variables (e.g. ``HAVEN_PASSPHRASE``).
        listen: the ``--listen`` argument.
        args: more arguments for ``haven app`` (e.g. ``["--open"]``).
    """

    def __init__(
        self,
        home: Path,
        *,
        env: dict[str, str] | None = None,
        listen: str = "127.0.0.1:0",
        args: list[str] | None = None,
    ) -> None:
        self.home = Path(home)
        self.env = dict(env or {})
        self.listen = listen
        self.args = list(args or [])
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.home.parent / f"{self.home.name}.app.log"
        self.url = ""
        self.port = 0
        self.secret = ""
        self.extra_stdout: list[str] = []  # anything after the URL line (must stay empty)
        self._lines: queue.Queue[str | None] = queue.Queue()

    # ---- process -----------------------------------------------------------------------------

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "client.cli",
            "app",
            "--home",
            str(self.home),
            "--listen",
            self.listen,
            *self.args,
        ]

    def start(self, timeout: float = 30) -> DaemonProc:
        """Start the daemon and wait for its URL line (and for ``/api/state`` to answer)."""
        self.home.parent.mkdir(parents=True, exist_ok=True)
        logf = open(self.log, "ab")
        env = os.environ | {"PYTHONPATH": str(ROOT)} | self.env
        if "HAVEN_PASSPHRASE" not in self.env:
            env.pop("HAVEN_PASSPHRASE", None)
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=logf,
            cwd=ROOT,
            env=env,
        )
        logf.close()
        self._lines = queue.Queue()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise AssertionError(f"daemon printed no URL in time:\n{self.stderr_text()}") from None
        if line is None:
            code = self.proc.wait(timeout=10)
            raise AssertionError(f"daemon exited ({code}) before its URL:\n{self.stderr_text()}")
        self.url = line
        base, _, frag = line.partition("/#k=")
        self.secret = frag
        self.port = int(base.rsplit(":", 1)[1])
        wait_until(lambda: self._answers(), 20, "the daemon's API to answer")
        return self

    def _read_stdout(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        first = True
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if first:
                self._lines.put(line)
                first = False
            else:
                self.extra_stdout.append(line)
        if first:
            self._lines.put(None)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited early:\n{self.stderr_text()}")
        try:
            status, _ = self.api("GET", "/api/state", expect=None)
        except OSError:
            return False
        return status == 200

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM and wait; returns the exit code."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            code = self.proc.wait(timeout=timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.proc = None

    def stderr_text(self) -> str:
        return self.log.read_text("utf-8", "replace") if self.log.exists() else ""

    # ---- HTTP --------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        """``http://127.0.0.1:PORT`` (also the Origin the daemon accepts)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def origin(self) -> str:
        return self.base

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 30,
    ) -> tuple[int, dict[str, str], bytes]:
        """A raw HTTP request to 127.0.0.1:PORT with exactly ``headers`` (plus Host unless
        given). Returns (status, headers with lower-case names, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            skip_host = any(k.lower() == "host" for k in hdrs)
            conn.putrequest(method, path, skip_host=skip_host, skip_accept_encoding=True)
            for k, v in hdrs.items():
                conn.putheader(k, v)
            if body is not None:
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body)
            r = conn.getresponse()
            data = r.read()
            out: dict[str, str] = {}
            for k, v in r.getheaders():
                k = k.lower()
                out[k] = f"{out[k]}, {v}" if k in out else v
            return r.status, out, data
        finally:
            conn.close()

    def api(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        expect: int | None = 200,
        timeout: float = 30,
    ) -> tuple[int, Any]:
        """Call the local API as the page would: ``X-Haven-Key``, our Origin on writes, JSON.

        Returns (status, decoded JSON body). With ``expect`` (default 200) any other status
        raises :class:`ApiError`; pass ``expect=None`` to get whatever came back.
        """
        hdrs = {"X-Haven-Key": self.secret if key is None else key, "Accept": "application/json"}
        if method in ("POST", "PUT", "PATCH", "DELETE"):
            hdrs["Origin"] = self.origin
        body = None
        if json_body is not None:
            body = json.dumps(json_body).encode()
            hdrs["Content-Type"] = "application/json"
        hdrs.update(headers or {})
        status, _, data = self.request(method, path, body, hdrs, timeout=timeout)
        try:
            obj = json.loads(data) if data else None
        except ValueError:
            obj = data.decode("utf-8", "replace")
        if expect is not None and status != expect:
            raise ApiError(f"{method} {path} -> {status} {obj!r} (wanted {expect})")
        return status, obj

    # ---- convenience -------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return self.api("GET", "/api/state")[1]  # type: ignore[no-any-return]

    def join(self, invite: str, display_name: str, passphrase: str | None = None) -> dict[str, Any]:
        """Onboarding through the API; returns the State."""
        body: dict[str, Any] = {"invite": invite, "display_name": display_name}
        if passphrase is not None:
            body["passphrase"] = passphrase
        return self.api("POST", "/api/join", body, timeout=60)[1]  # type: ignore[no-any-return]

    @property
    def address(self) -> str:
        me = self.state()["me"]
        assert me is not None, "not joined"
        return str(me["address"])

    def open_chat(self, address: str) -> dict[str, Any]:
        return self.api("POST", "/api/chats", {"address": address}, timeout=60)[1]  # type: ignore[no-any-return]

    def send(self, address: str, text: str) -> dict[str, Any]:
        path = f"/api/chats/{quote(address, safe='')}/messages"
        return self.api("POST", path, {"text": text})[1]  # type: ignore[no-any-return]

    def messages(self, address: str) -> list[dict[str, Any]]:
        path = f"/api/chats/{quote(address, safe='')}/messages"
        return self.api("GET", path)[1]  # type: ignore[no-any-return]

    def wait_state(self, pred: Any, timeout: float = 20, what: str = "daemon state") -> Any:
        """Poll ``/api/state`` until ``pred(state)`` holds; returns the state."""

        def check() -> dict[str, Any] | None:
            s = self.state()
            return s if pred(s) else None

        return wait_until(check, timeout, what)

    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/ws"


class EventSocket:
    """An authenticated ``/api/ws`` client (aiohttp) that collects the daemon's events.

    Use ``async with EventSocket(d) as ws:``; :meth:`next` waits for the next event matching a
    predicate (events seen earlier are kept in :attr:`events`).
    """

    def __init__(self, d: DaemonProc, *, origin: str | None = None, auth: bool = True) -> None:
        self.d = d
        self.origin = d.origin if origin is None else origin
        self.auth = auth
        self.events: list[dict[str, Any]] = []
        self._seen = 0
        self.hello: dict[str, Any] | None = None
        self._session: Any = None
        self.ws: Any = None

    async def __aenter__(self) -> EventSocket:
        import aiohttp

        self._session = aiohttp.ClientSession()
        headers = {"Origin": self.origin} if self.origin else {}
        self.ws = await self._session.ws_connect(self.d.ws_url(), headers=headers)
        if self.auth:
            await self.ws.send_json({"type": "auth", "key": self.d.secret})
            self.hello = await self.next(lambda e: e["type"] == "hello")
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self._session.close()

    async def next(self, pred: Any, timeout: float = 20) -> dict[str, Any]:
        """The first event not yet returned that satisfies ``pred`` (waits up to ``timeout``)."""
        import asyncio

        import aiohttp

        async with asyncio.timeout(timeout):
            while True:
                while self._seen < len(self.events):
                    e = self.events[self._seen]
                    self._seen += 1
                    if pred(e):
                        return e
                msg = await self.ws.receive()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    raise AssertionError(f"event socket closed ({msg.type}, {msg.data})")
                self.events.append(json.loads(msg.data))

    def rewind(self) -> None:
        """Let :meth:`next` look at every event received so far again."""
        self._seen = 0


def wait_message(
    d: DaemonProc, address: str, pred: Any, timeout: float = 20, what: str = "a message"
) -> dict[str, Any]:
    """Poll the messages of a chat until one satisfies ``pred``; returns it."""
    deadline = time.monotonic() + timeout

    def find() -> dict[str, Any] | None:
        for m in d.messages(address):
            if pred(m):
                return m
        return None

    while True:
        m = find()
        if m is not None:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
