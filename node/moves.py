"""Moving a node to another host (docs/protocol.md §12.5): its signed locator changes.

A node that moves (a personal node switching relays: ``haven node move-relay``) keeps its node
id and signs a :class:`federation.signing.LocatorChange` from its old host to its new one. The
statements are kept in ``HOME/locators.bin`` (oldest first), published in the descriptor under
``moves``, and pushed once per start to every pinned peer with a signed
``POST /haven/v1/federation/moved``. A peer verifies each with the key it pinned for the old
host (the node id), pins the new host to the same node id and keeps the old host as an alias
(:meth:`node.peers.PeerDirectory.follow_moves`), so addresses at the old host keep working and
its queued envelopes keep flowing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
from functools import partial
from urllib.parse import urlsplit

from federation.errors import HavenError, LocalProtocolError, MalformedFrame
from federation.relaylink import parse_invite
from federation.signing import LocatorChange, NodeKey, decode_moves
from federation.transport import PeerTransport
from federation.wire import packb, unpackb

from .config import NodeConfig, validate_public_url
from .peers import PeerDirectory
from .relay_client import RelayInfo
from .store import Store

log = logging.getLogger("haven.moves")

LOCATORS_NAME = "locators.bin"
PUSH_TRIES = 6  # per peer per start: 2 s doubling (about two minutes in all)
PUSH_FIRST_DELAY_S = 2.0


def load_locators(home: str) -> tuple[LocatorChange, ...]:
    """The node's signed locator changes, oldest first (none if it never moved)."""
    path = os.path.join(home, LOCATORS_NAME)
    if not os.path.exists(path):
        return ()
    with open(path, "rb") as f:
        return decode_moves(unpackb(f.read(), max_len=1 << 20))


def host_of(url: str) -> str:
    """The ``host[:port]`` part of a base URL, lower-cased (as addresses name it)."""
    return urlsplit(url).netloc.lower()


def record_move(home: str, key: NodeKey, old_url: str, new_url: str, now_ms: int) -> LocatorChange:
    """Sign a move from ``old_url``'s host to ``new_url``'s and append it to locators.bin
    (written atomically, mode 0600). Returns the statement.

    Raises:
        LocalProtocolError: ``now_ms`` is not after the last statement's ``created`` (peers
            skip a statement not newer than the last they followed: docs/protocol.md §12.5).
    """
    before = load_locators(home)
    if before and now_ms <= before[-1].created:
        raise LocalProtocolError("the clock is not past the node's last move; check the time")
    change = LocatorChange.make(key, host_of(old_url), host_of(new_url), now_ms)
    moves = (*before, change)
    path = os.path.join(home, LOCATORS_NAME)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(packb([m.to_wire() for m in moves]))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return change


def move_to(home: str, key: NodeKey, new_public_url: str, now_ms: int) -> LocatorChange:
    """Move the (stopped) node in ``home`` to ``new_public_url``: sign and keep the locator
    change, then write the new ``public_url`` to node.toml. Peers learn it at the next serve.

    Raises:
        LocalProtocolError: the node is already at that host.
    """
    config = NodeConfig.load(home)
    new_url = validate_public_url(new_public_url)
    if host_of(new_url) == config.public_host:
        raise LocalProtocolError("the node is already at that address")
    change = record_move(home, key, config.public_url, new_url, now_ms)
    dataclasses.replace(config, public_url=new_url).save(home)
    return change


def move_relay(home: str, key: NodeKey, code: str, now_ms: int) -> LocatorChange:
    """``haven node move-relay CODE``: use the relay of ``code`` from now on. Signs the locator
    change to the client host the code names, makes it the ``public_url`` and replaces
    ``relay.json`` (the link made at the next serve binds the invite's token).

    Raises:
        LocalProtocolError: the code is not a relay invite, or names the current host.
    """
    try:
        info = RelayInfo.from_invite(parse_invite(code))
    except MalformedFrame as exc:
        raise LocalProtocolError(str(exc)) from exc
    config = NodeConfig.load(home)
    if not config.client_url:  # the relay forwards federation only: devices come direct
        host = "127.0.0.1" if config.listen_host in ("0.0.0.0", "") else config.listen_host
        device_url = f"http://{host}:{config.listen_port}"
        dataclasses.replace(config, client_url=device_url).save(home)
    change = move_to(home, key, info.public_url(), now_ms)
    info.save(home)
    return change


async def _post(
    transport: PeerTransport,
    peers: PeerDirectory,
    node_id: str,
    moves: tuple[LocatorChange, ...],
    url: str,
) -> None:
    await transport.post_moved(url, node_id, peers.stamp(node_id), moves)


async def push_moves(
    moves: tuple[LocatorChange, ...],
    store: Store,
    peers: PeerDirectory,
    transport: PeerTransport,
) -> None:
    """Tell every pinned peer about ``moves`` (once per start; failures retried with backoff
    for a couple of minutes, then left to the descriptor: a peer that fetches it follows its
    ``moves`` too). Logs peer node ids only."""
    if not moves:
        return
    pending = [p.node_id for p in await store.all_peers()]
    delay = PUSH_FIRST_DELAY_S
    for attempt in range(PUSH_TRIES):
        failed: list[str] = []
        for node_id in pending:
            try:
                await peers.call(node_id, partial(_post, transport, peers, node_id, moves))
            except HavenError as exc:
                failed.append(node_id)
                if attempt == PUSH_TRIES - 1:
                    log.info("peer %s not told of our move: %s", node_id, exc.code)
        pending = failed
        if not pending:
            return
        await asyncio.sleep(random.uniform(delay / 2, delay))  # backoff between rounds
        delay *= 2
