"""Outbox quotas (docs/operations.md §3 "Limits"; ARCHITECTURE "Limits live in memory").

Two caps on what this node queues for other nodes, checked per envelope when a device sends:

* **per destination**: rows queued for one peer node (``max_outbox_per_destination``). The count
  starts from the store, then moves in memory, and is resynced from the store every few seconds
  (rows that expired, or moved with a peer's key rotation);
* **per account**: remote envelopes of one sending account queued by this process
  (``max_outbox_per_account``). The envelope id → account map lives in memory only: no stored
  row names its sender. After a restart, rows queued before it count for no account.

An envelope over either cap is refused with ``quota_exceeded`` in ``accepted.rejected``; nothing
else is affected. Counts go down when a row leaves the outbox: accepted by the peer, dropped
(permanent refusal), expired, or never committed.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable
from dataclasses import dataclass

from federation.errors import QuotaExceeded
from federation.wire import Envelope


@dataclass(slots=True)
class _Row:
    account: str
    dest: str
    expires: int


class OutboxQuotas:
    def __init__(self, per_destination: int, per_account: int) -> None:
        self.per_destination = per_destination
        self.per_account = per_account
        self.by_dest: dict[str, int] = {}
        self.by_account: dict[str, int] = {}
        self._rows: dict[bytes, _Row] = {}  # envelope id -> sender account: memory only
        self._expiry: list[tuple[int, bytes]] = []  # heap; entries of departed rows go stale
        self.also_left: Callable[[list[bytes]], None] | None = None  # a relay's held bytes

    def resync(self, stored: dict[str, int], uncommitted: dict[str, int]) -> None:
        """Per-destination counts from the store plus rows not yet committed."""
        self.by_dest = {d: stored.get(d, 0) + uncommitted.get(d, 0) for d in stored | uncommitted}

    def admit(self, account: str, dest: str, env: Envelope, now: int) -> str | None:
        """``quota_exceeded``, or None and the envelope counts towards both quotas."""
        self._expire(now)
        if env.id in self._rows:  # a resend of an envelope still queued: counted once
            return None
        if self.by_dest.get(dest, 0) >= self.per_destination:
            return QuotaExceeded.code
        if self.by_account.get(account, 0) >= self.per_account:
            return QuotaExceeded.code
        self.by_dest[dest] = self.by_dest.get(dest, 0) + 1
        self.by_account[account] = self.by_account.get(account, 0) + 1
        self._rows[env.id] = _Row(account, dest, env.expires)
        heapq.heappush(self._expiry, (env.expires, env.id))
        return None

    def watch(self, items: list[tuple[str, Envelope]], futs: list[asyncio.Future[None]]) -> None:
        """Release the quota of envelopes whose commit fails (they never reach the outbox)."""
        for (_, env), fut in zip(items, futs, strict=True):
            fut.add_done_callback(self._on_committed(env.id))

    def _on_committed(self, eid: bytes) -> Callable[[asyncio.Future[None]], None]:
        def done(fut: asyncio.Future[None]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                self.left([eid])

        return done

    def left(self, ids: list[bytes]) -> None:
        """These rows left the outbox (accepted by the peer, dropped, or never committed)."""
        if self.also_left is not None:
            self.also_left(ids)
        for eid in ids:
            row = self._rows.pop(eid, None)
            if row is not None:
                self._release(row)
        if len(self._expiry) > 2 * len(self._rows) + 1024:  # drop stale heap entries
            self._expiry = [(r.expires, eid) for eid, r in self._rows.items()]
            heapq.heapify(self._expiry)

    def _release(self, row: _Row) -> None:
        for counts, key in ((self.by_dest, row.dest), (self.by_account, row.account)):
            n = counts.get(key, 0) - 1
            if n > 0:
                counts[key] = n
            else:
                counts.pop(key, None)

    def _expire(self, now: int) -> None:
        """Rows past their expiry are deleted by the sweeper: stop counting them."""
        while self._expiry and self._expiry[0][0] <= now:
            _, eid = heapq.heappop(self._expiry)
            row = self._rows.get(eid)
            if row is not None and row.expires <= now:
                del self._rows[eid]
                self._release(row)
