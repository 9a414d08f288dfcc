"""The PostgreSQL carver finds sealed values in heap files, TOAST and WAL of a real server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests import pgcluster

from .pgcarve import HEAP, TOAST, Layout, carve_pg, sealed_sizes, varlena4

LAYOUT = Layout(("b16", "b16", "i8", "i8"))


async def _fill(
    dsn: str, inline: int, toasted: list[int]
) -> list[tuple[bytes, bytes, int, int, bytes]]:
    rows = [
        (os.urandom(16), os.urandom(16), 10**15 + i, -(10**12) - i, os.urandom(1280))
        for i in range(inline)
    ]
    rows += [(os.urandom(16), os.urandom(16), i, i, os.urandom(n)) for i, n in enumerate(toasted)]
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "CREATE TABLE t (idh bytea NOT NULL, mbh bytea NOT NULL, ord bigint NOT NULL,"
            " exp bigint NOT NULL, sealed bytea NOT NULL)"
        )
        await conn.executemany("INSERT INTO t VALUES ($1, $2, $3, $4, $5)", rows)
        await conn.execute("CHECKPOINT")
    finally:
        await conn.close()
    return rows


def _relation_bytes(cluster: pgcluster.Cluster, db: str, rel: str) -> bytes:
    path = cluster.psql(f"SELECT pg_relation_filepath('{rel}')", db)
    base = Path(cluster.data) / path
    return b"".join(p.read_bytes() for p in sorted(base.parent.glob(base.name + "*")))


def _wal_in_lsn_order(pg_wal: Path) -> bytes:
    """Every WAL segment, ordered by the address in its first page header (``xlp_pageaddr``,
    bytes 8-16), as an examiner would order them: a checkpoint recycles old segments by
    renaming them to future names, so on a long-running server (``scripts/test`` shares one)
    name order can put a recycled segment between the two halves of a record."""
    segments = [p.read_bytes() for p in pg_wal.glob("0*")]
    return b"".join(sorted(segments, key=lambda seg: int.from_bytes(seg[8:16], "little")))


@pytest.fixture(scope="module")
def own_cluster() -> Iterator[pgcluster.Cluster]:
    """A server of this test's own: what its WAL holds then depends only on this test, not on
    the checkpoints and segment switches the run's shared server has been through."""
    cluster = pgcluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_carves_inline_toasted_and_wal_copies(own_cluster: pgcluster.Cluster) -> None:
    pg_cluster = own_cluster
    pg_dsn = pgcluster.fresh_database(pg_cluster)
    toasted = [4352, 16640, 65792, 2 * 65536]  # buckets 4096+256, 16384+256, 65536+256; a step
    rows = await _fill(pg_dsn, 40, toasted)
    db = pg_dsn.rsplit("/", 1)[1]
    heap = _relation_bytes(pg_cluster, db, "t")
    toast_rel = pg_cluster.psql(
        "SELECT reltoastrelid::regclass FROM pg_class WHERE relname = 't'", db
    )
    toast = _relation_bytes(pg_cluster, db, toast_rel)
    wal = _wal_in_lsn_order(Path(pg_cluster.data) / "pg_wal")

    big = sealed_sizes(4 * 65536)  # beyond the buckets too (multiples of ROW_STEP)
    found = {r.values[-1]: r for r in carve_pg(heap + toast, [LAYOUT], big)}
    for idh, mbh, ord_, exp, sealed in rows[:40]:
        rec = found.get(sealed)
        assert rec is not None and rec.kind == HEAP
        assert rec.values[:4] == (idh, mbh, ord_, exp)  # the clear columns, from the layout
        assert rec.cell == 1
    heads = {LAYOUT.tuple_head(heap, r.offset) for r in carve_pg(heap, [LAYOUT])}
    assert None not in heads and len({h.xmin for h in heads if h}) == 1  # one transaction
    assert len({(h.block, h.posid) for h in heads if h}) == 40
    for *_, sealed in rows[40:]:
        assert sealed not in heap  # really moved out of line ...
        assert sealed in found and found[sealed].kind == TOAST  # ... and put back together
    wal_recs = list(carve_pg(wal, [LAYOUT], big))
    assert {r[-1] for r in rows} <= {r.values[-1] for r in wal_recs}  # page headers cut out
    # insert records carry no t_xmin where a heap tuple has it: no header is read there
    assert any(LAYOUT.tuple_head(wal, r.offset) is None for r in wal_recs if r.cell)


def test_noise_yields_no_candidate() -> None:
    noise = os.urandom(4 << 20)
    got = [r for r in carve_pg(noise) if r.values[-1] != noise]
    # a 4-byte header match in random data is possible but rare; a header followed by zeros is
    # still a candidate, so plant one to show the scan looks everywhere
    planted = noise[:1000] + varlena4(1280) + bytes(1280) + noise[1000:]
    assert len(list(carve_pg(planted))) == len(got) + 1
