"""The node's log handler: fixed library lines, no tracebacks, no addresses, bounded lines."""

from __future__ import annotations

import io
import logging

from node.logs import SafeHandler, scrub


def test_scrub_replaces_ipv4_and_ipv6_but_keeps_times_and_versions() -> None:
    text = "from 127.0.0.1:443 and [::1]:80 and fe80::1%eth0 and 2001:db8::42 at 07:48:06,123"
    out = scrub(text)
    assert "127.0.0.1" not in out and "::1" not in out and "2001:db8" not in out
    assert "fe80" not in out
    assert out.count("<ip>") == 4
    assert "07:48:06,123" in out
    assert scrub("aiohttp 3.14.5") == "aiohttp 3.14.5"


def _handler(limit: int, clock: list[float]) -> tuple[SafeHandler, io.StringIO]:
    out = io.StringIO()
    return SafeHandler(out, limit, monotonic=lambda: clock[0]), out


def _record(
    name: str, msg: str, *args: object, exc: BaseException | None = None
) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, exc_info)


def test_aiohttp_request_error_becomes_one_fixed_line_without_traceback() -> None:
    clock = [0.0]
    handler, out = _handler(10, clock)
    try:
        raise ConnectionResetError("peer 10.1.2.3 reset mailbox deadbeef")
    except ConnectionResetError as exc:
        handler.handle(
            _record("aiohttp.server", "Error handling request from %s", "10.1.2.3", exc=exc)
        )
    line = out.getvalue()
    assert line.rstrip().endswith("aiohttp.server: request failed (ConnectionResetError)")
    assert "10.1.2.3" not in line and "Traceback" not in line and "deadbeef" not in line


def test_own_exception_names_class_and_place_but_no_message() -> None:
    handler, out = _handler(10, [0.0])
    try:
        raise ValueError("secret 192.168.1.9")
    except ValueError as exc:
        handler.handle(_record("haven.node", "send loop failed", exc=exc))
    line = out.getvalue()
    assert "send loop failed (ValueError" in line
    assert "secret" not in line and "Traceback" not in line


def test_lines_of_one_kind_are_rate_limited_with_a_summary() -> None:
    clock = [0.0]
    handler, out = _handler(3, clock)
    for i in range(50):
        handler.handle(_record("asyncio", "accept failed on fd %d", i))
    handler.handle(_record("haven.node", "other kind"))
    assert out.getvalue().count("accept failed") == 3
    assert "other kind" in out.getvalue()
    clock[0] = 61.0
    handler.handle(_record("asyncio", "accept failed on fd %d", 99))
    lines = out.getvalue().splitlines()
    assert any(line.endswith("asyncio: 47 similar lines suppressed") for line in lines), lines
    assert lines[-1].endswith("accept failed on fd 99")
