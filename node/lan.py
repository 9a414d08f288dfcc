"""LAN presence: announce this node, find pinned peers, verify them before use (issue: offline LAN).

An mDNS answer is only a *candidate*. A candidate whose blinded id matches a pinned peer is used
only after that address answers a fresh descriptor challenge signed by the peer's pinned key.
A host that announces a known peer's blinded id but can't prove the key gets nothing; the event
is counted (``spoofed``) and logged with the node id only. Verified LAN addresses live in memory
(:class:`node.peers.PeerDirectory`), never on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from federation.clock import Clock
from federation.errors import HavenError
from federation.ids import key_from_node_id
from federation.lan import LanAnnouncer, LanBrowser
from federation.lanid import LanCandidate, ms_until_rotation, recognise
from federation.transport import PeerTransport

from .peers import PeerDirectory
from .store import Store

log = logging.getLogger("haven.lan")


class LanService:
    """Owns the announcer and the browser; turns verified candidates into LAN locators."""

    def __init__(
        self,
        *,
        public_key: bytes,
        port: int,
        clock: Clock,
        store: Store,
        peers: PeerDirectory,
        transport: PeerTransport,
        interfaces: list[str] | None = None,
        recheck_s: float = 10.0,
    ) -> None:
        self.clock = clock
        self.store = store
        self.peers = peers
        self.transport = transport
        self.announcer = LanAnnouncer(
            public_key=public_key, port=port, clock=clock, interfaces=interfaces, ttl_s=30
        )
        self.browser = LanBrowser(
            on_candidate=self._on_candidate,
            on_removed=self._on_removed,
            interfaces=interfaces,
            recheck_interval_s=recheck_s,
        )
        self.own_key = public_key
        self.recheck_ms = int(recheck_s * 1000)
        self._ticks = 0
        self._blinded_to_node: dict[str, str] = {}
        self._queue: asyncio.Queue[LanCandidate] = asyncio.Queue()

    def _on_candidate(self, c: LanCandidate) -> None:
        self._queue.put_nowait(c)

    def _on_removed(self, blinded: str) -> None:
        node_id = self._blinded_to_node.get(blinded)
        if node_id is None:
            return
        remaining = [c for c in self.browser.candidates() if c.blinded == blinded]
        if remaining:
            # Another service announces the same id (e.g. a spoofer left, the real one stays):
            # re-verify what is left instead of dropping a working locator.
            for c in remaining:
                self._queue.put_nowait(c)
            return
        del self._blinded_to_node[blinded]
        log.info("peer %s left the LAN", node_id)
        self.peers.lan_lost(node_id)

    async def _known_keys(self) -> dict[str, bytes]:
        return {p.node_id: key_from_node_id(p.node_id) for p in await self.store.all_peers()}

    async def verify(self, c: LanCandidate) -> None:
        """Prove a candidate's key before using its address (or count it as spoofed)."""
        try:
            await self._verify(c)
        except HavenError as exc:  # a failed check must never stop LAN discovery
            log.debug("LAN verification failed (%s)", exc.code)  # retried: not a state change

    async def _verify(self, c: LanCandidate) -> None:
        node_id = recognise(c.blinded, await self._known_keys(), self.clock.now_ms())
        if node_id is None:
            return  # not a peer we know (or our own announcement)
        proved = False
        for addr in c.addresses:
            url = f"http://{addr}:{c.port}"
            try:
                fetched = await self.transport.fetch_descriptor(url, self.clock.now_ms)
            except HavenError as exc:
                if exc.code == "bad_signature":
                    self.peers.spoofed(node_id)
                continue
            if fetched.descriptor.node_id != node_id:
                self.peers.spoofed(node_id)
                continue
            self._blinded_to_node[c.blinded] = node_id
            self.peers.lan_verified(node_id, url, fetched.offset_ms)
            proved = True
            log.info("peer %s verified on the LAN", node_id)
            break
        if not proved:
            log.debug("LAN candidate for peer %s not verified", node_id)  # retried every recheck

    async def run(self) -> None:
        """Announce, browse and verify until cancelled."""
        await self.announcer.start()
        await self.browser.start()
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._refresh_loop())
                while True:
                    c = await self._queue.get()
                    tg.create_task(self.verify(c))
        finally:
            with contextlib.suppress(HavenError):
                await self.browser.close()
            with contextlib.suppress(HavenError):
                await self.announcer.close()

    async def _refresh_loop(self) -> None:
        """Re-announce when the blinded id rotates; re-examine candidates not yet verified
        (a peer pinned after it was first seen, or a peer whose id rotated)."""
        while True:
            wait = min(self.recheck_ms, ms_until_rotation(self.clock.now_ms()) + 50)
            await asyncio.sleep(wait / 1000)
            try:
                if not await self.announcer.refresh():
                    self._ticks += 1
                    if self._ticks % 3 == 0:  # every ~30 s: help peers that lost us
                        await self.announcer.reannounce()
            except HavenError as exc:
                log.info("LAN refresh failed (%s)", exc.code)
            for c in self.browser.candidates():
                if c.blinded not in self._blinded_to_node:
                    self._queue.put_nowait(c)
