"""Free loopback ports for test and benchmark nodes, outside the kernel's ephemeral range.

A port taken with ``bind(("127.0.0.1", 0))`` comes from the ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``), the same range the kernel draws the local port
of every outgoing connection from. Between picking such a port and a node binding it (or a
node restarting on it after kill -9), any outgoing connection of the run (to PostgreSQL, to a
peer node) may take it, and the node fails with "address already in use". Ports here come from
the window just below the ephemeral range, which the kernel never hands out by itself, starting
at an offset drawn from the process id so concurrent runs rarely probe the same ports, and each
is handed out once per process.
"""

from __future__ import annotations

import os
import socket
import threading

_WINDOW = 12000
_lock = threading.Lock()
_next: int | None = None


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


def free_port() -> int:
    """A loopback port nothing is bound to, never the same twice in this process."""
    global _next
    lo, hi = _window()
    span = hi - lo + 1
    with _lock:
        if _next is None:
            _next = (os.getpid() * 7919) % span
        for _ in range(span):
            port = lo + _next % span
            _next += 1
            if _bindable(port):
                return port
    raise RuntimeError("no free loopback port below the ephemeral range")


def free_port_run(n: int) -> int:
    """A base port with ``n`` consecutive free ports (each handed out once)."""
    global _next
    lo, hi = _window()
    span = hi - lo + 1
    with _lock:
        if _next is None:
            _next = (os.getpid() * 7919) % span
        for _ in range(span):
            base = lo + _next % span
            if base + n - 1 > hi:
                _next += hi - base + 1
                continue
            _next += n
            if all(_bindable(base + i) for i in range(n)):
                return base
    raise RuntimeError("no run of free loopback ports below the ephemeral range")
