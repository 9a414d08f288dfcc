from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LONG = os.environ.get("HAVEN_LONG") == "1"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list]:  # type: ignore[type-arg]
    """A list the test appends NodeProc objects to; every one is stopped afterwards."""
    started: list = []  # type: ignore[type-arg]
    yield started
    for n in started:
        try:
            n.kill()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[object]:
    """The PostgreSQL server of this run: the one ``scripts/test`` started (``HAVEN_TEST_PG``),
    else one started here for this session and removed afterwards (tests/pgcluster.py)."""
    from tests import pgcluster

    cluster = pgcluster.from_env()
    if cluster is not None:
        yield cluster
        return
    cluster = pgcluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_dsn(pg_cluster: object) -> Iterator[str]:
    """A fresh, empty database on the run's PostgreSQL server; dropped afterwards."""
    from tests import pgcluster

    assert isinstance(pg_cluster, pgcluster.Cluster)
    dsn = pgcluster.fresh_database(pg_cluster)
    yield dsn
    pgcluster.drop_database(pg_cluster, dsn)
