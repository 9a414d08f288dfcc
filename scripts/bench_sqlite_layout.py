"""What the at-rest row layout costs SQLite: prints ONE JSON object (progress on stderr).

The node's ``envelopes`` table (``node/sqlite_store.py``, schema v3) gives every row a random
63-bit rowid so that the rows of one send never sit on adjacent rowids (the raw-disk seizure
test counts sends linked that way, and must find none). This benchmark measures, with plain
``sqlite3`` and none of the node around it (no crypto, no network, no aiosqlite thread), how
much that layout costs against two alternatives, on the node's own settings (WAL, the WAL kept,
``synchronous=FULL``, ``secure_delete=ON``), 1,280-byte sealed rows (a 1 KiB envelope's
bucket), ``--per-tx`` rows per transaction (the group commit) spread over 10 mailboxes:

* ``random``: the node's layout (random rowid; indexes on ``idh``, ``(mbh, ord)``, ``exp``);
* ``sequential``: rowids in arrival order (what SQLite is fastest at, and what the seizure
  test forbids: rows of one send get consecutive rowids);
* ``mailbox``: rowid = (23 bits of the mailbox hash) << 40 | order key, i.e. rows clustered
  per mailbox in order, no ``(mbh, ord)`` index (a candidate layout: rows of one send go to
  different mailboxes, so they are not adjacent; what it would mean at rest is not settled).

For each, with the table empty and with ``--prefill`` rows already pending: ``insert_rows_per_s``
(durable inserts, the ``offline_store`` path) and ``drain_rows_per_s`` (read a mailbox's
oldest 128 rows and delete them by key in one transaction, the ``drain`` path). These are
upper bounds for the node's ``offline_store`` and ``drain`` figures on the same machine.

    .venv/bin/python scripts/bench_sqlite_layout.py [--prefill 300000] [--tx 150]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROW = 1280  # ROW_BUCKETS[0] in node/sqlite_store.py: a 1 KiB envelope, sealed and padded
LAYOUTS = ("random", "sequential", "mailbox")
AUTOCHECKPOINT = 1000  # pages: SQLite's default, which the node uses (--autocheckpoint)


def log(msg: str) -> None:
    print(f"[bench_sqlite_layout] {msg}", file=sys.stderr, flush=True)


def open_db(path: Path, layout: str) -> sqlite3.Connection:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in (
        "PRAGMA journal_mode=WAL",
        "PRAGMA journal_size_limit=-1",
        "PRAGMA synchronous=FULL",
        "PRAGMA secure_delete=ON",
        f"PRAGMA wal_autocheckpoint={AUTOCHECKPOINT}",
    ):
        db.execute(pragma).fetchall()
    db.execute(
        "CREATE TABLE envelopes (k INTEGER PRIMARY KEY, idh BLOB NOT NULL UNIQUE, "
        "mbh BLOB NOT NULL, ord INTEGER NOT NULL, exp INTEGER NOT NULL, sealed BLOB NOT NULL)"
    )
    if layout != "mailbox":
        db.execute("CREATE INDEX envelopes_mailbox ON envelopes(mbh, ord)")
    db.execute("CREATE INDEX envelopes_expiry ON envelopes(exp)")
    return db


class Rows:
    """Rows for ``layout``: keys, keyed-hash stand-ins, per-mailbox random-walk order keys."""

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.seq = random.getrandbits(40)
        self.ords: dict[bytes, int] = {}
        self.blob = os.urandom(ROW)

    def slot(self, mb: bytes) -> int:
        return (int.from_bytes(mb[:3], "big") >> 1) << 40

    def make(self, n: int, mailboxes: list[bytes]) -> list[tuple[Any, ...]]:
        out = []
        for _ in range(n):
            mb = random.choice(mailboxes)
            o = self.ords[mb] = (
                self.ords.get(mb, random.getrandbits(30)) + 1 + random.getrandbits(10)
            )
            if self.layout == "random":
                k = random.getrandbits(63)
            elif self.layout == "sequential":
                self.seq += 1
                k = self.seq
            else:
                k = self.slot(mb) | o
            exp = 10**12 + random.getrandbits(20)  # coarse expiry minus per-row jitter
            out.append((k, secrets.token_bytes(16), mb, o, exp, self.blob))
        out.sort()
        return out


def insert(db: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    db.execute("BEGIN IMMEDIATE")
    db.executemany("INSERT INTO envelopes VALUES (?, ?, ?, ?, ?, ?)", rows)
    db.execute("COMMIT")


def take(db: sqlite3.Connection, rows: Rows, mb: bytes) -> int:
    if rows.layout == "mailbox":
        s = rows.slot(mb)
        got = db.execute(
            "SELECT k, sealed FROM envelopes WHERE k >= ? AND k < ? AND mbh = ? ORDER BY k "
            "LIMIT 128",
            (s, s + (1 << 40), mb),
        ).fetchall()
    else:
        got = db.execute(
            "SELECT k, sealed FROM envelopes WHERE mbh = ? ORDER BY ord LIMIT 128", (mb,)
        ).fetchall()
    db.execute("BEGIN IMMEDIATE")
    db.executemany("DELETE FROM envelopes WHERE k = ?", [(r[0],) for r in got])
    db.execute("COMMIT")
    return len(got)


def run(path: Path, layout: str, prefill: int, n_tx: int, per_tx: int) -> dict[str, float]:
    db = open_db(path, layout)
    rows = Rows(layout)
    backlog = [secrets.token_bytes(16) for _ in range(100)]
    db.execute("PRAGMA synchronous=OFF")  # the prefill is setup, not measured
    for _ in range(prefill // 1000):
        insert(db, rows.make(1000, backlog))
    db.execute("PRAGMA synchronous=FULL")
    live = backlog[:10]
    t = time.perf_counter()
    for _ in range(n_tx):
        insert(db, rows.make(per_tx, live))
    ins = n_tx * per_tx / (time.perf_counter() - t)
    t, n = time.perf_counter(), 0
    for i in range(n_tx):
        n += take(db, rows, backlog[i % len(backlog)])
    drained = n / (time.perf_counter() - t)
    db.close()
    return {"insert_rows_per_s": round(ins), "drain_rows_per_s": round(drained)}


def main() -> None:
    global AUTOCHECKPOINT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", type=int, default=300_000, help="rows pending for the big run")
    ap.add_argument("--tx", type=int, default=150, help="measured transactions per run")
    ap.add_argument("--per-tx", type=int, default=128, help="rows per transaction")
    ap.add_argument("--dir", default=None, help="where the database goes (default: a temp dir)")
    ap.add_argument("--autocheckpoint", type=int, default=AUTOCHECKPOINT, help="WAL pages")
    args = ap.parse_args()
    AUTOCHECKPOINT = args.autocheckpoint
    out: dict[str, Any] = {
        "row_bytes": ROW,
        "per_tx": args.per_tx,
        "autocheckpoint": AUTOCHECKPOINT,
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "layout.db"
        for layout in LAYOUTS:
            res = {}
            for label, prefill in (("empty", 0), (f"pending_{args.prefill}", args.prefill)):
                log(f"{layout}, {prefill} pending")
                res[label] = run(path, layout, prefill, args.tx, args.per_tx)
            out[layout] = res
    for layout in LAYOUTS[1:]:
        out[f"{layout}_vs_random"] = {
            label: {k: round(v / out["random"][label][k], 2) for k, v in out[layout][label].items()}
            for label in out[layout]
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
