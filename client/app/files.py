"""Attachments in the app: sending a file from the page, downloading received ones into the
daemon's save folder, progress events, and what the page may show of a file.

:class:`Files` is a base of :class:`client.app.core.AppCore` (like
:class:`client.app.actions.Actions`). The daemon owns the save folder (``--save-dir``, default
``~/Downloads/Haven``). The page asks for received files up to the auto-download size
(``--auto-download`` MB, default 25; ``State.auto_download``) as soon as it shows them, and for
larger ones on its download button; without a page, ``haven recv`` decides as before.
Uploads and downloads publish ``progress`` events (at most one per percent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from typing import Any

from client import transfers
from client.attachments import max_plain_size, safe_mime, safe_name
from client.connection import NodeConnection
from client.device import DEFAULT_TTL_MS, Device
from client.state import FILE_DOWNLOADED, FILE_SENT, Attachment, DeviceState
from federation.errors import HavenError, LocalProtocolError

from .events import Obj, event

log = logging.getLogger("haven.app.files")

AUTO_DOWNLOAD_MB = 25
# Types the page may show as a preview (from a blob: URL). Never SVG or HTML: those, and every
# other type, are offered as downloads only.
PREVIEW_MIMES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp"})
# A file answer's own CSP: a sandboxed, script-less document if a browser ever opened it.
FILE_CSP = "sandbox; default-src 'none'"
UPLOADS_DIR = "app-uploads"
READ_CHUNK = 1 << 20


def file_obj(att: Attachment) -> Obj:
    """The ``file`` of a ``Message`` (docs/app.md "Objects"); no key, token or path."""
    ref = att.ref
    downloaded = att.state in (FILE_DOWNLOADED, FILE_SENT) and bool(att.path)
    downloaded = downloaded and os.path.isfile(att.path)
    return {
        "name": ref.name,
        "size": ref.size,
        "mime": ref.mime,
        "state": att.state,
        "error": att.error or None,
        "thumb": bool(ref.thumb),
        "preview": ref.mime in PREVIEW_MIMES,
        "downloaded": downloaded,
    }


def with_file(msg: Obj, state: DeviceState) -> Obj:
    """``msg`` with ``kind`` (``text`` or ``file``) and, for a file, its ``file`` object."""
    att = state.attachment(bytes.fromhex(msg["id"]))
    if att is None:
        return msg | {"kind": "text"}
    return msg | {"kind": "file", "file": file_obj(att)}


class CoreParts:
    """What :class:`~client.app.core.AppCore` provides to its operation bases (:class:`Actions`,
    :class:`Files`): declared once here for the type checker."""

    def require(self) -> Device:
        """The open, joined device (else ``locked`` / ``not_joined``)."""
        raise NotImplementedError

    async def conn(self) -> NodeConnection:
        """The daemon's one connection to the home node."""
        raise NotImplementedError

    def _publish(self, ev: Obj) -> None:
        raise NotImplementedError

    def _publish_chat(self, address: str) -> None:
        raise NotImplementedError


class Files(CoreParts):
    """The app's file operations (a base of :class:`~client.app.core.AppCore`)."""

    home: str
    lock: asyncio.Lock
    save_dir: str
    auto_download_bytes: int
    _downloads: dict[bytes, asyncio.Task[None]]
    _file_locks: dict[bytes, asyncio.Lock]

    # provided by AppCore / Actions (besides those of CoreParts)
    def _address(self, address: Any) -> str:
        raise NotImplementedError

    def _message_of(self, msg_id: bytes) -> Obj | None:
        raise NotImplementedError

    async def open_chat(self, address: Any) -> Obj:
        """Provided by Actions."""
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def file_lock(self, msg_id: bytes) -> AsyncIterator[None]:
        """One download of a message's file at a time (the page's, auto-download, and
        ``haven recv``/``download`` through the daemon share its partial file)."""
        lock = self._file_locks.setdefault(msg_id, asyncio.Lock())
        try:
            async with lock:
                yield
        finally:
            if not lock.locked() and self._file_locks.get(msg_id) is lock:
                del self._file_locks[msg_id]

    def _progress(self, **ids: str) -> transfers.Progress:
        """A progress callback publishing ``progress`` events, at most one per percent."""
        last: dict[str, int] = {}

        def tick(phase: str, done: int, total: int) -> None:
            pct = 100 if total <= 0 else min(100, done * 100 // total)
            if last.get(phase) == pct:
                return
            last[phase] = pct
            self._publish(event("progress", **ids, phase=phase, done=done, total=total))

        return tick

    async def send_file(
        self,
        address: Any,
        name: Any,
        mime: Any,
        caption: Any,
        body: AsyncIterator[bytes],
        upload: str = "",
    ) -> Obj:
        """Store the page's bytes in a private temporary file, then encrypt, upload and send
        it (client/transfers.py); the new ``Message``. ``upload`` is the page's own handle for
        the ``progress`` events of this upload."""
        dev = self.require()
        address = self._address(address)
        if not isinstance(name, str) or not name:
            raise LocalProtocolError("give the file's name", code="bad_request")
        if not isinstance(caption, str):
            raise LocalProtocolError("the caption must be a string", code="bad_request")
        clean = safe_name(name)
        kind = safe_mime(mime) if isinstance(mime, str) and mime else None
        if dev.state.contact(address) is None:
            await self.open_chat(address)
        folder = os.path.join(self.home, UPLOADS_DIR)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="up-")
        limit = max_plain_size()
        try:
            with os.fdopen(fd, "wb") as f:
                n = 0
                async for data in body:
                    n += len(data)
                    if n > limit:
                        raise LocalProtocolError("the file is too large to send", code="too_large")
                    f.write(data)
            progress = self._progress(upload=upload[:64], chat=address)
            async with self.lock:
                res = await transfers.send_file(
                    dev,
                    address,
                    tmp,
                    caption,
                    ttl_ms=DEFAULT_TTL_MS,
                    mime=kind,
                    name=clean,
                    progress=progress,
                )
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        msg = self._message_of(res.row.msg_id)
        if msg is None:
            raise LocalProtocolError("the file was sent but its message is gone", code="not_found")
        self._publish(event("message", message=msg))
        self._publish_chat(address)
        return msg

    def clean_uploads(self) -> int:
        """Remove the page's temporary copies left by a daemon that stopped mid-upload (the
        encrypted copy of client/transfers.py is what a resumed upload uses); how many."""
        folder = os.path.join(self.home, UPLOADS_DIR)
        removed = 0
        with contextlib.suppress(OSError):
            for name in os.listdir(folder):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(folder, name))
                    removed += 1
        return removed

    def _attachment(self, msg_id: bytes) -> Attachment:
        att = self.require().state.attachment(msg_id)
        if att is None:
            raise LocalProtocolError("that message has no file", code="not_found")
        return att

    async def download(self, msg_id: bytes) -> Obj:
        """Download a received file into the save folder (now); the updated ``Message``."""
        self._attachment(msg_id)
        task = self._downloads.get(msg_id)
        if task is None or task.done():
            task = asyncio.ensure_future(self._download(msg_id))
            self._downloads[msg_id] = task
        await asyncio.shield(task)
        msg = self._message_of(msg_id)
        if msg is None:
            raise LocalProtocolError("no such message", code="not_found")
        err = msg.get("file", {}).get("error")
        if not msg.get("file", {}).get("downloaded") and err:
            raise HavenError("the file could not be downloaded", code=str(err))
        return msg

    async def _download(self, msg_id: bytes) -> None:
        dev = self.require()
        try:
            async with self.file_lock(msg_id):
                conn = await self.conn()  # the daemon's link (never a second connection)
                await transfers.download(
                    dev, msg_id, self.save_dir, progress=self._progress(id=msg_id.hex()), conn=conn
                )
        except HavenError as exc:
            log.info("a file was not downloaded (%s)", exc.code)
        finally:
            self._downloads.pop(msg_id, None)
            msg = self._message_of(msg_id)
            if msg is not None:
                self._publish(event("update", message=msg))

    def file_path(self, msg_id: bytes) -> tuple[str, Attachment]:
        """The local copy of a message's file (downloaded, or ours as sent)."""
        att = self._attachment(msg_id)
        if att.state not in (FILE_DOWNLOADED, FILE_SENT) or not os.path.isfile(att.path):
            raise LocalProtocolError("the file is not on this device yet", code="not_downloaded")
        return att.path, att

    def thumb(self, msg_id: bytes) -> bytes:
        """The sender's thumbnail of an image (a JPEG), or ``not_found``."""
        att = self._attachment(msg_id)
        if not att.ref.thumb:
            raise LocalProtocolError("that file has no thumbnail", code="not_found")
        return att.ref.thumb


def default_save_dir() -> str:
    """``~/Downloads/Haven``."""
    return transfers.default_save_dir()
