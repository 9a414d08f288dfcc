"""JSON log lines (node/logs.py ``json_lines``): one object per line, same redaction as text."""

from __future__ import annotations

import io
import json
import logging

from node.logs import SafeHandler


def lines_of(handler: SafeHandler, stream: io.StringIO) -> list[dict[str, str]]:
    handler.flush()
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_the_code_and_no_address() -> None:
    stream = io.StringIO()
    handler = SafeHandler(stream, lines_per_minute=2, json_lines=True)
    log = logging.getLogger("haven.test_json")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        log.error("group commit failed (%s)", "storage_error")
        log.warning("peer at %s refused", "203.0.113.7", extra={"code": "rate_limited"})
        try:
            raise ValueError("secret text")
        except ValueError:
            log.exception("handler crashed")
        for _ in range(5):  # over the budget of 2 per kind: one summary line later
            log.info("noisy line")
        handler.flush_suppressed()
    finally:
        log.removeHandler(handler)
    got = lines_of(handler, stream)
    assert got[0]["code"] == "storage_error" and got[0]["level"] == "ERROR"
    assert got[0]["logger"] == "haven.test_json"
    assert got[1] == got[1] | {"code": "rate_limited", "msg": "peer at <ip> refused"}
    assert got[2]["msg"].startswith("handler crashed (ValueError")
    assert "code" not in got[2]
    assert "secret text" not in stream.getvalue() and "Traceback" not in stream.getvalue()
    assert [g["msg"] for g in got[3:]] == ["noisy line", "noisy line", "3 similar lines suppressed"]
    assert all(set(g) >= {"ts", "level", "logger", "msg"} for g in got)
