"""Retry policy for the per-peer outbox sender (docs/protocol.md §6).

Per destination (:class:`Backoff`): exponential backoff with jitter, capped at minutes (default
5), reset as soon as the peer is seen again. Per envelope (:class:`EnvelopeHolds`): an envelope
the peer refused for now waits on its own schedule while the rest of the queue moves on.
Pure: the caller supplies ``now`` and a random source.
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


@dataclass(slots=True)
class _Hold:
    failures: int
    not_before: int


@dataclass(slots=True)
class EnvelopeHolds:
    """Per-envelope retry times for envelopes a peer refused for now (docs/protocol.md §6).

    A peer may refuse single envelopes of an accepted batch with a transient code (the
    recipient's mailbox is full: ``quota_exceeded``; ``rate_limited``; ``storage_error``). Such
    an envelope is held back on its own exponential schedule and skipped until then, so it
    never blocks the rest of the destination's queue. Memory is bounded by ``max_entries``:
    beyond it the oldest hold is forgotten (that envelope is simply retried early).
    """

    base_ms: int = BASE_MS
    cap_ms: int = CAP_MS
    max_entries: int = 100_000
    rng: random.Random = field(default_factory=random.Random)
    _holds: dict[bytes, _Hold] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._holds)

    def refused(self, eid: bytes, now: int) -> int:
        """The peer refused ``eid`` for now; return the delay (ms) before it is tried again."""
        prev = self._holds.pop(eid, None)
        failures = 1 if prev is None else prev.failures + 1
        ceiling = int(min(self.cap_ms, self.base_ms * (2 ** min(failures, 20))))
        delay = int(ceiling // 2 + self.rng.randint(0, ceiling // 2))
        # Round up to a grid of ceiling/4: envelopes refused together come due together, so
        # the sender retries them in a few batches (one pass over the queue each), not one
        # pass per envelope.
        grain = max(1, ceiling // 4)
        not_before = -(-(now + delay) // grain) * grain
        self._holds[eid] = _Hold(failures, not_before)  # re-inserted: newest last
        while len(self._holds) > self.max_entries:
            del self._holds[next(iter(self._holds))]
        return not_before - now

    def held(self, eid: bytes, now: int) -> bool:
        """``eid`` must not be sent yet."""
        h = self._holds.get(eid)
        return h is not None and now < h.not_before

    def forget(self, eids: list[bytes] | set[bytes]) -> None:
        """These envelopes left the queue (accepted, dropped or expired)."""
        for eid in eids:
            self._holds.pop(eid, None)

    def keep_only(self, present: set[bytes]) -> None:
        """Drop holds for envelopes no longer queued (after a full pass over the queue)."""
        for eid in [e for e in self._holds if e not in present]:
            del self._holds[eid]

    def next_due(self) -> int | None:
        """The earliest time a held envelope may be retried, or None when nothing is held."""
        return min((h.not_before for h in self._holds.values()), default=None)
