"""Send before store (node/outbox.py, node/mailbox.py): envelopes for an idle peer are posted
from memory ahead of their commit. Real SqliteStore; fakes for the network only."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from federation.clock import FakeClock
from federation.errors import TransportError
from federation.fanout import MultiBatch
from federation.multi import FEATURE, INNER_MEGOLM, GroupInner, seal_multi
from federation.transport import RemoteError
from federation.wire import Batch, BatchResult, Envelope
from node import mailbox
from node.atrest import EpochKeys
from node.mailbox import Mailboxes
from node.metrics import Metrics
from node.outbox import MultiSub, OutboxSender
from node.quotas import OutboxQuotas
from node.sqlite_store import SqliteStore
from node.store import WriteBatch

from .test_outbox import EncodedBatches, FakePeers

X, Y = b"x" * 16, b"y" * 16


class RecordingStore(SqliteStore):
    """The real store, noting which outbox envelopes were ever written to it."""

    def __init__(self, path: str, keys: EpochKeys) -> None:
        super().__init__(path, keys)
        self.inserted: list[bytes] = []
        self.writes = asyncio.Event()  # cleared: group commits wait (reads do not)
        self.writes.set()

    async def write(self, batch: WriteBatch, now: int) -> None:
        await self.writes.wait()
        self.inserted += [env.id for _, env in batch.outbox]
        await super().write(batch, now)


class Peer(EncodedBatches):
    """Accepts what it is posted, in order, once ``gate`` is open; can fail requests or refuse
    envelopes; notes any envelope posted while a request for it is still unanswered."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.gate.set()
        self.waiting = 0
        self.posts = 0
        self.fail = 0  # fail this many requests (once through the gate)
        self.refuse: dict[bytes, str] = {}
        self.accepted: list[Envelope] = []
        self.posted: Counter[bytes] = Counter()
        self._open: Counter[bytes] = Counter()
        self.twice: list[bytes] = []

    async def post_batch(self, url: str, dest: str, created: int, batch: Batch) -> BatchResult:
        self.posts += 1
        for env in batch.envelopes:
            if self._open[env.id]:
                self.twice.append(env.id)
            self._open[env.id] += 1
            self.posted[env.id] += 1
        try:
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
            if self.fail:
                self.fail -= 1
                raise TransportError("peer down")
            ok = [e for e in batch.envelopes if e.id not in self.refuse]
            self.accepted += ok
            rejected = tuple((e.id, self.refuse[e.id]) for e in batch.envelopes if e not in ok)
            return BatchResult(tuple(e.id for e in ok), rejected)
        finally:
            for env in batch.envelopes:
                self._open[env.id] -= 1


@dataclass
class Node:
    store: RecordingStore
    mailboxes: Mailboxes
    sender: OutboxSender
    quotas: OutboxQuotas
    tasks: list[asyncio.Task[None]]
    clock: FakeClock

    def send(self, envs: list[Envelope]) -> list[asyncio.Future[None]]:
        """As a device's Send frame does (node/client_api.py)."""
        items = []
        for env in envs:
            assert self.quotas.admit("alice", "peer", env, 0) is None
            items.append(("peer", env))
        futs = self.mailboxes.submit_outbox(items)
        self.quotas.watch(items, futs)
        return futs

    async def warm(self) -> None:
        """One envelope the stored way, so the peer's worker runs and goes idle."""
        await done(self.send([_env(X)]))
        await until(lambda: self.sender.dests["peer"].idle and not self.quotas.by_dest)

    async def stored(self) -> int:
        return (await self.store.counts())["outbox_envelopes"]


@asynccontextmanager
async def running(
    tmp_path: Path, peer: Peer, inflight: int = 1, features: tuple[str, ...] = ()
) -> AsyncIterator[Node]:
    clock = FakeClock()
    store = RecordingStore(str(tmp_path / "s.db"), EpochKeys(str(tmp_path / "e.key")))
    await store.open()
    sender: OutboxSender | None = None
    mailboxes = Mailboxes(store, clock, on_outbox=lambda d: sender.wake(d) if sender else None)
    quotas = OutboxQuotas(10_000, 10_000)
    sender = OutboxSender(
        store,
        mailboxes,
        FakePeers(inflight, features),  # type: ignore[arg-type]
        peer,  # type: ignore[arg-type]
        clock,
        Metrics(),
        quotas,
    )
    mailboxes.hot_lane = sender
    tasks = [asyncio.create_task(mailboxes.run()), asyncio.create_task(sender.run())]
    try:
        yield Node(store, mailboxes, sender, quotas, tasks, clock)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.close()


async def done(futs: list[asyncio.Future[None]]) -> None:
    async with asyncio.timeout(20):
        await asyncio.gather(*futs)


async def until(cond: object, timeout: float = 20) -> None:
    async with asyncio.timeout(timeout):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.005)


def _env(to: bytes) -> Envelope:
    return Envelope(os.urandom(16), to, 10**14, b"sealed")


def _ordered(envs: list[Envelope], to: bytes) -> list[bytes]:
    return [e.id for e in envs if e.to == to]


@pytest.fixture
def long_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A grace no test outlives: whether a row is committed depends only on the peer."""
    monkeypatch.setattr(mailbox, "OUTBOX_GRACE_S", 600.0)


@pytest.fixture
def no_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mailbox, "OUTBOX_GRACE_S", 0.0)


@pytest.mark.parametrize("inflight", [1, 4])
async def test_an_envelope_the_peer_accepts_in_time_never_touches_the_disk(
    tmp_path: Path, long_grace: None, inflight: int
) -> None:
    peer = Peer()
    async with running(tmp_path, peer, inflight) as node:
        await node.warm()
        written = list(node.store.inserted)
        peer.gate.clear()
        envs = [_env(X), _env(Y), _env(X), _env(Y), _env(X)]
        futs = node.send(envs)
        await until(lambda: peer.waiting)
        assert not any(f.done() for f in futs)  # neither accepted by the peer nor committed
        more = [_env(X), _env(Y)]
        futs += node.send(more)  # joins the open hot run
        peer.gate.set()
        await done(futs)
        assert node.store.inserted == written  # no insert, so no fsync and no delete either
        for to in (X, Y):
            sent = _ordered(envs + more, to)
            assert _ordered(peer.accepted, to)[-len(sent) :] == sent
        assert not node.quotas.by_dest and not node.quotas.by_account
        assert await node.mailboxes.settle(5) and await node.stored() == 0
        assert not peer.twice


async def test_after_the_grace_rows_are_committed_and_deleted_on_acceptance(
    tmp_path: Path, no_grace: None
) -> None:
    peer = Peer()
    async with running(tmp_path, peer) as node:
        await node.warm()
        peer.gate.clear()
        envs = [_env(X) for _ in range(4)]
        futs = node.send(envs)
        await done(futs)  # durable here: committed while the request is unanswered
        await until(lambda: peer.waiting)
        assert await node.stored() == 4
        # The stored rows are in flight in the hot request: nothing may post them again
        # meanwhile (the committer does not even wake the worker for rows it holds).
        assert not node.sender.dests["peer"].wake.is_set()
        await node.stored()
        assert peer.waiting == 1 and peer.posts == 2
        peer.gate.set()
        await until(lambda: not node.quotas.by_dest)
        assert await node.stored() == 0
        assert all(peer.posted[e.id] == 1 for e in envs) and not peer.twice
        assert _ordered(peer.accepted, X)[-4:] == _ordered(envs, X)


@pytest.mark.parametrize("grace", [600.0, 0.0])
async def test_a_failed_hot_request_sends_everything_the_stored_way_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, grace: float
) -> None:
    """Held only in memory when the request fails (a long grace), or already committed while
    the run held them (no grace: the walk passed over them, and must go back for them)."""
    monkeypatch.setattr(mailbox, "OUTBOX_GRACE_S", grace)
    peer = Peer()
    async with running(tmp_path, peer) as node:
        await node.warm()
        peer.gate.clear()
        peer.fail = 1
        first = [_env(X), _env(Y), _env(X)]
        futs = node.send(first)
        await until(lambda: peer.waiting)
        second = [_env(Y), _env(X), _env(X)]  # held in memory behind the request in flight
        futs += node.send(second)
        peer.gate.set()
        await done(futs)  # committed once the hot run gave them up
        await until(lambda: not node.quotas.by_dest)
        assert await node.stored() == 0
        envs = first + second
        assert set(node.store.inserted) >= {e.id for e in envs}  # none lost
        for to in (X, Y):
            sent = _ordered(envs, to)
            assert _ordered(peer.accepted, to)[-len(sent) :] == sent
        assert Counter(e.id for e in peer.accepted[1:]) == Counter(e.id for e in envs)
        assert not peer.twice
        assert node.sender.metrics.errors["outbox.unreachable"] == 1


async def test_an_envelope_refused_in_a_hot_request_goes_the_stored_way(
    tmp_path: Path, long_grace: None
) -> None:
    peer = Peer()
    async with running(tmp_path, peer) as node:
        await node.warm()
        ok, gone = [_env(X), _env(Y)], _env(Y)
        peer.refuse[gone.id] = "not_found"
        await done(node.send([ok[0], gone, ok[1]]))
        await until(lambda: not node.quotas.by_dest)
        assert await node.stored() == 0
        assert gone.id in node.store.inserted  # refused envelopes are settled as stored rows
        assert not {e.id for e in ok} & set(node.store.inserted)
        assert peer.posted[gone.id] == 2  # once hot, once from the store (then dropped)
        assert node.sender.metrics.errors["outbox_rejected.not_found"] == 1


async def test_envelopes_sent_while_stored_rows_are_in_flight_go_after_them(
    tmp_path: Path, long_grace: None
) -> None:
    peer = Peer()
    async with running(tmp_path, peer) as node:
        peer.gate.clear()
        stored = [_env(X), _env(X)]
        await done(node.send(stored))  # no worker yet: the stored way
        await until(lambda: peer.waiting)
        later = [_env(X), _env(Y)]
        futs = node.send(later)  # held for a hot run behind the stored rows
        peer.gate.set()
        await done(futs)
        assert not {e.id for e in later} & set(node.store.inserted)
        assert _ordered(peer.accepted, X) == _ordered(stored + later, X)
        assert not peer.twice and peer.posts == 2


async def test_rows_a_hot_run_holds_are_not_posted_by_the_walk_over_the_store(
    tmp_path: Path, no_grace: None
) -> None:
    peer = Peer()
    async with running(tmp_path, peer) as node:
        peer.gate.clear()
        first = _env(X)
        await done(node.send([first]))
        await until(lambda: peer.waiting)
        later = [_env(X), _env(Y)]
        await done(node.send(later))  # held by a hot run, committed at once (no grace)
        peer.gate.set()
        await until(lambda: not node.quotas.by_dest)
        assert await node.stored() == 0
        assert set(node.store.inserted) == {e.id for e in [first, *later]}
        assert all(peer.posted[e.id] == 1 for e in later) and not peer.twice
        assert _ordered(peer.accepted, X) == [first.id, later[0].id]


async def test_a_hold_in_the_stored_rows_ends_a_hot_run_that_waits_behind_them(
    tmp_path: Path, long_grace: None
) -> None:
    peer = Peer()
    async with running(tmp_path, peer) as node:
        peer.gate.clear()
        full = _env(Y)
        peer.refuse[full.id] = "mailbox_full"  # refused for now: held
        await done(node.send([full]))
        await until(lambda: peer.waiting)
        later = [_env(X), _env(X)]
        futs = node.send(later)  # a hot run opens behind the stored row
        peer.gate.set()
        await done(futs)  # the hold ended the run: committed, then sent the stored way
        await until(lambda: len(peer.accepted) == 2)
        assert _ordered(peer.accepted, X) == _ordered(later, X)
        assert set(node.store.inserted) == {full.id, *(e.id for e in later)}
        assert not peer.twice


async def test_a_hot_run_waits_for_older_envelopes_still_being_committed(
    tmp_path: Path, long_grace: None
) -> None:
    peer = Peer()
    async with running(tmp_path, peer) as node:
        held = _env(Y)
        peer.refuse[held.id] = "mailbox_full"  # refused for now, once
        await done(node.send([held]))
        d = node.sender.dests["peer"]
        await until(lambda: len(d.holds))
        peer.refuse.clear()
        node.store.writes.clear()
        second = _env(X)
        futs = node.send([second])  # no hot run while a row is held: queued to commit
        node.clock.advance(3_600_000)  # the hold comes due ...
        node.sender.wake("peer")
        # ... the row goes through, and the worker finds nothing stored (``second`` is not
        # committed yet) and nothing held
        await until(lambda: d.idle)
        third = _env(X)
        futs += node.send([third])  # a hot run opens, but must not overtake ``second``
        node.store.writes.set()
        await done(futs)
        await until(lambda: not node.quotas.by_dest)
        assert _ordered(peer.accepted, X) == [second.id, third.id]
        assert third.id not in node.store.inserted


async def test_stopping_commits_what_is_only_held_in_memory(
    tmp_path: Path, long_grace: None
) -> None:
    peer = Peer()
    async with running(tmp_path, peer) as node:
        await node.warm()
        peer.gate.clear()
        envs = [_env(X), _env(Y)]
        futs = node.send(envs)
        await until(lambda: peer.waiting)
        futs += node.send([_env(X)])
        sender_task = node.tasks[1]
        sender_task.cancel()  # as node/app.py _serve stops the sender before settling
        await asyncio.gather(sender_task, return_exceptions=True)
        assert await node.mailboxes.settle(5)
        await done(futs)  # durable: committed
        assert await node.stored() == 3


class MultiPeer(Peer):
    """Also serves ``/multi`` (or answers it ``not_found``, as a node that turned it off)."""

    def __init__(self, serve: bool = True) -> None:
        super().__init__()
        self.serve = serve
        self.multi: list[MultiBatch] = []

    async def post_multi(self, url: str, dest: str, created: int, body: bytes) -> BatchResult:
        if not self.serve:
            raise RemoteError("not_found", "no such endpoint")
        got = MultiBatch.decode(body)
        self.multi.append(got)
        envs = got.envelopes()
        self.accepted += envs
        return BatchResult(tuple(e.id for e in envs))


def _submission(node: Node, n: int) -> tuple[list[Envelope], list[asyncio.Future[None]]]:
    """``n`` envelopes composed from one multi submission, handed over as client_api does."""
    sealed = seal_multi(GroupInner(INNER_MEGOLM, "a@x", "d", b"hi"), [os.urandom(32)] * n)
    envs = [Envelope(os.urandom(16), os.urandom(16), 10**14, sealed.copy_for(i)) for i in range(n)]
    with node.sender.multi_submission(MultiSub(sealed.eph, sealed.gbody)):
        futs = node.send(envs)
    return envs, futs


async def test_a_multi_submission_goes_as_one_request_and_others_as_batches(
    tmp_path: Path, long_grace: None
) -> None:
    peer = MultiPeer()
    async with running(tmp_path, peer, 4, (FEATURE,)) as node:
        await node.warm()
        written = list(node.store.inserted)
        peer.gate.clear()  # batches wait: the submissions queue up behind the first one
        first = node.send([_env(X)])
        await until(lambda: peer.waiting)
        envs, futs = _submission(node, 300)  # more than one batch's worth
        single = node.send([_env(Y)])
        envs2, futs2 = _submission(node, 3)
        peer.gate.set()
        await done(first + futs + single + futs2)
        assert [len(m.recips) for m in peer.multi] == [300, 3]  # one request each
        assert [r[0] for r in peer.multi[0].recips] == [e.id for e in envs]
        got = {e.id: e for e in peer.accepted}
        assert all(got[e.id] == e for e in envs + envs2)  # composed exactly as sent
        assert node.store.inserted == written  # accepted in time: nothing touched the disk
        assert not peer.twice


async def test_a_peer_that_stopped_serving_multi_gets_batches(
    tmp_path: Path, long_grace: None
) -> None:
    peer = MultiPeer(serve=False)
    async with running(tmp_path, peer, 1, (FEATURE,)) as node:
        await node.warm()
        envs, futs = _submission(node, 5)
        await done(futs)  # committed: they go the stored way, by /batch
        await until(lambda: {e.id for e in envs} <= {e.id for e in peer.accepted})
        assert peer.multi == []
        assert node.sender.peers.features("peer") == ()  # until its next descriptor
