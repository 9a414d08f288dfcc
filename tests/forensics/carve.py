"""A small SQLite record carver for raw images (what an examiner runs over freed blocks).

It looks for b-tree leaf pages (table leaf ``0x0D``, index leaf ``0x0A``) at *any* byte offset
of the input, not only at block boundaries: pages inside a database file sit at 4 KiB offsets,
but pages inside WAL frames follow a 24-byte frame header (the WAL starts with a 32-byte
header, frames are 24 + 4096 bytes), so they sit at any multiple of 8 within a block. A
candidate is kept only if its page header is consistent and every cell pointer leads to a
cell whose record decodes completely (varint header, serial types, values inside the page),
which random or sealed data practically never passes. Payloads that spill to overflow pages
keep their local part (``truncated``).

Freeblocks inside live pages are not carved: the stores run ``secure_delete=ON``, which zeroes
them; what is left of deleted rows is in stale copies of whole pages (WAL frames, freed blocks
of truncated or replaced files), which this carver finds as pages.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

Value = int | float | bytes | str | None

PAGE = 4096
_CANDIDATE = re.compile(rb"[\x0a\x0d]")


@dataclass(frozen=True)
class Record:
    """One carved cell: where it was, its rowid (table leaves) and its column values."""

    offset: int  # byte offset of the page in the scanned buffer
    kind: int  # 0x0D table leaf, 0x0A index leaf
    cell: int  # offset of the cell inside the page (cells are written downwards in insert order)
    rowid: int | None
    values: tuple[Value, ...]
    truncated: bool = False

    @property
    def shape(self) -> tuple[int, int, tuple[str, ...]]:
        """Which table a record probably belongs to: page kind, column count, value types."""
        return (self.kind, len(self.values), tuple(type(v).__name__ for v in self.values))


def varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """Decode a SQLite varint at ``pos``; returns (value, next position)."""
    value = 0
    for i in range(9):
        if pos + i >= end:
            raise ValueError("varint past end")
        b = buf[pos + i]
        if i == 8:
            return (value << 8) | b, pos + 9
        value = (value << 7) | (b & 0x7F)
        if not b & 0x80:
            return value, pos + i + 1
    raise ValueError("unreachable")


def _decode_record(payload: bytes) -> tuple[tuple[Value, ...], bool]:
    """Column values of a record; ``complete`` is False when the payload was cut short."""
    hlen, pos = varint(payload, 0, len(payload))
    if hlen < 2 or hlen > len(payload) or hlen > 200:
        raise ValueError("bad record header")
    types = []
    while pos < hlen:
        t, pos = varint(payload, pos, hlen)
        types.append(t)
    if pos != hlen or not types:
        raise ValueError("bad record header")
    values: list[Value] = []
    body = hlen
    complete = True
    for t in types:
        if t in (10, 11):
            raise ValueError("reserved serial type")
        if t == 0:
            values.append(None)
            continue
        if t in (8, 9):
            values.append(t - 8)
            continue
        n = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 8, 7: 8}.get(t, (t - 12) // 2)
        chunk = payload[body : body + n]
        if len(chunk) < n:
            complete = False
            if t < 12:
                break
        if t == 7:
            values.append(struct.unpack(">d", chunk)[0])
        elif t < 12:
            values.append(int.from_bytes(chunk, "big", signed=True))
        elif t % 2 == 0:
            values.append(bytes(chunk))
        else:
            try:
                values.append(bytes(chunk).decode())
            except UnicodeDecodeError as exc:
                if complete:
                    raise ValueError("text is not UTF-8") from exc
                values.append(bytes(chunk).decode(errors="replace"))
        body += n
    if complete and body != len(payload):
        raise ValueError("record length mismatch")
    return tuple(values), complete


def _local_size(p: int, kind: int, usable: int = PAGE) -> int:
    x = usable - 35 if kind == 0x0D else ((usable - 12) * 64 // 255) - 23
    if p <= x:
        return p
    m = ((usable - 12) * 32 // 255) - 23
    k = m + ((p - m) % (usable - 4))
    return k if k <= x else m


def _page(buf: bytes, at: int, usable: int = PAGE) -> list[Record] | None:
    kind = buf[at]
    freeblock = int.from_bytes(buf[at + 1 : at + 3], "big")
    ncells = int.from_bytes(buf[at + 3 : at + 5], "big")
    start = int.from_bytes(buf[at + 5 : at + 7], "big")
    frag = buf[at + 7]
    head = 8 + 2 * ncells
    if not 0 < ncells <= 1000 or frag > 60 or not head <= start < usable:
        return None
    if freeblock and not head <= freeblock < usable:
        return None
    out = []
    for i in range(ncells):
        cell = int.from_bytes(buf[at + 8 + 2 * i : at + 10 + 2 * i], "big")
        if not start <= cell < usable - 3:
            return None
        end = at + usable
        try:
            p, pos = varint(buf, at + cell, end)
            rowid = None
            if kind == 0x0D:
                rowid, pos = varint(buf, pos, end)
            local = _local_size(p, kind, usable)
            if p == 0 or pos + local > end:
                return None
            values, complete = _decode_record(buf[pos : pos + local])
        except ValueError:
            return None
        truncated = local < p or not complete
        out.append(Record(at, kind, cell, rowid, values, truncated))
    return out


def carve(buf: bytes, usable: int = PAGE) -> Iterator[Record]:
    """Every record of every plausible leaf page anywhere in ``buf`` (``usable``: page size
    minus reserved bytes, e.g. 4016 for SQLCipher 4 pages)."""
    limit = len(buf) - PAGE
    for m in _CANDIDATE.finditer(buf):
        at = m.start()
        if at > limit:
            break
        records = _page(buf, at, usable)
        if records:
            yield from records
