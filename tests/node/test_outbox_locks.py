"""One sender per destination across workers (node/outbox.py ``DestLocks``): a worker posts to
a destination only while it holds the destination's lock. Real SqliteStore; fake locks and
network (the PostgreSQL advisory locks themselves: tests/node/test_pg_bus.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from node import outbox

from .test_outbox_hot import Peer, X, _env, done, running, until


class Locks:
    """Advisory locks shared by "workers": ``holder[dest]`` is the worker holding it."""

    def __init__(self, me: str) -> None:
        self.me = me
        self.holder: dict[str, str] = {}
        self.tries = 0

    def held(self, dest: str) -> bool:
        return self.holder.get(dest) == self.me

    async def try_lock(self, dest: str) -> bool:
        self.tries += 1
        if self.holder.get(dest, self.me) != self.me:
            return False
        self.holder[dest] = self.me
        return True

    async def unlock(self, dest: str) -> None:
        if self.held(dest):
            del self.holder[dest]


async def test_rows_wait_for_the_lock_then_go_and_the_lock_is_let_go_when_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox, "LOCK_RETRY_S", 0.05)
    monkeypatch.setattr(outbox, "LOCK_LINGER_S", 0.2)
    peer = Peer()
    locks = Locks("w1")
    locks.holder["peer"] = "w0"  # another worker sends to this peer
    async with running(tmp_path, peer) as node:
        node.sender.locks = locks
        envs = [_env(X) for _ in range(5)]
        await done(node.send(envs))  # committed: not taken in memory without the lock
        assert set(node.store.inserted) == {e.id for e in envs}
        await until(lambda: locks.tries >= 3)  # it keeps trying while rows wait ...
        assert peer.posts == 0 and await node.stored() == 5  # ... and never posts meanwhile
        del locks.holder["peer"]  # the holder died: PostgreSQL released its lock
        await until(lambda: [e.id for e in peer.accepted] == [e.id for e in envs])
        await until(lambda: not locks.held("peer"))  # idle: let go for the other workers
        await until(lambda: node.quotas.by_dest.get("peer", 0) == 0)
        assert await node.stored() == 0


async def test_only_the_lock_holder_takes_envelopes_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox, "LOCK_LINGER_S", 30.0)  # keep the lock during the test
    peer = Peer()
    locks = Locks("w0")
    async with running(tmp_path, peer) as node:
        node.sender.locks = locks
        await node.warm()  # stored way; the worker now holds the lock and idles
        assert locks.held("peer")
        before = len(node.store.inserted)
        hot = [_env(X) for _ in range(3)]
        await done(node.send(hot))
        assert len(node.store.inserted) == before  # accepted from memory: never written
        locks.holder["peer"] = "w1"  # (as if) another worker held it instead
        assert not node.sender.take("peer", _env(X))
