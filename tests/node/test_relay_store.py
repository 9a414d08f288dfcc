"""The relay's ``relay_clients`` rows in the SQLite store (node/relay.py, node/held.py)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node import sqlite_store
from node.atrest import EpochKeys
from node.sqlite_store import SqliteStore

DAY_MS = 86_400_000


async def test_v6_relay_rows_migrate_and_keep_the_latest_statement(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store made at schema 6 opens at 7: its bound row has no statement yet; the latest one
    set is kept across a reopen, only for bound clients."""
    path, keys = str(tmp_path / "store.db"), str(tmp_path / "epochs.key")
    monkeypatch.setattr(sqlite_store, "MIGRATIONS", sqlite_store.MIGRATIONS[:6])
    old = SqliteStore(path, EpochKeys(keys))
    await old.open()
    await old.add_relay_client("bound", b"t" * 32, 1000, 10 * DAY_MS, 0)
    await old.add_relay_client("unbound", b"u" * 32, 1000, 10 * DAY_MS, 0)
    assert await old.bind_relay_client("bound", b"t" * 32, "client-a", DAY_MS)
    await old.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 6
    monkeypatch.undo()

    new = SqliteStore(path, EpochKeys(keys))
    await new.open()
    try:
        assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == len(
            sqlite_store.MIGRATIONS
        )
        assert await new.relay_auths() == {}
        await new.set_relay_auth("client-a", b"first")
        await new.set_relay_auth("client-a", b"second")
        await new.set_relay_auth("", b"nobody")  # an unbound row never takes one
        assert await new.relay_auths() == {"client-a": b"second"}
        assert [r[:3] for r in await new.relay_clients()] == [
            ("bound", b"", "client-a"),
            ("unbound", b"u" * 32, ""),
        ]
    finally:
        await new.close()
    again = SqliteStore(path, EpochKeys(keys))
    await again.open()
    try:
        assert await again.relay_auths() == {"client-a": b"second"}
    finally:
        await again.close()
