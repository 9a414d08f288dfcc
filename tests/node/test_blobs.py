"""The blob store (node/blobs.py): chunks on disk, sealed metas, resume, TTL, quotas, shredding."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.errors import (
    Conflict,
    HashMismatch,
    MalformedFrame,
    NotFound,
    NotReady,
    QuotaExceeded,
    StorageError,
    TooLarge,
)
from federation.wire import CHUNK_SIZE
from node.atrest import EpochKeys
from node.blobfiles import META, data_len
from node.blobs import BlobStore, footprint
from node.metrics import Metrics

MIB = 1024 * 1024
NOW = 1_700_000_000_000
EPOCH = 600_000


def make_store(tmp: Path, **kw: int) -> BlobStore:
    return BlobStore(
        str(tmp / "blobs"),
        str(tmp / "blob-epochs.key"),
        EPOCH,
        kw.get("max_store", 1024 * MIB),
        kw.get("max_per_account", 300 * MIB),
        Metrics(),
        disk_reserve=kw.get("disk_reserve", 0),
    )


def chunks_of(data: bytes) -> list[bytes]:
    return [data[i : i + CHUNK_SIZE] for i in range(0, len(data), CHUNK_SIZE)]


class Upload:
    """A ciphertext blob as a device would upload it, with two recipients' tokens."""

    def __init__(self, size: int) -> None:
        self.blob = os.urandom(16)
        self.data = os.urandom(size)
        self.chunks = chunks_of(self.data)
        self.hashes = tuple(hashlib.sha256(c).digest() for c in self.chunks)
        self.tokens = [os.urandom(32), os.urandom(32)]
        self.token_hashes = [hashlib.sha256(t).digest() for t in self.tokens]

    async def announce(
        self, store: BlobStore, account: str = "alice", ttl: int = 60_000
    ) -> list[int]:
        return await store.announce(
            account, self.blob, len(self.data), self.hashes, self.token_hashes, NOW + ttl, NOW
        )

    async def put_all(self, store: BlobStore) -> None:
        for i, c in enumerate(self.chunks):
            await store.put(self.blob, i, c)

    async def read_all(self, store: BlobStore, token: bytes) -> bytes:
        out = []
        for i in range(len(self.chunks)):
            out.append((await store.read(self.blob, token, i, NOW)).data)
        return b"".join(out)


def dirs(store: BlobStore) -> list[str]:
    return os.listdir(store.root)


def raw_files(store: BlobStore) -> bytes:
    out = b""
    for d in dirs(store):
        for name in os.listdir(os.path.join(store.root, d)):
            with open(os.path.join(store.root, d, name), "rb") as f:
                out += f.read()
    return out


async def test_round_trip_and_at_rest(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.open(NOW)
    up = Upload(2 * CHUNK_SIZE + 12345)
    assert await up.announce(store) == []
    await up.put_all(store)
    assert await up.read_all(store, up.tokens[0]) == up.data
    assert await up.read_all(store, up.tokens[1]) == up.data
    # on disk: one directory with a random name, no plaintext chunk, no blob id
    (name,) = dirs(store)
    assert up.blob.hex() not in name
    raw = raw_files(store)
    assert up.chunks[0][:64] not in raw and up.blob not in raw
    assert all(h not in raw for h in up.hashes)
    assert os.stat(os.path.join(store.root, name, "data")).st_size == data_len(len(up.data))


async def test_resume_after_reopen_lists_stored_chunks(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.open(NOW)
    up = Upload(5 * CHUNK_SIZE)
    await up.announce(store)
    for i in (0, 1, 3):
        assert await store.put(up.blob, i, up.chunks[i]) is True
    # a repeated put of a stored chunk is answered but not stored twice
    assert await store.put(up.blob, 1, up.chunks[1]) is False
    # the process dies: a new store on the same directory finds the durable chunks
    again = make_store(tmp_path)
    await again.open(NOW + 1000)
    assert await up.announce(again) == [0, 1, 3]
    with pytest.raises(NotReady):
        await again.read(up.blob, up.tokens[0], 0, NOW)
    for i in (2, 4):
        await again.put(up.blob, i, up.chunks[i])
    assert await up.read_all(again, up.tokens[0]) == up.data


async def test_bad_chunks_are_refused_and_change_nothing(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.open(NOW)
    up = Upload(CHUNK_SIZE + 100)
    await up.announce(store)
    with pytest.raises(HashMismatch):
        await store.put(up.blob, 0, os.urandom(CHUNK_SIZE))
    with pytest.raises(HashMismatch):  # chunks swapped: each has the other's hash
        await store.put(up.blob, 0, up.chunks[1] + bytes(CHUNK_SIZE - 100))
    with pytest.raises(MalformedFrame):  # truncated
        await store.put(up.blob, 0, up.chunks[0][:-1])
    with pytest.raises(MalformedFrame):  # reordered: the short last chunk at index 0
        await store.put(up.blob, 0, up.chunks[1])
    with pytest.raises(TooLarge):
        await store.put(up.blob, 0, up.chunks[0] + b"x")
    with pytest.raises(MalformedFrame):
        await store.put(up.blob, 2, up.chunks[1])
    with pytest.raises(NotFound):
        await store.put(os.urandom(16), 0, up.chunks[0])
    assert store.uploads[up.blob].have == set()
    await up.put_all(store)
    assert await up.read_all(store, up.tokens[0]) == up.data


async def test_token_check_and_unknown_blob_answer_alike(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.open(NOW)
    up = Upload(1000)
    await up.announce(store)
    await up.put_all(store)
    for blob, token in ((up.blob, os.urandom(32)), (os.urandom(16), up.tokens[0])):
        with pytest.raises(NotFound) as exc:
            await store.read(blob, token, 0, NOW)
        assert str(exc.value) == "no such blob"
        with pytest.raises(NotFound):
            await store.release(blob, token)
    with pytest.raises(NotFound):  # the token hash itself is not a token
        await store.read(up.blob, up.token_hashes[0], 0, NOW)


async def test_conflicting_announce(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.open(NOW)
    up = Upload(3000)
    await up.announce(store)
    with pytest.raises(Conflict):
        await store.announce("alice", up.blob, 3001, up.hashes, up.token_hashes, NOW + 1, NOW)
    with pytest.raises(Conflict):
        await store.announce(
            "alice", up.blob, 3000, (os.urandom(32),), up.token_hashes, NOW + 1, NOW
        )
    with pytest.raises(MalformedFrame):  # two hashes for a one-chunk blob
        await store.announce(
            "bob", os.urandom(16), 3000, up.hashes * 2, up.token_hashes, NOW + 1, NOW
        )


async def test_deleted_once_every_token_is_done(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.open(NOW)
    up = Upload(CHUNK_SIZE + 1)
    await up.announce(store)
    await up.put_all(store)
    assert await store.release(up.blob, up.tokens[0]) is False
    with pytest.raises(NotFound):  # that device's token is spent
        await store.read(up.blob, up.tokens[0], 0, NOW)
    # the release is durable: after a restart the spent token still gets nothing
    store = make_store(tmp_path)
    await store.open(NOW)
    with pytest.raises(NotFound):
        await store.read(up.blob, up.tokens[0], 0, NOW)
    assert (await store.read(up.blob, up.tokens[1], 1, NOW)).data == up.chunks[1]
    assert await store.release(up.blob, up.tokens[1]) is True
    assert dirs(store) == []
    assert store.used == 0 and store.in_flight == {}
    assert store.metrics.events["blob.deleted_fetched"] == 1
    # no blobs: no epoch key left either
    await store.rotate(NOW)
    assert store.keys is not None and store.keys.ids == []


async def test_ttl_expiry(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.open(NOW)
    up, kept = Upload(5000), Upload(5000)
    await up.announce(store, ttl=10_000)  # never fetched
    await kept.announce(store, ttl=100_000)
    assert (await store.tick(NOW + 9_999))["expired"] == 0
    assert (await store.tick(NOW + 10_000))["expired"] == 1
    assert up.blob not in store.uploads and kept.blob in store.uploads
    assert len(dirs(store)) == 1
    assert store.metrics.events["blob.deleted_ttl"] == 1
    # an expired blob found at start is deleted too
    again = make_store(tmp_path)
    await again.open(NOW + 100_000)
    assert again.uploads == {} and dirs(again) == []


async def test_reseal_across_epochs_destroys_the_old_key(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.open(NOW)
    up = Upload(CHUNK_SIZE * 2)
    await up.announce(store, ttl=10 * EPOCH)
    await up.put_all(store)
    assert store.keys is not None
    (old_kid,) = store.keys.ids
    old_key = store.keys._get(old_kid).raw
    meta_path = os.path.join(store.root, dirs(store)[0], META)
    with open(meta_path, "rb") as f:
        old_meta = f.read()
    assert (await store.tick(NOW + EPOCH))["resealed"] == 1
    assert len(store.keys.ids) == 1 and store.keys.ids != [old_kid]
    with open(meta_path, "rb") as f:
        new_meta = f.read()
    assert new_meta != old_meta
    # the old key is gone from the key file; the old meta no longer opens with what is left
    with open(tmp_path / "blob-epochs.key", "rb") as f:
        assert old_key not in f.read()
    assert EpochKeys(str(tmp_path / "blob-epochs.key"), EPOCH).try_open(old_meta[1:]) is None
    # the new meta still opens: a restart finds the blob whole
    again = make_store(tmp_path)
    await again.open(NOW + EPOCH + 1)
    assert await up.read_all(again, up.tokens[1]) == up.data


async def test_quotas(tmp_path: Path) -> None:
    store = make_store(tmp_path, max_per_account=3 * MIB, max_store=5 * MIB)
    await store.open(NOW)
    a1, a2, b1 = Upload(2 * MIB), Upload(2 * MIB), Upload(2 * MIB)
    await a1.announce(store, "alice")
    with pytest.raises(QuotaExceeded):  # alice: 4 MiB in flight > 3 MiB
        await a2.announce(store, "alice")
    await b1.announce(store, "bob")
    with pytest.raises(QuotaExceeded):  # node-wide: 6 MiB > 5 MiB
        await Upload(MIB + 1).announce(store, "carol")
    assert len(dirs(store)) == 2
    # once alice's blob is fetched, her bytes in flight are free again
    await a1.put_all(store)
    await store.release(a1.blob, a1.tokens[0])
    await store.release(a1.blob, a1.tokens[1])
    await a2.announce(store, "alice")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs for this test only (we run as root, as tests/integration/test_disk_full)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


async def test_full_disk_refuses_with_storage_error(small_disk: Path) -> None:
    # no reserve: the allocation itself meets ENOSPC
    store = make_store(small_disk, disk_reserve=0)
    store.free_space = lambda: 1 << 40  # skip the early check: let the filesystem refuse
    await store.open(NOW)
    first = Upload(9 * MIB)
    await first.announce(store)
    with pytest.raises(StorageError):
        await Upload(9 * MIB).announce(store)
    assert len(dirs(store)) == 1 and store.used == footprint(9 * MIB)
    # nothing else is lost: the first upload completes and is served
    await first.put_all(store)
    assert await first.read_all(store, first.tokens[0]) == first.data


async def test_blobs_leave_the_reserve_free(small_disk: Path) -> None:
    store = make_store(small_disk, disk_reserve=8 * MIB)  # the real statvfs, a real disk
    await store.open(NOW)
    with pytest.raises(StorageError):
        await Upload(9 * MIB).announce(store)  # 16 MiB disk - 8 MiB reserve: does not fit
    assert dirs(store) == [] and store.used == 0
    await Upload(4 * MIB).announce(store)


async def test_fetched_copy_resumes_and_is_dropped(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.open(NOW)
    up = Upload(3 * CHUNK_SIZE - 7)
    origin, token = "originnodeid", up.tokens[0]
    for i in (0, 2):
        await store.copy_put(origin, up.blob, token, i, up.chunks[i], len(up.data), NOW + 5000, NOW)
    again = make_store(tmp_path)
    await again.open(NOW)
    copy = again.copy_of(origin, up.blob, token)
    assert copy is not None and copy.have == {0, 2}
    assert again.copy_of(origin, up.blob, up.tokens[1]) is None  # per token
    served = await again.copy_read(copy, 2, NOW)
    assert served is not None and served.data == up.chunks[2]
    assert await again.copy_read(copy, 1, NOW) is None
    with pytest.raises(MalformedFrame):
        await again.copy_put(origin, up.blob, token, 1, b"short", len(up.data), NOW + 5000, NOW)
    assert await again.copy_drop(origin, up.blob, token) is True
    assert dirs(again) == [] and again.used == 0


async def test_a_deletion_moves_the_other_metas_to_a_fresh_key(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.open(NOW)
    gone, kept = Upload(1000), Upload(2000)
    await gone.announce(store)
    await kept.announce(store)
    await gone.put_all(store)
    assert store.keys is not None
    (before,) = store.keys.ids
    old_key = store.keys._get(before).raw
    for t in gone.tokens:
        await store.release(gone.blob, t)
    assert (await store.tick(NOW + 1))["resealed"] == 1  # same epoch: no wait for its end
    assert len(store.keys.ids) == 1
    with open(tmp_path / "blob-epochs.key", "rb") as f:
        assert old_key not in f.read()  # the deleted blob's metas cannot be opened any more
    again = make_store(tmp_path)
    await again.open(NOW + 2)
    assert list(again.uploads) == [kept.blob]


async def test_the_same_chunk_twice_at_once_is_written_once(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    await store.open(NOW)
    up = Upload(2 * CHUNK_SIZE)
    await up.announce(store)
    first, second, resumed = await asyncio.gather(
        store.put(up.blob, 0, up.chunks[0]),
        store.put(up.blob, 0, up.chunks[0]),
        up.announce(store),  # a resume while the write is under way waits for it
    )
    assert sorted([first, second]) == [False, True]
    assert resumed == [0]
    with pytest.raises(HashMismatch):  # a repeat is still checked
        await store.put(up.blob, 0, os.urandom(CHUNK_SIZE))
