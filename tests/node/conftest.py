"""Fixtures shared by the node's unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.atrest import EpochKeys
from node.sqlite_store import SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(str(tmp_path / "store.db"), EpochKeys(str(tmp_path / "epochs.key")))
    await s.open()
    yield s
    await s.close()
