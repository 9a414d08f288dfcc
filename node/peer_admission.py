"""New-peer admission: one shared budget for node keys this node has not pinned (§4.4).

Anyone can mint node keys, and every key would get its own per-peer buckets, so per-peer limits
alone let a flood buy rate by minting keys. Requests from an *unknown* origin (a node id not in
the peers table: not resolved by us, not pinned from a contact card or invite, not verified on
the LAN) are therefore also charged to **one** bucket shared by all of them
(``new_peer_rate``/s, burst ``new_peer_burst``). Pinned peers never touch it.

A genuine first contact must still get in while a flood holds the shared bucket empty, so the
bucket keeps a *reserve* (half its burst) for **fresh** origins: an origin may take from the
reserve only while its own small allowance (``FRESH_BURST`` attempts, refilled at
``FRESH_RATE``/s; refused attempts count too) lasts; an origin that already used its allowance
is refused once the level is down to the reserve. A flood from *k* minted keys can drain the
reserve only at ``k * FRESH_RATE`` per second, so below ``new_peer_rate / FRESH_RATE`` keys
(100 with the defaults) the reserve refills and a new node's handful of requests (a key query,
a claim, a batch) goes through at once. Total admitted from unknown origins never exceeds the
shared bucket, however many keys are minted. A flood that mints a fresh key for every request
is indistinguishable from first contacts; it can delay new peers (they retry ``rate_limited``
soon, §6) but never pinned ones.

Pure: every method takes ``now`` (ms); state lives in memory only.
"""

from __future__ import annotations

from collections.abc import Container

from federation.errors import RateLimited

FRESH_BURST = 5.0  # requests an unknown origin may take from the reserve ...
FRESH_RATE = 0.2  # ... refilled at this rate (one per 5 s)
MAX_ORIGINS = 100_000  # tracked fresh allowances; beyond that the table resets (bounded memory)


class NewPeerBudget:
    """The shared bucket for unknown origins, with a reserve for fresh ones."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.reserve = burst / 2
        self._tokens = burst
        self._last: int | None = None
        self._fresh: dict[str, tuple[float, int]] = {}

    def _refill(self, now: int) -> None:
        if self._last is not None:
            self._tokens = min(
                self.burst, self._tokens + max(0, now - self._last) * self.rate / 1000
            )
        self._last = now

    def _fresh_tokens(self, origin: str, now: int) -> float:
        tokens, last = self._fresh.get(origin, (FRESH_BURST, now))
        return min(FRESH_BURST, tokens + max(0, now - last) * FRESH_RATE / 1000)

    def admit(self, origin: str, now: int) -> bool:
        """Charge one request from the unknown ``origin``; False when it must be refused."""
        self._refill(now)
        fresh = self._fresh_tokens(origin, now)
        floor = 0.0 if fresh >= 1 else self.reserve
        # Every attempt spends the allowance, admitted or not: an origin that keeps trying
        # while the bucket is empty stops being fresh after a few tries.
        if len(self._fresh) >= MAX_ORIGINS and origin not in self._fresh:
            self._fresh.clear()
        self._fresh[origin] = (max(0.0, fresh - 1), now)
        if self._tokens - 1 < floor:
            return False
        self._tokens -= 1
        return True

    @property
    def tokens(self) -> float:
        return self._tokens


def admit_origin(budget: NewPeerBudget, pinned: Container[str], origin: str, now: int) -> None:
    """Called once a request's signature proves ``origin`` (§4.4 step 8).

    Raises:
        RateLimited: ``origin`` is not pinned and the new-peer budget refuses it.
    """
    if origin not in pinned and not budget.admit(origin, now):
        raise RateLimited("too many requests from new peers")
