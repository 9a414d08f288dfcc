"""Property test: envelopes are never lost or duplicated across restarts of the store, epoch
rotations, clean shutdowns (re-sealing under a fresh key) and starts after a long stop; and no
key outlives the rows it seals."""

from __future__ import annotations

import asyncio
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.clock import FakeClock
from federation.wire import Envelope
from node.atrest import EpochKeys
from node.sqlite_store import SqliteStore
from node.store import WriteBatch
from tests.conftest import LONG

MAILBOXES = [bytes([i]) * 16 for i in range(3)]
ops = st.lists(
    st.one_of(
        st.tuples(st.just("insert"), st.integers(0, 2), st.integers(1, 5)),
        st.tuples(st.just("ack"), st.integers(0, 2), st.integers(1, 5)),
        st.tuples(st.just("restart"), st.just(0), st.just(0)),
        st.tuples(st.just("rotate"), st.just(0), st.just(0)),
        st.tuples(st.just("serve"), st.just(0), st.integers(0, 3)),  # stop, wait n epochs, start
    ),
    max_size=25,
)


@settings(
    max_examples=200 if LONG else 25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(ops)
def test_no_loss_no_duplicates_across_restarts(sequence: list[tuple[str, int, int]]) -> None:
    asyncio.run(_run(sequence))


async def _run(sequence: list[tuple[str, int, int]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path, key_path = os.path.join(d, "s.db"), os.path.join(d, "e.key")
        now = 1_000_000_000
        epoch = 600_000
        store = SqliteStore(path, EpochKeys(key_path, epoch))
        await store.open()
        model: dict[bytes, list[Envelope]] = {mb: [] for mb in MAILBOXES}
        try:
            for op, mb_i, n in sequence:
                mb = MAILBOXES[mb_i]
                if op == "insert":
                    envs = [
                        Envelope(os.urandom(16), mb, now + 10**9, os.urandom(40)) for _ in range(n)
                    ]
                    # a duplicate of an already stored envelope must not be stored twice
                    dup = tuple(model[mb][:1])
                    await store.write(WriteBatch(envelopes=tuple(envs) + dup), now)
                    model[mb] += envs
                elif op == "ack":
                    gone, model[mb] = model[mb][:n], model[mb][n:]
                    await store.write(WriteBatch(delete_envelopes=tuple(e.id for e in gone)), now)
                elif op == "restart":  # not serving (e.g. an offline command): keys untouched
                    await store.close()
                    store = SqliteStore(path, EpochKeys(key_path, epoch))
                    await store.open()
                elif op == "serve":
                    await store.close()
                    now += n * epoch
                    store = SqliteStore(path, EpochKeys(key_path, epoch))
                    await store.open()
                    await store.begin(FakeClock(now))
                else:
                    now += epoch
                    await store.rotate_epochs(now)
                for m in MAILBOXES:
                    assert await store.pending_for(m, 1000) == model[m]
                keys = store.keys
                if not any(model.values()) and op in ("ack", "rotate", "serve"):
                    assert keys.ids == []  # nothing pending: no key
                if op in ("rotate", "serve") and any(model.values()):
                    assert len(keys.ids) == 1  # everything under one current key
        finally:
            await store.close()
