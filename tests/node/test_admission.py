"""Admission without sockets: frame tracking, caps with a reserve, deadlines by explicit time."""

from __future__ import annotations

import os
import struct
from typing import Any

from node.admission import Admission, FrameTracker, connection_budget
from node.config import NodeConfig
from node.metrics import Metrics


def frame(
    payload: bytes, opcode: int = 0x2, fin: bool = True, declared: int | None = None
) -> bytes:
    n = len(payload) if declared is None else declared
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes([b0, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([b0, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, 0x80 | 127]) + struct.pack(">Q", n)
    return head + os.urandom(4) + payload


def test_tracker_follows_frames_fed_one_byte_at_a_time() -> None:
    t = FrameTracker()
    data = frame(b"a" * 300) + frame(b"", opcode=0x9) + frame(b"b" * 70_000)
    for i in range(len(data)):
        t.feed(data[i : i + 1])
        assert t.in_frame == (i != len(data) - 1 and i not in (300 + 8 - 1, 300 + 8 + 6 - 1))
    assert not t.in_frame and t.largest == 70_000


def test_tracker_sums_fragments_of_one_message_and_sees_declared_size_at_once() -> None:
    t = FrameTracker()
    t.feed(frame(b"x" * 100, fin=False) + frame(b"y" * 100, opcode=0x0, fin=False))
    assert t.largest == 200
    t2 = FrameTracker()
    t2.feed(frame(b"", declared=10_000_000)[:14])  # header only
    assert t2.in_frame and t2.largest == 10_000_000


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False
        self.written = b""

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.aborted = True

    def is_reading(self) -> bool:
        return self.reading

    reading = True


def admission(**kw: Any) -> Admission:
    cfg = NodeConfig(public_url="http://x", exempt_loopback=False, **kw)
    return Admission(cfg, Metrics(), cfg.max_connections)


def test_caps_per_source_and_the_reserve_for_signed_in_devices() -> None:
    adm = admission(max_connections=4, max_unauthenticated=2, max_unauthenticated_per_source=1)
    a = adm.open("10.0.0.1", FakeTransport())  # type: ignore[arg-type]
    assert adm.refusal("10.0.0.1") == "source_over_capacity"
    adm.open("10.0.0.2", FakeTransport())  # type: ignore[arg-type]
    assert adm.refusal("10.0.0.3") == "unauthenticated_over_capacity"
    adm.authenticated(a)  # a device signed in: its pre-auth slot is free again
    assert adm.refusal("10.0.0.3") is None and adm.refusal("10.0.0.1") is None
    adm.open("10.0.0.3", FakeTransport())  # type: ignore[arg-type]
    adm.authenticated(adm.open("10.0.0.4", FakeTransport()))  # type: ignore[arg-type]
    assert adm.refusal("10.0.0.5") == "over_capacity"
    assert adm.snapshot()["open"] == 4 and adm.snapshot()["unauthenticated"] == 2


def test_loopback_is_exempt_from_per_source_caps_by_default() -> None:
    cfg = NodeConfig(public_url="http://x", max_unauthenticated_per_source=1)
    adm = Admission(cfg, Metrics(), 100)
    adm.open("127.0.0.1", FakeTransport())  # type: ignore[arg-type]
    assert adm.refusal("127.0.0.1") is None
    assert adm.refusal("::1") is None


def test_stalled_head_and_unauthenticated_websocket_are_closed_by_the_sweep() -> None:
    adm = admission(read_grace_ms=1000, min_read_rate=100, auth_timeout_ms=3000)
    idle = adm.open("10.0.0.1", FakeTransport())  # type: ignore[arg-type]
    ws = adm.open("10.0.0.2", FakeTransport())  # type: ignore[arg-type]
    adm.upgraded(ws)
    t0 = idle.opened
    assert adm.sweep(t0 + 0.5) == 0
    assert adm.sweep(t0 + 1.5) == 1 and idle.transport.aborted  # type: ignore[attr-defined]
    assert adm.sweep(t0 + 2.5) == 0
    assert adm.sweep(t0 + 3.5) == 1
    assert ws.transport.written.startswith(b"\x88\x02\x03\xf0")  # type: ignore[attr-defined]
    assert adm.metrics.errors == {"conn.read_timeout": 1, "conn.auth_timeout": 1}


def test_fd_budget_keeps_a_reserve() -> None:
    assert connection_budget(4096, 1024) == 1024 - 256
    assert connection_budget(300, 20_000) == 300


def test_a_lower_fd_budget_keeps_the_reserve_in_proportion() -> None:
    adm = admission(max_connections=4096, max_unauthenticated=1024)
    adm.max_connections = 400
    assert adm.max_unauthenticated == 100


def test_behind_a_trusted_proxy_the_forwarded_address_is_the_source() -> None:
    adm = admission(trusted_proxy=True, max_unauthenticated_per_source=1)
    first = adm.open("10.9.9.9", FakeTransport())  # type: ignore[arg-type]
    assert adm.rebind(first, "203.0.113.7") is None
    second = adm.open("10.9.9.9", FakeTransport())  # type: ignore[arg-type]
    assert adm.rebind(second, "203.0.113.7") == "source_over_capacity"
    assert adm.rebind(second, "203.0.113.8") is None
    adm.closed(first)
    adm.closed(second)
    assert not adm.by_source and not adm.unauth_by_source and adm.unauthenticated == 0


def test_no_stall_is_charged_while_the_node_itself_paused_reading() -> None:
    adm = admission(read_grace_ms=1000, min_read_rate=100)
    conn = adm.open("10.0.0.1", FakeTransport())  # type: ignore[arg-type]
    conn.transport.reading = False  # type: ignore[attr-defined]
    t0 = conn.opened
    assert adm.sweep(t0 + 5) == 0
    conn.transport.reading = True  # type: ignore[attr-defined]
    assert adm.sweep(t0 + 5.5) == 0
    assert adm.sweep(t0 + 6.5) == 1


def test_a_request_head_is_complete_at_its_blank_line_even_one_byte_at_a_time() -> None:
    adm = admission(read_grace_ms=1000, min_read_rate=100)
    conn = adm.open("10.0.0.1", FakeTransport())  # type: ignore[arg-type]
    for b in b"GET / HTTP/1.1\r\nHost: x\r\n\r":
        adm.received(conn, bytes([b]))
    assert conn.partial_since is not None
    adm.received(conn, b"\n")
    assert conn.partial_since is None  # the handler may start late: not the peer's stall


def test_the_sign_in_deadline_waits_while_the_node_handles_a_frame() -> None:
    adm = admission(auth_timeout_ms=1000)
    conn = adm.open("10.0.0.1", FakeTransport())  # type: ignore[arg-type]
    adm.upgraded(conn)
    conn.handling = True
    assert adm.sweep(conn.opened + 5) == 0
    conn.handling = False
    assert adm.sweep(conn.opened + 5) == 1
