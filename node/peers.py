"""Peer directory: which node serves a host, its pinned key, its clock, how to reach it.

Machines route by node id. A host named in an address is resolved by fetching the signed
descriptor (with a fresh challenge); the node id (which *is* the node key) is then pinned to that
host (TOFU, or from an invite or contact card). A later descriptor with a different id is accepted
only with a rotation chain signed by the pinned key; otherwise it is refused (``key_changed``),
counted and logged with node ids only, and the peer is marked ``key_changed`` in memory so that
senders are warned (docs/protocol.md §5.4) until the pinned key answers again or a valid
rotation arrives.

The pin is bound to the URL the descriptor was *fetched from*, not to the ``public_url`` the
descriptor names: a host cannot send our traffic to another host by naming it (§4.7). A
differing ``public_url`` is ignored, counted (``peers.public_url_ignored``) and logged once per
peer with its node id only. LAN locators never change the pin.

A peer has *locators*: verified LAN addresses (held in memory only, never written to disk) and
its public URL. Requests try them in that order. Each peer's clock offset is measured at the
descriptor handshake; requests to it are stamped in *its* clock (docs/protocol.md §4.3), so nodes
whose clocks disagree by minutes still interoperate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit

from federation.clock import Clock
from federation.errors import (
    KeyChanged,
    RateLimited,
    RemoteProtocolError,
    StorageError,
    TransportError,
)
from federation.signing import LocatorChange, plan_moves, rotation_chain_allows
from federation.transport import FetchedDescriptor, PeerTransport, RemoteError

from .metrics import Metrics
from .store import PeerRecord, Store, day

log = logging.getLogger("haven.peers")
T = TypeVar("T")
RATE_TRIES = 4  # attempts of a federated key query answered rate_limited
# How long a pin read from the store serves requests before it is read again: one query per
# peer per second instead of one per request (each waits behind the group commits on the
# store's single connection). Pins changed by this process drop the copy at once.
PIN_CACHE_MS = 1000
# Most requests we keep in flight to one peer, whatever its descriptor allows (§4.1).
MAX_INFLIGHT = 8


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
    """What this process knows about a peer right now (memory only)."""

    offset_ms: int = 0
    measured: bool = False
    lan_urls: list[str] = field(default_factory=list)
    last_ok: str = ""  # "lan" or "public": the locator kind that last worked
    reachable: bool = False
    last_seen: int = 0
    spoofed: int = 0
    key_changed: bool = False  # presented another key with no valid rotation (§4.7)
    url_ignored: bool = False  # its descriptor named another public URL (logged once)
    inflight: int = 1  # requests it takes at once: its descriptor's ``max_inflight`` (§4.1)
    features: tuple[str, ...] = ()  # its descriptor's ``features`` (§4.1), e.g. "blobs"
    pin: PeerRecord | None = None  # the stored pin, as read at ``pin_read`` (PIN_CACHE_MS)
    pin_read: int = 0


class PeerDirectory:
    """Resolves hosts to pinned node ids and tracks per-peer clocks and locators."""

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
        self._stored_day: dict[str, int] = {}  # the pin's last_seen day known to be stored

    def st(self, node_id: str) -> PeerState:
        return self.state.setdefault(node_id, PeerState())

    def stamp(self, node_id: str) -> int:
        """``created`` for a request to ``node_id``, in that peer's clock."""
        return self.clock.now_ms() + self.st(node_id).offset_ms

    def max_inflight(self, node_id: str) -> int:
        """How many batch requests to keep in flight to ``node_id`` (1 unless its descriptor
        advertises more: docs/protocol.md §4.1 ``limits.max_inflight``)."""
        st = self.state.get(node_id)
        return 1 if st is None else st.inflight

    def features(self, node_id: str) -> tuple[str, ...]:
        """The optional protocol parts ``node_id``'s last descriptor listed (§4.1)."""
        st = self.state.get(node_id)
        return () if st is None else st.features

    def drop_feature(self, node_id: str, feature: str) -> None:
        """``node_id`` no longer serves ``feature`` (it answered ``not_found``): until its
        next descriptor is read, act as if it did not list it."""
        st = self.state.get(node_id)
        if st is not None:
            st.features = tuple(f for f in st.features if f != feature)

    def _measured(self, node_id: str, fetched: FetchedDescriptor) -> PeerState:
        st = self.st(node_id)
        st.offset_ms, st.measured, st.key_changed = fetched.offset_ms, True, False
        st.inflight = max(1, min(MAX_INFLIGHT, fetched.descriptor.limits.get("max_inflight", 1)))
        st.features = fetched.descriptor.features
        return st

    def correct_clock(self, node_id: str, peer_now: int) -> None:
        st = self.st(node_id)
        st.offset_ms, st.measured = peer_now - self.clock.now_ms(), True

    def invalidate(self, node_id: str) -> None:
        """Forget the measurement: the next request re-fetches the descriptor (and re-checks
        the key), e.g. after the peer answered ``wrong_destination``."""
        st = self.st(node_id)
        st.measured, st.pin = False, None

    async def locators(self, node_id: str) -> list[tuple[str, str]]:
        """``(kind, base URL)`` to try, verified LAN addresses first."""
        st = self.st(node_id)
        out = [("lan", u) for u in st.lan_urls]
        rec = await self.pinned(node_id)
        if rec is not None:
            out.append(("public", rec.url))
        return out

    async def pinned(self, node_id: str) -> PeerRecord | None:
        """The stored pin of ``node_id``, read from the store at most once per PIN_CACHE_MS."""
        st = self.state.get(node_id)
        now = self.clock.now_ms()
        if st is not None and st.pin is not None and 0 <= now - st.pin_read < PIN_CACHE_MS:
            return st.pin
        rec = await self.store.get_peer(node_id)
        if rec is not None:  # no state for origins that are not pinned (unbounded in number)
            st = self.st(node_id)
            st.pin, st.pin_read = rec, now
        return rec

    def _drop_pin_copy(self, *node_ids: str) -> None:
        for node_id in node_ids:
            if node_id in self.state:
                self.state[node_id].pin = None

    async def call(self, node_id: str, fn: Callable[[str], Awaitable[T]]) -> T:
        """Run ``fn(base_url)`` against each locator of ``node_id`` until one is reachable."""
        await self.ensure_measured(node_id)
        last: Exception | None = None
        for kind, url in await self.locators(node_id):
            try:
                result = await fn(url)
            except TransportError as exc:
                last = exc
                continue
            self._ok(node_id, kind)
            await self.touch(node_id)
            return result
        self.st(node_id).reachable = False
        raise TransportError("peer unreachable") from last

    async def call_patiently(
        self, node_id: str, fn: Callable[[str], Awaitable[T]], tries: int = RATE_TRIES
    ) -> T:
        """:meth:`call`, retrying a ``rate_limited`` answer after 0.25-1 s (docs/protocol.md
        §6): the other node's new-peer budget refills within a second (§4.7)."""
        for _ in range(tries - 1):
            try:
                return await self.call(node_id, fn)
            except RemoteError as exc:
                if exc.code != RateLimited.code:
                    raise
            await asyncio.sleep(random.uniform(0.25, 1.0))
        return await self.call(node_id, fn)

    def _ok(self, node_id: str, kind: str) -> None:
        st = self.st(node_id)
        st.reachable, st.last_ok, st.last_seen = True, kind, self.clock.now_ms()

    async def touch(self, node_id: str) -> None:
        """Keep the pin's stored ``last_seen`` (a UTC day) current: at most one write per peer
        per day. A personal node drops pins unused for ``pin_ttl_days`` (node/sweeper.py)."""
        now = self.clock.now_ms()
        if self._stored_day.get(node_id, -1) >= day(now):
            return
        try:
            rec = await self.store.get_peer(node_id)
            if rec is not None and rec.last_seen < day(now):
                await self.store.upsert_peer(PeerRecord(rec.node_id, rec.url, rec.host, now))
                self._drop_pin_copy(node_id)
        except StorageError:
            return  # tried again on the next contact
        if rec is not None:
            self._stored_day[node_id] = day(now)

    def forget(self, node_id: str) -> None:
        """The pin was dropped: forget what memory holds about the peer too."""
        self.state.pop(node_id, None)
        self._stored_day.pop(node_id, None)

    async def resolve_host(self, host: str) -> PeerRecord:
        """Node record for ``host``, fetching and pinning its descriptor on first contact.

        Raises:
            TransportError: the host could not be reached.
            KeyChanged: the host now presents a different key with no signed rotation.
        """
        pinned = await self.store.peer_by_host(host)
        if pinned is not None:
            try:
                await self.ensure_measured(pinned.node_id)
                return await self.store.get_peer(pinned.node_id) or pinned
            except TransportError:
                pass  # maybe it moved: ask the host itself below
        url, fetched = await self._fetch(host, pinned.url if pinned else None)
        return await self._pin(host, pinned, fetched, url)

    async def _fetch(self, host: str, known_url: str | None) -> tuple[str, FetchedDescriptor]:
        """The first descriptor that verifies, with the base URL that served it."""
        urls = ([known_url] if known_url else []) + candidate_urls(host)
        last: Exception | None = None
        for url in dict.fromkeys(urls):
            try:
                return url, await self.transport.fetch_descriptor(url, self.clock.now_ms)
            except (TransportError, RemoteProtocolError) as exc:
                last = exc
        raise TransportError("no answer from that node") from last

    async def _pin(
        self, host: str, pinned: PeerRecord | None, fetched: FetchedDescriptor, url: str
    ) -> PeerRecord:
        """Pin (or confirm) the node that answered at ``url``, the URL the descriptor came
        from (§4.7); the descriptor's own ``public_url`` never moves traffic elsewhere."""
        desc = fetched.descriptor
        self._check_public_url(desc.node_id, desc.public_url, url)
        record = PeerRecord(desc.node_id, url, host, self.clock.now_ms())
        if pinned is not None and pinned.node_id != desc.node_id:
            if not rotation_chain_allows(pinned.node_id, desc.node_id, desc.rotations):
                self._key_changed(pinned.node_id)
                raise KeyChanged("peer node key changed without a signed rotation")
            log.info("peer %s rotated its key to %s", pinned.node_id, desc.node_id)
            self.st(pinned.node_id).key_changed = False
            await self.store.rename_peer(pinned.node_id, record)
            self._drop_pin_copy(pinned.node_id, desc.node_id)
            self.on_seen(desc.node_id)  # its queue moved: drain it under the new id
        else:
            if desc.moves:  # known under another host? follow its signed moves (keeps aliases)
                await self.follow_moves(desc.node_id, desc.moves)
            await self.store.upsert_peer(record)
            self._drop_pin_copy(desc.node_id)
        self._measured(desc.node_id, fetched)
        self._ok(desc.node_id, "public")
        self._stored_day[desc.node_id] = day(record.last_seen)
        return record

    async def follow_moves(self, node_id: str, moves: Iterable[LocatorChange]) -> bool:
        """Follow ``node_id``'s signed locator changes (docs/protocol.md §12.5), oldest first.

        Each statement must name ``node_id``, start at the host it is pinned to now, verify
        with its key (the pinned key of that host: the node id *is* the key) and be newer than
        the last statement followed (:func:`federation.signing.plan_moves`). Then the new host
        is pinned to the same node id, with its URL (same scheme) as the locator, and the old
        host is kept as an alias of that node id, so addresses at the old host keep working.
        Statements that do not apply are skipped (already followed, or another chain); bad
        signatures and replayed older statements are counted. Returns True when the pin moved.
        """
        rec = await self.store.get_peer(node_id)
        if rec is None:
            return False
        plan = plan_moves(moves, node_id, rec.host, await self.store.peer_moved_at(node_id))
        for _ in range(plan.bad):
            self.metrics.error("peers", "bad_locator_change")
        if plan.replayed:
            self.metrics.event("peers.stale_locator_change", plan.replayed)
            log.info("peer %s: an older locator change than the one followed; skipped", node_id)
        for change in plan.follow:
            scheme = urlsplit(rec.url).scheme or "https"
            new = PeerRecord(
                node_id, f"{scheme}://{change.new_host}", change.new_host, rec.last_seen
            )
            await self.store.add_peer_host(rec.host, node_id)
            await self.store.upsert_peer(new)
            await self.store.set_peer_moved_at(node_id, change.created)
            rec = new
        if plan.follow:
            log.info("peer %s moved to another host; followed its signed locator change", node_id)
            self.metrics.event("peers.moved")
            self._drop_pin_copy(node_id)
            self.on_seen(node_id)  # its queue drains to the new locator at once
        return bool(plan.follow)

    def _key_changed(self, node_id: str) -> None:
        """Count every refusal; log (and start warning senders) once per change."""
        self.metrics.error("peers", KeyChanged.code)
        st = self.st(node_id)
        if not st.key_changed:
            st.key_changed = True
            log.warning(
                "peer %s presented a different key with no signed rotation; refused", node_id
            )

    def _check_public_url(self, node_id: str, public_url: str, fetched_from: str) -> None:
        if urlsplit(public_url).netloc.lower() == urlsplit(fetched_from).netloc.lower():
            return
        self.metrics.error("peers", "public_url_ignored")
        st = self.st(node_id)
        if not st.url_ignored:
            st.url_ignored = True
            log.warning(
                "peer %s names another public URL than the one it was fetched from; ignored",
                node_id,
            )

    def key_warnings(self, node_ids: Iterable[str]) -> tuple[tuple[str, str], ...]:
        """``("peer_key_changed", node_id)`` for each of ``node_ids`` marked key-changed."""
        return tuple(
            ("peer_key_changed", n)
            for n in dict.fromkeys(node_ids)
            if n in self.state and self.state[n].key_changed
        )

    async def ensure_measured(self, node_id: str) -> None:
        """Fetch a peer's descriptor (clock, key check) before the first request to it."""
        st = self.st(node_id)
        if st.measured:
            return
        last: Exception | None = None
        for kind, url in await self.locators(node_id):
            try:
                fetched = await self.transport.fetch_descriptor(url, self.clock.now_ms)
            except (TransportError, RemoteProtocolError) as exc:
                last = exc
                if kind == "public" and isinstance(exc, RemoteError) and exc.code == "unavailable":
                    # A relay holding for this pinned node while it is offline (§12.4): batches
                    # go there unmeasured (our clock; clock_skew re-stamps), measured on return.
                    return
                continue
            if fetched.descriptor.node_id != node_id:
                rec = await self.store.get_peer(node_id)
                if rec is None or kind == "lan":
                    continue  # a LAN address now answers for someone else: not this peer
                await self._pin(rec.host, rec, fetched, url)  # KeyChanged unless rotated
                raise TransportError("peer identity rotated; queue moved")
            moved = bool(fetched.descriptor.moves) and await self.follow_moves(
                node_id, fetched.descriptor.moves
            )
            if kind == "public" and not moved:
                self._check_public_url(node_id, fetched.descriptor.public_url, url)
            self._measured(node_id, fetched)
            self._ok(node_id, kind)
            return
        st.reachable = False
        raise TransportError("peer unreachable") from last

    async def seen(self, node_id: str) -> None:
        """A peer contacted us: note it and let its outbox drain at once."""
        rec = await self.pinned(node_id)
        if rec is not None:
            st = self.st(node_id)
            st.reachable, st.last_seen = True, self.clock.now_ms()
            self.on_seen(node_id)
            await self.touch(node_id)

    # ---- LAN ---------------------------------------------------------------------------------

    def lan_verified(self, node_id: str, url: str, offset_ms: int) -> None:
        """A LAN address proved ``node_id``'s key: use it first, drain the outbox now."""
        st = self.st(node_id)
        if url not in st.lan_urls:
            st.lan_urls.insert(0, url)
        st.offset_ms, st.measured = offset_ms, True
        self._ok(node_id, "lan")
        self.on_seen(node_id)

    def lan_lost(self, node_id: str) -> None:
        st = self.st(node_id)
        st.lan_urls.clear()
        if st.last_ok == "lan":
            st.reachable = False

    def spoofed(self, node_id: str) -> None:
        self.st(node_id).spoofed += 1
        self.metrics.error("lan", "spoofed")
        log.warning("a LAN host announced peer %s but could not prove its key", node_id)

    async def describe(self) -> list[dict[str, object]]:
        """The ``haven node peers --json`` view."""
        out = []
        for rec in await self.store.all_peers():
            st = self.st(rec.node_id)
            if st.reachable:
                how = st.last_ok or "public"
            else:
                how = "unreachable"
            out.append(
                {
                    "node_id": rec.node_id,
                    "host": rec.host,
                    "reachable": how,
                    "lan": bool(st.lan_urls),
                    "last_seen": st.last_seen or rec.last_seen,
                    "spoofed": st.spoofed,
                    "key_changed": st.key_changed,
                }
            )
        return out
