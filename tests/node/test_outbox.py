"""Outbox sender against a fake peer transport (unit test: fakes for the network only)."""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from federation.backoff import EnvelopeHolds
from federation.clock import FakeClock
from federation.transport import RemoteError
from federation.wire import Batch, BatchResult, Envelope
from node import sqlite_store
from node.atrest import EpochKeys
from node.mailbox import Mailboxes
from node.metrics import Metrics
from node.outbox import OutboxSender
from node.quotas import OutboxQuotas
from node.sqlite_store import SqliteStore


class FakePeers:
    def __init__(self, inflight: int = 1, features: tuple[str, ...] = ()) -> None:
        self.calls = 0
        self.inflight = inflight
        self.listed = features

    def max_inflight(self, node_id: str) -> int:
        return self.inflight

    def features(self, node_id: str) -> tuple[str, ...]:
        return self.listed

    def drop_feature(self, node_id: str, feature: str) -> None:
        self.listed = tuple(f for f in self.listed if f != feature)

    async def ensure_measured(self, node_id: str) -> None:
        return None

    def stamp(self, node_id: str) -> int:
        return 0

    async def call(self, node_id: str, fn: Callable[[str], Awaitable[Any]]) -> Any:
        self.calls += 1
        return await fn("http://peer.invalid")


class EncodedBatches:
    """The sender posts encoded batches (:meth:`PeerTransport.post_encoded_batch`)."""

    async def post_encoded_batch(
        self, url: str, dest: str, created: int, body: bytes
    ) -> BatchResult:
        return await self.post_batch(url, dest, created, Batch.decode(body))  # type: ignore[attr-defined]


class RefusingTransport(EncodedBatches):
    """Refuses a whole batch when any envelope is "too large"; accepts everything else."""

    def __init__(self) -> None:
        self.accepted: list[bytes] = []

    async def post_batch(self, url: str, dest: str, created: int, batch: Batch) -> BatchResult:
        if any(len(e.body) > 100 for e in batch.envelopes):
            raise RemoteError("too_large", "batch refused")
        self.accepted += [e.id for e in batch.envelopes]
        return BatchResult(tuple(e.id for e in batch.envelopes))


async def test_one_bad_envelope_does_not_block_the_queue(tmp_path: Path) -> None:
    clock = FakeClock()
    store = SqliteStore(str(tmp_path / "s.db"), EpochKeys(str(tmp_path / "e.key")))
    await store.open()
    sender: OutboxSender | None = None
    mailboxes = Mailboxes(store, clock, on_outbox=lambda d: sender.wake(d) if sender else None)
    transport = RefusingTransport()
    sender = OutboxSender(store, mailboxes, FakePeers(), transport, clock, Metrics())  # type: ignore[arg-type]
    good = [Envelope(os.urandom(16), os.urandom(16), 10**14, b"ok") for _ in range(7)]
    bad = Envelope(os.urandom(16), os.urandom(16), 10**14, b"x" * 500)
    tasks = [asyncio.create_task(mailboxes.run()), asyncio.create_task(sender.run())]
    try:
        futs = mailboxes.submit_outbox([("peer", e) for e in [*good[:3], bad, *good[3:]]])
        await asyncio.gather(*futs)
        async with asyncio.timeout(20):
            while (await store.counts())["outbox_envelopes"]:
                await asyncio.sleep(0.01)
        assert sorted(transport.accepted) == sorted(e.id for e in good)
        assert sender.metrics.errors["outbox_rejected.too_large"] == 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()


# ---- per-envelope holds: no head-of-line blocking (docs/protocol.md §6) ----------------------


def test_envelope_holds_back_off_per_envelope_with_a_fake_clock() -> None:
    clock = FakeClock()
    holds = EnvelopeHolds(base_ms=500, cap_ms=60_000, max_entries=3, rng=random.Random(1))
    a, b = b"a" * 16, b"b" * 16
    first = holds.refused(a, clock.now_ms())
    assert 500 <= first <= 1250 and holds.held(a, clock.now_ms()) and not holds.held(b, 0)
    assert holds.next_due() == clock.now_ms() + first
    clock.advance(first)
    assert not holds.held(a, clock.now_ms())  # due: it may be tried again
    second = holds.refused(a, clock.now_ms())
    assert 1000 <= second <= 2500  # its own schedule grows ...
    for _ in range(20):
        holds.refused(a, clock.now_ms())
    assert holds.refused(a, clock.now_ms()) <= 75_000  # ... up to the cap (+ rounding)
    holds.refused(b, clock.now_ms())
    holds.forget([a])
    assert not holds.held(a, clock.now_ms()) and holds.held(b, clock.now_ms())
    for i in range(5):  # bounded memory: the oldest holds are forgotten first
        holds.refused(bytes([i]) * 16, clock.now_ms())
    assert len(holds) == 3 and not holds.held(b, clock.now_ms())
    holds.keep_only({bytes([4]) * 16})
    assert len(holds) == 1
    holds.forget([bytes([4]) * 16])
    assert holds.next_due() is None
    # envelopes refused together come due at a few instants, not one each
    many = EnvelopeHolds(rng=random.Random(2))
    delays = {many.refused(os.urandom(16), clock.now_ms()) for _ in range(1000)}
    assert len(delays) <= 3


class FullMailboxTransport(EncodedBatches):
    """A peer whose mailbox ``full`` refuses every envelope with ``quota_exceeded`` until
    ``room`` is set; everything else is accepted."""

    def __init__(self, full: bytes) -> None:
        self.full = full
        self.room = False
        self.accepted: list[bytes] = []
        self.refused = 0
        self.requests = 0

    async def post_batch(self, url: str, dest: str, created: int, batch: Batch) -> BatchResult:
        self.requests += 1
        ok = [e.id for e in batch.envelopes if self.room or e.to != self.full]
        rejected = [(e.id, "quota_exceeded") for e in batch.envelopes if e.id not in ok]
        self.accepted += ok
        self.refused += len(rejected)
        return BatchResult(tuple(ok), tuple(rejected))


async def test_refusals_for_one_full_mailbox_do_not_block_the_queue(tmp_path: Path) -> None:
    """300 envelopes for a full mailbox sit at the head (more than a batch); another user's 10
    envelopes behind them are delivered, the refused ones wait on their own and go once the
    mailbox has room; the quotas are released as rows leave."""
    clock = FakeClock()
    store = SqliteStore(str(tmp_path / "s.db"), EpochKeys(str(tmp_path / "e.key")))
    await store.open()
    sender: OutboxSender | None = None
    mailboxes = Mailboxes(store, clock, on_outbox=lambda d: sender.wake(d) if sender else None)
    full, other = os.urandom(16), os.urandom(16)
    transport = FullMailboxTransport(full)
    quotas = OutboxQuotas(per_destination=1000, per_account=400)
    sender = OutboxSender(store, mailboxes, FakePeers(), transport, clock, Metrics(), quotas)  # type: ignore[arg-type]
    junk = [Envelope(os.urandom(16), full, 10**14, b"j") for _ in range(300)]
    real = [Envelope(os.urandom(16), other, 10**14, b"r") for _ in range(10)]
    for e in junk:
        assert quotas.admit("mallory", "peer", e, clock.now_ms()) is None
    for e in real:
        assert quotas.admit("carol", "peer", e, clock.now_ms()) is None
    tasks = [asyncio.create_task(mailboxes.run()), asyncio.create_task(sender.run())]
    try:
        await asyncio.gather(*mailboxes.submit_outbox([("peer", e) for e in junk]))
        await asyncio.gather(*mailboxes.submit_outbox([("peer", e) for e in real]))
        async with asyncio.timeout(20):
            while len(transport.accepted) < 10 or transport.refused < 300:
                await asyncio.sleep(0.01)
        assert sorted(transport.accepted) == sorted(e.id for e in real)  # 10/10 delivered
        assert sender.metrics.errors["outbox_rejected.quota_exceeded"] == 300
        assert (await store.counts())["outbox_envelopes"] == 300  # refused rows wait, not lost
        assert quotas.by_account == {"mallory": 300} and quotas.by_dest == {"peer": 300}
        requests = transport.requests
        clock.advance(10 * 60_000)  # every hold is due; the peer's mailbox has room again
        transport.room = True
        async with asyncio.timeout(20):
            while (await store.counts())["outbox_envelopes"]:
                await asyncio.sleep(0.01)
        assert sorted(transport.accepted) == sorted(e.id for e in real + junk)
        assert transport.requests > requests
        assert quotas.by_account == {} and quotas.by_dest == {}
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()


# ---- pipelining: only as far as the peer's descriptor allows, per-mailbox order kept ---------


class ShufflingTransport(EncodedBatches):
    """A peer that answers requests after random delays, so requests in flight together are
    stored in any order; records the arrival order per mailbox and the most in flight."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.arrived: dict[bytes, list[bytes]] = {}
        self.inflight = 0
        self.most_inflight = 0

    async def post_batch(self, url: str, dest: str, created: int, batch: Batch) -> BatchResult:
        self.inflight += 1
        self.most_inflight = max(self.most_inflight, self.inflight)
        try:
            await asyncio.sleep(self.rng.random() * 0.004)
            for e in batch.envelopes:
                self.arrived.setdefault(e.to, []).append(e.id)
            return BatchResult(tuple(e.id for e in batch.envelopes))
        finally:
            self.inflight -= 1


async def _pipelined_run(
    tmp_path: Path, inflight: int, mailboxes_n: int, per_mailbox: int
) -> tuple[ShufflingTransport, dict[bytes, list[bytes]]]:
    clock = FakeClock()
    store = SqliteStore(str(tmp_path / "s.db"), EpochKeys(str(tmp_path / "e.key")))
    await store.open()
    sender: OutboxSender | None = None
    mailboxes = Mailboxes(store, clock, on_outbox=lambda d: sender.wake(d) if sender else None)
    transport = ShufflingTransport(seed=inflight * 1000 + mailboxes_n)
    peers = FakePeers(inflight)
    sender = OutboxSender(store, mailboxes, peers, transport, clock, Metrics())  # type: ignore[arg-type]
    boxes = [os.urandom(16) for _ in range(mailboxes_n)]
    sent: dict[bytes, list[bytes]] = {mb: [] for mb in boxes}
    tasks = [asyncio.create_task(mailboxes.run()), asyncio.create_task(sender.run())]
    try:
        futs = []
        for _ in range(per_mailbox // 10):  # interleaved, in several commits
            items = []
            for mb in boxes:
                for _ in range(10):
                    env = Envelope(os.urandom(16), mb, 10**14, b"m")
                    sent[mb].append(env.id)
                    items.append(("peer", env))
            futs += mailboxes.submit_outbox(items)
            await asyncio.sleep(0)
        await asyncio.gather(*futs)
        async with asyncio.timeout(30):
            while (await store.counts())["outbox_envelopes"]:
                await asyncio.sleep(0.01)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()
    return transport, sent


async def test_pipelined_requests_keep_each_mailboxs_order(tmp_path: Path) -> None:
    """A peer that allows 4 requests in flight gets them, answered in random order; every
    mailbox still receives its envelopes in the order they were sent, none lost or doubled."""
    transport, sent = await _pipelined_run(tmp_path, inflight=4, mailboxes_n=12, per_mailbox=60)
    assert transport.most_inflight > 1
    assert transport.arrived == sent


async def test_one_mailbox_over_a_pipelined_link_arrives_in_order(tmp_path: Path) -> None:
    transport, sent = await _pipelined_run(tmp_path, inflight=4, mailboxes_n=1, per_mailbox=700)
    assert transport.arrived == sent


async def test_a_peer_that_allows_one_request_gets_one_at_a_time(tmp_path: Path) -> None:
    transport, sent = await _pipelined_run(tmp_path, inflight=1, mailboxes_n=12, per_mailbox=30)
    assert transport.most_inflight == 1
    assert transport.arrived == sent


# ---- re-sealing while requests are out: an epoch's end, a shutdown ---------------------------


class HeldTransport(EncodedBatches):
    """Accepts every envelope, each request only once ``release`` is set; counts the posts of
    each envelope (a duplicate post shows as 2)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.posted: Counter[bytes] = Counter()
        self.waiting = 0

    async def post_batch(self, url: str, dest: str, created: int, batch: Batch) -> BatchResult:
        self.posted.update(e.id for e in batch.envelopes)
        self.waiting += 1
        try:
            await self.release.wait()
        finally:
            self.waiting -= 1
        return BatchResult(tuple(e.id for e in batch.envelopes))


async def _sealing_keys(store: SqliteStore) -> set[int]:
    """The live keys that seal the stored rows (every row must open under one of them)."""
    kids = set()
    for table in ("envelopes", "outbox"):
        for (sealed,) in await store.db.execute_fetchall(f"SELECT sealed FROM {table}"):
            got = store.keys.try_open(bytes(sealed))
            assert got is not None, "a pending row is under no live key"
            kids.add(got[0])
    return kids


async def test_an_epochs_end_with_requests_in_flight_leaves_no_row_under_the_old_key(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Pipelined requests are out (the next page read ahead) when the epoch ends; rows written
    then, and the re-seal that follows while the answers and their deletions land, leave every
    pending row under the newest key and no older key beside it (what a seized disk opens:
    tests/forensics ``pending_old_key``); each envelope is posted once and then deleted."""
    monkeypatch.setattr(sqlite_store, "RESEAL_CHUNK", 3)  # the re-seal interleaves with deletes
    clock = FakeClock()
    keys = EpochKeys(str(tmp_path / "e.key"), 600_000)
    store = SqliteStore(str(tmp_path / "s.db"), keys)
    await store.open()
    await store.begin(clock)
    sender: OutboxSender | None = None
    mailboxes = Mailboxes(store, clock, on_outbox=lambda d: sender.wake(d) if sender else None)
    transport = HeldTransport()
    sender = OutboxSender(store, mailboxes, FakePeers(4), transport, clock, Metrics())  # type: ignore[arg-type]
    boxes = [os.urandom(16) for _ in range(6)]
    first = [Envelope(os.urandom(16), mb, 10**14, b"a") for mb in boxes for _ in range(5)]
    later = [Envelope(os.urandom(16), mb, 10**14, b"b") for mb in boxes for _ in range(3)]
    tasks = [asyncio.create_task(mailboxes.run()), asyncio.create_task(sender.run())]
    try:
        await asyncio.gather(*mailboxes.submit_outbox([("peer", e) for e in first]))
        async with asyncio.timeout(20):
            while transport.waiting < 2:  # several requests in flight at once
                await asyncio.sleep(0.01)
        clock.advance(600_000)  # the epoch ends; the sweep has not come yet
        await asyncio.gather(*mailboxes.submit_outbox([("peer", e) for e in later]))
        assert len(keys.ids) == 1 and await _sealing_keys(store) == set(keys.ids)
        rotation = asyncio.create_task(store.rotate_epochs(clock.now_ms()))
        transport.release.set()  # answers, and the deletions they queue, during the re-seal
        await rotation
        # the old key is gone (and if the deletions emptied the queue meanwhile, every key)
        assert keys.epochs in ([], [keys.epoch_of(clock.now_ms())])
        assert await _sealing_keys(store) <= set(keys.ids)
        async with asyncio.timeout(20):
            while (await store.counts())["outbox_envelopes"]:
                await asyncio.sleep(0.01)
        assert transport.posted == Counter(e.id for e in first + later)  # each once, none lost
        assert keys.ids == []  # nothing pending: no key
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()


def _slot_keys(path: str) -> set[bytes]:
    """The keys in the live slots of an ``epochs.key`` (40-byte slots: epoch, then key)."""
    data = Path(path).read_bytes()
    slots = [data[i : i + 40] for i in range(0, len(data), 40)]
    return {s[8:] for s in slots if any(s)}


async def _sender(
    store: SqliteStore, clock: FakeClock, transport: EncodedBatches, inflight: int = 4
) -> tuple[Mailboxes, OutboxSender, list[asyncio.Task[None]]]:
    """A running mailbox committer and outbox sender (peer "peer" behind ``transport``)."""
    sender: OutboxSender | None = None
    mailboxes = Mailboxes(store, clock, on_outbox=lambda d: sender.wake(d) if sender else None)
    peers = FakePeers(inflight)
    sender = OutboxSender(store, mailboxes, peers, transport, clock, Metrics())  # type: ignore[arg-type]
    return (
        mailboxes,
        sender,
        [asyncio.create_task(mailboxes.run()), asyncio.create_task(sender.run())],
    )


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_rows_in_flight_at_shutdown_are_resealed_and_sent_after_the_restart(
    tmp_path: Path,
) -> None:
    """The node stops with pipelined requests unanswered: the shutdown re-seal covers those
    rows with the rest (one fresh key left, nothing lost), and the restarted node sends them."""
    clock = FakeClock()
    key_file, db = str(tmp_path / "e.key"), str(tmp_path / "s.db")
    store = SqliteStore(db, EpochKeys(key_file, 600_000))
    await store.open()
    await store.begin(clock)
    held = HeldTransport()
    mailboxes, _, tasks = await _sender(store, clock, held)
    envs = [Envelope(os.urandom(16), os.urandom(16), 10**14, b"a") for _ in range(12)]
    try:
        await asyncio.gather(*mailboxes.submit_outbox([("peer", e) for e in envs]))
        async with asyncio.timeout(20):
            while held.waiting < 2:
                await asyncio.sleep(0.01)
        serving = _slot_keys(key_file)
    finally:
        await _stop(tasks)
        await store.close()  # the shutdown re-seal, with the requests still unanswered
    stopped = _slot_keys(key_file)
    assert len(stopped) == 1 and not stopped & serving
    store = SqliteStore(db, EpochKeys(key_file, 600_000))
    await store.open()
    await store.begin(clock)
    again = HeldTransport()
    again.release.set()
    _, _, tasks = await _sender(store, clock, again)
    try:
        assert await _sealing_keys(store) == set(store.keys.ids)
        async with asyncio.timeout(20):
            while (await store.counts())["outbox_envelopes"]:
                await asyncio.sleep(0.01)
        assert again.posted == Counter(e.id for e in envs)
        assert store.keys.ids == []
    finally:
        await _stop(tasks)
        await store.close()


class DeadTransport(EncodedBatches):
    """A peer that is down: every request fails as a whole."""

    def __init__(self) -> None:
        self.calls = 0

    async def post_batch(self, url: str, dest: str, created: int, batch: Batch) -> BatchResult:
        self.calls += 1
        raise RemoteError("unreachable", "connection refused")


async def test_rows_queued_for_a_dead_peer_do_not_lengthen_its_backoff(tmp_path: Path) -> None:
    """Each new row wakes the worker for an early try (docs/protocol.md §6), but only a try
    made when the backoff was due counts: the fake clock never advances here, so however many
    rows are queued meanwhile, the destination has failed once."""
    clock = FakeClock()
    store = SqliteStore(str(tmp_path / "s.db"), EpochKeys(str(tmp_path / "e.key")))
    await store.open()
    transport = DeadTransport()
    mailboxes, sender, tasks = await _sender(store, clock, transport, inflight=1)
    try:
        for i in range(20):
            env = Envelope(os.urandom(16), os.urandom(16), 10**14, b"m%d" % i)
            await asyncio.gather(*mailboxes.submit_outbox([("peer", env)]))
            async with asyncio.timeout(20):  # each new row: one early try, which fails
                while transport.calls <= i:
                    await asyncio.sleep(0.005)
        assert transport.calls >= 20
        backoff = sender.dests["peer"].backoff
        assert backoff.failures == 1, backoff
        assert (await store.counts())["outbox_envelopes"] == 20  # nothing lost meanwhile
    finally:
        await _stop(tasks)
        await store.close()
