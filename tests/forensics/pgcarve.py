"""A small PostgreSQL carver for raw images: sealed ``bytea`` values wherever they sit.

PostgreSQL keeps a ``bytea`` above 126 bytes inline in its heap tuple with a 4-byte varlena
header (little-endian ``(length + 4) << 2``; the low two bits 00 mean "4-byte header, not
compressed"), aligned to 4 within the tuple. A sealed value (XSalsa20-Poly1305, random-looking)
never compresses, so it is stored exactly as the store wrote it. The carver looks for the
header of every size a sealed row can have (:func:`sealed_sizes`: the store's padding buckets)
at *any* byte offset of the input (heap pages, free blocks, WAL records, full-page images) and
takes the bytes after it as a candidate. Nothing about page or tuple headers is required, so
dead tuples (VACUUM leaves their bytes in place until the space is reused), stale pages of
dropped relations and WAL segments in free blocks are all found.

Details the carver handles:

- **WAL page headers.** A WAL record crossing an 8 KiB WAL page has a 24-byte page header
  (40 at a segment's first page) in the middle of it. WAL pages start on a 4 KiB block of the
  image, so a candidate crossing a block boundary where a WAL page header (magic ``0xD110``,
  PostgreSQL 15, "continuation" flag set) sits has that header cut out.
- **TOAST.** A row over about 2 KiB has its big value moved out of line into the table's TOAST
  relation, in chunks of :data:`TOAST_CHUNK` bytes (tuples ``chunk_id oid, chunk_seq int4,
  chunk_data bytea``). Chunks are found by their header, grouped by ``chunk_id`` and put back
  together in ``chunk_seq`` order for every size a sealed value can have.
- **Clear columns.** A :class:`Layout` (the columns before the sealed one, as
  ``node/pg_store.py`` declares them) gives each inline candidate's clear values (keyed hashes,
  order keys, coarse expiries) for the linkage scoring of ``examine._linkage``. The offsets are
  computed relative to the sealed value's header, so they hold in heap tuples and in WAL
  records alike (a WAL insert record copies the tuple's bytes verbatim); a value whose 1-byte
  short-varlena header does not match is left out.

Carved values come out as :class:`carve.Record` (``kind`` :data:`HEAP` or :data:`TOAST`) so
that ``examine.node_figures`` scores them like SQLite records.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .carve import Record, Value
from .disk import BLOCK

HEAP, TOAST = 0x50, 0x54  # Record.kind of an inline candidate / of a reassembled TOAST value
TOAST_CHUNK = 1996  # TOAST_MAX_CHUNK_SIZE for 8 KiB pages
WAL_MAGIC = 0xD110  # XLOG_PAGE_MAGIC, PostgreSQL 15
XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER = 0x0001, 0x0002
WAL_SHORT_HEADER, WAL_LONG_HEADER = 24, 40  # MAXALIGN(sizeof(XLogPageHeaderData)), long
MAX_SEALED = 65536 + 256  # largest sealed size looked for by default (the last bucket)
TUPLE_HEADER = 24  # MAXALIGN(offsetof(HeapTupleHeaderData, t_bits)), no null bitmap
MAX_TUPLES_PER_PAGE = 291  # MaxHeapTuplesPerPage, 8 KiB pages


def varlena4(n: int) -> bytes:
    """The 4-byte uncompressed varlena header of an ``n``-byte value (little-endian)."""
    return ((n + 4) << 2).to_bytes(4, "little")


def sealed_sizes(limit: int = MAX_SEALED) -> list[int]:
    """Every size a sealed row blob can have (``node/sqlite_store.py`` ``_pad``: the buckets,
    then multiples of ``ROW_STEP``), up to ``limit``; the PostgreSQL store pads alike."""
    try:
        from node.sealed_rows import ROW_BUCKETS, ROW_STEP
    except ImportError:  # before the PostgreSQL store (issue 13) the SQLite store had them
        from node.sqlite_store import ROW_BUCKETS, ROW_STEP  # type: ignore[attr-defined,no-redef]

    sizes = list(ROW_BUCKETS)
    step = -(-ROW_BUCKETS[-1] // ROW_STEP) * ROW_STEP
    while step <= limit:
        if step not in sizes:
            sizes.append(step)
        step += ROW_STEP
    return sorted(s for s in sizes if s <= limit)


@dataclass(frozen=True)
class Layout:
    """The columns stored before the sealed one in one heap tuple, in order: ``"b16"`` a
    16-byte ``bytea`` (1-byte header, unaligned), ``"i8"`` a ``bigint`` (8-aligned), ``"i4"``
    an ``integer`` (4-aligned). The tuple's data starts 8-aligned (``t_hoff``)."""

    columns: tuple[str, ...] = ()

    def offsets(self) -> tuple[list[tuple[str, int]], int]:
        """(kind, offset from the data start) per column, and the sealed header's offset."""
        pos, out = 0, []
        for kind in self.columns:
            if kind == "i8":
                pos = -(-pos // 8) * 8
                out.append((kind, pos))
                pos += 8
            elif kind == "i4":
                pos = -(-pos // 4) * 4
                out.append((kind, pos))
                pos += 4
            elif kind == "b16":
                out.append((kind, pos))
                pos += 17
            else:
                raise ValueError(f"unknown column kind {kind!r}")
        return out, -(-pos // 4) * 4

    def clear_values(self, buf: bytes, header_at: int) -> tuple[Value, ...] | None:
        """The clear columns of the tuple whose sealed value's header is at ``header_at``, or
        None when a 16-byte column's short-varlena header is not where the layout puts it."""
        cols, sealed_at = self.offsets()
        start = header_at - sealed_at
        if start < 0:
            return None
        out: list[Value] = []
        for kind, off in cols:
            at = start + off
            if kind == "b16":
                if buf[at : at + 1] != b"\x23":  # short varlena of 16 bytes: (17 << 1) | 1
                    return None
                out.append(bytes(buf[at + 1 : at + 17]))
            else:
                n = 8 if kind == "i8" else 4
                out.append(int.from_bytes(buf[at : at + n], "little", signed=True))
        return tuple(out)

    def tuple_head(self, buf: bytes, header_at: int) -> TupleHead | None:
        """The heap tuple header in front of the columns (``t_xmin``, ``t_ctid``), if one is
        there: ``t_hoff`` 24, as many attributes as the layout plus the sealed one, a line
        pointer number a heap page can have. A WAL insert record has its ``xl_heap_header`` at
        the same place but no ``t_xmin`` (its transaction id is in the record header): the
        bytes before it are the record's block reference, whose last two (``0xFF``, data
        length) are no valid line pointer number, so no header is read there."""
        _, sealed_at = self.offsets()
        start = header_at - sealed_at - TUPLE_HEADER
        if start < 0:
            return None
        xmin, bhi, blo, posid, infomask2 = struct.unpack_from("<I8xHHHH", buf, start)
        natts = infomask2 & 0x07FF
        if buf[start + 22] != TUPLE_HEADER or natts != len(self.columns) + 1:
            return None
        if not 1 <= posid <= MAX_TUPLES_PER_PAGE or not xmin:
            return None
        return TupleHead(xmin, (bhi << 16) | blo, posid)


@dataclass(frozen=True)
class TupleHead:
    """What a heap tuple header says about a row: the inserting transaction and its place."""

    xmin: int
    block: int
    posid: int


def _find_all(buf: bytes, needle: bytes) -> Iterator[int]:
    """Every offset of ``needle`` in ``buf``. ``bytes.find`` tests a window's last byte first,
    and an image is mostly zeros: a needle ending in zero bytes (a varlena header) is searched
    without them, then checked, which is several times faster."""
    head = needle.rstrip(b"\0") or needle
    at = buf.find(head)
    while at >= 0:
        if buf.startswith(needle, at):
            yield at
        at = buf.find(head, at + 1)


def _wal_splice(buf: bytes, start: int, n: int) -> bytes:
    """``n`` bytes from ``start``, with every WAL page header at a block boundary cut out."""
    out = bytearray()
    pos = start
    while len(out) < n:
        boundary = (pos // BLOCK + 1) * BLOCK
        take = min(n - len(out), boundary - pos)
        out += buf[pos : pos + take]
        pos += take
        if len(out) >= n or pos + WAL_SHORT_HEADER > len(buf):
            break
        magic, info = struct.unpack_from("<HH", buf, pos)
        if magic == WAL_MAGIC and info & XLP_FIRST_IS_CONTRECORD:
            pos += WAL_LONG_HEADER if info & XLP_LONG_HEADER else WAL_SHORT_HEADER
    return bytes(out)


def _inline(buf: bytes, sizes: Sequence[int], layouts: Sequence[Layout]) -> Iterator[Record]:
    for size in sizes:
        for hdr in _find_all(buf, varlena4(size)):
            at = hdr + 4
            value = buf[at : at + size]
            if len(value) < size:
                continue
            crosses = at // BLOCK != (at + size - 1) // BLOCK
            values = [value]
            if crosses:
                spliced = _wal_splice(buf, at, size)
                if len(spliced) == size and spliced != value:
                    values.append(spliced)
            which: int = 0
            clear: tuple[Value, ...] = ()
            for i, layout in enumerate(layouts):
                got = layout.clear_values(buf, hdr)
                if got is not None:
                    which, clear = i + 1, got
                    break
            for v in values:
                yield Record(hdr, HEAP, which, None, (*clear, v))


def _toasted(buf: bytes, sizes: Sequence[int]) -> Iterator[Record]:
    """Sealed values moved to TOAST: chunks grouped by ``chunk_id``, joined by ``chunk_seq``.
    One pass per chunk length (full chunks, and each size's last chunk), indexed by
    ``(chunk_id, chunk_seq)`` from the 8 bytes in front of the chunk's header."""
    lengths = {TOAST_CHUNK} | {n % TOAST_CHUNK for n in sizes if n > TOAST_CHUNK}
    chunks: dict[tuple[bytes, int, int], bytes] = {}  # (chunk_id, seq, length) -> data
    max_seq = max(sizes, default=0) // TOAST_CHUNK
    for n in sorted(lengths - {0}):
        for h in _find_all(buf, varlena4(n)):
            if h < 8:
                continue
            cid, seq = buf[h - 8 : h - 4], int.from_bytes(buf[h - 4 : h], "little")
            if seq <= max_seq and (cid, seq, n) not in chunks:
                data = _wal_splice(buf, h + 4, n)
                if len(data) == n:
                    chunks[(cid, seq, n)] = data
    firsts = {cid for cid, seq, n in chunks if seq == 0 and n == TOAST_CHUNK}
    for cid in firsts:
        for size in sizes:
            nfull, rest = divmod(size, TOAST_CHUNK)
            if size <= TOAST_CHUNK:
                continue
            parts = [chunks.get((cid, s, TOAST_CHUNK)) for s in range(nfull)]
            if rest:
                parts.append(chunks.get((cid, nfull, rest)))
            if all(p is not None for p in parts):
                value = b"".join(p for p in parts if p is not None)
                yield Record(0, TOAST, 0, None, (int.from_bytes(cid, "little"), value))


def carve_pg(
    buf: bytes, layouts: Sequence[Layout] = (), sizes: Iterable[int] | None = None
) -> Iterator[Record]:
    """Every candidate sealed value in ``buf``: inline ones with the clear columns of the first
    of ``layouts`` that fits (``Record.cell``: its index + 1; 0 and no clear values if none
    does) and values reassembled from TOAST chunks (``cell`` 0, ``values`` = (chunk_id,
    value)). ``Record.offset`` is the varlena header's offset in ``buf``. Candidates that are
    not sealed rows simply open under no key; duplicates (a row in its page, in WAL, in a
    full-page image) are all yielded."""
    size_list = sorted(sizes) if sizes is not None else sealed_sizes()
    yield from _inline(buf, size_list, layouts)
    yield from _toasted(buf, size_list)
