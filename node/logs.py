"""The node's log: fixed, rate-limited lines with no addresses and no tracebacks.

A node's log is something a seizure reveals, and peers control much of what libraries would
write to it: aiohttp's "Error handling request from <ip>" tracebacks carry client addresses and
bits of requests, asyncio names transports and sockets. So every record passes through
:class:`SafeHandler`, which

* turns a library record (any logger outside ``haven``) into one fixed line: aiohttp's request
  errors become ``request failed (<ExceptionClass>)``, anything else keeps its text;
* never prints a traceback: an exception is reduced to its class name (and, for our own
  loggers, the file and line where it was raised, which name no data);
* scrubs IPv4 and IPv6 literals from every line, ours included, as defence in depth;
* lets at most ``log_lines_per_minute`` lines of one kind (logger + message template) through
  per minute and then writes one ``N similar lines suppressed`` summary.

:func:`loop_exception_handler` routes the event loop's own errors (``socket.accept() out of
system resource`` at the fd limit, fatal transport errors) through the same path.

With ``log_format = "json"`` (``--log-json``) each line is one JSON object instead:
``{"ts": "2026-01-01T12:00:00.123Z", "level": "ERROR", "logger": "haven.node", "msg": "…"}``
plus ``"code"``: the stable error code where the line has one (``extra={"code": …}``, or the
``(code)`` our lines end with). The text is the same translated, scrubbed, rate-limited text.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any, TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WINDOW_S = 60.0
LIBRARY_QUIET = ("zeroconf", "aiohttp.server", "aiohttp.web", "aiohttp.websocket", "asyncio")

_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.%])[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(?:%[\w.-]+)?")
_KIND_NOISE = re.compile(r"0x[0-9a-f]+|[0-9a-f]{8,}|\d+")
_TRAILING_CODE = re.compile(r"\(([a-z][a-z0-9_]{1,47})\)$")


def _ipv6_or_keep(match: re.Match[str]) -> str:
    text = match.group(0)
    if text.count(":") < 2:
        return text
    try:
        ipaddress.IPv6Address(text.split("%", 1)[0].strip("."))
    except ValueError:
        return text
    return "<ip>"


def scrub(text: str) -> str:
    """``text`` with every IPv4 and IPv6 literal replaced by ``<ip>``."""
    text = _IPV4.sub("<ip>", text)
    if ":" in text:
        text = _IPV6_CANDIDATE.sub(_ipv6_or_keep, text)
    return text


def _exc_name(exc_info: Any) -> str | None:
    if isinstance(exc_info, tuple) and exc_info and exc_info[0] is not None:
        return str(exc_info[0].__name__)
    if isinstance(exc_info, BaseException):
        return type(exc_info).__name__
    return None


def _where(exc_info: Any) -> str:
    """``file.py:line`` of the innermost frame in our own code (no values, no paths)."""
    tb = exc_info[2] if isinstance(exc_info, tuple) and len(exc_info) == 3 else None
    where = ""
    for frame in traceback.extract_tb(tb):
        parts = frame.filename.replace("\\", "/").split("/")
        if len(parts) >= 2 and parts[-2] in ("node", "federation", "client"):
            where = f"{parts[-2]}/{parts[-1]}:{frame.lineno}"
    return where


def translate(record: logging.LogRecord) -> tuple[str, str]:
    """The (kind, text) this record is written as: fixed for libraries, scrubbed always."""
    own = record.name == "haven" or record.name.startswith("haven.")
    template = str(record.msg)
    exc = _exc_name(record.exc_info)
    if not own and template.startswith("Error handling request"):
        text = f"request failed ({exc or 'unknown'})"
        template = "Error handling request"
    else:
        try:
            text = record.getMessage()
        except (TypeError, ValueError):
            text = template
        if exc is not None:
            where = _where(record.exc_info) if own else ""
            text += f" ({exc}{' at ' + where if where else ''})"
    kind = f"{record.name}:{_KIND_NOISE.sub('#', template)[:60]}"
    return kind, scrub(text)


def code_of(record: logging.LogRecord, text: str) -> str | None:
    """The stable error code of a line: ``extra={"code": …}``, else a trailing ``(code)``."""
    code = getattr(record, "code", None)
    if isinstance(code, str) and _TRAILING_CODE.fullmatch(f"({code})"):
        return code
    found = _TRAILING_CODE.search(text)
    return found.group(1) if found else None


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ms), ``level``, ``logger``, ``msg``, ``code``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        obj: dict[str, str] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        code = getattr(record, "code", None)
        if isinstance(code, str):
            obj["code"] = code
        return json.dumps(obj, ensure_ascii=False)


class SafeHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes only translated, scrubbed, rate-limited lines."""

    def __init__(
        self,
        stream: TextIO,
        lines_per_minute: int,
        monotonic: Callable[[], float] = time.monotonic,
        json_lines: bool = False,
    ) -> None:
        super().__init__(stream)
        self.limit = max(1, lines_per_minute)
        self.monotonic = monotonic
        self.window_start = monotonic()
        self.seen: Counter[str] = Counter()
        self.suppressed: Counter[str] = Counter()
        self.setFormatter(JsonFormatter() if json_lines else logging.Formatter(FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        kind, text = translate(record)
        now = self.monotonic()
        if now - self.window_start >= WINDOW_S:
            self.flush_suppressed()
            self.window_start = now
        self.seen[kind] += 1
        if self.seen[kind] > self.limit:
            self.suppressed[kind] += 1
            return
        self._write(record, text)

    def _write(self, record: logging.LogRecord, text: str) -> None:
        safe = logging.makeLogRecord(
            {
                "name": record.name,
                "levelno": record.levelno,
                "levelname": record.levelname,
                "msg": text,
                "args": None,
                "created": record.created,
                "msecs": record.msecs,
                "code": code_of(record, text),
            }
        )
        super().emit(safe)

    def flush_suppressed(self) -> None:
        """Write one summary line per kind that went over its budget; start a new window."""
        for kind, n in sorted(self.suppressed.items()):
            name = kind.split(":", 1)[0]
            summary = logging.makeLogRecord(
                {
                    "name": name,
                    "levelno": logging.WARNING,
                    "levelname": "WARNING",
                    "msg": f"{n} similar lines suppressed",
                    "args": None,
                }
            )
            super().emit(summary)
        self.seen.clear()
        self.suppressed.clear()

    def close(self) -> None:
        try:
            self.flush_suppressed()
        finally:
            super().close()


def install(
    lines_per_minute: int, stream: TextIO | None = None, json_lines: bool = False
) -> SafeHandler:
    """Make :class:`SafeHandler` the only root handler (replacing any earlier setup);
    ``json_lines`` writes one JSON object per line."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler = SafeHandler(stream or sys.stderr, lines_per_minute, json_lines=json_lines)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").disabled = True
    for name in LIBRARY_QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
    return handler


_loop_log = logging.getLogger("asyncio")


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's errors as one fixed line each (the handler rate-limits them)."""
    exc = context.get("exception")
    message = str(context.get("message") or "event loop error")[:80]
    name = type(exc).__name__ if isinstance(exc, BaseException) else None
    _loop_log.error("%s%s", message, f" ({name})" if name else "")
