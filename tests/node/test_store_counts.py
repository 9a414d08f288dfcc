"""Pending counts survive a hash the GROUP BY could not name (real SqliteStore, no network)."""

from __future__ import annotations

import os
from pathlib import Path

from federation.wire import Envelope
from node.atrest import EpochKeys
from node.sqlite_store import ENV_MB, SqliteStore
from node.store import WriteBatch


async def test_a_null_hash_in_the_counts_is_skipped_not_fatal(tmp_path: Path) -> None:
    # A GROUP BY that once interleaved with writes on the same connection returned a NULL hash;
    # turning it into bytes raised TypeError and the node's cache refresh stopped the node.
    store = SqliteStore(str(tmp_path / "s.db"), EpochKeys(str(tmp_path / "e.key")))
    await store.open()
    try:
        mb = os.urandom(32)
        now = 1_000_000
        envs = tuple(Envelope(os.urandom(16), mb, now + 60_000, b"x") for _ in range(2))
        await store.write(WriteBatch(envelopes=envs), now)
        h = store.keys.index(store.keys.ids[0], ENV_MB, mb)
        assert await store._resolve("envelopes", "mbh", [(None, 3), (h, 2)], {}) == {mb: 2}
        assert await store.pending_counts() == {mb: 2}
    finally:
        await store.close()
