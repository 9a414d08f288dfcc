"""Groups across device links and removals (docs/protocol.md §3.5, §11.6).

A device linked to an account must take part in the account's groups at once, and a device
removed from it must stop getting their keys at once. Two pieces do that:

- **The group hand-over.** The linking device adds the groups it is an active member of to the
  link hand-over: for each group the signed states its book shows (the current state, its chain
  down to the parents of the superseded changes, the superseded changes), the time it joined,
  the members' join times and the read watermarks. Link messages are 64 KiB each, so the items
  are cut into chunks (``{"gchunk": i, "items": [...]}``), sealed with the link secret like the
  history chunks. The new device checks every state as it would a received change (signatures
  under the signers' pinned identity keys, the chain by digests); the join times and watermarks
  come from our own account over the sealed link, and are trusted like copied history.
- **The ``devices`` notice.** After our signed device list changed (a device linked or removed),
  this device sends each of its groups a Megolm payload of kind ``devices`` (no fields). Its
  receivers drop the reused device lists that include us (:meth:`Groups.member_devices_changed`),
  so their next send asks for our list again: a linked device gets their session keys, a
  removed one makes them rotate (post-removal secrecy, §11.2). Our own next send rotates too,
  because our own list changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

from federation.errors import HavenError, MalformedEnvelope
from federation.wire import packb

from .group_receipts import Watermarks
from .group_state import GroupError, SignedState
from .payload import Payload

if TYPE_CHECKING:
    from .connection import NodeConnection
    from .device import Device

log = logging.getLogger("haven.groups")

MAX_LINK_GROUPS = 1000  # groups handed to a new device (the most recently joined first)
# packed items per link message: a link message's packed content is at most 65,484 bytes (the
# 64 KiB bucket less the length prefix and the seal, §3.3); the chunk map adds under 32
GROUP_CHUNK_BYTES = 65_000
NOTICE = "devices"
T = TypeVar("T")


def _meta_item(row: Any) -> list[Any] | None:
    """``["g", gid, joined_at, marks, since]``, without the watermarks (then without the join
    times) when it would not fit in one link message."""
    for marks, since in ((row.marks.dump(), row.since), (b"", row.since), (b"", {})):
        item = ["g", row.gid, row.joined_at, marks, since]
        if len(packb(item)) <= GROUP_CHUNK_BYTES:
            return item
    return None


def handover_items(dev: Device) -> list[list[Any]]:
    """What a new device of our account needs of our groups, as link-message items."""
    eng = dev.groups_engine
    items: list[list[Any]] = []
    for g in [g for g in eng.all() if g.active][:MAX_LINK_GROUPS]:
        row = eng._load(g.gid)
        meta = None if row is None else _meta_item(row)
        if row is None or meta is None:
            continue
        items += [["s", g.gid, s.encode()] for s in row.book.transfer()]
        items.append(meta)
    return items


def cut_by_size(items: Iterable[T], cost: Callable[[T], int], limit: int) -> list[list[T]]:
    """``items`` in order, cut into runs whose ``cost`` adds up to at most ``limit`` (an item
    above ``limit`` alone makes a run of one). Link messages are cut with it (§3.5)."""
    chunks: list[list[T]] = [[]]
    size = 0
    for item in items:
        n = cost(item)
        if size + n > limit and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n
    return [c for c in chunks if c]


def group_chunks(items: list[list[Any]]) -> list[list[list[Any]]]:
    """``items`` cut into link messages of at most GROUP_CHUNK_BYTES packed bytes each."""
    return cut_by_size(items, lambda item: len(packb(item)), GROUP_CHUNK_BYTES)


def _parse(items: list[Any]) -> tuple[dict[bytes, list[SignedState]], dict[bytes, list[Any]]]:
    states: dict[bytes, list[SignedState]] = {}
    metas: dict[bytes, list[Any]] = {}
    try:
        for item in items:
            if item[0] == "s":
                signed = SignedState.decode(bytes(item[2]))
                signed.open()  # the blob's own checks (sizes, sorted lists), once, here
                states.setdefault(bytes(item[1]), []).append(signed)
            elif item[0] == "g":
                since = {str(m): int(t) for m, t in dict(item[4]).items()}
                metas[bytes(item[1])] = [int(item[2]), bytes(item[3]), since]
    except (HavenError, IndexError, TypeError, ValueError) as exc:
        raise MalformedEnvelope("bad group hand-over") from exc
    return states, metas


async def import_groups(dev: Device, conn: NodeConnection, items: list[Any]) -> int:
    """Store the groups of a hand-over (on the new device). Each state is checked as a received
    change would be; a group whose current state does not check is left out (counted
    ``forged_state`` or by the book's code). Returns the number of groups stored."""
    eng = dev.groups_engine
    states, metas = _parse(items)
    signers = {s.open().by for sts in states.values() for s in sts}
    for by in sorted(signers):
        if eng._identity_of(by) is None:
            try:
                await dev.fetch_contact(conn, by, claim=False)
            except HavenError as exc:  # its groups are left out below (unknown signer)
                log.info("a group signer's keys are unavailable (%s)", exc.code)
    now = dev.clock.now_ms()
    stored = 0
    with dev.state.tx() as db:
        for gid, sts in states.items():
            res, _ = eng._accept(db, sts[0], now)
            if not res.ok:
                eng.drop(res.code or "keys_unavailable")
                continue
            for s in sts[1:]:
                eng._accept(db, s, now)
            row = eng._load(gid, db)
            if row is None or row.book.current is None:
                continue
            if gid in metas:
                joined_at, marks, since = metas[gid]
                row.joined_at = joined_at
                if marks:
                    try:
                        row.marks = Watermarks.load(marks)
                    except GroupError as exc:  # the counters fill again from new receipts
                        log.info("handed-over watermarks were not usable (%s)", exc.code)
                members = set(row.book.current.members)
                row.since.update({m: t for m, t in since.items() if m in members})
                eng._save(db, row)
            stored += 1
    eng._retried = []  # copies that waited for these states are stored; nobody to tell
    return stored


async def announce_devices(dev: Device, conn: NodeConnection) -> int:
    """Send every group we are an active member of a ``devices`` notice (our device list just
    changed). A group that cannot be reached now is logged by code and skipped: its members'
    reused lists still expire within LIST_TTL_S. Returns the number of groups told."""
    eng = dev.groups_engine
    told = 0
    for g in [g for g in eng.all() if g.active][:MAX_LINK_GROUPS]:
        p = Payload(os.urandom(16), NOTICE, g.ref, dev.clock.now_ms())
        try:
            await eng.send_payload(g.gid, p, conn=conn)
            told += 1
        except HavenError as exc:
            log.warning("a group was not told of our device change (%s)", exc.code)
    return told
