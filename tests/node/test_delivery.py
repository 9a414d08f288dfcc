"""Delivery flow control and outbox quotas: pure units (docs/protocol.md §5.5, §6)."""

from __future__ import annotations

import os

from federation import frames as F
from federation.wire import MAX_BODY, Envelope
from node.delivery import DeliveryWindow
from node.quotas import OutboxQuotas


def big(n: int, body: int = MAX_BODY) -> list[Envelope]:
    return [Envelope(os.urandom(16), os.urandom(16), 10**14, os.urandom(body)) for _ in range(n)]


def test_a_backlog_goes_out_in_bounded_frames_within_the_window() -> None:
    w = DeliveryWindow(max_frame_bytes=1 << 20, max_frame_envs=256, window_bytes=4 << 20)
    envs = big(150)  # ~9.8 MB of 64 KiB bodies
    frames, consumed = w.take(envs)
    sizes = [len(F.Deliver(f).encode()) for f in frames]
    assert max(sizes) <= 1 << 20 and sum(sizes) <= 4 << 20
    assert consumed == sum(map(len, frames)) < len(envs)  # the rest waits for acks
    assert w.take(envs[consumed:]) == ([], 0)  # window full: nothing more
    assert not w.half_free()
    w.ack([e.id for f in frames[:3] for e in f])  # the device acks frame by frame
    assert w.half_free()
    more, n = w.take(envs[consumed:])
    assert n == sum(map(len, more)) > 0 and max(len(F.Deliver(f).encode()) for f in more) <= 1 << 20
    # already pushed envelopes are skipped, never sent twice on one connection
    again, n = w.take(envs[:consumed])
    assert again == [] and n == consumed


def test_frames_are_bounded_by_count_and_one_envelope_always_fits() -> None:
    w = DeliveryWindow(max_frame_bytes=1 << 20, max_frame_envs=256, window_envs=2000)
    small = big(1000, body=100)
    frames, consumed = w.take(small)
    assert consumed == 1000 and [len(f) for f in frames] == [256, 256, 256, 232]
    w = DeliveryWindow(max_frame_bytes=1 << 20, window_bytes=1)  # a tiny window
    frames, consumed = w.take(big(3))
    assert consumed == 1 and len(frames) == 1  # an empty window always takes one
    assert w.ack([frames[0][0].id, os.urandom(16)]) == [frames[0][0].id]  # only its own ids


def test_outbox_quotas_per_destination_and_account() -> None:
    q = OutboxQuotas(per_destination=5, per_account=3)
    envs = big(10, body=1)
    assert [q.admit("mallory", "b", e, 0) for e in envs[:4]] == [None] * 3 + ["quota_exceeded"]
    assert q.admit("mallory", "b", envs[0], 0) is None  # a resend counts once
    assert [q.admit("eve", "b", e, 0) for e in envs[4:7]] == [None, None, "quota_exceeded"]
    assert q.admit("eve", "c", envs[7], 0) is None  # another destination has its own count
    q.left([envs[0].id, envs[4].id])  # delivered: room again for both
    assert q.admit("mallory", "b", envs[8], 0) is None
    assert q.by_account == {"mallory": 3, "eve": 2} and q.by_dest == {"b": 4, "c": 1}
    q.admit("zed", "b", Envelope(os.urandom(16), os.urandom(16), 50, b""), 0)
    assert q.by_dest["b"] == 5
    assert q.admit("zed", "b", envs[9], 60) is None  # the expired row stopped counting
    q.resync({"b": 2}, {"c": 1})
    assert q.by_dest == {"b": 2, "c": 1}
