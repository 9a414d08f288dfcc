"""What every store backend does to an envelope or outbox row before it touches the disk.

docs/operations.md §5 "At rest": a row's whole record (id, mailbox, destination, exact expiry,
body) is packed, padded to a size bucket and sealed under an epoch key (:mod:`node.atrest`) in
one blob. In clear a row keeps only keyed hashes for lookups (under a subkey of the key that
sealed it, so they change when it is re-sealed), an order key ``ord`` on a per-mailbox chain
of random steps from a random start, and a coarse, jittered expiry. This module holds those
pieces, pure and shared by :mod:`node.sqlite_store` and :mod:`node.pg_store`; each backend only
adds how it stores and locks.
"""

from __future__ import annotations

import os
from typing import Any

import msgpack

from federation.wire import Envelope

from .atrest import EpochKeys

EXPIRY_GRAIN_MS = 15 * 60_000  # the clear expiry column is rounded down to this, then jittered
# Sealed rows are padded so the blob is one of these sizes (sender buckets + room for the row's
# own fields), or a multiple of the last step beyond them: the size links nothing.
ROW_BUCKETS = (1024 + 256, 4096 + 256, 16384 + 256, 65536 + 256)
ROW_STEP = 65536
SEAL_OVERHEAD = 40  # XSalsa20-Poly1305 nonce + tag
ORD_START = 1 << 61  # a mailbox's first order key is random below this ...
ORD_STEP = 1 << 24  # ... and each next one is higher by a random step below this (room for
# about 10**11 rows per mailbox or destination before 2**63)

# index hash purposes (BLAKE2b personalisation): one per column, so no two columns share values
ENV_ID, ENV_MB, OBX_ID, OBX_MB, OBX_DEST = b"env-id", b"env-mb", b"obx-id", b"obx-mb", b"obx-dest"


def pad(payload: bytes) -> bytes:
    """``payload`` with its length in front, zero-padded so the sealed blob fills a bucket."""
    need = len(payload) + 4 + SEAL_OVERHEAD
    size = next((b for b in ROW_BUCKETS if need <= b), -(-need // ROW_STEP) * ROW_STEP)
    return len(payload).to_bytes(4, "big") + payload + bytes(size - need)


def record(env: Envelope, dest: str | None) -> bytes:
    """The sealed plaintext of one row: everything about it, padded."""
    payload: bytes = msgpack.packb([env.id, env.to, env.expires, env.body, dest], use_bin_type=True)
    return pad(payload)


def unrecord(plain: bytes) -> tuple[Envelope, str | None]:
    """The envelope (and outbox destination, else None) of an opened row."""
    n = int.from_bytes(plain[:4], "big")
    eid, to, expires, body, dest = msgpack.unpackb(plain[4 : 4 + n], raw=False)
    return Envelope(bytes(eid), bytes(to), int(expires), bytes(body)), dest


def coarse_expiry(expires: int, rand: int) -> int:
    """The clear expiry: a lower bound of the exact one, unequal across the rows of a send
    (``rand``: a random 32-bit number)."""
    return (expires // EXPIRY_GRAIN_MS) * EXPIRY_GRAIN_MS - rand % EXPIRY_GRAIN_MS


def random_words(n: int) -> list[int]:
    """``n`` random 32-bit numbers from one CSPRNG read (one syscall per batch, not per row)."""
    raw = os.urandom(4 * n)
    return [int.from_bytes(raw[i : i + 4], "big") for i in range(0, 4 * n, 4)]


def hashes(keys: EpochKeys, purpose: bytes, value: bytes) -> dict[bytes, int]:
    """``value``'s index hash under every live key -> that key."""
    return {keys.index(k, purpose, value): k for k in keys.ids}


def next_ord(floor: int, low: int, rand: int) -> int:
    """The order key after ``floor`` (and above ``low``): one random step up."""
    return max(floor, low) + 1 + rand % ORD_STEP


def resealed_values(
    keys: EpochKeys,
    table: str,
    plain: bytes,
    new: int,
    dest: str | None,
) -> tuple[tuple[bytes, ...], bytes, str | None]:
    """An opened row re-sealed under key ``new``: its new index hashes (``(idh, mbh)`` for an
    envelope, ``(idh, dh, mbh)`` for an outbox row), the new blob, and the outbox destination
    (``dest`` if given: a renamed peer). ``table`` is ``"envelopes"`` or ``"outbox"``."""
    ix = keys.index
    env, old_dest = unrecord(plain)
    if table == "envelopes":
        return (
            (ix(new, ENV_ID, env.id), ix(new, ENV_MB, env.to)),
            keys.seal(new, record(env, None)),
            None,
        )
    d = dest if dest is not None else str(old_dest)
    values = (ix(new, OBX_ID, env.id), ix(new, OBX_DEST, d.encode()), ix(new, OBX_MB, env.to))
    return values, keys.seal(new, record(env, d)), d


def plan_reseal(
    keys: EpochKeys,
    table: str,
    rows: list[tuple[Any, bytes]],
    target: int | None,
    dest: str | None,
) -> tuple[list[tuple[Any, tuple[bytes, ...], bytes, str | None]], list[Any]]:
    """``(row key, sealed)`` pairs -> the rows to rewrite ``(row key, new hashes, new blob,
    destination)`` under ``target`` (None: each under its own key) and the row keys no live key
    opens (never readable again: to delete). Rows already under ``target`` are left alone
    unless ``dest`` renames them."""
    prefer = None if target is None else [k for k in keys.ids if k != target]
    updates, dead = [], []
    for key, sealed in rows:
        got = keys.try_open(bytes(sealed), prefer)
        if got is None:
            dead.append(key)
            continue
        kid, plain = got
        new = kid if target is None else target
        if new == kid and dest is None:
            continue
        values, blob, d = resealed_values(keys, table, plain, new, dest)
        updates.append((key, values, blob, d))
    return updates, dead


class PagedReads:
    """The store calls that are one page read, the same on every backend; a backend provides
    :meth:`_page` (one page of a table by index hash, ``ord > after``) and ``outbox_page``."""

    async def _page(
        self, table: str, column: str, purpose: bytes, value: bytes, after: int, limit: int
    ) -> list[tuple[int, Envelope]]:
        raise NotImplementedError

    async def outbox_page(
        self, dest: str, after_seq: int, limit: int
    ) -> list[tuple[int, Envelope]]:
        raise NotImplementedError

    async def pending_page(
        self, mailbox: bytes, after_seq: int, limit: int
    ) -> list[tuple[int, Envelope]]:
        """Up to ``limit`` envelopes of ``mailbox`` with ``seq > after_seq``, oldest first."""
        return await self._page("envelopes", "mbh", ENV_MB, mailbox, after_seq, limit)

    async def pending_for(self, mailbox: bytes, limit: int) -> list[Envelope]:
        """The oldest ``limit`` envelopes of ``mailbox``."""
        return [e for _, e in await self.pending_page(mailbox, 0, limit)]

    async def outbox_batch(self, dest: str, limit: int) -> list[Envelope]:
        """The first ``limit`` outbox rows for ``dest``."""
        return [e for _, e in await self.outbox_page(dest, 0, limit)]
