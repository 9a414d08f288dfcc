"""Injected time. Nothing outside this module reads the wall clock; tests use :class:`FakeClock`."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Milliseconds since the epoch, as this process believes it."""
        ...


class SystemClock:
    """The real wall clock, optionally shifted by ``offset_ms`` (for drifting-clock tests)."""

    def __init__(self, offset_ms: int = 0) -> None:
        self.offset_ms = offset_ms

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.offset_ms


class FakeClock:
    """A clock that only moves when a test advances it."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms

    def now_ms(self) -> int:
        return self._now

    def advance(self, ms: int) -> None:
        self._now += ms


def parse_duration(text: str) -> int:
    """Parse ``30s``, ``10m``, ``1h``, ``7d`` (or plain seconds) into milliseconds.

    Raises:
        ValueError: on anything else, including zero or negative durations.
    """
    units = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
    t = text.strip().lower()
    for suffix in ("ms", "s", "m", "h", "d"):
        if t.endswith(suffix) and t[: -len(suffix)].isdigit():
            value = int(t[: -len(suffix)]) * units[suffix]
            break
    else:
        if not t.isdigit():
            raise ValueError(f"bad duration {text!r}: use e.g. 30s, 10m, 1h, 7d")
        value = int(t) * 1000
    if value <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return value
