"""Held mode (docs/protocol.md §12.4) on real nodes in this process, over 127.0.0.1.

A relay node (relay service on, routing by Host as in production) and its client node (public
host ``heldclient.relay.test:PORT``, resolved to 127.0.0.1 by the peer's resolver); a peer
posts with the real :class:`PeerTransport` and checks every answer. The client links with its
invite (the relay stores the hello's statement; the client's descriptor publishes it), then
goes offline (stopped); the relay holds what the peer sends, signed as itself with the
client's statement, and restarts meanwhile (the stored statement and the held bytes carry
over: no 503, the same quota); a ``/multi`` for two of the client's mailboxes is held per
recipient. The client comes back, and the relay's outbox forwards the held rows over the link
(here: the client's own listener, as the client serves a link's ``req`` frames, §12.3), whose
first answer is lost mid-batch. The client ends with every envelope once, in order."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from federation.clock import SystemClock
from federation.errors import BadSignature, TransportError
from federation.fanout import MultiBatch
from federation.multi import EPH_LEN, HEADER_LEN
from federation.relayauth import RelayAuth
from federation.relaylink import TOKEN_LEN
from federation.signing import Descriptor, NodeKey
from federation.transport import DESCRIPTOR_PATH, PeerTransport, RemoteError
from federation.wire import Batch, Envelope
from node.app import Node, load_node_key, open_store
from node.cli import init_node
from node.config import NodeConfig
from node.relay import describe_clients, token_hash
from node.relay_client import RelayInfo

from .harness import async_wait_until, free_port

N = 24
BODY = 1000
MARK = b"held-in-clear-"
LABEL = "heldclient"


class Loopback(aiohttp.abc.AbstractResolver):
    """Every name is 127.0.0.1 (the relay's wildcard DNS, for this test's peer)."""

    async def resolve(self, host: str, port: int = 0, family: int = 0) -> list[dict[str, object]]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": 0,
            }
        ]

    async def close(self) -> None:
        pass


async def start(
    home: Path,
    public_url: str,
    port: int,
    fresh: bool = True,
    relay: bool = False,
    via: RelayInfo | None = None,
) -> tuple[Node, asyncio.Event, asyncio.Task[None]]:
    if fresh:
        init_node(str(home), public_url, f"127.0.0.1:{port}", 7 * 86_400_000, False)
    if via is not None:  # its relay.json, as ``init --via-relay`` leaves it
        via.save(str(home))
    config = NodeConfig.load(str(home))
    if relay:
        config = dataclasses.replace(config, relay=True, relay_domain="relay.test")
    node = Node(
        str(home), config, load_node_key(str(home)), SystemClock(), open_store(str(home), config)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    await node.ready.wait()
    return node, stop, task


def multi(mailbox: bytes, other: bytes) -> MultiBatch:
    """One ``/multi`` submission for two mailboxes (held per recipient)."""
    return MultiBatch(
        os.urandom(EPH_LEN),
        SystemClock().now_ms() + 3_600_000,
        (MARK + b"multi").ljust(BODY, b"."),
        (
            (os.urandom(16), mailbox, os.urandom(HEADER_LEN)),
            (os.urandom(16), other, b"h" * HEADER_LEN),
        ),
    )


def multi_bytes() -> int:
    return sum(len(e.body) for e in multi(os.urandom(16), os.urandom(16)).envelopes())


def envelope(mailbox: bytes, i: int) -> Envelope:
    body = (MARK + str(i).encode()).ljust(BODY, b".")
    return Envelope(os.urandom(16), mailbox, SystemClock().now_ms() + 3_600_000, body)


def _files_holding(home: Path, needle: bytes) -> list[str]:
    return [f.name for f in home.rglob("*") if f.is_file() and needle in f.read_bytes()]


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[dict[str, object]]:
    rport, cport = free_port(), free_port()
    relay, rstop, rtask = await start(
        tmp_path / "relay", f"http://relay.test:{rport}", rport, relay=True
    )
    # an invite for the client with a small quota; the client links with it (binding the
    # label, and leaving its statement with the relay)
    token, now = os.urandom(TOKEN_LEN), SystemClock().now_ms()
    quota = N * BODY + multi_bytes() + BODY // 2
    await relay.store.add_relay_client(LABEL, token_hash(token), quota, now + 86_400_000, 0)  # type: ignore[attr-defined]
    host = f"{LABEL}.relay.test:{rport}"
    via = RelayInfo(f"http://127.0.0.1:{rport}", relay.key.node_id, LABEL, host, token)
    chome = tmp_path / "client"
    client, cstop, ctask = await start(chome, f"http://{host}", cport, via=via)
    stops = {"relay": (rstop, rtask), "client": (cstop, ctask)}
    try:
        yield {
            "relay": relay,
            "client": client,
            "chome": chome,
            "cport": cport,
            "rport": rport,
            "stops": stops,
        }
    finally:
        for stop, task in stops.values():
            stop.set()
            await task


async def test_held_while_offline_then_forwarded_once_in_order(
    world: dict[str, object], tmp_path: Path
) -> None:
    relay, client = world["relay"], world["client"]
    assert isinstance(relay, Node) and isinstance(client, Node)
    rport, cport = world["rport"], world["cport"]
    cid = client.key.node_id
    mailbox, other = os.urandom(16), os.urandom(16)
    await client.store.create_account("bob", SystemClock().now_ms())
    await client.store.add_device("bob", mailbox, os.urandom(32))
    await client.store.create_account("carol", SystemClock().now_ms())
    await client.store.add_device("carol", other, os.urandom(32))
    await client.refresh_accounts()
    held_multi = multi(mailbox, other)
    host = f"{LABEL}.relay.test:{rport}"
    store = relay.store
    service, link_up = relay.relay, client.relay_link
    assert service is not None and link_up is not None

    async def linked() -> bool:
        return service.link_of(cid) is not None and link_up.statement != b""

    await async_wait_until(linked, timeout=60, what="the client's link")
    # the relay keeps the hello's statement in its store; the client publishes it
    assert await store.relay_auths() == {cid: link_up.statement}  # type: ignore[attr-defined]
    RelayAuth.decode(link_up.statement).check(cid, relay.key.node_id, SystemClock().now_ms())

    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(resolver=Loopback(), force_close=True)
    ) as session:
        link_calls = {"n": 0}

        async def link(
            method: str, path: str, headers: list[tuple[str, str]], body: bytes
        ) -> tuple[int, list[tuple[str, str]], bytes]:
            """The client serving a ``req``: the same request to its own listener. The first
            answer is lost after the client took it (the link drops mid-batch)."""
            link_calls["n"] += 1
            url = f"http://127.0.0.1:{cport}{path}"
            try:
                async with session.request(method, url, headers=headers, data=body) as resp:
                    data = await resp.read()
                    out = (resp.status, list(resp.headers.items()), data)
            except (aiohttp.ClientError, OSError) as exc:
                raise TransportError("link closed") from exc
            if link_calls["n"] == 1:
                raise TransportError("link closed")
            return out

        base = f"http://{host}"
        async with session.get(base + DESCRIPTOR_PATH) as resp:  # over the link
            assert resp.status == 200
            assert Descriptor.verify_decode(await resp.read()).relay == link_up.statement

        # the client goes offline: its node stops, and comes back later without its link
        # (this test's lossy link stands in for it)
        cstop, ctask = world["stops"]["client"]  # type: ignore[index]
        cstop.set()
        await ctask
        (Path(world["chome"]) / "relay.json").unlink()  # type: ignore[arg-type]

        async def unlinked() -> bool:
            return service.link_of(cid) is None

        await async_wait_until(unlinked, timeout=60, what="the relay to see the link gone")

        peer = PeerTransport(NodeKey.generate(), session)
        sent: list[bytes] = []
        for start_at in range(0, N, 8):
            if start_at == 16:  # the relay restarts while the client is offline
                rstop, rtask = world["stops"]["relay"]  # type: ignore[index]
                rstop.set()
                await rtask
                relay, rstop, rtask = await start(
                    tmp_path / "relay", "", rport, fresh=False, relay=True
                )
                world["stops"]["relay"] = (rstop, rtask)  # type: ignore[index]
                store = relay.store
                assert relay.held.held(cid) == 16 * BODY  # recounted from the stored rows
            envs = [envelope(mailbox, i) for i in range(start_at, start_at + 8)]
            got = await peer.post_batch(base, cid, SystemClock().now_ms(), Batch(tuple(envs)))
            assert got.accepted == tuple(e.id for e in envs) and got.rejected == ()
            sent += [e.id for e in envs]
        # one /multi for two of the client's mailboxes: held per recipient
        got = await peer.post_multi(base, cid, SystemClock().now_ms(), held_multi.encode())
        assert got.accepted == tuple(r[0] for r in held_multi.recips) and got.rejected == ()
        again = await peer.post_batch(base, cid, SystemClock().now_ms(), Batch(tuple([envs[-1]])))
        assert again.accepted == (envs[-1].id,)  # a resend: accepted, held once
        over = envelope(mailbox, N)
        got = await peer.post_batch(base, cid, SystemClock().now_ms(), Batch((over,)))
        assert got.rejected == ((over.id, "quota_exceeded"),)
        assert (await relay.store.outbox_counts()).get(cid) == N + 2
        assert relay.held.held(cid) == N * BODY + multi_bytes()
        shown = await describe_clients(store, relay.relay)  # haven node relay-clients
        assert [(r["label"], r["held"], r["connected"]) for r in shown] == [(LABEL, N + 2, False)]

        # only batches are held: a key query or the descriptor is 503 unavailable
        with pytest.raises(RemoteError) as exc:
            await peer.query_keys(base, cid, SystemClock().now_ms(), "bob", False)
        assert exc.value.code == "unavailable"
        async with session.get(base + DESCRIPTOR_PATH) as resp:
            assert resp.status == 503
        # addressed to the relay's own id, the relay's answer is its own and plain
        with pytest.raises((RemoteError, BadSignature)):
            await peer.post_batch(base, relay.key.node_id, SystemClock().now_ms(), Batch(()))

        # sealed at rest: no body in clear in any of the relay's files
        await relay.store.checkpoint()
        assert _files_holding(Path(relay.home), MARK) == []

        # the client comes back and links again: the relay forwards, the first answer is lost
        client2, cstop2, ctask2 = await start(world["chome"], "", cport, fresh=False)  # type: ignore[arg-type]
        world["stops"]["client"] = (cstop2, ctask2)  # type: ignore[index]
        relay.held.linked(cid, link)

        async def all_there() -> bool:
            rows = await client2.store.pending_for(mailbox, 4 * N)
            return len(rows) >= N + 1 and not (await relay.store.outbox_counts()).get(cid)

        await async_wait_until(all_there, timeout=60, what="the held envelopes to be forwarded")
        rows = await client2.store.pending_for(mailbox, 4 * N)
        (bob_multi, carol_multi) = held_multi.envelopes()
        assert [e.id for e in rows] == [*sent, bob_multi.id]  # each once, in order
        assert await client2.store.pending_for(other, 4) == [carol_multi]
        assert link_calls["n"] >= 2  # the lost answer was retried
        assert relay.held.held(cid) == 0
