"""Freshness and replay checks for signed federation requests (docs/protocol.md §4.3).

Pure: every method takes ``now`` (ms). The receiver judges ``created`` against *its own* clock;
the sender stamps ``created`` in the receiver's clock using the offset it measured from the
receiver's descriptor, so nodes with drifting clocks (offline LANs) still agree.

The nonce window lives in memory only (no per-request log on disk), so a restart forgets it.
Replays across a restart are refused instead by ``not_before``, the process start: a request
``created`` before it cannot be fresh. Such a request is answered ``clock_skew`` with the
receiver's clock, so an honest sender re-stamps and retries once (§4.3).
"""

from __future__ import annotations

from collections import OrderedDict

from .errors import ClockSkew, RateLimited, Replay

SKEW_MS = 60_000


class NonceWindow:
    """Remembers ``(origin, nonce)`` pairs for the skew window; refuses stale, future or repeats."""

    def __init__(
        self, skew_ms: int = SKEW_MS, max_entries: int = 1_000_000, not_before: int = 0
    ) -> None:
        self.skew_ms = skew_ms
        self.max_entries = max_entries
        self.not_before = not_before  # process start (ms, own clock): older requests refused
        self._seen: OrderedDict[tuple[str, bytes], int] = OrderedDict()

    def check_fresh(self, created: int, now: int) -> None:
        """Raise ClockSkew unless ``created`` is within ±skew of ``now`` and not earlier than
        the process start (a request from before a restart may be a replay). Cheap; no state."""
        if abs(created - now) > self.skew_ms:
            raise ClockSkew(f"request time is off by {(created - now) // 1000} s")
        if created < self.not_before:
            raise ClockSkew("request is older than this node's start: re-stamp it")

    def check_and_remember(self, origin: str, nonce: bytes, created: int, now: int) -> None:
        """Raise Replay if the nonce was already used inside the window; else remember it."""
        self._expire(now)
        key = (origin, nonce)
        if key in self._seen:
            raise Replay("request nonce already used")
        if len(self._seen) >= self.max_entries:
            raise RateLimited("replay window full")
        self._seen[key] = max(created, now) + self.skew_ms

    def _expire(self, now: int) -> None:
        # Entries are inserted in roughly increasing expiry order; drop from the front.
        while self._seen:
            key, until = next(iter(self._seen.items()))
            if until > now:
                break
            del self._seen[key]

    def __len__(self) -> int:
        return len(self._seen)


class TokenBucket:
    """Per-key token bucket: ``rate`` tokens per second up to ``burst``. Pure, takes ``now``."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._state: dict[str, tuple[float, int]] = {}

    def take(self, key: str, now: int, cost: float = 1.0) -> bool:
        tokens, last = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0, now - last) * self.rate / 1000.0)
        if tokens < cost:
            self._state[key] = (tokens, now)
            return False
        self._state[key] = (tokens - cost, now)
        if len(self._state) > 100_000:
            self._state.clear()  # bounded memory; worst case a burst is granted again
        return True
