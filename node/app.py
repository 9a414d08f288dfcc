"""Composition root of one node process: builds every part explicitly and owns every task."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import aiohttp
import msgspec
from aiohttp import web

from federation.clock import Clock, SystemClock
from federation.devicelist import SignedDeviceList
from federation.errors import (
    HavenError,
    KeyChanged,
    LocalProtocolError,
    NotFound,
    QuotaExceeded,
    TransportError,
)
from federation.ids import Address
from federation.multi import FEATURE as MULTI_FEATURE
from federation.replay import NonceWindow, TokenBucket
from federation.signing import Descriptor, NodeKey, Rotation
from federation.transport import PeerTransport, RemoteError
from federation.wire import MAX_BATCH_BYTES, PROTOCOL_VERSION, Envelope, packb, unpackb

from . import admin, admission, blobfiles, client_api, federation_api, guard, held
from .atrest import EpochKeys
from .ballast import DiskGuard
from .blob_api import FEATURE as BLOBS_FEATURE
from .blob_api import BlobApi
from .blobs import BLOB_EPOCHS_NAME, BLOBS_DIR, MIB, BlobStore
from .config import DB_NAME, EPOCH_KEYS_NAME, NodeConfig
from .fanout import KeysFanout
from .lan import LanService
from .linktokens import LinkTokens
from .mailbox import Mailboxes
from .metrics import GaugeSample, Metrics
from .moves import load_locators, push_moves
from .nodekey import load_key
from .outbox import OutboxSender
from .peer_admission import NewPeerBudget
from .peers import PeerDirectory
from .pg_store import PgStore
from .quotas import OutboxQuotas
from .relay import RelayService, clients_view
from .relay_client import RelayInfo, RelayLink
from .sqlite_store import SqliteStore
from .store import Store
from .sweeper import Sweeper

if TYPE_CHECKING:
    from .worker_role import WorkerRole

log = logging.getLogger("haven.node")
ROTATIONS_NAME = "rotations.bin"
REFRESH_MIN_S = 5.0  # cache refresh interval ...
REFRESH_COST_FACTOR = 50  # ... at least this many times the last refresh's duration
ACCOUNTS_REREAD_MIN_S = 1.0  # operator-triggered account re-reads, at most this often
ACCOUNTS_CONFIRM_S = 15.0  # ... and the operator command waits this long for one
SETTLE_AT_STOP_S = 2.0  # a stopping node waits this long at most for queued commits
GAUGE_EVERY_S = 2.0  # gauges are refreshed from in-memory counts this often (and per scrape)


@dataclass(frozen=True, slots=True)
class Limits:
    max_frame: int = 4 * 1024 * 1024
    max_batch_bytes: int = MAX_BATCH_BYTES
    max_inflight: int = 4  # batch requests a peer may keep in flight to us (§4.1)


class Rates:
    """Token buckets by purpose (``purpose:key``), plus the new-peer budget (§4.4).

    ``workers``: the node runs as that many processes (node/workers.py); budgets stay in
    memory, and each worker gets ``1/workers`` of every rate and burst."""

    def __init__(self, config: NodeConfig | None = None, workers: int = 1) -> None:
        link_per_hour = config.link_tokens_per_hour if config else 30
        per_ip_hour = config.registrations_per_ip_per_hour if config else 5
        reg_per_minute = config.registrations_per_minute if config else 60
        n = max(1, workers)
        self.new_peers = NewPeerBudget(
            (config.new_peer_rate if config else 20) / n,
            (config.new_peer_burst if config else 100) / n,
        )

        def bucket(rate: float, burst: float) -> TokenBucket:
            return TokenBucket(rate=rate / n, burst=max(1.0, burst / n))

        self.buckets = {
            "link": bucket(link_per_hour / 3600, link_per_hour),  # per account
            "register": bucket(reg_per_minute / 60, reg_per_minute),  # node-wide
            # open registration, per source IP (memory only, never stored or logged)
            "regip": bucket(per_ip_hour / 3600, per_ip_hour),
            "send": bucket(50_000, 100_000),
            "keys": bucket(1000, 2000),  # local lookups: cheap
            "remotekeys": bucket(20, 200),  # each one costs a federation call
            "fed": bucket(500, 2000),
            "fedverify": bucket(10_000, 20_000),  # all signature checks
            "fedkeys": bucket(20, 200),
            # attachments (node/blob_api.py): per account, and per origin for fetches
            "blobnew": bucket(20, 200),
            "blobget": bucket(5000, 10_000),
            "remoteblob": bucket(1000, 2000),
            "fedblob": bucket(2000, 4000),
        }

    def take(self, key: str, now: int, cost: float = 1.0) -> bool:
        purpose = key.split(":", 1)[0]
        return self.buckets[purpose].take(key, now, cost)


def load_node_key(home: str, config: NodeConfig | None = None) -> NodeKey:
    """The node key: ``HOME/node.key`` or ``key_file``, unwrapped if ``key_secret_file`` is set
    (:mod:`node.nodekey`). Raises :class:`node.nodekey.NodeKeyUnavailable` with one clear line."""
    return load_key(home, config or NodeConfig.load(home))


def load_rotations(home: str) -> tuple[Rotation, ...]:
    path = os.path.join(home, ROTATIONS_NAME)
    if not os.path.exists(path):
        return ()
    with open(path, "rb") as f:
        return tuple(Rotation.from_wire(r) for r in unpackb(f.read(), max_len=1 << 20))


def open_store(home: str, config: NodeConfig, *, leader: bool = True) -> Store:
    """The node's store (unopened): PostgreSQL if ``config.store`` names a DSN, else SQLite in
    the home. The epoch keys stay in the home's key file either way (node/pg_store.py).
    ``leader``: this process rotates and destroys the keys (one per key file)."""
    keys = EpochKeys(os.path.join(home, EPOCH_KEYS_NAME), config.epoch_ms)
    if config.store:
        return PgStore(config.store, keys, leader=leader)
    return SqliteStore(os.path.join(home, DB_NAME), keys, config.max_db_mb)


class Node:
    """One running node. Build with :func:`build`; run with :meth:`run`."""

    def __init__(
        self, home: str, config: NodeConfig, key: NodeKey, clock: Clock, store: Store
    ) -> None:
        self.home = home
        self.config = config
        self.key = key
        self.clock = clock
        self.store = store
        self.limits = Limits()
        self.metrics = Metrics()
        # max_connections is lowered below the fd limit when serving starts (run()).
        self.admission = admission.Admission(config, self.metrics, config.max_connections)
        # Replays across a restart: refuse requests created before this process started
        # (the nonce window is in memory only; docs/protocol.md §4.3).
        self.started_ms = clock.now_ms()
        self.nonces = NonceWindow(not_before=self.started_ms)
        self.rates = Rates(config)
        self.rotations = load_rotations(home)
        self.moves = load_locators(home)  # signed host changes (node/moves.py, §12.5)
        self.known_mailboxes: set[bytes] = set()  # mailboxes here, minus disabled accounts'
        self.disabled_accounts: set[str] = set()
        self.mailbox_quota: dict[bytes, int] = {}  # per-account quotas, by mailbox
        self.pending_load: dict[bytes, int] = {}  # envelopes held per mailbox (quota)
        self.known_peers: set[str] = set()
        self.link_tokens = LinkTokens(client_api.LINK_TTL_MS)  # memory only
        self.quotas = OutboxQuotas(config.max_outbox_per_destination, config.max_outbox_per_account)
        # a relay's offline clients (held mode, node/held.py): empty on other nodes
        self.held = held.HeldClients(wake=self._peer_seen)
        self.quotas.also_left = self.held.left
        self.mailboxes = Mailboxes(store, clock, on_outbox=self._outbox_ready)
        store.set_activity(lambda: self.mailboxes.activity)
        self.mailboxes.disk = DiskGuard(home, config.ballast_mb)  # disk full: node/ballast.py
        self.sweeper = Sweeper(store, self.mailboxes, clock, disk=self.mailboxes.disk)
        if config.owner and config.pin_ttl_days > 0:  # personal node: pins = contact list
            self.sweeper.pin_ttl_ms = config.pin_ttl_days * 86_400_000
            self.sweeper.on_pins_dropped = self._pins_dropped
        self.blobs = BlobStore(  # attachments: files under HOME/blobs (node/blobs.py)
            os.path.join(home, BLOBS_DIR),
            os.path.join(home, BLOB_EPOCHS_NAME),
            config.epoch_ms,
            config.max_blob_store_mb * MIB,
            config.max_blob_mb_per_account * MIB,
            self.metrics,
        )
        self.blob_api = BlobApi(self)
        self.keys_fanout = KeysFanout(self)  # batched key queries (node/fanout.py)
        self.session: aiohttp.ClientSession | None = None
        self.transport: PeerTransport | None = None
        self._peers: PeerDirectory | None = None
        self._outbox: OutboxSender | None = None
        self.runner: web.AppRunner | None = None
        self.port = config.listen_port
        self.ready = asyncio.Event()
        self.stopping = False
        self.lan_enabled = config.lan
        self.admin_enabled = True  # False in a worker: its supervisor serves /metrics
        self.admin: admin.AdminServer | None = None
        self.sweeper.on_expired = partial(self.metrics.event, "envelopes.expired")
        self.mailboxes.on_store_error = partial(self.metrics.error, "store")
        # operator commands that changed accounts: asked for / applied (_accounts_changed)
        self._accounts_dirty = asyncio.Event()
        self._accounts_lock = asyncio.Lock()
        self._accounts_cond = asyncio.Condition()
        self._accounts_wanted = 0
        self._accounts_applied = 0
        self.role: WorkerRole | None = None  # one of several workers (node/workers.py)
        # relay service for nodes behind NAT (node/relay.py), and this node's own relay link
        # when it is one of them (node/relay_client.py, HOME/relay.json)
        self.relay: RelayService | None = RelayService(self) if config.relay else None
        info = RelayInfo.load(home)
        self.relay_link: RelayLink | None = RelayLink(self, info) if info is not None else None
        if self.relay is not None:  # offline clients: held mode (node/held.py)
            held.attach(self, self.relay)

    @property
    def blobs_enabled(self) -> bool:
        """Attachments need the blob store of one process: a node served by several workers
        does not offer them yet (the feature is not advertised and blob requests get
        ``unsupported``; docs/operations.md §15)."""
        return self.role is None or self.role.count == 1

    def use_role(self, role: WorkerRole) -> None:
        """Serve as one of ``role.count`` workers of this node (before :meth:`run`): rate
        budgets split, requests created before the supervisor's start refused, and only the
        leader sweeps, rotates and destroys epoch keys and announces on the LAN."""
        self.role = role
        self.rates = Rates(self.config, role.count)
        self.nonces = NonceWindow(not_before=role.started_ms)
        self.lan_enabled = self.lan_enabled and role.leader

    async def _knows_elsewhere(self, mailbox: bytes) -> bool:
        """Several workers: whether ``mailbox`` was registered through another worker."""
        if self.role is None or await self.store.get_device(mailbox) is None:
            return False
        self.known_mailboxes.add(mailbox)
        return True

    async def learn(self, items: Iterable[tuple[str, Envelope]]) -> None:
        """Several workers: mailboxes registered and peers pinned through another worker are
        not in this one's caches until the next refresh; ask the store before refusing."""
        asked: set[bytes | str] = set()  # once per call: a batch may name one mailbox often
        for dest, env in items:
            if dest == self.key.node_id:
                if env.to not in self.known_mailboxes and env.to not in asked:
                    asked.add(env.to)
                    await self._knows_elsewhere(env.to)
            elif dest not in self.known_peers and dest not in asked:
                asked.add(dest)
                if await self.store.get_peer(dest) is not None:
                    self.known_peers.add(dest)

    # parts that need the HTTP client session exist only while running
    @property
    def peers(self) -> PeerDirectory:
        if self._peers is None:
            raise LocalProtocolError("node is not running")
        return self._peers

    @property
    def outbox(self) -> OutboxSender:
        if self._outbox is None:
            raise LocalProtocolError("node is not running")
        return self._outbox

    async def _refresh_caches(self) -> None:
        """Pick up accounts removed or peers pinned by offline CLI commands while running, and
        correct the pending counts' drift (expiry, duplicates). Every 5 s, or less often when
        a refresh is slow (it counts every pending row): it takes at most about 2% of the time,
        so a backlog of a million rows does not slow delivery (bench ``growth``)."""
        interval = REFRESH_MIN_S
        while True:
            await asyncio.sleep(interval)
            began = time.monotonic()
            try:
                await self.refresh_accounts()
                self.known_peers |= {p.node_id for p in await self.store.all_peers()}
                self.pending_load = await self._load()
                self.quotas.resync(await self.store.outbox_counts(), self.mailboxes.outbox_load())
            except HavenError as exc:
                self.metrics.error("store", exc.code)
                log.error("cache refresh failed (%s)", exc.code)
            except Exception as exc:  # noqa: BLE001 - a refresh bug must not stop the node
                log.error("cache refresh failed (internal: %s)", type(exc).__name__)
            interval = max(REFRESH_MIN_S, REFRESH_COST_FACTOR * (time.monotonic() - began))

    async def refresh_accounts(self) -> None:
        """Re-read accounts: mailboxes of disabled accounts leave :attr:`known_mailboxes`
        (peers' envelopes to them get ``not_found``, as for a missing mailbox), their
        connected devices are disconnected (sign-in refuses them), and per-account quotas
        apply to their mailboxes. Runs at every cache refresh and when an operator command
        reaches the running node (:meth:`_accounts_changed`)."""
        # One at a time: a slow periodic re-read that began before an operator's change must
        # not overwrite the newer state that the change's own re-read set.
        async with self._accounts_lock:
            await self._refresh_accounts_locked()

    async def _refresh_accounts_locked(self) -> None:
        live, before = self.known_mailboxes, set(self.known_mailboxes)
        mailboxes = set(await self.store.all_mailboxes())
        disabled: set[str] = set()
        quota: dict[bytes, int] = {}
        for acc in await self.store.list_accounts():
            if not (acc.disabled or acc.quota):
                continue
            mine = await self.store.devices_of(acc.name)
            if acc.disabled:
                disabled.add(acc.name)
                mailboxes.difference_update(mine)
            elif acc.quota:
                quota.update((mb, acc.quota) for mb in mine)
        # devices registered while this ran (added to the live set) are not lost
        mailboxes |= live - before
        self.known_mailboxes, self.disabled_accounts, self.mailbox_quota = (
            mailboxes,
            disabled,
            quota,
        )
        if disabled:
            await self.disconnect_accounts(disabled)

    async def disconnect_accounts(self, names: set[str]) -> None:
        """Close the connections of these accounts' devices (their sessions end at once)."""
        gone = [
            link
            for link in list(self.mailboxes.links.values())
            if isinstance(link, client_api.ClientSession) and link.account in names
        ]
        for link in gone:
            await link.ws.close()

    async def _load(self) -> dict[bytes, int]:
        """Envelopes held per mailbox: stored rows plus those not yet committed."""
        load = await self.store.pending_counts()
        for env in self.mailboxes.uncommitted():
            load[env.to] = load.get(env.to, 0) + 1
        return load

    async def _run_lan(self) -> None:
        try:
            await self._lan().run()
        except HavenError as exc:
            log.error("LAN discovery unavailable (%s); serving without it", exc.code)

    def _lan(self) -> LanService:
        return LanService(
            public_key=self.key.public_key,
            port=self.port,
            clock=self.clock,
            store=self.store,
            peers=self.peers,
            transport=self.transport_or_fail(),
            interfaces=self.config.interfaces,
        )

    def _pins_dropped(self, node_ids: list[str]) -> None:
        self.known_peers.difference_update(node_ids)
        for node_id in node_ids:
            if self._peers is not None:
                self._peers.forget(node_id)

    def _outbox_ready(self, dest: str) -> None:
        if self._outbox is not None:
            self._outbox.wake(dest)

    def _peer_seen(self, node_id: str) -> None:
        if self._outbox is not None:
            self._outbox.peer_seen(node_id)
        if self.role is not None:  # the worker holding its queue may be another one
            self.role.peer_seen(node_id, time.monotonic())

    # ---- helpers used by the APIs ------------------------------------------------------------

    def admit(self, env: Envelope, now: int) -> tuple[Envelope, str | None]:
        """Check an incoming envelope: a stable refusal code, or the envelope to store with
        its expiry capped at this node's TTL (the operator-set maximum)."""
        if env.expires <= now:
            return env, "expired"
        cap = now + min(self.config.ttl_ms, self.config.max_ttl_ms)
        if env.expires > cap:
            env = msgspec.structs.replace(env, expires=cap)
        return env, None

    def admit_local(self, env: Envelope) -> str | None:
        """For an envelope to a mailbox here: ``not_found`` or ``quota_exceeded``, or None
        (and it counts towards the mailbox's pending quota)."""
        if env.to not in self.known_mailboxes:
            return NotFound.code
        held = self.pending_load.get(env.to, 0)
        if held >= self.mailbox_quota.get(env.to, self.config.max_pending_per_mailbox):
            return QuotaExceeded.code
        self.pending_load[env.to] = held + 1
        return None

    def released(self, mailbox: bytes, n: int) -> None:
        """``n`` envelopes of ``mailbox`` were acked (the periodic resync corrects drift)."""
        if n:
            self.pending_load[mailbox] = max(0, self.pending_load.get(mailbox, 0) - n)

    def descriptor_bytes(self, challenge: bytes = b"") -> bytes:
        return Descriptor(
            node_id=self.key.node_id,
            public_url=self.config.public_url,
            version=PROTOCOL_VERSION,
            now=self.clock.now_ms(),
            limits={
                "max_batch_bytes": self.limits.max_batch_bytes,
                "max_frame": self.limits.max_frame,
                "max_inflight": self.limits.max_inflight,
                "max_ttl_ms": self.config.max_ttl_ms,
            },
            rotations=self.rotations,
            challenge=challenge,
            moves=self.moves,
            features=self.features,
            relay=self.relay_link.statement if self.relay_link is not None else b"",
        ).sign(self.key)

    @property
    def features(self) -> tuple[str, ...]:
        """Optional protocol parts served here: the descriptor's and the challenge's list."""
        out = (BLOBS_FEATURE,) if self.blobs_enabled else ()
        return (*out, MULTI_FEATURE) if self.config.multi else out

    async def local_keys(
        self, name: str, claim: bool
    ) -> tuple[SignedDeviceList, dict[str, tuple[str, str]]]:
        raw = await self.store.get_device_list(name)
        # A disabled account answers exactly as a missing one (same code, same message).
        if raw is None or await self.store.account_status(name) != "active":
            raise NotFound("no such user")
        dl = SignedDeviceList(*raw)
        claimed: dict[str, tuple[str, str]] = {}
        if claim:
            for dev in dl.open().devices:
                if dev.mailbox in self.known_mailboxes or await self._knows_elsewhere(dev.mailbox):
                    got = await self.store.claim_otk(dev.mailbox)
                    if got is not None:
                        claimed[dev.device_id] = got
        return dl, claimed

    async def remote_keys(
        self, address: Address, claim: bool
    ) -> tuple[str, SignedDeviceList, dict[str, tuple[str, str]]]:
        """Fetch a remote user's signed device list (and claimed keys) over federation."""
        peer = await self.peers.resolve_host(address.host)
        self.known_peers.add(peer.node_id)
        transport = self.transport_or_fail()

        async def query(url: str) -> dict[str, Any]:
            stamp = self.peers.stamp(peer.node_id)
            return await transport.query_keys(url, peer.node_id, stamp, address.name, claim)

        try:
            obj = await self.peers.call_patiently(peer.node_id, query)
        except RemoteError as exc:
            if exc.code == "clock_skew" and exc.peer_now is not None:
                self.peers.correct_clock(peer.node_id, exc.peer_now)
            elif exc.code == "wrong_destination":
                self.peers.invalidate(peer.node_id)
                peer = await self.peers.resolve_host(address.host)  # KeyChanged if not rotated
            else:
                raise
            obj = await self.peers.call_patiently(peer.node_id, query)
        try:
            dl = SignedDeviceList.from_wire(obj["device_list"])
            claimed = {str(k): (str(v[0]), str(v[1])) for k, v in dict(obj["claimed"]).items()}
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise TransportError("malformed key answer") from exc
        return peer.node_id, dl, claimed

    def transport_or_fail(self) -> PeerTransport:
        if self.transport is None:
            raise LocalProtocolError("node is not running")
        return self.transport

    # ---- lifecycle ---------------------------------------------------------------------------

    def web_app(self) -> web.Application:
        middlewares = [guard.middleware(self.admission)]
        if self.relay is not None:  # <label>.relay_domain goes over that client's link
            middlewares.append(self.relay.middleware())
        app = web.Application(client_max_size=MAX_BATCH_BYTES + 1024, middlewares=middlewares)
        if self.relay is not None:
            app.router.add_get("/haven/v1/relay/link", self.relay.link_ws)
            app.router.add_get("/haven/v1/relay/clients", partial(clients_view, self.relay))
        app.router.add_get("/.well-known/haven/node", partial(federation_api.descriptor, self))
        app.router.add_post("/haven/v1/federation/batch", partial(federation_api.batch, self))
        app.router.add_post("/haven/v1/federation/keys", partial(federation_api.keys, self))
        app.router.add_post("/haven/v1/federation/multi", partial(federation_api.multi, self))
        app.router.add_post("/haven/v1/federation/moved", partial(federation_api.moved, self))
        app.router.add_post(
            "/haven/v1/federation/keys_multi", partial(federation_api.keys_multi, self)
        )
        app.router.add_post("/haven/v1/federation/blob", partial(federation_api.blob, self))
        app.router.add_post(
            "/haven/v1/federation/blob_done", partial(federation_api.blob_done, self)
        )
        app.router.add_get("/haven/v1/client", partial(client_api.client_ws, self))
        app.router.add_get("/haven/v1/stats", self._stats)
        app.router.add_get("/haven/v1/peers", self._peers_view)
        app.router.add_post("/haven/v1/accounts-changed", self._accounts_changed)
        return app

    async def _accounts_changed(self, request: web.Request) -> web.Response:
        """An operator command changed accounts in the store: re-read them now instead of at
        the next refresh, and answer 204 once applied (202 if that takes longer than
        :data:`ACCOUNTS_CONFIRM_S`). Loopback only; it carries nothing and only triggers a
        re-read, at most once a second (requests meanwhile are coalesced into the next one,
        never lost)."""
        if request.remote not in ("127.0.0.1", "::1"):
            raise web.HTTPNotFound()
        self._accounts_wanted += 1
        want = self._accounts_wanted
        self._accounts_dirty.set()
        try:
            async with asyncio.timeout(ACCOUNTS_CONFIRM_S), self._accounts_cond:
                await self._accounts_cond.wait_for(lambda: self._accounts_applied >= want)
        except TimeoutError:
            return web.Response(status=202)
        return web.Response(status=204)

    async def _reread_accounts(self) -> None:
        """Re-read accounts whenever :meth:`_accounts_changed` asked, at most once a second."""
        while True:
            await self._accounts_dirty.wait()
            self._accounts_dirty.clear()
            target = self._accounts_wanted
            try:
                await self.refresh_accounts()
            except HavenError as exc:
                log.error("account refresh failed (%s)", exc.code)
            else:
                async with self._accounts_cond:
                    self._accounts_applied = target
                    self._accounts_cond.notify_all()
            await asyncio.sleep(ACCOUNTS_REREAD_MIN_S)

    async def _peers_view(self, request: web.Request) -> web.Response:
        if request.remote not in ("127.0.0.1", "::1"):
            raise web.HTTPNotFound()
        return web.Response(
            body=packb(await self.peers.describe()), content_type="application/msgpack"
        )

    async def _stats(self, request: web.Request) -> web.Response:
        # Aggregate counters only: no ids, no addresses. Served to loopback callers only.
        if request.remote not in ("127.0.0.1", "::1"):
            raise web.HTTPNotFound()
        body = packb(
            self.metrics.snapshot()
            | {"counts": await self.store.counts(), "connections": self.admission.snapshot()}
            | {"blobs": self.blobs.counts()}
        )
        return web.Response(body=body, content_type="application/msgpack")

    def _ssl(self) -> ssl.SSLContext | None:
        if not self.config.tls_cert:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.config.tls_cert, self.config.tls_key)
        return ctx

    # ---- observability (node/admin.py) ----------------------------------------------------------

    def gauge_sample(self) -> GaugeSample:
        """The gauges' values from what the node counts in memory anyway (no store query)."""
        keys = getattr(self.store, "keys", None)
        disk = self.mailboxes.disk
        return GaugeSample(
            devices=len(self.mailboxes.links),
            unauthenticated=self.admission.unauthenticated,
            open_connections=len(self.admission.conns),
            max_connections=self.admission.max_connections,
            known_peers=len(self.known_peers),
            pending_envelopes=sum(self.pending_load.values()),
            outbox_envelopes=sum(self.quotas.by_dest.values()),
            epoch_keys=len(keys.ids) if isinstance(keys, EpochKeys) else 0,
            disk_full=disk is not None and disk.full,
            ready=self.ready.is_set() and not self.stopping,
        )

    def sample_gauges(self) -> None:
        """Set the gauges now (every scrape, and periodically for multiprocess mode)."""
        self.metrics.sample(self.gauge_sample())

    async def _sample_gauges(self) -> None:
        while True:
            self.sample_gauges()
            await asyncio.sleep(GAUGE_EVERY_S)

    async def readiness(self) -> str | None:
        """None when serving, else why not: ``starting``, ``stopping``, ``disk_full``, ``store``."""
        if self.stopping:
            return "stopping"
        if not self.ready.is_set():
            return "starting"
        disk = self.mailboxes.disk
        if disk is not None and disk.full:
            return "disk_full"
        try:
            async with asyncio.timeout(admin.READY_STORE_S):
                await self.store.account_exists("")  # one indexed lookup
        except Exception:  # noqa: BLE001 - any failure of the store means "not ready"
            return "store"
        return None

    async def _start_admin(self) -> None:
        host, port = admin.parse_listen(self.config.admin_listen)
        self.admin = admin.AdminServer(
            host, port, self.metrics.registry, self.readiness, self.sample_gauges
        )
        url = await self.admin.start()
        admin.write_runtime(self.home, url)

    async def _stop_admin(self) -> None:
        if self.admin is not None:
            admin.remove_runtime(self.home)
            await self.admin.stop()
            self.admin = None

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; then shut down cleanly (nothing acked is lost).

        The admin listener (if enabled) starts first and stops last, so ``/readyz`` says
        ``starting`` while the store opens and ``stopping`` while queued commits settle."""
        if self.admin_enabled:
            await self._start_admin()
        try:
            await self._run(stop)
        finally:
            self.stopping = True
            await self._stop_admin()

    async def _run(self, stop: asyncio.Event) -> None:
        await self.store.open()
        if self.role is not None:
            self.role.bus.now_ms = self.clock.now_ms
            await self.role.bus.open()
            # crash recovery emptied the replay table: nothing created before it is fresh
            self.nonces.not_before = max(self.nonces.not_before, self.role.bus.pg_started_ms)
        try:
            await self.refresh_accounts()
            blobfiles.return_large_buffers_to_the_os()  # 1 MiB chunk buffers (node/blobfiles.py)
            if self.blobs_enabled:
                await self.blobs.open(self.clock.now_ms())
            self.known_peers = {p.node_id for p in await self.store.all_peers()}
            self.pending_load = await self._load()
            self.quotas.resync(await self.store.outbox_counts(), {})
            if self.relay is not None:
                await self.relay.load()
                await held.restore(self, self.relay)  # statements, held bytes (§12.4)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
                self.session = session
                self.transport = PeerTransport(self.key, session, now_ms=self.clock.now_ms)
                self.transport.route = self.held.route
                self._peers = PeerDirectory(
                    self.store, self.transport, self.clock, self.metrics, self._peer_seen
                )
                self._outbox = OutboxSender(
                    self.store,
                    self.mailboxes,
                    self._peers,
                    self.transport,
                    self.clock,
                    self.metrics,
                    self.quotas,
                )
                self.mailboxes.hot_lane = self._outbox  # send before store (node/outbox.py)
                if self.role is not None:
                    self.role.bind(self.store, self.mailboxes, self._outbox)
                fd_limit = admission.raise_fd_limit()
                self.admission.max_connections = admission.connection_budget(
                    self.config.max_connections, fd_limit
                )
                self.runner = web.AppRunner(
                    self.web_app(),
                    access_log=None,
                    handle_signals=False,
                    shutdown_timeout=2,
                    # the admission watchdog closes idle connections first; this is a backstop
                    keepalive_timeout=self.config.idle_timeout_ms / 1000 + 5,
                    max_headers=32,
                )
                await self.runner.setup()
                site = guard.GuardedSite(
                    self.runner,
                    self.admission,
                    self.config.listen_host,
                    self.config.listen_port,
                    ssl_context=self._ssl(),
                    reuse_port=self.role is not None,  # the workers share one address
                )
                await site.start()
                self.port = _bound_port(site) or self.config.listen_port
                if self.role is not None and self.role.worker_port:  # behind a reverse proxy
                    await guard.GuardedSite(
                        self.runner,
                        self.admission,
                        "127.0.0.1",
                        self.role.worker_port,
                        ssl_context=self._ssl(),
                    ).start()
                try:
                    await self._serve(stop)
                finally:
                    await self.runner.cleanup()
        finally:
            self.blobs.close()
            if self.role is not None:
                await self.role.bus.close()
            await self.store.close()

    async def _serve(self, stop: asyncio.Event) -> None:
        tasks: list[asyncio.Task[None]] = []
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.mailboxes.run()),
                    tg.create_task(self.outbox.run()),
                ]
                if self.role is None or self.role.leader:  # the leader alone rotates keys
                    tasks.append(tg.create_task(self.sweeper.run()))
                if self.role is not None:
                    tasks.append(tg.create_task(self.role.bus.run()))
                    tasks.append(tg.create_task(self.role.run()))
                tasks.append(tg.create_task(self._refresh_caches()))
                tasks.append(tg.create_task(self._reread_accounts()))
                if self.blobs_enabled:
                    tasks.append(tg.create_task(self.blob_api.run()))
                tasks.append(tg.create_task(self.admission.watchdog()))
                tasks.append(tg.create_task(self._sample_gauges()))
                if self.lan_enabled:
                    tasks.append(tg.create_task(self._run_lan()))
                if self.relay_link is not None and (self.role is None or self.role.leader):
                    tasks.append(tg.create_task(self.relay_link.run()))
                if self.moves and (self.role is None or self.role.leader):
                    tasks.append(tg.create_task(self._push_moves()))
                self.ready.set()
                log.info("node %s serving", self.key.node_id)
                await stop.wait()
                self.stopping = True
                self.sample_gauges()
                for t in tasks[1:]:
                    t.cancel()
                # acks and peers' acceptances that came in are committed before the committer
                # stops (bounded: a failing disk must not hold the shutdown)
                await self.mailboxes.settle(SETTLE_AT_STOP_S)
                tasks[0].cancel()
        except* asyncio.CancelledError:
            pass
        except* HavenError as eg:
            for exc in eg.exceptions:
                log.error("background task failed: %s", getattr(exc, "code", "internal"))
            raise

    async def _push_moves(self) -> None:
        """Tell every pinned peer where this node moved (once per start: node/moves.py)."""
        await push_moves(self.moves, self.store, self.peers, self.transport_or_fail())


def _bound_port(site: web.TCPSite) -> int | None:
    server = site._server
    sockets = getattr(server, "sockets", None)
    if sockets:
        return int(sockets[0].getsockname()[1])
    return None


def build(home: str, clock: Clock | None = None) -> Node:
    config = NodeConfig.load(home)
    return Node(home, config, load_node_key(home), clock or SystemClock(), open_store(home, config))


__all__ = ["KeyChanged", "Node", "build"]
