"""The record carver finds what it must (database pages, WAL frames) and nothing in noise."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import nacl.secret

from .carve import Record, carve, varint
from .examine import Env, Ledger, _linkage, secretbox_open


def _db(path: Path, rows: int) -> sqlite3.Connection:
    """Rows committed to the WAL only (the open connection keeps SQLite from checkpointing)."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (id BLOB, mb BLOB, expires INTEGER, note TEXT, sealed BLOB)")
    db.execute("BEGIN")
    for i in range(rows):
        db.execute(
            "INSERT INTO t VALUES (?, ?, ?, ?, ?)",
            (os.urandom(16), os.urandom(16), 1_700_000_000_000 + i, f"n{i}", os.urandom(1064)),
        )
    db.execute("COMMIT")
    return db


def test_varint_round_trips_sqlite_encoding() -> None:
    assert varint(b"\x7f", 0, 1) == (127, 1)
    assert varint(b"\x81\x00", 0, 2) == (128, 2)
    assert varint(b"\xff" * 8 + b"\x01", 0, 9)[1] == 9


def test_carves_every_row_from_db_file_and_from_unaligned_wal_frames(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    db = _db(path, 40)  # rows only in the WAL: 24-byte frame headers, unaligned
    wal = (tmp_path / "x.db-wal").read_bytes()
    db.execute("PRAGMA wal_checkpoint(RESTART)")
    in_db = {r.values[3] for r in carve(path.read_bytes()) if len(r.values) == 5}
    db.close()
    assert in_db == {f"n{i}" for i in range(40)}
    in_wal = {r.values[3] for r in carve(wal) if len(r.values) == 5}
    assert in_wal == {f"n{i}" for i in range(40)}
    # the same WAL embedded at an odd offset of a larger buffer, as in a disk image
    noisy = os.urandom(12_345) + wal + os.urandom(50_000)
    assert {r.values[3] for r in carve(noisy) if len(r.values) == 5} == in_wal


def test_finds_nothing_in_random_or_sealed_bytes() -> None:
    assert list(carve(os.urandom(4 * 2**20))) == []
    key = os.urandom(32)
    sealed = b"".join(
        bytes(nacl.secret.SecretBox(key).encrypt(os.urandom(4000))) for _ in range(64)
    )
    assert list(carve(sealed)) == []
    assert secretbox_open(key, sealed[:4040]) is not None
    assert secretbox_open(os.urandom(32), sealed[:4040]) is None


def test_linkage_counts_equal_fields_and_adjacent_rowids() -> None:
    ledger = Ledger()
    ids = [os.urandom(16) for _ in range(4)]
    for i, eid in enumerate(ids):  # sends 1 and 2, two envelopes each
        ledger.add(Env(eid, b"m" * 16, os.urandom(32), 1 + i // 2, "A", "B"))
    recs = [Record(0, 0x0D, 0, 10 + i, (eid, 777 + i // 2)) for i, eid in enumerate(ids)]
    attributed = {i: {eid} for i, eid in enumerate(ids)}
    assert _linkage(recs, attributed, ledger) == (2, 4, 2, 2, 0)
    # jittered fields and scattered keys: nothing links
    recs = [Record(0, 0x0A, 0, None, (eid, 777 + i)) for i, eid in enumerate(ids)]
    assert _linkage(recs, attributed, ledger) == (0, 0, 0, 2, 0)
    # an equal destination hash is counted apart (it names a node, not a pair)
    dh = [os.urandom(16), os.urandom(16)]
    recs = [Record(0, 0x0A, 0, None, (eid, dh[i // 2])) for i, eid in enumerate(ids)]
    assert _linkage(recs, attributed, ledger, set(dh)) == (0, 0, 0, 2, 2)


def _files(home: Path) -> tuple[list[tuple[int, bytes]], bytes]:
    from .examine import parse_epoch_keys

    keys = parse_epoch_keys((home / "epochs.key").read_bytes())
    return keys, b"".join(p.read_bytes() for p in sorted(home.glob("store.db*")))


async def test_store_opener_and_index_match_the_node_store(tmp_path: Path) -> None:
    """The examiner's record opener and keyed hashes are the store's own: rows a real v3
    store wrote, carved from its files, open under its epoch key and match its mailbox index."""
    from federation.wire import Envelope
    from node.atrest import EpochKeys
    from node.sqlite_store import SqliteStore
    from node.store import WriteBatch

    from .examine import Scan, mailboxes_by_index, sealed_rows

    store = SqliteStore(str(tmp_path / "store.db"), EpochKeys(str(tmp_path / "epochs.key")))
    await store.open()
    try:
        envs = [Envelope(os.urandom(16), b"M" * 16, 2**41, os.urandom(600)) for _ in range(3)]
        await store.write(WriteBatch(envelopes=tuple(envs), outbox=(("peer", envs[0]),)), 1000)
        keys, raw = _files(tmp_path)
    finally:
        await store.close()
    ledger = Ledger()
    for i, e in enumerate(envs):
        ledger.add(Env(e.id, e.to, e.body[:32], i, "A", "B"))
    recs = list(carve(raw))
    open_rec = sealed_rows()
    got = {i for r in recs for i in ledger.attribute(r, [pt for _, pt in open_rec(r, keys)])}
    assert got == {e.id for e in envs}
    scan = Scan("x", tmp_path / "store.db", raw, b"", recs, 0)
    assert mailboxes_by_index(scan, keys, [b"M" * 16, b"N" * 16]) == 1


def test_sqlcipher_pages_decrypt_for_the_carver(tmp_path: Path) -> None:
    import sqlcipher3

    from .sqlcipher import USABLE, sqlcipher_pages

    key = os.urandom(32)
    db = sqlcipher3.connect(str(tmp_path / "c.db"), isolation_level=None)
    db.execute(f"PRAGMA key = \"x'{key.hex()}'\"")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (note TEXT, n INTEGER)")
    db.executemany("INSERT INTO t VALUES (?, ?)", [(f"secret-{i}", i) for i in range(300)])
    wal = (tmp_path / "c.db-wal").read_bytes()  # the rows are in WAL frames only
    image = os.urandom(8192) + wal + bytes(8192)  # files start on a block boundary
    assert b"secret-1" not in image
    found = {r.values[0] for r in carve(sqlcipher_pages(image, key), USABLE)}
    assert {f"secret-{i}" for i in range(300)} <= found
    assert not list(carve(sqlcipher_pages(image, os.urandom(32)), USABLE))
    db.close()


def test_device_key_finder_reads_the_keyslots_layout(tmp_path: Path) -> None:
    from client.keyslots import KeySlots

    from .examine import keyslot_keys, unwrap_keyslots_header

    db_key = os.urandom(32)
    clear = KeySlots.create(str(tmp_path / "clear.keys"), db_key, None, False)
    wrapped = KeySlots.create(str(tmp_path / "wrapped.keys"), db_key, "pass phrase", False)
    for ks in (clear, wrapped):
        _slot, key = ks.allocate()
        ks.flush()
        ks.committed()
        dead, _ = ks.allocate()
        ks.flush()
        ks.committed()
        ks.shred(dead)
        ks.flush()
        ks.committed()
        data = Path(ks.path).read_bytes()
        keys = keyslot_keys(data)
        assert key in keys and len(keys) == 2  # the live key and slot 0's token, not the zeroed
    data = (tmp_path / "clear.keys").read_bytes()
    assert unwrap_keyslots_header(data, None) == db_key
    data = (tmp_path / "wrapped.keys").read_bytes()
    assert unwrap_keyslots_header(data, None) is None
    assert unwrap_keyslots_header(data, "wrong") is None
    assert unwrap_keyslots_header(data, "pass phrase") == db_key
