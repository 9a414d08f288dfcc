"""Personal nodes drop peer pins unused for ``pin_ttl_days`` (node/sweeper.py, node/peers.py)."""

from __future__ import annotations

import os
from typing import Any, cast

import pytest

from federation.clock import FakeClock
from federation.errors import TransportError
from federation.transport import RemoteError
from federation.wire import Envelope
from node.mailbox import Mailboxes
from node.metrics import Metrics
from node.peers import PeerDirectory
from node.sqlite_store import SqliteStore
from node.store import PeerRecord, WriteBatch
from node.sweeper import Sweeper

DAY = 86_400_000


async def test_unused_pins_drop_but_queued_and_fresh_ones_stay(store: SqliteStore) -> None:
    clock = FakeClock()
    t0 = clock.now_ms()
    mailboxes = Mailboxes(store, clock, on_outbox=lambda _: None)
    dropped: list[list[str]] = []
    personal = Sweeper(store, mailboxes, clock, pin_ttl_ms=30 * DAY, on_pins_dropped=dropped.append)
    organisation = Sweeper(store, mailboxes, clock)
    for name in ("old", "queued", "fresh"):
        await store.upsert_peer(PeerRecord(name, f"http://{name}", name, t0))
    envelope = Envelope(os.urandom(16), os.urandom(16), t0 + 60 * DAY, b"x" * 64)
    await store.write(WriteBatch(outbox=(("queued", envelope),)), t0)

    clock.advance(29 * DAY)
    await store.upsert_peer(PeerRecord("fresh", "http://fresh", "fresh", clock.now_ms()))
    assert (await personal.tick())["pins_dropped"] == 0  # 29 days: nothing is stale yet

    clock.advance(2 * DAY)
    assert (await organisation.tick())["pins_dropped"] == 0  # organisation nodes keep pins
    assert (await personal.tick())["pins_dropped"] == 1
    assert dropped == [["old"]]
    assert sorted(p.node_id for p in await store.all_peers()) == ["fresh", "queued"]

    # checked hourly, not on every tick
    await store.upsert_peer(PeerRecord("older", "http://older", "older", t0))
    assert (await personal.tick())["pins_dropped"] == 0
    clock.advance(3_600_000)
    assert (await personal.tick())["pins_dropped"] == 1
    assert dropped == [["old"], ["older"]]


async def test_contact_refreshes_the_stored_day_once_per_day(store: SqliteStore) -> None:
    clock = FakeClock(1_700_000_000_000 - 1_700_000_000_000 % DAY + 1000)
    writes: list[PeerRecord] = []

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def upsert_peer(self, peer: PeerRecord) -> None:
            writes.append(peer)
            await store.upsert_peer(peer)

    peers = PeerDirectory(cast(Any, Counting()), cast(Any, None), clock, Metrics(), lambda _: None)
    await store.upsert_peer(PeerRecord("p", "http://p", "p", clock.now_ms()))
    await peers.seen("p")
    await peers.seen("p")
    assert writes == []  # pinned today: nothing to write
    clock.advance(DAY)
    for _ in range(5):
        await peers.seen("p")
    assert len(writes) == 1  # one write per peer per day, however many contacts
    rec = await store.get_peer("p")
    assert rec is not None and rec.last_seen == clock.now_ms() - clock.now_ms() % DAY


async def test_a_pinned_peer_held_by_its_relay_is_used_unmeasured(store: SqliteStore) -> None:
    """Descriptor ``unavailable`` (a relay holding for the offline peer, docs/protocol.md §12.4):
    the batch may go, unmeasured; any other refusal still makes the peer unreachable."""
    clock = FakeClock()
    answers = {"code": "unavailable"}

    class Relay:
        async def fetch_descriptor(self, url: str, now_ms: Any) -> Any:
            raise RemoteError(answers["code"], "offline")

    peers = PeerDirectory(store, cast(Any, Relay()), clock, Metrics(), lambda _: None)
    await store.upsert_peer(PeerRecord("p", "http://p", "p", clock.now_ms()))
    await peers.ensure_measured("p")
    assert not peers.st("p").measured  # measured once it is back
    assert await peers.call("p", _echo) == "http://p"
    answers["code"] = "bad_signature"
    with pytest.raises(TransportError):
        await peers.ensure_measured("p")


async def _echo(url: str) -> str:
    return url
