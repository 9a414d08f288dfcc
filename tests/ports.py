"""Free loopback ports for test and benchmark nodes, outside the kernel's ephemeral range.

A port taken with ``bind(("127.0.0.1", 0))`` comes from the ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``), the same range the kernel draws the local port
of every outgoing connection from. Between picking such a port and a node binding it (or a
node restarting on it after kill -9), any outgoing connection of the run (to PostgreSQL, to a
peer node) may take it, and the node fails with "address already in use". Ports here come from
the window just below the ephemeral range, which the kernel never hands out by itself.

Every process of a run (each pytest-xdist worker, each benchmark subprocess) draws from one
shared cursor, a small file under the temp directory locked with ``flock``, so no two of them
hand out the same port until the whole window has been used; a port something is bound to
is skipped.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from collections.abc import Callable

_WINDOW = 12000
_CURSOR = os.path.join(tempfile.gettempdir(), "haven-test-ports.cursor")


def _window() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    low = max(low, 1024 + 2000)
    return max(1024, low - _WINDOW), low - 1


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _take(n: int, fits: Callable[[int], bool]) -> int:
    """Advance the shared cursor to the next base of ``n`` ports for which ``fits`` holds."""
    lo, hi = _window()
    span = hi - lo + 1
    fd = os.open(_CURSOR, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        raw = os.pread(fd, 32, 0).strip()
        cursor = int(raw) if raw.isdigit() else (os.getpid() * 7919) % span
        try:
            for _ in range(span):
                base = lo + cursor % span
                if base + n - 1 > hi:
                    cursor += hi - base + 1
                    continue
                cursor += n
                if fits(base):
                    return base
        finally:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(cursor % span).encode(), 0)
    finally:
        os.close(fd)
    raise RuntimeError("no free loopback port below the ephemeral range")


def free_port() -> int:
    """A loopback port nothing is bound to, not handed out before in this window's cycle."""
    return _take(1, _bindable)


def free_port_run(n: int) -> int:
    """A base port with ``n`` consecutive free ports."""
    return _take(n, lambda base: all(_bindable(base + i) for i in range(n)))
