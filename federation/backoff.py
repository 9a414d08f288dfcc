"""Retry policy for the per-peer outbox sender (docs/protocol.md §6).

Exponential backoff with full jitter, capped at minutes (default 5), reset as soon as the peer
is seen again. Pure: the caller supplies ``now`` and a random source.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

BASE_MS = 500
CAP_MS = 5 * 60_000


@dataclass(slots=True)
class Backoff:
    """State of one destination's retry schedule."""

    base_ms: int = BASE_MS
    cap_ms: int = CAP_MS
    failures: int = 0
    next_attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def failed(self, now: int) -> int:
        """Record a failed attempt; return the delay (ms) until the next one."""
        self.failures += 1
        ceiling = min(self.cap_ms, self.base_ms * (2 ** min(self.failures, 20)))
        # "equal jitter": at least half the ceiling, so a dead peer isn't hammered.
        delay = int(ceiling // 2 + self.rng.randint(0, ceiling // 2))
        self.next_attempt = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.next_attempt = 0

    def reset(self) -> None:
        """The peer was seen (it contacted us, or discovery found it): retry at once."""
        self.failures = 0
        self.next_attempt = 0

    def due(self, now: int) -> bool:
        return now >= self.next_attempt
