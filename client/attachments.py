"""Attachments on the device: encrypt, pad and chunk a file; check and decrypt it again.

A file is encrypted once, with a fresh random 32-byte key, by libsodium's secretstream
(XChaCha20-Poly1305) in 64 KiB plaintext messages; the last message carries ``TAG_FINAL``.
The ciphertext (24-byte header, then the messages) is padded with random bytes to a Padmé
bucket (at least 64 KiB, at most ~12 % more) and cut into 1 MiB chunks. The node stores and
serves those chunks by index; it learns only the padded size (docs/protocol.md §3.1, "file").

Everything streams: :func:`encrypt_file` reads the file and writes the padded ciphertext in
64 KiB steps, hashing each 1 MiB chunk and the whole as it goes, and :func:`decrypt_file` does
the reverse, so memory stays flat for a 100 MB file. The receiver knows the plaintext size from
the (end-to-end encrypted) payload, hence where each message ends; it checks that only the last
message is final, stops there and ignores the padding, and checks the whole ciphertext against
the payload's SHA-256 before it keeps a single byte (a reordered, truncated or altered chunk
fails one of these checks).

Received file names are never trusted: :func:`safe_name` keeps a plain base name and
:func:`create_unique` never replaces an existing file.
"""

from __future__ import annotations

import hashlib
import io
import mimetypes
import os
import re
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import nacl.bindings as nb
import nacl.encoding
import nacl.exceptions
import nacl.hash

from federation.errors import HavenError, LocalProtocolError, RemoteProtocolError

CHUNK = 1 << 20  # node chunk size (the last chunk of a blob may be shorter)
MESSAGE = 1 << 16  # plaintext bytes per secretstream message
HEADER = nb.crypto_secretstream_xchacha20poly1305_HEADERBYTES  # 24
ABYTES = nb.crypto_secretstream_xchacha20poly1305_ABYTES  # 17
KEY_BYTES = 32
MIN_PADDED = 1 << 16
MAX_CHUNKS = 128  # 128 MiB of padded ciphertext (the node's frame limit for hashes)
NAME_MAX_BYTES = 255
MIME_MAX = 127
THUMB_MAX = 16 * 1024
THUMB_EDGE = 320  # the first try; smaller ones follow until the JPEG fits
DEFAULT_MIME = "application/octet-stream"
_TAG_MESSAGE = nb.crypto_secretstream_xchacha20poly1305_TAG_MESSAGE
_TAG_FINAL = nb.crypto_secretstream_xchacha20poly1305_TAG_FINAL
_MIME_RE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]{0,63}/[a-z0-9][a-z0-9!#$&^_.+-]{0,62}")
_RESERVED = frozenset(
    {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(10)} | {f"lpt{i}" for i in range(10)}
)

Progress = Callable[[int], None]  # bytes done so far (called as work advances)


class AttachmentError(RemoteProtocolError):
    """A received file failed its checks (``hash_mismatch``, ``truncated``, ``bad_file``)."""

    code = "bad_file"


@dataclass(frozen=True, slots=True)
class Encrypted:
    """The padded ciphertext of one file, as written by :func:`encrypt_file`."""

    key: bytes
    size: int  # plaintext bytes
    padded: int  # ciphertext bytes after padding (what the node stores)
    sha256: bytes  # of the whole padded ciphertext
    hashes: tuple[bytes, ...]  # SHA-256 of each 1 MiB chunk
    plain_sha256: bytes = b""  # of the file itself (shown to the user, never sent)


def messages(size: int) -> int:
    """How many secretstream messages a plaintext of ``size`` bytes takes (at least one)."""
    return max(1, -(-size // MESSAGE))


def ciphertext_size(size: int) -> int:
    """Header plus messages, before padding."""
    return HEADER + size + ABYTES * messages(size)


def padme(length: int) -> int:
    """The Padmé bucket of ``length`` (at least :data:`MIN_PADDED`): leaks O(log log n) bits,
    costs at most ~12 %."""
    if length <= MIN_PADDED:
        return MIN_PADDED
    e = length.bit_length() - 1  # floor(log2 L)
    s = e.bit_length()  # floor(log2 E) + 1
    mask = (1 << (e - s)) - 1
    return (length + mask) & ~mask


def padded_size(size: int) -> int:
    """The size the node sees for a plaintext of ``size`` bytes."""
    return padme(ciphertext_size(size))


def chunk_count(padded: int) -> int:
    return -(-padded // CHUNK)


def chunk_len(padded: int, index: int) -> int:
    """The exact length of chunk ``index`` of a blob of ``padded`` bytes."""
    return min(CHUNK, padded - index * CHUNK)


def max_plain_size() -> int:
    """The largest plaintext whose padded ciphertext fits :data:`MAX_CHUNKS` chunks."""
    lo, hi = 0, MAX_CHUNKS * CHUNK
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if padded_size(mid) <= MAX_CHUNKS * CHUNK:
            lo = mid
        else:
            hi = mid - 1
    return lo


class _ChunkHasher:
    """Hashes what is written, per 1 MiB chunk and as a whole."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._whole = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self._in_chunk = 0
        self.hashes: list[bytes] = []
        self.written = 0

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self._whole.update(data)
        view = memoryview(data)
        while view:
            take = min(len(view), CHUNK - self._in_chunk)
            self._chunk.update(view[:take])
            self._in_chunk += take
            view = view[take:]
            if self._in_chunk == CHUNK:
                self.hashes.append(self._chunk.digest())
                self._chunk = hashlib.sha256()
                self._in_chunk = 0
        self.written += len(data)

    def finish(self) -> tuple[bytes, tuple[bytes, ...]]:
        if self._in_chunk:
            self.hashes.append(self._chunk.digest())
        return self._whole.digest(), tuple(self.hashes)


def encrypt_stream(
    src: BinaryIO,
    size: int,
    out: BinaryIO,
    *,
    key: bytes | None = None,
    progress: Progress | None = None,
) -> Encrypted:
    """Encrypt exactly ``size`` bytes of ``src`` into ``out`` (padded), 64 KiB at a time.

    Raises:
        LocalProtocolError: ``file_changed`` (``src`` ended early or has more bytes than
            ``size``: it changed while being read), ``too_large``.
    """
    if size > max_plain_size():
        raise LocalProtocolError("the file is too large to send", code="too_large")
    key = key if key is not None else os.urandom(KEY_BYTES)
    state = nb.crypto_secretstream_xchacha20poly1305_state()
    header = nb.crypto_secretstream_xchacha20poly1305_init_push(state, key)
    w = _ChunkHasher(out)
    plain_hash = hashlib.sha256()
    w.write(bytes(header))
    n = messages(size)
    for i in range(n):
        want = min(MESSAGE, size - i * MESSAGE)
        plain = src.read(want)
        if len(plain) != want:
            raise LocalProtocolError("the file changed while it was read", code="file_changed")
        plain_hash.update(plain)
        tag = _TAG_FINAL if i == n - 1 else _TAG_MESSAGE
        w.write(bytes(nb.crypto_secretstream_xchacha20poly1305_push(state, plain, None, tag)))
        if progress is not None:
            progress(i * MESSAGE + want)
    if src.read(1):
        raise LocalProtocolError("the file changed while it was read", code="file_changed")
    padded = padme(w.written)
    while w.written < padded:  # random padding: noise to anyone without the key, too
        w.write(os.urandom(min(MESSAGE, padded - w.written)))
    whole, hashes = w.finish()
    return Encrypted(key, size, padded, whole, hashes, plain_hash.digest())


def encrypt_file(path: str, out_path: str, *, progress: Progress | None = None) -> Encrypted:
    """Encrypt the file at ``path`` into a new file ``out_path`` (mode 0600, fsynced)."""
    with open(path, "rb") as src:
        size = os.fstat(src.fileno()).st_size
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb", buffering=CHUNK) as out:
            enc = encrypt_stream(src, size, out, progress=progress)
            out.flush()
            os.fsync(out.fileno())
    return enc


def read_chunks(path: str, padded: int, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """``(index, data)`` of each 1 MiB chunk of the ciphertext file, from chunk ``start``."""
    with open(path, "rb") as f:
        for i in range(start, chunk_count(padded)):
            f.seek(i * CHUNK)
            data = f.read(chunk_len(padded, i))
            if len(data) != chunk_len(padded, i):
                raise LocalProtocolError("the encrypted copy is damaged", code="storage_error")
            yield i, data


def read_chunk(path: str, padded: int, index: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(index * CHUNK)
        data = f.read(chunk_len(padded, index))
    if len(data) != chunk_len(padded, index):
        raise LocalProtocolError("the encrypted copy is damaged", code="storage_error")
    return data


def file_sha256(path: str) -> bytes:
    """SHA-256 of a file, read 1 MiB at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.digest()


def decrypt_stream(
    src: BinaryIO,
    out: BinaryIO,
    *,
    key: bytes,
    size: int,
    padded: int,
    sha256: bytes,
    progress: Progress | None = None,
) -> bytes:
    """Check and decrypt a padded ciphertext of a ``size``-byte file into ``out``.

    The whole ciphertext (padding included) must hash to ``sha256``; only the last message
    may carry ``TAG_FINAL``; the padding after it is read for the hash and otherwise ignored.
    ``out`` may hold a prefix of the plaintext when this raises: the caller discards it.
    Returns the SHA-256 of the plaintext.

    Raises:
        AttachmentError: ``truncated`` (shorter than ``padded``), ``hash_mismatch``, or
            ``bad_file`` (a message does not authenticate or ends the stream early).
    """
    if padded != padded_size(size):
        raise AttachmentError("the file's sizes do not match", code="bad_file")
    whole = hashlib.sha256()

    def take(n: int) -> bytes:
        data = src.read(n)
        if len(data) != n:
            raise AttachmentError("the file is truncated", code="truncated")
        whole.update(data)
        return data

    state = nb.crypto_secretstream_xchacha20poly1305_state()
    plain_hash = hashlib.sha256()
    try:
        nb.crypto_secretstream_xchacha20poly1305_init_pull(state, take(HEADER), key)
        n = messages(size)
        for i in range(n):
            want = min(MESSAGE, size - i * MESSAGE)
            plain, tag = nb.crypto_secretstream_xchacha20poly1305_pull(
                state, take(want + ABYTES), None
            )
            if tag != (_TAG_FINAL if i == n - 1 else _TAG_MESSAGE):
                raise AttachmentError("the file's messages are out of order", code="bad_file")
            out.write(plain)
            plain_hash.update(plain)
            if progress is not None:
                progress(i * MESSAGE + want)
    except (nacl.exceptions.CryptoError, ValueError, RuntimeError) as exc:
        raise AttachmentError("the file does not decrypt (altered or reordered)") from exc
    rest = padded - ciphertext_size(size)
    while rest:
        rest -= len(take(min(CHUNK, rest)))
    if src.read(1):
        raise AttachmentError("the file is longer than its size", code="bad_file")
    if whole.digest() != sha256:
        raise AttachmentError("the file does not match its hash", code="hash_mismatch")
    return plain_hash.digest()


def check_sha256(path: str, sha256: bytes) -> None:
    """Raise ``hash_mismatch`` unless the file at ``path`` hashes to ``sha256``."""
    if file_sha256(path) != sha256:
        raise AttachmentError("the file does not match its hash", code="hash_mismatch")


# ---- names, MIME types, thumbnails ---------------------------------------------------------


def safe_name(name: str) -> str:
    """A received file name made safe to create in a folder (docs/protocol.md §3.1).

    Base name only (after ``/`` or ``\\``), no NUL, control or format characters, no leading
    dots or spaces, no trailing dots or spaces, at most 255 UTF-8 bytes (the extension kept
    where it fits); empty, ``.``/``..`` and Windows device names become ``file``.
    """
    name = unicodedata.normalize("NFC", name.replace("\\", "/")).rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = name.lstrip(". ").rstrip(". ")
    stem = name.split(".", 1)[0].lower()
    if not name or stem in _RESERVED:
        return "file" if not name else f"file-{name}"
    return _cut(name, NAME_MAX_BYTES)


def _cut(name: str, limit: int) -> str:
    """``name`` in at most ``limit`` UTF-8 bytes, keeping a short extension."""
    if len(name.encode()) <= limit:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext.encode()) > 16:
        stem, ext = name, ""
    ext = "." + ext if ext else ""
    room = limit - len(ext.encode())
    cut = stem.encode()[:room].decode("utf-8", "ignore")
    return cut + ext


def create_unique(folder: str, name: str) -> tuple[str, int]:
    """Create a new empty file for ``name`` in ``folder`` (``name (1).ext``, … if taken):
    ``(path, fd)``, the file opened for writing, mode 0600. Never opens an existing file."""
    name = safe_name(name)
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    ext = "." + ext if ext else ""
    for n in range(10_000):
        suffix = f" ({n})" if n else ""
        candidate = _cut(stem, NAME_MAX_BYTES - len((suffix + ext).encode())) + suffix + ext
        path = os.path.join(folder, candidate)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        return path, fd
    raise LocalProtocolError("no free name for the file in the save folder", code="os_error")


def safe_mime(mime: str) -> str:
    """A well-formed ``type/subtype`` (lowercased, no parameters, ≤ 127 characters), else
    ``application/octet-stream``."""
    mime = mime.split(";", 1)[0].strip().lower()
    return mime if len(mime) <= MIME_MAX and _MIME_RE.fullmatch(mime) else DEFAULT_MIME


def guess_mime(name: str) -> str:
    """The MIME type of a file name's extension (``application/octet-stream`` if unknown)."""
    return safe_mime(mimetypes.guess_type(name, strict=False)[0] or DEFAULT_MIME)


def thumbnail(path: str, mime: str) -> bytes:
    """A JPEG of at most 16 KiB for an image file, or ``b""`` (not an image, or unreadable).

    Downscaled (longest edge 320 px, then smaller) with falling JPEG quality until it fits.
    """
    if not mime.startswith("image/"):
        return b""
    try:
        from PIL import Image
    except ImportError:
        return b""
    try:
        with Image.open(path) as im:
            if im.width * im.height > 50_000_000:  # decompression bomb: no thumbnail
                return b""
            im.draft("RGB", (THUMB_EDGE, THUMB_EDGE))  # JPEG: decode at a smaller scale
            rgb = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return b""
    edge = THUMB_EDGE
    while edge >= 16:
        small = rgb.copy()
        small.thumbnail((edge, edge))
        for quality in (80, 65, 50, 35, 20):
            buf = io.BytesIO()
            small.save(buf, "JPEG", quality=quality, optimize=True)
            if buf.tell() <= THUMB_MAX:
                return buf.getvalue()
        edge //= 2
    return b""


def file_token(secret: bytes, device_id: str) -> bytes:
    """The fetch token of one recipient device: keyed BLAKE2b of its device id under the
    file's random 32-byte token secret (unguessable without the secret, different per device;
    the secret never leaves the sending device)."""
    return bytes(
        nacl.hash.blake2b(
            device_id.encode(),
            key=secret,
            person=b"haven-filetok",
            digest_size=32,
            encoder=nacl.encoding.RawEncoder,
        )
    )


def token_hash(token: bytes) -> bytes:
    """What the node stores of a token: its SHA-256."""
    return hashlib.sha256(token).digest()


def error_code(exc: BaseException) -> str:
    """A stable code for a failed transfer (what the history row records)."""
    if isinstance(exc, HavenError):
        return exc.code
    if isinstance(exc, OSError):
        return "os_error"
    return "bad_file"
