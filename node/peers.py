"""Peer directory: which node serves a host, its pinned key, its clock, how to reach it.

Machines route by node id. A host named in an address is resolved once by fetching the signed
descriptor; the node id (which *is* the node key) is then pinned to that host (TOFU, or from an
invite). A later descriptor with a different id is accepted only with a rotation chain signed by
the pinned key; otherwise it is refused (``key_changed``), counted and logged with node ids only.

Each peer's clock offset is measured at this handshake; requests to it are stamped in *its*
clock (docs/protocol.md §4.3), so nodes whose clocks disagree still interoperate.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from federation.clock import Clock
from federation.errors import KeyChanged, RemoteProtocolError, TransportError
from federation.signing import rotation_chain_allows
from federation.transport import FetchedDescriptor, PeerTransport

from .metrics import Metrics
from .store import PeerRecord, Store

log = logging.getLogger("haven.peers")


def candidate_urls(host: str) -> list[str]:
    """Base URLs to try for a host: plain HTTP first only for IP literals and localhost."""
    bare = host.rsplit(":", 1)[0].strip("[]") if host.count(":") <= 1 or "]" in host else host
    plain_first = bare == "localhost"
    try:
        ipaddress.ip_address(bare)
        plain_first = True
    except ValueError:
        pass
    order = ["http", "https"] if plain_first else ["https", "http"]
    return [f"{scheme}://{host}" for scheme in order]


@dataclass
class PeerState:
    offset_ms: int = 0
    measured: bool = False
    reachable: bool = True
    lan_urls: list[str] = field(default_factory=list)


class PeerDirectory:
    """Resolves hosts to pinned node ids and tracks per-peer clock offsets and locators."""

    def __init__(
        self,
        store: Store,
        transport: PeerTransport,
        clock: Clock,
        metrics: Metrics,
        on_seen: Callable[[str], None],
    ) -> None:
        self.store = store
        self.transport = transport
        self.clock = clock
        self.metrics = metrics
        self.on_seen = on_seen
        self.state: dict[str, PeerState] = {}

    def _st(self, node_id: str) -> PeerState:
        return self.state.setdefault(node_id, PeerState())

    def stamp(self, node_id: str) -> int:
        """``created`` for a request to ``node_id``, in that peer's clock."""
        return self.clock.now_ms() + self._st(node_id).offset_ms

    def correct_clock(self, node_id: str, peer_now: int) -> None:
        st = self._st(node_id)
        st.offset_ms, st.measured = peer_now - self.clock.now_ms(), True

    async def resolve_host(self, host: str) -> PeerRecord:
        """Node record for ``host``, fetching and pinning its descriptor on first contact.

        Raises:
            TransportError: the host could not be reached.
            KeyChanged: the host now presents a different key with no signed rotation.
        """
        pinned = await self.store.peer_by_host(host)
        if pinned is not None and self._st(pinned.node_id).measured:
            return pinned
        fetched = await self._fetch(host, pinned.url if pinned else None)
        return await self._pin(host, pinned, fetched)

    async def _fetch(self, host: str, known_url: str | None) -> FetchedDescriptor:
        urls = ([known_url] if known_url else []) + candidate_urls(host)
        last: Exception | None = None
        for url in dict.fromkeys(urls):
            try:
                return await self.transport.fetch_descriptor(url, self.clock.now_ms)
            except (TransportError, RemoteProtocolError) as exc:
                last = exc
        raise TransportError("no answer from that node") from last

    async def _pin(
        self, host: str, pinned: PeerRecord | None, fetched: FetchedDescriptor
    ) -> PeerRecord:
        desc = fetched.descriptor
        record = PeerRecord(desc.node_id, desc.public_url, host, self.clock.now_ms())
        if pinned is not None and pinned.node_id != desc.node_id:
            if not rotation_chain_allows(pinned.node_id, desc.node_id, desc.rotations):
                self.metrics.error("peers", KeyChanged.code)
                log.warning(
                    "peer %s presented a different key with no signed rotation; refused",
                    pinned.node_id,
                )
                raise KeyChanged("peer node key changed without a signed rotation")
            log.info("peer %s rotated its key to %s", pinned.node_id, desc.node_id)
            await self.store.rename_peer(pinned.node_id, record)
        else:
            await self.store.upsert_peer(record)
        st = self._st(desc.node_id)
        st.offset_ms, st.measured, st.reachable = fetched.offset_ms, True, True
        return record

    async def url_for(self, node_id: str) -> str | None:
        st = self._st(node_id)
        if st.lan_urls:
            return st.lan_urls[0]
        rec = await self.store.get_peer(node_id)
        return rec.url if rec else None

    async def ensure_measured(self, node_id: str) -> None:
        """Measure a known peer's clock (after a restart) before the first request to it."""
        st = self._st(node_id)
        if st.measured:
            return
        url = await self.url_for(node_id)
        if url is None:
            raise TransportError("no locator for peer")
        fetched = await self.transport.fetch_descriptor(url, self.clock.now_ms)
        if fetched.descriptor.node_id != node_id:
            rec = await self.store.get_peer(node_id)
            await self._pin(rec.host if rec else url, rec, fetched)
            raise TransportError("peer identity changed; queue moved")
        st.offset_ms, st.measured = fetched.offset_ms, True

    def mark(self, node_id: str, reachable: bool) -> None:
        self._st(node_id).reachable = reachable

    async def seen(self, node_id: str) -> None:
        """A peer contacted us: note it and let its outbox drain at once."""
        rec = await self.store.get_peer(node_id)
        if rec is not None:
            self._st(node_id).reachable = True
            self.on_seen(node_id)
