"""Timers: TTL expiry, epoch-key rotation and the idle WAL checkpoint.

``tick(now)`` is pure enough to drive from a test with a fake clock; ``run`` calls it on a short
real-time interval. The checkpoint runs once writes have been idle for ``idle_ms``, never per
delete (ARCHITECTURE §4 "Storage").
"""

from __future__ import annotations

import asyncio
import logging

from federation.clock import Clock
from federation.errors import StorageError

from .mailbox import Mailboxes
from .store import Store

log = logging.getLogger("haven.sweeper")


class Sweeper:
    def __init__(
        self,
        store: Store,
        mailboxes: Mailboxes,
        clock: Clock,
        idle_ms: int = 1000,
        sweep_every_ms: int = 10_000,
        interval_s: float = 0.25,
    ) -> None:
        self.store = store
        self.mailboxes = mailboxes
        self.clock = clock
        self.idle_ms = idle_ms
        self.sweep_every_ms = sweep_every_ms
        self.interval_s = interval_s
        self._last_sweep = -(10**15)

    async def tick(self) -> dict[str, int]:
        now = self.clock.now_ms()
        out = {"expired": 0, "resealed": 0, "checkpointed": 0}
        if now - self._last_sweep >= self.sweep_every_ms:
            self._last_sweep = now
            out["expired"] = await self.store.sweep_expired(now)
            out["resealed"] = await self.store.rotate_epochs(now)
            if out["expired"]:
                log.info("expired %d envelopes", out["expired"])
                self.mailboxes.writes_since_checkpoint += 1
        if (
            self.mailboxes.writes_since_checkpoint
            and now - self.mailboxes.last_write_ms >= self.idle_ms
        ):
            self.mailboxes.writes_since_checkpoint = 0
            await self.store.checkpoint()
            out["checkpointed"] = 1
        return out

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except StorageError as exc:  # e.g. disk full: keep serving, retry next tick
                log.error("sweeper: %s", exc.code)
            await asyncio.sleep(self.interval_s)
