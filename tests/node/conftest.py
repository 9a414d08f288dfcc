"""Fixtures shared by the node's unit tests.

``store`` runs a test on every backend: SQLite (a file in the test's temp folder) and
PostgreSQL (a fresh database on the run's server, tests/pgcluster.py). ``make_store`` builds
more stores of the same backend on the same database (a restart, a second process).
``sqlite_store`` is for tests about SQLite itself (its statements, WAL, pragmas, migrations).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from node.atrest import EpochKeys
from node.pg_store import PgStore
from node.sqlite_store import SqliteStore
from node.store import Store

BACKENDS = ["sqlite", "postgresql"]

MakeStore = Callable[..., Any]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> MakeStore:
    """``make_store(keys, **kw)``: a new (unopened) store of this test's backend on this
    test's database; ``kw`` as the backend takes them (``clock``; ``leader`` on PostgreSQL)."""
    if backend == "postgresql":
        dsn = str(request.getfixturevalue("pg_dsn"))

        def make_pg(keys: EpochKeys, **kw: Any) -> PgStore:
            return PgStore(dsn, keys, **kw)

        return make_pg

    def make_sqlite(keys: EpochKeys, **kw: Any) -> SqliteStore:
        kw.pop("leader", None)
        return SqliteStore(str(tmp_path / "store.db"), keys, **kw)

    return make_sqlite


@pytest.fixture
async def store(make_store: MakeStore, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store = make_store(EpochKeys(str(tmp_path / "epochs.key")))
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(str(tmp_path / "store.db"), EpochKeys(str(tmp_path / "epochs.key")))
    await s.open()
    yield s
    await s.close()
