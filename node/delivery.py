"""Delivery flow control for one device connection (docs/protocol.md §5.5).

Pure: no asyncio, no I/O. :class:`DeliveryWindow` decides which envelopes go out now and how
they are cut into ``deliver`` frames. Two rules bound what a device must hold:

* a frame is at most ``max_frame_bytes`` encoded and ``max_frame_envs`` envelopes (a single
  envelope, ≤ 64 KiB of body, always fits);
* at most ``window_bytes`` / ``window_envs`` are unacked on one connection. What does not fit
  stays in the store (the *backlog*) and is streamed once acks free half the window.

The node never sends a whole backlog as one frame: a device with 10,000 waiting envelopes gets
them in frames of ≤ 1 MiB, a few at a time, each one after the device acked earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from federation.wire import Envelope

# msgpack framing around one envelope's id, mailbox and body (measured: 20 bytes), and around a
# frame's envelope list (measured: 17 bytes); rounded up.
ENVELOPE_OVERHEAD = 24
FRAME_OVERHEAD = 32


def wire_size(env: Envelope) -> int:
    """Upper bound on the bytes ``env`` adds to an encoded ``deliver`` frame."""
    return len(env.body) + len(env.id) + len(env.to) + ENVELOPE_OVERHEAD


@dataclass(slots=True)
class DeliveryWindow:
    """Unacked envelopes of one connection, and the rules for sending more."""

    max_frame_bytes: int = 1024 * 1024
    max_frame_envs: int = 256
    window_bytes: int = 4 * 1024 * 1024
    window_envs: int = 2000
    inflight: dict[bytes, int] = field(default_factory=dict)  # id -> wire size
    inflight_bytes: int = 0
    acked: dict[bytes, None] = field(default_factory=dict)  # insertion-ordered, pruned

    def knows(self, eid: bytes) -> bool:
        """Already pushed on this connection (in flight or acked)."""
        return eid in self.inflight or eid in self.acked

    def _fits(self, size: int) -> bool:
        if not self.inflight:
            return True  # an empty window always takes one envelope
        return (
            len(self.inflight) < self.window_envs
            and self.inflight_bytes + size <= self.window_bytes
        )

    def take(self, envs: list[Envelope]) -> tuple[list[tuple[Envelope, ...]], int]:
        """Admit envelopes in order until the window is full.

        Returns the frames to send now and how many leading envelopes of ``envs`` were
        consumed (sent now, or skipped because already pushed on this connection). The rest
        did not fit: they stay in the store and the caller refills after acks.
        """
        frames: list[tuple[Envelope, ...]] = []
        current: list[Envelope] = []
        current_bytes = FRAME_OVERHEAD
        consumed = 0
        for env in envs:
            if not self.knows(env.id):
                size = wire_size(env)
                if not self._fits(size):
                    break
                if current and (
                    len(current) >= self.max_frame_envs
                    or current_bytes + size > self.max_frame_bytes
                ):
                    frames.append(tuple(current))
                    current, current_bytes = [], FRAME_OVERHEAD
                current.append(env)
                current_bytes += size
                self.inflight[env.id] = size
                self.inflight_bytes += size
            consumed += 1
        if current:
            frames.append(tuple(current))
        return frames, consumed

    def ack(self, ids: tuple[bytes, ...] | list[bytes]) -> list[bytes]:
        """Record acks; return the ids that were in flight on this connection."""
        mine = []
        for eid in ids:
            size = self.inflight.pop(eid, None)
            if size is None:
                continue
            self.inflight_bytes -= size
            self.acked[eid] = None
            mine.append(eid)
        if len(self.acked) > 4 * self.window_envs:  # remember only the most recent acks
            self.acked = dict.fromkeys(list(self.acked)[-2 * self.window_envs :])
        return mine

    def half_free(self) -> bool:
        """At least half of the window is free (both bytes and count): time to refill."""
        return (
            len(self.inflight) <= self.window_envs // 2
            and self.inflight_bytes <= self.window_bytes // 2
        )

    def room_envs(self) -> int:
        return max(0, self.window_envs - len(self.inflight))
