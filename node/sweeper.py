"""Timers: TTL expiry, epoch-key rotation, the idle WAL checkpoint and the disk-full guard.

At start, :meth:`Sweeper.run` hands the clock to the store (:meth:`node.store.Store.begin`):
keys that seal nothing are destroyed and leftovers of a passed epoch re-sealed before the first
tick; from then on the store re-seals for shutdown when it is closed.

``tick(now)`` is pure enough to drive from a test with a fake clock; ``run`` calls it on a short
real-time interval. The checkpoint (RESTART, never TRUNCATE) runs once writes have been idle for
``idle_ms``, never per delete (ARCHITECTURE §4 "Storage"). While the disk is full, each tick
checks whether space is back and then restores the ballast (:mod:`node.ballast`).

On a personal node the pin table is the owner's contact list at node level, so pins unused for
``pin_ttl_ms`` are dropped (hourly, and at the first tick after start); a pin with envelopes
still queued for it is kept. The owner's next contact with that node pins it again (TOFU).
Log lines are counts of state changes, never per envelope.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from federation.clock import Clock
from federation.errors import StorageError

from .ballast import DiskFull, DiskGuard
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
        disk: DiskGuard | None = None,
        pin_ttl_ms: int = 0,
        on_pins_dropped: Callable[[list[str]], None] | None = None,
        pin_sweep_every_ms: int = 3_600_000,
    ) -> None:
        self.store = store
        self.mailboxes = mailboxes
        self.clock = clock
        self.idle_ms = idle_ms
        self.sweep_every_ms = sweep_every_ms
        self.interval_s = interval_s
        self.disk = disk
        self.on_expired: Callable[[int], None] | None = None  # envelopes deleted at expiry
        self._last_sweep = -(10**15)
        self.pin_ttl_ms = pin_ttl_ms  # 0: pins are never dropped (organisation nodes)
        self.on_pins_dropped = on_pins_dropped
        self.pin_sweep_every_ms = pin_sweep_every_ms
        self._last_pin_sweep = -(10**15)
        self._error: str | None = None  # last failure logged (one line per state change)

    async def tick(self) -> dict[str, int]:
        now = self.clock.now_ms()
        out = {
            "expired": 0,
            "resealed": 0,
            "checkpointed": 0,
            "recovered": 0,
            "swept": 0,
            "pins_dropped": 0,
        }
        disk = self.disk
        if disk is not None and (disk.full or (disk.size and not disk.held)):
            out["recovered"] = int(await asyncio.to_thread(disk.check))
        if now - self._last_sweep >= self.sweep_every_ms:
            self._last_sweep = now
            out["swept"] = 1
            out["expired"] = await self.store.sweep_expired(now)
            if out["expired"] and self.on_expired is not None:
                self.on_expired(out["expired"])
            out["resealed"] = await self.store.rotate_epochs(now)
            if out["expired"]:
                log.debug("expired %d envelopes", out["expired"])  # not a state change
                self.mailboxes.writes_since_checkpoint += 1
        if self.pin_ttl_ms and now - self._last_pin_sweep >= self.pin_sweep_every_ms:
            self._last_pin_sweep = now
            out["pins_dropped"] = await self.drop_unused_pins(now)
        if (
            self.mailboxes.writes_since_checkpoint
            and now - self.mailboxes.last_write_ms >= self.idle_ms
        ):
            self.mailboxes.writes_since_checkpoint = 0
            try:
                await self.store.checkpoint()
            except StorageError:
                self.mailboxes.writes_since_checkpoint = 1  # retry on a later tick
                raise
            out["checkpointed"] = 1
        return out

    async def drop_unused_pins(self, now: int) -> int:
        """Drop pins whose last contact (a UTC day) is older than ``pin_ttl_ms``."""
        keep = set(await self.store.outbox_destinations()) | set(self.mailboxes.outbox_load())
        dropped = await self.store.drop_stale_peers(now - self.pin_ttl_ms, keep)
        if dropped:
            self.mailboxes.writes_since_checkpoint += 1
            log.info("dropped %d peer pins unused for %d days", len(dropped), self._ttl_days)
            if self.on_pins_dropped is not None:
                self.on_pins_dropped(dropped)
        return len(dropped)

    @property
    def _ttl_days(self) -> int:
        return self.pin_ttl_ms // 86_400_000

    async def run(self) -> None:
        if self.disk is not None:
            try:
                await asyncio.to_thread(self.disk.start)
            except OSError as exc:
                log.warning("ballast not created: %s", exc.strerror or exc)
        try:
            resealed = await self.store.begin(self.clock)
            if resealed:
                log.info("re-sealed %d stored envelopes under a fresh key", resealed)
        except StorageError as exc:  # keys are kept; the ticks retry the rotation
            self._error = str(exc)
            log.error("sweeper: %s", exc)
        while True:
            try:
                done = await self.tick()
                if self._error is not None and (done["checkpointed"] or done["swept"]):
                    self._error = None
                    log.info("sweeper: store writes succeed again")
            except StorageError as exc:  # e.g. disk full: keep serving, retry next tick
                if isinstance(exc, DiskFull) and self.disk is not None:
                    self.disk.on_full()
                if str(exc) != self._error:
                    self._error = str(exc)
                    log.error("sweeper: %s", exc)
            await asyncio.sleep(self.interval_s)
