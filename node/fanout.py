"""Batched key queries for group setup (docs/protocol.md §11.4).

A device asks its home node for the keys of many addresses in one ``query_keys_multi`` frame.
The home node answers local addresses from its store and groups the remote ones by host: each
host is resolved and pinned as for ``query_keys``, then asked **once** with a signed
``POST /haven/v1/federation/keys_multi`` if its descriptor lists ``"multi"``, else name by name
with ``/keys`` (a node without the feature). Every address gets its own result and code; one
host failing fails only its addresses. Nothing here logs an address or a name.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from federation.devicelist import SignedDeviceList
from federation.errors import (
    HavenError,
    KeysUnavailable,
    MalformedFrame,
    NotFound,
    RateLimited,
)
from federation.fanout import KeysMultiAnswer, KeysMultiQuery
from federation.ids import Address
from federation.multi import FEATURE
from federation.transport import RemoteError

from .store import PeerRecord

if TYPE_CHECKING:
    from .app import Node

T = TypeVar("T")
Claimed = dict[str, tuple[str, str]]
# (address, node id or "", signed list or None, claimed keys, code): frames.KeyResult
Result = tuple[str, str, SignedDeviceList | None, Claimed, str]
# codes a peer may give for one name that are passed on as they are; others: keys_unavailable
PASSED_ON = {NotFound.code, KeysUnavailable.code, MalformedFrame.code, RateLimited.code}
V1_PARALLEL = 8  # /keys requests at once to a node without "multi"
V1_PATIENCE_S = 20.0  # how long names for such a node wait for the remotekeys budget ...
V1_RETRY_S = 0.05  # ... looking again this often; then they get rate_limited


class KeysFanout:
    """The home node's side of ``query_keys_multi``."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def query(self, account: str, addresses: tuple[str, ...], claim: bool) -> list[Result]:
        """One result per address, in the order asked (frames.KeysMulti). Raises RateLimited
        only when the account's local lookup budget is spent (the whole frame is refused)."""
        node = self.node
        results: list[Result | None] = [None] * len(addresses)
        local: list[tuple[int, str]] = []
        remote: dict[str, list[tuple[int, str]]] = {}
        for i, text in enumerate(addresses):
            try:
                address = Address.parse(text)
            except ValueError:
                results[i] = (text, "", None, {}, MalformedFrame.code)
                continue
            if address.host == node.config.public_host:
                local.append((i, address.name))
            else:
                remote.setdefault(address.host, []).append((i, address.name))
        now = node.clock.now_ms()
        if not node.rates.take("keys:" + account, now, cost=max(1, len(local))):
            raise RateLimited("too many key queries")
        node.metrics.event("keys_multi.frames")
        for i, name in local:
            try:
                dl, claimed = await node.local_keys(name, claim)
            except NotFound:
                results[i] = (addresses[i], "", None, {}, NotFound.code)
            else:
                results[i] = (addresses[i], node.key.node_id, dl, claimed, "")
        answers = await asyncio.gather(
            *(
                self._host(account, host, [n for _, n in rows], claim)
                for host, rows in remote.items()
            )
        )
        for rows, (node_id, by_name) in zip(remote.values(), answers, strict=True):
            for i, name in rows:
                got, keys, code = by_name.get(name, (None, {}, KeysUnavailable.code))
                results[i] = (addresses[i], node_id if not code else "", got, keys, code)
        return [r for r in results if r is not None]

    async def _host(
        self, account: str, host: str, names: list[str], claim: bool
    ) -> tuple[str, dict[str, tuple[SignedDeviceList | None, Claimed, str]]]:
        """Ask one host for ``names``: ``(node id, {name: (list, claimed, code)})``."""
        node = self.node
        unique = list(dict.fromkeys(names))
        try:
            peer = await node.peers.resolve_host(host)
        except HavenError:
            return "", {n: (None, {}, KeysUnavailable.code) for n in unique}
        node.known_peers.add(peer.node_id)
        if FEATURE in node.peers.features(peer.node_id):
            if not node.rates.take("remotekeys:" + account, node.clock.now_ms()):
                return peer.node_id, {n: (None, {}, RateLimited.code) for n in unique}
            try:
                return peer.node_id, await self._ask_multi(peer, host, unique, claim)
            except RemoteError as exc:
                if exc.code != NotFound.code:  # else: the feature was turned off; ask by name
                    return peer.node_id, {n: (None, {}, KeysUnavailable.code) for n in unique}
                node.peers.drop_feature(peer.node_id, FEATURE)
            except HavenError:
                return peer.node_id, {n: (None, {}, KeysUnavailable.code) for n in unique}
        return peer.node_id, await self._ask_by_name(account, host, unique, claim)

    async def _ask_multi(
        self, peer: PeerRecord, host: str, names: list[str], claim: bool
    ) -> dict[str, tuple[SignedDeviceList | None, Claimed, str]]:
        node = self.node
        transport = node.transport_or_fail()
        query = KeysMultiQuery(tuple(names), claim)

        def call(node_id: str) -> Callable[[str], Awaitable[KeysMultiAnswer]]:
            async def ask(url: str) -> KeysMultiAnswer:
                return await transport.query_keys_multi(
                    url, node_id, node.peers.stamp(node_id), query
                )

            return ask

        answer = await self._patiently(peer, host, call)
        node.metrics.event("keys_multi.requests_out")
        asked = set(names)
        out: dict[str, tuple[SignedDeviceList | None, Claimed, str]] = {}
        for name, dl, claimed, code in answer.results:
            if name not in asked or name in out:
                continue  # not asked, or answered twice: the first answer counts
            if code or dl is None:
                out[name] = (None, {}, code if code in PASSED_ON else KeysUnavailable.code)
            else:
                out[name] = (dl, {k: (v[0], v[1]) for k, v in claimed.items()}, "")
        return out

    async def _patiently(
        self,
        peer: PeerRecord,
        host: str,
        call: Callable[[str], Callable[[str], Awaitable[T]]],
    ) -> T:
        """One federation call, re-stamped once after ``clock_skew`` and re-resolved once after
        ``wrong_destination``, as :meth:`Node.remote_keys` does."""
        node = self.node
        try:
            return await node.peers.call_patiently(peer.node_id, call(peer.node_id))
        except RemoteError as exc:
            if exc.code == "clock_skew" and exc.peer_now is not None:
                node.peers.correct_clock(peer.node_id, exc.peer_now)
            elif exc.code == "wrong_destination":
                node.peers.invalidate(peer.node_id)
                peer = await node.peers.resolve_host(host)  # KeyChanged if not rotated
            else:
                raise
            return await node.peers.call_patiently(peer.node_id, call(peer.node_id))

    async def _ask_by_name(
        self, account: str, host: str, names: list[str], claim: bool
    ) -> dict[str, tuple[SignedDeviceList | None, Claimed, str]]:
        """A node without ``"multi"``: ``/keys`` name by name, a few at once, each costing a
        ``remotekeys`` token as a ``query_keys`` frame does (waited for up to
        :data:`V1_PATIENCE_S`, so a group larger than the bucket's burst still gets its keys)."""
        node = self.node
        gate = asyncio.Semaphore(V1_PARALLEL)

        loop = asyncio.get_running_loop()
        deadline = loop.time() + V1_PATIENCE_S

        async def one(name: str) -> tuple[SignedDeviceList | None, Claimed, str]:
            async with gate:
                while True:
                    # the budgets (ours and the peer's) refill at 20/s: a large group waits
                    # for them, up to a bound
                    if not node.rates.take("remotekeys:" + account, node.clock.now_ms()):
                        if loop.time() > deadline:
                            return None, {}, RateLimited.code
                        await asyncio.sleep(V1_RETRY_S)
                        continue
                    try:
                        _, dl, claimed = await node.remote_keys(Address(name, host), claim)
                    except NotFound:
                        return None, {}, NotFound.code
                    except RemoteError as exc:
                        if exc.code == RateLimited.code and loop.time() < deadline:
                            continue
                        code = exc.code if exc.code in PASSED_ON else KeysUnavailable.code
                        return None, {}, code
                    except HavenError:
                        return None, {}, KeysUnavailable.code
                    return dl, claimed, ""

        got = await asyncio.gather(*(one(n) for n in names))
        return dict(zip(names, got, strict=True))


__all__ = ["KeysFanout"]
