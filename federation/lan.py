"""LAN discovery over mDNS: the thin asyncio shell around python-zeroconf (ARCHITECTURE §4).

:class:`LanAnnouncer` registers one ``_haven._tcp.local.`` service whose TXT record carries the
node's blinded, hourly-rotating id (:mod:`federation.lanid`). Instance and server names are random
and are replaced whenever the blinded id changes, so neither the DNS names nor the TXT record link
one hour (or one LAN) to the next. Only IPv4 is announced and browsed for now.

:class:`LanBrowser` watches the service type and turns zeroconf's events into
:class:`~federation.lanid.LanCandidate` values. It does not decide who a candidate is: the owner
calls :func:`federation.lanid.recognise` with its pinned keys (which also filters out our own
announcement) and then proves the node key over the transport before using an address.

Liveness. A peer that leaves cleanly sends an mDNS goodbye and is reported through ``on_removed``
within about a second. A peer that vanishes (cable pulled, Wi-Fi gone) sends nothing, and
python-zeroconf raises every received PTR TTL to at least 1125 s, so its browser would report the
removal only after ~19 minutes. The browser therefore re-resolves every known service every
``recheck_interval_s``: while the SRV/TXT/A records (TTL ``ttl_s`` chosen by the announcer, 120 s by
default) are cached this costs nothing; once they expire it sends one query, and a service that does
not answer within ``resolve_timeout_s`` is reported as removed. If it answers again later (while
zeroconf still lists it) it is reported as a candidate again.

Zeroconf runs its callbacks in our event loop; each resolution is a task owned by the browser and
cancelled by :meth:`LanBrowser.close`. Exceptions from zeroconf and sockets are translated into
:class:`~federation.errors.TransportError`; nothing raised in a callback escapes into zeroconf.
Logs name blinded ids only, never addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import ifaddr
from zeroconf import (
    Error as ZeroconfError,
)
from zeroconf import (
    InterfaceChoice,
    IPVersion,
    NonUniqueNameException,
    ServiceStateChange,
    Zeroconf,
)
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .clock import Clock
from .errors import LocalProtocolError, TransportError
from .lanid import LAN_VERSION, LanCandidate, parse_txt, txt_record

SERVICE_TYPE = "_haven._tcp.local."
DEFAULT_TTL_S = 120
MAX_SERVICES = 256  # services tracked per browser; more on one LAN is a flood, not a LAN
_REGISTER_ATTEMPTS = 3

log = logging.getLogger(__name__)
_T = TypeVar("_T")


def _resolve_interfaces(interfaces: Sequence[str] | None) -> list[str]:
    """Local IPv4 addresses for ``interfaces`` (names such as ``eth0``, or addresses).

    ``None`` means every interface. Loopback addresses are kept here (zeroconf may listen there);
    :func:`_announce_addresses` drops them.
    """
    adapters = ifaddr.get_adapters()
    by_name = {a.name: [str(ip.ip) for ip in a.ips if ip.is_IPv4] for a in adapters}
    if interfaces is None:
        return sorted({addr for addrs in by_name.values() for addr in addrs})
    result: set[str] = set()
    for item in interfaces:
        try:
            result.add(str(ipaddress.IPv4Address(item)))
        except ValueError:
            result.update(by_name.get(item, []))
    return sorted(result)


def _announce_addresses(interfaces: Sequence[str] | None) -> list[str]:
    """The addresses worth announcing: every non-loopback IPv4 address of ``interfaces``."""
    return [a for a in _resolve_interfaces(interfaces) if not ipaddress.IPv4Address(a).is_loopback]


def _zeroconf_interfaces(interfaces: Sequence[str] | None) -> InterfaceChoice | list[str]:
    """What to pass as zeroconf's ``interfaces=``: all of them, or the resolved addresses.

    Raises:
        TransportError: if named interfaces have no IPv4 address.
    """
    if interfaces is None:
        return InterfaceChoice.All
    resolved = _resolve_interfaces(interfaces)
    if not resolved:
        raise TransportError("no IPv4 address on the requested LAN interfaces")
    return resolved


def _open_zeroconf(interfaces: Sequence[str] | None) -> AsyncZeroconf:
    """Create an IPv4-only AsyncZeroconf, translating socket errors."""
    choice = _zeroconf_interfaces(interfaces)
    try:
        return AsyncZeroconf(interfaces=choice, ip_version=IPVersion.V4Only)
    except (OSError, ZeroconfError) as exc:
        raise TransportError(f"cannot open mDNS sockets: {type(exc).__name__}") from exc


class LanAnnouncer:
    """Announces this node on the LAN under a blinded id that rotates every hour.

    The owner calls :meth:`refresh` when the hour may have changed (see
    :func:`federation.lanid.ms_until_rotation`) or the network may have changed.
    """

    def __init__(
        self,
        *,
        public_key: bytes,
        port: int,
        clock: Clock,
        interfaces: list[str] | None = None,
        addresses: list[str] | None = None,
        ttl_s: int = DEFAULT_TTL_S,
        version: int = LAN_VERSION,
    ) -> None:
        """Args:
        public_key: the node's 32-byte public key (never announced, only used as BLAKE2b key).
        port: the federation port to announce.
        clock: injected time; decides the blinded id's hour.
        interfaces: interface names or local IPv4 addresses to announce on; None = all.
        addresses: addresses to announce; None = every non-loopback IPv4 of ``interfaces``.
        ttl_s: TTL of the announced records, i.e. how soon a silently vanished node is noticed.
        version: announcement version put in the TXT record.
        """
        txt_record(public_key, clock.now_ms(), port, version)  # validate arguments early
        if ttl_s < 1:
            raise ValueError("ttl_s must be positive")
        self._public_key = public_key
        self._port = port
        self._clock = clock
        self._interfaces = interfaces
        self._addresses = addresses
        self._ttl_s = ttl_s
        self._version = version
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None
        self._blinded: str | None = None
        self._announced_addresses: tuple[str, ...] = ()

    @property
    def blinded(self) -> str | None:
        """The blinded id currently announced, or None while nothing is announced."""
        return self._blinded if self._info is not None else None

    async def start(self) -> None:
        """Open the mDNS sockets and announce (if there is an address to announce).

        Raises:
            TransportError: if the sockets cannot be opened or registration fails.
        """
        if self._zc is not None:
            return
        self._zc = _open_zeroconf(self._interfaces)
        try:
            await self.refresh()
        except BaseException:
            await self.close()
            raise

    async def refresh(self) -> bool:
        """Re-announce under fresh names if the blinded id or the local addresses changed.

        Returns:
            True if the announcement changed (withdrawn, replaced or made).

        Raises:
            TransportError: if re-registration fails.
            LocalProtocolError: if called before :meth:`start`.
        """
        zc = self._zc
        if zc is None:
            raise LocalProtocolError("LanAnnouncer.refresh() before start()")
        txt = txt_record(self._public_key, self._clock.now_ms(), self._port, self._version)
        addresses = tuple(
            sorted(
                self._addresses
                if self._addresses is not None
                else _announce_addresses(self._interfaces)
            )
        )
        unchanged = txt["id"] == self._blinded and addresses == self._announced_addresses
        if unchanged and (self._info is not None or not addresses):
            return False
        await self._withdraw()
        self._blinded, self._announced_addresses = txt["id"], addresses
        if not addresses:
            log.info("lan: no IPv4 LAN address, not announcing")
            return True
        await self._register(zc, txt, addresses)
        log.info("lan: announcing blinded id %s", self._blinded)
        return True

    async def reannounce(self) -> None:
        """Broadcast the current records again, so peers that lost us (a link that went down
        and came back) find us without waiting for their next query."""
        if self._zc is None or self._info is None:
            return
        try:
            await (await self._zc.async_update_service(self._info))
        except (OSError, ZeroconfError) as exc:
            raise TransportError(f"mDNS re-announce failed: {type(exc).__name__}") from exc

    async def close(self) -> None:
        """Send goodbyes and close the sockets. Safe to call twice."""
        zc, self._zc = self._zc, None
        if zc is None:
            return
        try:
            await self._withdraw(zc)
        finally:
            with contextlib.suppress(OSError, ZeroconfError):
                await zc.async_close()

    async def _register(
        self, zc: AsyncZeroconf, txt: dict[str, str], addresses: tuple[str, ...]
    ) -> None:
        """Register under random names; a (vanishingly unlikely) name clash picks new ones."""
        for _ in range(_REGISTER_ATTEMPTS):
            label = secrets.token_hex(8)
            info = AsyncServiceInfo(
                SERVICE_TYPE,
                f"{label}.{SERVICE_TYPE}",
                port=self._port,
                properties=txt,
                server=f"{secrets.token_hex(8)}.local.",
                host_ttl=self._ttl_s,
                other_ttl=self._ttl_s,
                parsed_addresses=list(addresses),
            )
            try:
                await (await zc.async_register_service(info))
            except NonUniqueNameException:
                continue
            except (OSError, ZeroconfError) as exc:
                raise TransportError(f"mDNS registration failed: {type(exc).__name__}") from exc
            self._info = info
            return
        raise TransportError("mDNS registration failed: no unique name")

    async def _withdraw(self, zc: AsyncZeroconf | None = None) -> None:
        """Send goodbyes for the current announcement, if any."""
        info, self._info = self._info, None
        zc = zc or self._zc
        if info is None or zc is None:
            return
        try:
            await (await zc.async_unregister_service(info))
        except (OSError, ZeroconfError) as exc:
            # The peers will expire the records after ttl_s; nothing else to do.
            log.info("lan: goodbye for %s not sent: %s", self._blinded, type(exc).__name__)


@dataclass(slots=True)
class _Seen:
    """What the browser knows about one service name."""

    candidate: LanCandidate | None = None  # last candidate reported through on_candidate
    live: bool = False  # True between on_candidate and on_removed
    malformed: bool = False  # last resolution had an unusable TXT record (logged once)


class LanBrowser:
    """Reports Haven announcements on the LAN as :class:`LanCandidate` values.

    ``on_candidate`` is called when a service appears, changes (addresses, port, blinded id) or
    answers again after being reported lost. ``on_removed`` is called with the blinded id when a
    service says goodbye, stops answering, or replaces its blinded id. Callbacks run in the event
    loop and must not block; exceptions they raise are logged and swallowed.
    """

    def __init__(
        self,
        *,
        on_candidate: Callable[[LanCandidate], None],
        on_removed: Callable[[str], None] | None = None,
        interfaces: list[str] | None = None,
        recheck_interval_s: float = 30.0,
        resolve_timeout_s: float = 3.0,
    ) -> None:
        """Args:
        on_candidate: called with every new or changed candidate.
        on_removed: called with the blinded id of a candidate that went away.
        interfaces: interface names or local IPv4 addresses to listen on; None = all.
        recheck_interval_s: how often known services are re-resolved (see module docstring).
        resolve_timeout_s: how long a service may take to answer before it counts as gone.
        """
        if recheck_interval_s <= 0 or resolve_timeout_s <= 0:
            raise ValueError("intervals must be positive")
        self._on_candidate = on_candidate
        self._on_removed = on_removed
        self._interfaces = interfaces
        self._recheck_interval_s = recheck_interval_s
        self._resolve_timeout_ms = int(resolve_timeout_s * 1000)
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._seen: dict[str, _Seen] = {}
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._recheck: asyncio.Task[None] | None = None

    def candidates(self) -> list[LanCandidate]:
        """The candidates currently believed reachable."""
        return [s.candidate for s in self._seen.values() if s.live and s.candidate is not None]

    async def start(self) -> None:
        """Open the mDNS sockets and start browsing.

        Raises:
            TransportError: if the sockets cannot be opened.
        """
        if self._zc is not None:
            return
        self._zc = _open_zeroconf(self._interfaces)
        try:
            self._browser = AsyncServiceBrowser(
                self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_state_change]
            )
        except (OSError, ZeroconfError) as exc:
            await self.close()
            raise TransportError(f"cannot browse mDNS: {type(exc).__name__}") from exc
        self._recheck = asyncio.create_task(self._recheck_loop(), name="lan-recheck")

    async def close(self) -> None:
        """Stop browsing, cancel pending resolutions and close the sockets. Safe to call twice."""
        tasks = [*self._resolving.values(), *([self._recheck] if self._recheck else [])]
        self._resolving.clear()
        self._recheck = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        browser, self._browser = self._browser, None
        zc, self._zc = self._zc, None
        with contextlib.suppress(OSError, ZeroconfError):
            if browser is not None:
                await browser.async_cancel()
            if zc is not None:
                await zc.async_close()
        self._seen.clear()

    def _on_state_change(
        self,
        zeroconf: Zeroconf,
        service_type: str,
        name: str,
        state_change: ServiceStateChange,
    ) -> None:
        """Zeroconf's handler (runs in our loop). Must never raise into zeroconf."""
        try:
            if state_change is ServiceStateChange.Removed:
                self._forget(name)
            elif name in self._seen or len(self._seen) < MAX_SERVICES:
                self._seen.setdefault(name, _Seen())
                self._resolve_soon(name, restart=True)
        except Exception:  # a raise here would break zeroconf's dispatch
            log.exception("lan: failed to handle a service event")

    def _resolve_soon(self, name: str, *, restart: bool) -> None:
        """Start resolving ``name`` unless a resolution is running (restarted if ``restart``)."""
        running = self._resolving.get(name)
        if running is not None:
            if not restart:
                return
            running.cancel()
        task = asyncio.get_running_loop().create_task(self._resolve(name), name="lan-resolve")
        self._resolving[name] = task
        task.add_done_callback(lambda t: self._resolve_done(name, t))

    def _resolve_done(self, name: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]

    async def _recheck_loop(self) -> None:
        """Re-resolve every known service periodically, to notice silent departures."""
        while True:
            await asyncio.sleep(self._recheck_interval_s)
            for name in list(self._seen):
                self._resolve_soon(name, restart=False)

    async def _resolve(self, name: str) -> None:
        """Resolve one service and report what changed."""
        if self._zc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        try:
            answered = await info.async_request(self._zc.zeroconf, self._resolve_timeout_ms)
        except (OSError, ZeroconfError) as exc:
            log.debug("lan: resolving a service failed: %s", type(exc).__name__)
            answered = False
        seen = self._seen.get(name)
        if seen is None:  # removed while we were waiting
            return
        if not answered:
            self._lose(seen)
            return
        candidate = _candidate(info)
        if candidate is None:
            if not seen.malformed:
                log.debug("lan: ignoring a service with a malformed announcement")
            seen.malformed = True
            self._lose(seen)
            return
        seen.malformed = False
        if seen.live and seen.candidate == candidate:
            return
        if seen.live and seen.candidate is not None and seen.candidate.blinded != candidate.blinded:
            self._lose(seen)
        seen.candidate, seen.live = candidate, True
        self._call(self._on_candidate, candidate)

    def _forget(self, name: str) -> None:
        task = self._resolving.pop(name, None)
        if task is not None:
            task.cancel()
        seen = self._seen.pop(name, None)
        if seen is not None:
            self._lose(seen)

    def _lose(self, seen: _Seen) -> None:
        """Report ``seen`` as gone, once."""
        if not seen.live or seen.candidate is None:
            return
        seen.live = False
        log.debug("lan: %s went away", seen.candidate.blinded)
        if self._on_removed is not None:
            self._call(self._on_removed, seen.candidate.blinded)

    @staticmethod
    def _call(callback: Callable[[_T], None], value: _T) -> None:
        try:
            callback(value)
        except Exception:  # the owner's bug must not stop discovery
            log.exception("lan: discovery callback raised")


def _candidate(info: AsyncServiceInfo) -> LanCandidate | None:
    """A candidate from a resolved service, or None if its TXT or addresses are unusable."""
    parsed = parse_txt(info.properties)
    addresses = tuple(sorted(info.parsed_addresses(IPVersion.V4Only)))
    if parsed is None or not addresses:
        return None
    blinded, port, version = parsed
    return LanCandidate(blinded=blinded, addresses=addresses, port=port, version=version)
