"""Device-side attachment crypto: round trips, padding, tampering, names, thumbnails."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from client import attachments as A
from federation.errors import LocalProtocolError

KIB, MIB = 1024, 1 << 20


def _encrypt(data: bytes) -> tuple[A.Encrypted, bytes]:
    out = io.BytesIO()
    enc = A.encrypt_stream(io.BytesIO(data), len(data), out)
    return enc, out.getvalue()


def _decrypt(enc: A.Encrypted, ct: bytes) -> bytes:
    out = io.BytesIO()
    A.decrypt_stream(
        io.BytesIO(ct), out, key=enc.key, size=enc.size, padded=enc.padded, sha256=enc.sha256
    )
    return out.getvalue()


@pytest.mark.parametrize(
    "size", [0, 1, 64 * KIB - 1, 64 * KIB, 64 * KIB + 1, MIB - 1, MIB, MIB + 1, 5 * MIB]
)
def test_round_trip(size: int) -> None:
    data = os.urandom(size)
    enc, ct = _encrypt(data)
    assert len(ct) == enc.padded == A.padded_size(size)
    assert enc.sha256 == hashlib.sha256(ct).digest()
    assert len(enc.hashes) == A.chunk_count(enc.padded)
    for i, h in enumerate(enc.hashes):
        assert h == hashlib.sha256(ct[i * MIB : (i + 1) * MIB]).digest()
    assert _decrypt(enc, ct) == data


def test_files_round_trip_through_disk(tmp_path: object) -> None:
    base = str(tmp_path)
    src = os.path.join(base, "in.bin")
    data = os.urandom(3 * MIB + 5)
    with open(src, "wb") as f:
        f.write(data)
    ct = os.path.join(base, "ct")
    enc = A.encrypt_file(src, ct)
    assert os.path.getsize(ct) == enc.padded
    assert oct(os.stat(ct).st_mode & 0o777) == "0o600"
    chunks = list(A.read_chunks(ct, enc.padded))
    assert [i for i, _ in chunks] == list(range(A.chunk_count(enc.padded)))
    assert [hashlib.sha256(d).digest() for _, d in chunks] == list(enc.hashes)
    assert A.file_sha256(ct) == enc.sha256
    assert _decrypt(enc, b"".join(d for _, d in chunks)) == data


def test_padding_buckets() -> None:
    assert A.padme(1) == A.padme(A.MIN_PADDED) == A.MIN_PADDED
    sizes = [A.padded_size(n) for n in range(0, 3 * MIB, 9973)]
    for n, p in zip(range(0, 3 * MIB, 9973), sizes, strict=True):
        ct = A.ciphertext_size(n)
        assert ct <= p <= max(A.MIN_PADDED, int(ct * 1.12) + 1)
    # few buckets per power of two (Padmé: 2**floor(log2(E))+1): sizes near each other
    # look alike to a node
    between = {A.padded_size(n) for n in range(MIB, 2 * MIB, 997)}
    assert len(between) <= 32
    big = A.padded_size(100 * 1000 * 1000)
    assert big - A.ciphertext_size(100 * 1000 * 1000) < 0.12 * big
    assert A.chunk_count(A.padded_size(A.max_plain_size())) <= A.MAX_CHUNKS
    assert A.chunk_count(A.padded_size(A.max_plain_size() + 1)) > A.MAX_CHUNKS


def _bad(enc: A.Encrypted, ct: bytes) -> str:
    with pytest.raises(A.AttachmentError) as ei:
        _decrypt(enc, ct)
    return ei.value.code


def test_tampered_chunk_is_refused() -> None:
    enc, ct = _encrypt(os.urandom(2 * MIB + 100))
    flipped = bytearray(ct)
    flipped[MIB + 10] ^= 1
    assert _bad(enc, bytes(flipped)) in ("bad_file", "hash_mismatch")
    # padding altered: only the whole hash sees it
    pad = bytearray(ct)
    pad[-1] ^= 1
    assert _bad(enc, bytes(pad)) == "hash_mismatch"


def test_truncated_and_reordered_are_refused() -> None:
    enc, ct = _encrypt(os.urandom(3 * MIB))
    assert _bad(enc, ct[: 2 * MIB]) == "truncated"
    assert _bad(enc, ct[:-1]) == "truncated"
    swapped = ct[MIB : 2 * MIB] + ct[:MIB] + ct[2 * MIB :]
    assert _bad(enc, swapped) == "bad_file"
    assert _bad(enc, ct + b"x") == "bad_file"
    wrong_key = A.Encrypted(os.urandom(32), enc.size, enc.padded, enc.sha256, enc.hashes)
    assert _bad(wrong_key, ct) == "bad_file"


def test_early_final_tag_is_refused() -> None:
    """A stream cut short by a sender-side TAG_FINAL, padded to the declared size."""
    data = os.urandom(200 * KIB)
    enc, ct = _encrypt(data[: 64 * KIB])  # one final message
    claimed = A.Encrypted(enc.key, len(data), A.padded_size(len(data)), b"", ())
    padded = ct + os.urandom(claimed.padded - len(ct))
    claimed = A.Encrypted(enc.key, len(data), claimed.padded, hashlib.sha256(padded).digest(), ())
    assert _bad(claimed, padded) == "bad_file"


def test_file_changed_while_read() -> None:
    with pytest.raises(LocalProtocolError) as ei:
        A.encrypt_stream(io.BytesIO(b"abc"), 4, io.BytesIO())
    assert ei.value.code == "file_changed"
    with pytest.raises(LocalProtocolError):
        A.encrypt_stream(io.BytesIO(b"abcde"), 4, io.BytesIO())


@pytest.mark.parametrize(
    ("hostile", "expected"),
    [
        ("../x", "x"),
        ("/etc/passwd", "passwd"),
        ("a\x00b", "ab"),
        ("..", "file"),
        (".", "file"),
        ("", "file"),
        (".bashrc", "bashrc"),
        ("..\\..\\windows\\win.ini", "win.ini"),
        ("CON.txt", "file-CON.txt"),
        ("evil\u202egnp.exe", "evilgnp.exe"),
        ("line\nbreak.txt", "linebreak.txt"),
        ("ok name.pdf", "ok name.pdf"),
    ],
)
def test_hostile_names(hostile: str, expected: str) -> None:
    assert A.safe_name(hostile) == expected


def test_overlong_name_keeps_extension() -> None:
    name = A.safe_name("x" * 300 + ".pdf")
    assert len(name.encode()) <= 255 and name.endswith(".pdf")
    multi = A.safe_name("한" * 200 + ".txt")  # 3 bytes each: cut on a character boundary
    assert len(multi.encode()) <= 255 and multi.endswith(".txt")
    multi.encode().decode()


def test_create_unique_never_overwrites(tmp_path: object) -> None:
    folder = str(tmp_path)
    with open(os.path.join(folder, "a.txt"), "w") as f:
        f.write("mine")
    paths = []
    for _ in range(3):
        path, fd = A.create_unique(folder, "../a.txt")
        os.close(fd)
        paths.append(os.path.basename(path))
    assert paths == ["a (1).txt", "a (2).txt", "a (3).txt"]
    with open(os.path.join(folder, "a.txt")) as f:
        assert f.read() == "mine"
    long_path, fd = A.create_unique(folder, "y" * 300)
    os.close(fd)
    assert os.path.dirname(long_path) == folder
    again, fd = A.create_unique(folder, "y" * 300)
    os.close(fd)
    assert again != long_path and len(os.path.basename(again).encode()) <= 255


def test_create_unique_does_not_follow_a_symlink(tmp_path: object) -> None:
    folder = str(tmp_path)
    target = os.path.join(folder, "target")
    with open(target, "w") as f:
        f.write("keep")
    os.symlink(target, os.path.join(folder, "link.txt"))
    path, fd = A.create_unique(folder, "link.txt")
    os.close(fd)
    assert path.endswith("link (1).txt")
    with open(target) as f:
        assert f.read() == "keep"


def test_mime() -> None:
    assert A.guess_mime("a.png") == "image/png"
    assert A.guess_mime("noext") == A.DEFAULT_MIME
    assert A.safe_mime("text/html; charset=utf-8") == "text/html"
    assert A.safe_mime("image/svg+xml") == "image/svg+xml"
    assert A.safe_mime("x" * 200 + "/y") == A.DEFAULT_MIME
    assert A.safe_mime("text/html\r\nX-Evil: 1") == A.DEFAULT_MIME
    assert A.safe_mime("") == A.DEFAULT_MIME


def test_thumbnail_of_an_image_fits(tmp_path: object) -> None:
    from PIL import Image

    path = os.path.join(str(tmp_path), "noise.png")
    Image.frombytes("RGB", (1200, 900), os.urandom(1200 * 900 * 3)).save(path)
    thumb = A.thumbnail(path, "image/png")
    assert 0 < len(thumb) <= A.THUMB_MAX
    with Image.open(io.BytesIO(thumb)) as im:
        assert im.format == "JPEG" and max(im.size) <= A.THUMB_EDGE


def test_no_thumbnail_for_non_images(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "fake.png")
    with open(path, "wb") as f:
        f.write(b"<svg onload=alert(1)>")
    assert A.thumbnail(path, "image/png") == b""
    assert A.thumbnail(path, "text/plain") == b""
