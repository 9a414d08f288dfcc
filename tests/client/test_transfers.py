"""Upload and download resumption against a fake blob link (the real node: test_files.py)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from typing import Any

import pytest

from client import attachments as A
from client import transfers as T
from client.payload import FileRef, Payload
from federation import frames as F
from federation.errors import RemoteProtocolError, TransportError

MIB = 1 << 20


class FakeLink:
    """Answers blob frames like a home node (in memory); can drop the link after N puts."""

    def __init__(self, fail_after_puts: int | None = None) -> None:
        self.blobs: dict[bytes, dict[str, Any]] = {}
        self.put_bytes = 0
        self.puts: list[int] = []
        self.gets: list[int] = []
        self.fail_after_puts = fail_after_puts
        self.fail_after_gets: int | None = None
        self.done: list[bytes] = []
        self._rid = 0

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    async def request(self, frame: F.Frame) -> F.Frame:
        if isinstance(frame, F.BlobNew):
            b = self.blobs.setdefault(
                frame.blob, {"size": frame.size, "hashes": frame.hashes, "chunks": {}}
            )
            if b["hashes"] != frame.hashes:
                raise RemoteProtocolError("conflict", code="conflict")
            return F.BlobOk(frame.rid, frame.blob, tuple(sorted(b["chunks"])))
        if isinstance(frame, F.BlobPut):
            if self.fail_after_puts is not None and len(self.puts) >= self.fail_after_puts:
                raise TransportError("gone", code="node_unreachable")
            b = self.blobs[frame.blob]
            if hashlib.sha256(frame.data).digest() != b["hashes"][frame.index]:
                raise RemoteProtocolError("bad", code="hash_mismatch")
            b["chunks"][frame.index] = frame.data
            self.put_bytes += len(frame.data)
            self.puts.append(frame.index)
            return F.Ok(frame.rid)
        if isinstance(frame, F.BlobGet):
            if self.fail_after_gets is not None and len(self.gets) >= self.fail_after_gets:
                raise TransportError("gone", code="node_unreachable")
            b = self.blobs.get(frame.blob)
            if b is None:
                raise RemoteProtocolError("not found", code="not_found")
            self.gets.append(frame.index)
            return F.BlobChunk(frame.rid, frame.index, b["chunks"][frame.index])
        if isinstance(frame, F.BlobDone):
            self.done.append(frame.blob)
            return F.Ok(frame.rid)
        raise AssertionError(frame)


def _upload(tmp: str, size: int) -> tuple[T.Upload, bytes]:
    src = os.path.join(tmp, "src.bin")
    data = os.urandom(size)
    with open(src, "wb") as f:
        f.write(data)
    ct = os.path.join(tmp, "up.ct")
    enc = A.encrypt_file(src, ct)
    st = os.stat(src)
    up = T.Upload(
        blob=os.urandom(16),
        msg_id=os.urandom(16),
        peer="bob@x",
        src=src,
        src_size=st.st_size,
        src_mtime_ns=st.st_mtime_ns,
        ct=ct,
        key=enc.key,
        size=enc.size,
        padded=enc.padded,
        sha256=enc.sha256,
        plain_sha256=enc.plain_sha256,
        hashes=enc.hashes,
        secret=os.urandom(32),
        devices=("devA", "devB"),
        name="src.bin",
        mime="application/octet-stream",
        thumb=b"",
        caption="",
        ttl_ms=60_000,
        expires_in=0,
    )
    return up, data


def test_upload_record_round_trips(tmp_path: Any) -> None:
    up, _ = _upload(str(tmp_path), 10)
    assert T.Upload.decode(up.encode()) == up


async def test_interrupted_upload_resumes_without_resending(tmp_path: Any) -> None:
    up, _ = _upload(str(tmp_path), 5 * MIB)
    link = FakeLink(fail_after_puts=2)
    with pytest.raises(TransportError):
        await T._put_all(link, up, await T._blob_new(link, up), None)  # type: ignore[arg-type]
    first = set(link.puts)
    assert 0 < len(first) < A.chunk_count(up.padded)
    link.fail_after_puts = None
    have = await T._blob_new(link, up)  # type: ignore[arg-type]
    assert have == first
    await T._put_all(link, up, have, None)  # type: ignore[arg-type]
    assert sorted(link.puts) == list(range(A.chunk_count(up.padded)))  # each chunk once
    assert link.put_bytes == up.padded


async def test_interrupted_download_resumes_and_decrypts(tmp_path: Any) -> None:
    tmp = str(tmp_path)
    up, data = _upload(tmp, 4 * MIB + 7)
    link = FakeLink()
    await T._put_all(link, up, await T._blob_new(link, up), None)  # type: ignore[arg-type]
    ref = replace(up.ref("node"), token=os.urandom(32))
    part = os.path.join(tmp, "down.part")
    link.fail_after_gets = 2
    with pytest.raises(TransportError):
        await T._fetch(link, ref, part, None)  # type: ignore[arg-type]
    kept = os.stat(part).st_size
    assert kept % MIB == 0 and 0 < kept < ref.padded
    with open(part, "ab") as f:
        f.write(b"torn")  # a chunk half written when the process died
    link.fail_after_gets = None
    before = len(link.gets)
    await T._fetch(link, ref, part, None)  # type: ignore[arg-type]
    assert link.gets[before] == kept // MIB  # restarted at the first missing chunk
    assert len(link.gets) - before == A.chunk_count(ref.padded) - kept // MIB
    folder = os.path.join(tmp, "save")
    path, sha = T._decrypt_to(ref, part, folder, None)
    with open(path, "rb") as f:
        assert f.read() == data
    assert sha == hashlib.sha256(data).digest() == up.plain_sha256


def test_bad_ciphertext_leaves_no_file(tmp_path: Any) -> None:
    tmp = str(tmp_path)
    up, _ = _upload(tmp, MIB)
    with open(up.ct, "r+b") as f:
        f.seek(100)
        f.write(b"\x00" * 8)
    folder = os.path.join(tmp, "save")
    with pytest.raises(A.AttachmentError):
        T._decrypt_to(up.ref("node"), up.ct, folder, None)
    assert os.listdir(folder) == []


def test_file_payload_round_trips_and_validates() -> None:
    ref = FileRef(
        os.urandom(16),
        "n" * 52,
        os.urandom(32),
        os.urandom(32),
        5,
        A.padded_size(5),
        "a.txt",
        "text/plain",
        b"",
        os.urandom(32),
    )
    p = Payload(os.urandom(16), "file", "bob@x", 1, text="cap", file=ref)
    assert Payload.decode(p.encode()) == p
    from federation.errors import MalformedEnvelope

    for bad in (
        replace(ref, blob=b"x"),
        replace(ref, thumb=b"x" * (16 * 1024 + 1)),
        replace(ref, name="x" * 256),
        replace(ref, key=b""),
    ):
        with pytest.raises(MalformedEnvelope):
            Payload.decode(replace(p, file=bad).encode())
    with pytest.raises(MalformedEnvelope):
        Payload.decode(replace(p, file=None).encode())
    with pytest.raises(MalformedEnvelope):
        Payload.decode(replace(p, kind="text").encode())


def test_tokens_differ_per_device_and_hide_the_secret() -> None:
    secret = os.urandom(32)
    a, b = A.file_token(secret, "devA"), A.file_token(secret, "devB")
    assert len(a) == 32 and a != b and secret not in (a, b)
    assert A.file_token(os.urandom(32), "devA") != a
    assert A.token_hash(a) == hashlib.sha256(a).digest()


def test_upload_records_survive_reopening_and_are_shredded_when_dropped(tmp_path: Any) -> None:
    from client.state import DeviceState

    home = str(tmp_path / "dev")
    s = DeviceState(home)
    blob = os.urandom(16)
    with s.tx() as db:
        s.save_upload(db, blob, b"the record", 1)
    (slot,) = s.db.execute("SELECT slot FROM uploads").fetchone()
    s.close()
    s = DeviceState(home, create=False)  # reconciling key slots keeps the upload's
    assert s.uploads() == [(blob, b"the record")]
    assert s.keys.key(slot) is not None
    with s.tx() as db:
        s.drop_upload(db, blob)
    assert s.uploads() == [] and s.keys.key(slot) is None  # its key is zeroed
    s.close()


def test_attachment_follows_its_history_row(tmp_path: Any) -> None:
    """Sealed under the row's key: an edit re-seals it, a delete or expiry removes it."""
    from client.state import FILE_DOWNLOADED, FILE_PENDING, Attachment, DeviceState, HistoryRow

    s = DeviceState(str(tmp_path / "dev"))
    ref = FileRef(
        os.urandom(16),
        "n" * 52,
        os.urandom(32),
        os.urandom(32),
        5,
        A.padded_size(5),
        "a.txt",
        "text/plain",
        b"",
        os.urandom(32),
    )
    ids = [os.urandom(16) for _ in range(2)]
    with s.tx() as db:
        for i, mid in enumerate(ids):
            s.add_history(
                db,
                HistoryRow(
                    mid,
                    "bob@x",
                    False,
                    "bob@x",
                    "cap",
                    1,
                    1,
                    expires_in=10,
                    expire_at=100 if i else None,
                ),
            )
            s.add_attachment(db, Attachment(mid, ref, FILE_PENDING))
    assert s.attachment(ids[0]) == Attachment(ids[0], ref, FILE_PENDING)
    assert s.attachment_ids(FILE_PENDING) == ids
    with s.tx() as db:
        s.set_attachment(db, Attachment(ids[0], ref, FILE_DOWNLOADED, "/p", b"h"))
        s.edit_history(db, ids[0], "new caption")
    got = s.attachment(ids[0])
    assert got is not None and got.state == FILE_DOWNLOADED and got.path == "/p"
    assert s.purge_expired(1000) == 1  # the second row expired: its file goes with it
    assert s.attachment(ids[1]) is None
    with s.tx() as db:
        s.delete_history(db, ids[0])
    assert s.attachment(ids[0]) is None
    assert s.db.execute("SELECT count(*) FROM attachments").fetchone()[0] == 0
    s.close()


def test_partial_downloads_of_deleted_messages_are_removed(tmp_path: Any) -> None:
    from client.state import FILE_PENDING, Attachment, DeviceState, HistoryRow

    s = DeviceState(str(tmp_path / "dev"))
    ref = FileRef(
        os.urandom(16),
        "n" * 52,
        os.urandom(32),
        os.urandom(32),
        5,
        A.padded_size(5),
        "a.txt",
        "text/plain",
        b"",
        os.urandom(32),
    )
    keep, gone = os.urandom(16), os.urandom(16)
    with s.tx() as db:
        for mid in (keep, gone):
            s.add_history(db, HistoryRow(mid, "bob@x", False, "bob@x", "", 1, 1))
            s.add_attachment(db, Attachment(mid, ref, FILE_PENDING))
    folder = tmp_path / "dev" / T.TRANSFERS_DIR
    folder.mkdir()
    for mid in (keep, gone):
        (folder / f"down-{mid.hex()}.part").write_bytes(b"x")
    (folder / "down-nothex.part").write_bytes(b"x")
    with s.tx() as db:
        s.delete_history(db, gone)
    assert T.clean_parts(s) == 1
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"down-{keep.hex()}.part", "down-nothex.part"]
    )
    s.close()
