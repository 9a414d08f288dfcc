"""Contacts' ``moved`` notices kept for another try (docs/protocol.md §12.5 "Contacts").

A device follows a contact's ``moved`` notice by fetching the new address's signed list. When
that fetch fails for a reason that may pass (the new host's node unreachable), the notice is
kept here, in the device store (sealed like every key/value row), with the time it arrived,
and tried again on the next connect and after each received batch, until it is followed,
refused (``untrusted_key``) or older than :data:`KEEP_MS`. At most :data:`MAX_PENDING` are
kept (the oldest go first). The list is a pure value: encode, decode, add, expire.
"""

from __future__ import annotations

from dataclasses import dataclass

from federation.errors import HavenError
from federation.wire import packb, unpackb

from .payload import Payload

KV_KEY = "pending_moves"
KEEP_MS = 7 * 24 * 3600 * 1000  # a week: after that, the old address is what the user has
MAX_PENDING = 32
RETRY_GAP_MS = 60_000  # between tries after received batches (every connect tries at once)
# refusals: retrying cannot change the answer (the new list has another key, or is garbage)
FINAL_CODES = frozenset({"untrusted_key", "malformed", "bad_signature"})


@dataclass(frozen=True, slots=True)
class PendingMove:
    """One notice not followed yet: the payload as received and our clock when it came."""

    received_at: int
    payload: Payload


def decode(blob: bytes | None) -> list[PendingMove]:
    """The kept notices (none for a missing or unreadable row: it is only a retry list)."""
    if not blob:
        return []
    try:
        rows = unpackb(blob, max_len=1 << 20)
        return [PendingMove(int(t), Payload.decode(bytes(p))) for t, p in rows]
    except (HavenError, ValueError, TypeError, KeyError):
        return []


def encode(pending: list[PendingMove]) -> bytes:
    """The row for :data:`KV_KEY`."""
    return packb([[m.received_at, m.payload.encode()] for m in pending])


def add(pending: list[PendingMove], move: PendingMove) -> list[PendingMove]:
    """``pending`` with ``move`` (once per notice id), the newest :data:`MAX_PENDING`."""
    kept = [m for m in pending if m.payload.id != move.payload.id]
    return [*kept, move][-MAX_PENDING:]


def live(pending: list[PendingMove], now_ms: int) -> list[PendingMove]:
    """The notices not older than :data:`KEEP_MS`."""
    return [m for m in pending if now_ms - m.received_at <= KEEP_MS]
