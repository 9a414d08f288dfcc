"""Sending and receiving files: resumable uploads to the home node, resumable downloads
through it (docs/protocol.md §3.1 "file", §5 blob frames).

**Upload.** The file is encrypted once (:func:`client.attachments.encrypt_file`) into a
temporary ciphertext file in the device home (``transfers/up-BLOB.ct``, mode 0600; random
noise to anyone without the file key). Before the first chunk leaves, an upload record goes
into the device database: blob id, message id, file key, chunk hashes, the token secret and
the recipient devices. ``blob_new`` answers with the chunks the node already has, and only the
others are put, up to 8 at a time. So a device killed mid-upload resumes on its next run
(:func:`resume_uploads`, called by ``send``, ``recv`` and ``download``): ``blob_new`` again,
put what is missing. When every chunk is stored, one transaction adds the history row, its
attachment and the ``file`` payload to the outbox and drops the upload record; the outbox
sends it (once per recipient device: receivers dedupe by message id). The ciphertext copy is
removed afterwards.

**Tokens.** Each recipient device gets its own 32-byte fetch token, derived from a random
per-file secret and the device id (:func:`client.attachments.file_token`); the node gets
only their SHA-256. The queued payload holds the secret; the per-device encryption puts each
device's own token in its copy (client/device.py). Devices linked after the upload get no
token, hence no file.

**Download.** Chunks are fetched in order (4 in flight) into ``transfers/down-….part``; a
restart continues at the first missing chunk (the file's length says which). Then the whole
ciphertext is checked against the payload's SHA-256 and decrypted into a new file in the save
folder under the sanitised name (never over an existing file), and ``blob_done`` tells the
nodes the copies can go.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

from federation import frames as F
from federation.errors import HavenError, LocalProtocolError, RemoteProtocolError
from federation.ids import Address
from federation.wire import packb, unpackb

from . import attachments as A
from .connection import NodeConnection, expect
from .payload import FileRef, Payload
from .state import (
    FILE_DOWNLOADED,
    FILE_FAILED,
    FILE_PENDING,
    FILE_SENT,
    STATUS_PENDING,
    Attachment,
    HistoryRow,
    OutboxItem,
)

if TYPE_CHECKING:
    from .device import Device
    from .state import DeviceState

log = logging.getLogger("haven.transfers")

WINDOW = 8  # puts in flight (spec: up to 8)
# gets in flight: each answer is ~1 MiB in the node's write queue for this connection (8 MiB
# at most, docs/protocol.md §10.2), so fewer than puts
GET_WINDOW = 4
TRANSFERS_DIR = "transfers"
NOT_READY_TRIES = 20
# Node answers to an upload that a later retry may cure (anything else refuses the file).
RETRY = frozenset({"rate_limited", "busy", "not_ready", "unavailable"})
# Download failures that a retry will not cure: the file is gone or was never ours.
PERMANENT = frozenset({"not_found", "hash_mismatch", "bad_file", "truncated", "unsupported"})

# (phase, done, total): "encrypt", "upload", "download", "decrypt"; bytes.
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True, slots=True)
class Upload:
    """An upload in progress, as the device database keeps it (sealed) until it is queued."""

    blob: bytes
    msg_id: bytes
    peer: str
    src: str  # the file sent (absolute path), for the history and to resume the same send
    src_size: int
    src_mtime_ns: int
    ct: str  # the ciphertext copy in the device home
    key: bytes
    size: int
    padded: int
    sha256: bytes
    plain_sha256: bytes
    hashes: tuple[bytes, ...]
    secret: bytes  # token secret (client/attachments.py file_token)
    devices: tuple[str, ...]
    name: str
    mime: str
    thumb: bytes
    caption: str
    ttl_ms: int
    expires_in: int

    def encode(self) -> bytes:
        obj = {f.name: getattr(self, f.name) for f in fields(self)}
        return packb(obj | {"hashes": list(self.hashes), "devices": list(self.devices)})

    @classmethod
    def decode(cls, data: bytes) -> Upload:
        obj = unpackb(data, max_len=len(data))
        obj["hashes"] = tuple(bytes(h) for h in obj["hashes"])
        obj["devices"] = tuple(str(d) for d in obj["devices"])
        return cls(**obj)

    def ref(self, node_id: str) -> FileRef:
        return FileRef(
            self.blob,
            node_id,
            self.key,
            self.sha256,
            self.size,
            self.padded,
            self.name,
            self.mime,
            self.thumb,
            self.secret,
        )


def _dir(dev: Device) -> str:
    path = os.path.join(dev.state.home, TRANSFERS_DIR)
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def _note(progress: Progress | None, phase: str, total: int) -> Callable[[int], None]:
    def tick(done: int) -> None:
        if progress is not None:
            progress(phase, done, total)

    return tick


# ---- the blob frames ------------------------------------------------------------------------


async def _blob_new(conn: NodeConnection, up: Upload) -> set[int]:
    tokens = tuple(A.token_hash(A.file_token(up.secret, d)) for d in up.devices)
    frame = F.BlobNew(conn.next_rid(), up.blob, up.padded, up.hashes, tokens, up.ttl_ms)
    ok = expect(await conn.request(frame), F.BlobOk)
    return {int(i) for i in ok.have}


async def _put_all(
    conn: NodeConnection, up: Upload, have: set[int], progress: Progress | None
) -> None:
    """Put every chunk the node lacks, :data:`WINDOW` at a time (at most 8 MiB in memory)."""
    total = up.padded
    done = sum(A.chunk_len(up.padded, i) for i in have)
    tick = _note(progress, "upload", total)
    tick(done)
    sem = asyncio.Semaphore(WINDOW)

    async def put(i: int, data: bytes) -> None:
        nonlocal done
        try:
            expect(await conn.request(F.BlobPut(conn.next_rid(), up.blob, i, data)), F.Ok)
        finally:
            sem.release()
        done += len(data)
        tick(done)

    try:
        async with asyncio.TaskGroup() as tg:
            for i in range(A.chunk_count(up.padded)):
                if i in have:
                    continue
                await sem.acquire()
                tg.create_task(put(i, A.read_chunk(up.ct, up.padded, i)))
    except BaseExceptionGroup as eg:  # one failed put stops the others: raise its error
        raise _first(eg) from None


def _first(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    for exc in eg.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return eg


# ---- sending --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FileSent:
    """What :func:`send_file` did: the history row (``pending`` if the outbox could not
    send it yet), and whether an earlier interrupted upload of the same file was resumed."""

    row: HistoryRow
    resumed: bool = False


async def send_file(
    dev: Device,
    address: str,
    path: str,
    caption: str = "",
    *,
    ttl_ms: int,
    expires_in: int | None = None,
    mime: str | None = None,
    name: str | None = None,
    progress: Progress | None = None,
) -> FileSent:
    """Encrypt, upload (resumably) and send a file to ``address`` and our other devices.

    Sending the same file to the same address again while an earlier upload of it was
    interrupted resumes that upload instead of starting a second one. ``name`` is the file
    name recipients see (default: the base name of ``path``, e.g. a dropped file's own name
    when ``path`` is a temporary copy); ``mime`` its type (default: from the name).

    Raises:
        LocalProtocolError: ``no_such_file``, ``too_large``, ``file_changed``,
            ``no_devices``.
        RemoteProtocolError: the home node refused (``too_large``, ``quota_exceeded``,
            ``storage_error``, …).
        TransportError: the node is unreachable (the upload resumes on the next run).
    """
    Address.parse(address)
    src, st = _source(path)
    if st.st_size > A.max_plain_size():
        raise LocalProtocolError("the file is too large to send", code="too_large")
    conn = await dev.connect()
    try:
        earlier = _find_upload(dev, address, src, st)
        resumed = await resume_uploads(dev, conn, progress=progress)
        if earlier is not None and earlier.msg_id in resumed:
            return FileSent(_row(dev, earlier.msg_id), resumed=True)
        up = await _prepare(
            dev, conn, address, src, caption, ttl_ms, expires_in, mime, name, progress
        )
        try:
            await _finish_upload(dev, conn, up, progress)
        except RemoteProtocolError as exc:
            if exc.code not in RETRY:  # refused (too_large, quota_exceeded, …): forget it
                _drop(dev, up)
            raise
        await dev.flush_outbox(conn)
        return FileSent(_row(dev, up.msg_id))
    finally:
        await dev.release(conn)


def _drop(dev: Device, up: Upload) -> None:
    with dev.state.tx() as db:
        dev.state.drop_upload(db, up.blob)
    with contextlib.suppress(OSError):
        os.unlink(up.ct)


def _source(path: str) -> tuple[str, os.stat_result]:
    src = os.path.abspath(path)
    if not os.path.isfile(src):
        raise LocalProtocolError(f"no such file: {path}", code="no_such_file")
    return src, os.stat(src)


def _exists(path: str) -> bool:
    return bool(path) and os.path.exists(path)


def _row(dev: Device, msg_id: bytes) -> HistoryRow:
    row = dev.state.message(msg_id)
    if row is None:  # deleted meanwhile (by another process on this home)
        raise LocalProtocolError("the message was deleted", code="not_found")
    return row


def _find_upload(dev: Device, address: str, src: str, st: os.stat_result) -> Upload | None:
    for _, rec in dev.state.uploads():
        up = Upload.decode(rec)
        if (up.peer, up.src, up.src_size, up.src_mtime_ns) == (
            address,
            src,
            st.st_size,
            st.st_mtime_ns,
        ):
            return up
    return None


async def _prepare(
    dev: Device,
    conn: NodeConnection,
    address: str,
    src: str,
    caption: str,
    ttl_ms: int,
    expires_in: int | None,
    mime: str | None,
    name: str | None,
    progress: Progress | None,
) -> Upload:
    """Resolve the recipient devices, encrypt to the ciphertext copy, record the upload."""
    devices = await dev.recipient_devices(conn, address)
    if not devices:
        raise LocalProtocolError(f"{address} has no device to send to", code="no_devices")
    if expires_in is None:
        c = dev.state.contact(address)
        expires_in = c.timer_ms if c else 0
    blob = os.urandom(16)
    ct = os.path.join(_dir(dev), f"up-{blob.hex()}.ct")
    st = os.stat(src)
    name = A.safe_name(name or os.path.basename(src))
    kind = A.safe_mime(mime) if mime else A.guess_mime(name)
    try:
        enc = await asyncio.to_thread(
            A.encrypt_file, src, ct, progress=_note(progress, "encrypt", st.st_size)
        )
        thumb = await asyncio.to_thread(A.thumbnail, src, kind)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(ct)
        raise
    up = Upload(
        blob=blob,
        msg_id=os.urandom(16),
        peer=address,
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
        devices=tuple(devices[:1024]),
        name=name,
        mime=kind,
        thumb=thumb,
        caption=caption,
        ttl_ms=ttl_ms,
        expires_in=expires_in,
    )
    with dev.state.tx() as db:  # before the first chunk leaves: a crash resumes from here
        dev.state.save_upload(db, blob, up.encode(), dev.clock.now_ms())
    return up


async def _finish_upload(
    dev: Device, conn: NodeConnection, up: Upload, progress: Progress | None
) -> None:
    """Upload what the node lacks, then queue the payload and forget the upload (one
    transaction), then remove the ciphertext copy."""
    have = await _blob_new(conn, up)
    await _put_all(conn, up, have, progress)
    now = dev.clock.now_ms()
    p = Payload(
        up.msg_id,
        "file",
        up.peer,
        now,
        text=up.caption,
        expires_in=up.expires_in,
        file=up.ref(dev.node_id),
    )
    row = HistoryRow(
        up.msg_id,
        up.peer,
        True,
        dev.address,
        up.caption,
        now,
        now,
        status=STATUS_PENDING,
        read=True,
        expires_in=up.expires_in,
        expire_at=now + up.expires_in if up.expires_in else None,
    )
    shown = replace(up.ref(dev.node_id), token=b"")  # ours: the secret stays in the queue only
    with dev.state.tx() as db:
        if dev.state.add_history(db, row):
            dev.state.add_attachment(
                db, Attachment(up.msg_id, shown, FILE_SENT, up.src, up.plain_sha256)
            )
            dev.state.queue(db, OutboxItem(up.msg_id, up.peer, p.encode(), up.ttl_ms, now))
        dev.state.drop_upload(db, up.blob)
    with contextlib.suppress(OSError):
        os.unlink(up.ct)


async def resume_uploads(
    dev: Device, conn: NodeConnection, *, progress: Progress | None = None
) -> set[bytes]:
    """Finish every upload an earlier run left unfinished; the message ids queued.

    An upload whose ciphertext copy is gone (removed by hand) is dropped. Stray ciphertext
    copies with no record (a crash while encrypting) are removed. A node refusal
    (``too_large``, ``quota_exceeded``, ``conflict``…) drops that upload, logged by code.
    """
    done: set[bytes] = set()
    known: set[str] = set()
    for blob, rec in dev.state.uploads():
        up = Upload.decode(rec)
        known.add(os.path.basename(up.ct))
        if not _exists(up.ct):
            with dev.state.tx() as db:
                dev.state.drop_upload(db, blob)
            log.warning("an interrupted upload lost its encrypted copy; dropped")
            continue
        try:
            await _finish_upload(dev, conn, up, progress)
        except RemoteProtocolError as exc:
            if exc.code in RETRY:
                raise
            _drop(dev, up)
            log.warning("an interrupted upload was refused by the node (%s)", exc.code)
            continue
        done.add(up.msg_id)
    folder = _dir(dev)
    for name in os.listdir(folder):
        if name.startswith("up-") and name not in known:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
    if done:
        await dev.flush_outbox(conn)
    return done


# ---- receiving ------------------------------------------------------------------------------


async def _get(conn: NodeConnection, ref: FileRef, index: int, host: str) -> bytes:
    """One chunk; ``not_ready`` (the origin has not got it all yet) is retried a while."""
    delay = 0.1
    for attempt in range(NOT_READY_TRIES):
        try:
            frame = F.BlobGet(conn.next_rid(), ref.blob, ref.node, ref.token, index, host)
            ans = expect(await conn.request(frame), F.BlobChunk)
        except RemoteProtocolError as exc:
            if exc.code != "not_ready" or attempt == NOT_READY_TRIES - 1:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            continue
        data = bytes(ans.data)
        if ans.index != index or len(data) != A.chunk_len(ref.padded, index):
            raise A.AttachmentError("the node sent a chunk of the wrong size", code="truncated")
        return data
    raise RemoteProtocolError("not ready", code="not_ready")  # not reached


async def _fetch(
    conn: NodeConnection, ref: FileRef, part: str, progress: Progress | None, host: str = ""
) -> None:
    """Fetch the chunks missing from ``part`` (a prefix of whole chunks), in order. ``host``:
    the uploader's address host, for a home node that has not pinned its node yet."""
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        have = os.fstat(fd).st_size
        if have >= ref.padded:
            os.ftruncate(fd, ref.padded)
            return
        start = have // A.CHUNK
        os.ftruncate(fd, start * A.CHUNK)  # a torn last chunk is fetched again
        tick = _note(progress, "download", ref.padded)
        tick(start * A.CHUNK)
        pending: collections.deque[asyncio.Task[bytes]] = collections.deque()
        n = A.chunk_count(ref.padded)
        nxt = start
        try:
            for i in range(start, n):
                while nxt < n and len(pending) < GET_WINDOW:
                    pending.append(asyncio.ensure_future(_get(conn, ref, nxt, host)))
                    nxt += 1
                data = await pending.popleft()
                os.pwrite(fd, data, i * A.CHUNK)
                tick(i * A.CHUNK + len(data))
        finally:
            for t in pending:
                t.cancel()
            for t in pending:
                with contextlib.suppress(BaseException):
                    await t
        os.fsync(fd)
    finally:
        os.close(fd)


def _decrypt_to(
    ref: FileRef, part: str, folder: str, progress: Progress | None
) -> tuple[str, bytes]:
    """Check and decrypt ``part`` into a new file in ``folder``: ``(path, plaintext sha)``."""
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path, fd = A.create_unique(folder, ref.name)
    try:
        with open(part, "rb") as src, os.fdopen(fd, "wb", buffering=A.CHUNK) as out:
            sha = A.decrypt_stream(
                src,
                out,
                key=ref.key,
                size=ref.size,
                padded=ref.padded,
                sha256=ref.sha256,
                progress=_note(progress, "decrypt", ref.size),
            )
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return path, sha


def clean_parts(state: DeviceState) -> int:
    """Remove partial downloads whose message is gone (deleted or expired meanwhile) or whose
    file is already saved; how many. Their bytes are ciphertext under a key that went with
    the message."""
    folder = os.path.join(state.home, TRANSFERS_DIR)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        if not (name.startswith("down-") and name.endswith(".part")):
            continue
        try:
            msg_id = bytes.fromhex(name[5:-5])
        except ValueError:
            continue
        att = state.attachment(msg_id)
        if att is None or att.state in (FILE_DOWNLOADED, FILE_SENT):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
                removed += 1
    return removed


def default_save_dir() -> str:
    """``~/Downloads/Haven``."""
    return os.path.join(os.path.expanduser("~"), "Downloads", "Haven")


async def download(
    dev: Device,
    msg_id: bytes,
    save_dir: str,
    *,
    progress: Progress | None = None,
    conn: NodeConnection | None = None,
) -> Attachment:
    """Fetch, check and save the file of message ``msg_id``; the updated attachment.

    Already downloaded (and still there): nothing is fetched. A failure that a retry may cure
    (the node unreachable) leaves it ``pending`` with the code in ``error``, the chunks got
    so far kept; one that it will not (``not_found``: expired or deleted; a bad file) makes
    it ``failed``. Either way the error is raised.
    """
    clean_parts(dev.state)
    att = dev.state.attachment(msg_id)
    if att is None:
        raise LocalProtocolError("that message has no file", code="not_a_file")
    if att.state == FILE_SENT or (att.state == FILE_DOWNLOADED and _exists(att.path)):
        return att
    if conn is None:
        c = await dev.connect()
        try:
            return await download(dev, msg_id, save_dir, progress=progress, conn=c)
        finally:
            await dev.release(c)
    ref = att.ref
    row = dev.state.message(msg_id)
    host = row.sender.rsplit("@", 1)[-1] if row is not None else ""
    part = os.path.join(_dir(dev), f"down-{msg_id.hex()}.part")
    try:
        await _fetch(conn, ref, part, progress, host)
        path, sha = await asyncio.to_thread(_decrypt_to, ref, part, save_dir, progress)
    except HavenError as exc:
        permanent = exc.code in PERMANENT
        if permanent:
            with contextlib.suppress(OSError):
                os.unlink(part)
        new = replace(att, state=FILE_FAILED if permanent else FILE_PENDING, error=exc.code)
        with dev.state.tx() as db:
            dev.state.set_attachment(db, new)
        log.warning("a file was not downloaded (%s)", exc.code)
        raise
    done = replace(att, state=FILE_DOWNLOADED, path=path, plain_sha256=sha, error="")
    with dev.state.tx() as db:
        dev.state.set_attachment(db, done)
    with contextlib.suppress(OSError):
        os.unlink(part)
    try:
        done_frame = F.BlobDone(conn.next_rid(), ref.blob, ref.node, ref.token, host)
        expect(await conn.request(done_frame), F.Ok)
    except HavenError as exc:  # the nodes delete it at its TTL anyway
        log.info("blob_done not acknowledged (%s)", exc.code)
    return done


__all__ = [
    "FILE_PENDING",
    "FileSent",
    "Upload",
    "default_save_dir",
    "download",
    "resume_uploads",
    "send_file",
]
