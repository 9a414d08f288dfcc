"""LAN discovery end to end: real zeroconf processes on a bridged LAN of network namespaces.

Hosts 0 and 1 run ``lan_probe.py`` with an announcer and a browser; host 2 only browses and also
announces a malformed ``_haven._tcp`` service. The test checks, in order:

1. 0 and 1 find each other: the blinded id is recognised with the right key and the candidate
   carries the peer's 169.254 address and port; host 2 (which announces nothing valid) finds both.
2. The malformed announcement is ignored (logged, never a candidate).
3. Unplugging host 1 is noticed: zeroconf itself would keep the service listed for ~19 minutes
   (it raises PTR TTLs to 1125 s), so this relies on LanBrowser's recheck of the short-TTL
   SRV/TXT/A records; plugging it back in makes it a candidate again.
4. An hour later host 1 announces a new blinded id (refresh), still recognised; the old id is
   removed.
5. A clean shutdown (goodbye packets) removes host 1 at host 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from federation.lanid import HOUR_MS, recognise
from tests.integration.netns import NetnsLan

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("lan_probe.py")
# Short TTLs and rechecks keep the test fast; production uses ttl 120 s, recheck 30 s.
PROBE_TIMING = ["--ttl", "2", "--recheck", "0.5", "--resolve-timeout", "1.5"]
DEADLINE_S = 15.0

Event = dict[str, Any]


class Probe:
    """One lan_probe.py process in a namespace; its JSON events are collected by a thread."""

    def __init__(self, lan: NetnsLan, i: int, args: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        argv = [*lan.exec_prefix(i), sys.executable, str(PROBE), *args]
        self.name = f"host{i}"
        self.events: list[Event] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        for stream, sink in ((self.proc.stdout, self._on_stdout), (self.proc.stderr, self._on_err)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    def _pump(self, stream: IO[str], sink: Callable[[str], None]) -> None:
        for line in stream:
            sink(line.rstrip("\n"))
        with self._cond:
            self._cond.notify_all()

    def _on_stdout(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            event = {"event": "garbled", "line": line}
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def _on_err(self, line: str) -> None:
        with self._cond:
            self.stderr.append(line)

    def wait_for(self, what: str, match: Callable[[Event], bool], start: int = 0) -> int:
        """Block until an event from index ``start`` on matches; return its index."""
        deadline = time.monotonic() + DEADLINE_S
        with self._cond:
            while True:
                for idx in range(start, len(self.events)):
                    if match(self.events[idx]):
                        return idx
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._more_output()):
                    pytest.fail(f"{self.name}: no {what} within {DEADLINE_S}s\n{self.dump()}")
                self._cond.wait(min(remaining, 0.5))

    def _more_output(self) -> bool:
        return self.proc.stdout is not None and not self.proc.stdout.closed

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def announced(self, start: int = 0) -> tuple[int, str]:
        idx = self.wait_for("announcement", lambda e: e["event"] == "announced", start)
        return idx, str(self.events[idx]["blinded"])

    def dump(self) -> str:
        events = "\n".join(json.dumps(e) for e in self.events[-40:])
        return f"--- events\n{events}\n--- stderr\n" + "\n".join(self.stderr[-40:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def lan() -> Iterator[NetnsLan]:
    with NetnsLan(3) as lan:
        yield lan


def test_lan_peers_discover_each_other_and_notice_departures(lan: NetnsLan) -> None:
    keys = {"n0": os.urandom(32), "n1": os.urandom(32)}
    ports = {"n0": 7100, "n1": 7101}
    probes = [
        Probe(lan, 0, ["--key", keys["n0"].hex(), "--port", "7100", *PROBE_TIMING]),
        # Host 1 restricts itself to eth0 by name; host 0 uses every interface.
        Probe(
            lan, 1, ["--key", keys["n1"].hex(), "--port", "7101", "--iface", "eth0", *PROBE_TIMING]
        ),
        Probe(lan, 2, ["--garbage", *PROBE_TIMING]),
    ]
    p0, p1, p2 = probes

    def now_ms() -> int:
        return time.time_ns() // 1_000_000

    def is_candidate(node: str, host: int, blinded: str | None = None) -> Callable[[Event], bool]:
        def match(e: Event) -> bool:
            return (
                e["event"] == "candidate"
                and recognise(e["blinded"], keys, now_ms()) == node
                and (blinded is None or e["blinded"] == blinded)
                and e["addresses"] == [lan.host_ip(host)]
                and e["port"] == ports[node]
                and e["version"] == 1
            )

        return match

    def is_removed(blinded: str) -> Callable[[Event], bool]:
        return lambda e: e["event"] == "removed" and e["blinded"] == blinded

    try:
        _, b0 = p0.announced()
        _, b1 = p1.announced()
        assert recognise(b0, keys, now_ms()) == "n0" and recognise(b1, keys, now_ms()) == "n1"

        # 1. Mutual discovery, with the right address and port; a silent third host sees both.
        p0.wait_for("candidate n1", is_candidate("n1", 1, b1))
        p1.wait_for("candidate n0", is_candidate("n0", 0, b0))
        p2.wait_for("candidate n0", is_candidate("n0", 0, b0))
        p2.wait_for("candidate n1", is_candidate("n1", 1, b1))

        # 2. The malformed announcement from host 2 is seen and ignored.
        p0.wait_for("ignored garbage", lambda e: "malformed" in e.get("msg", ""))

        # 3. Unplug host 1: both sides notice; plug it back in: both find each other again.
        mark0, mark1 = len(p0.events), len(p1.events)
        lan.link_down(1)
        p0.wait_for("removal of n1 after unplug", is_removed(b1), mark0)
        p1.wait_for("removal of n0 after unplug", is_removed(b0), mark1)
        mark0 = len(p0.events)
        lan.link_up(1)
        p0.wait_for("n1 again after replug", is_candidate("n1", 1, b1), mark0)

        # 4. An hour later host 1 announces a new blinded id, recognisable; the old one goes.
        mark0 = len(p0.events)
        p1.send(f"advance {HOUR_MS}")
        _, b1_next = p1.announced(mark1 + 1)
        assert b1_next != b1
        assert recognise(b1_next, keys, now_ms()) == "n1"  # within the ±1 h drift window
        p0.wait_for("n1 under its new id", is_candidate("n1", 1, b1_next), mark0)
        p0.wait_for("removal of n1's old id", is_removed(b1), mark0)

        # 5. Clean shutdown: goodbyes remove host 1 at host 0.
        mark0 = len(p0.events)
        p1.send("quit")
        p1.wait_for("clean close", lambda e: e["event"] == "closed")
        assert p1.proc.wait(timeout=10) == 0
        p0.wait_for("removal of n1 after goodbye", is_removed(b1_next), mark0)

        # Nothing unrecognisable ever surfaced as a candidate (the garbage service included).
        for probe in probes:
            for e in probe.events:
                if e["event"] == "candidate":
                    assert recognise(e["blinded"], keys, now_ms()) is not None, probe.dump()
    finally:
        for probe in probes:
            probe.stop()
