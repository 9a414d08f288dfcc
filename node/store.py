"""The node's narrow storage interface (ARCHITECTURE §4 "Storage").

Everything the node persists goes through :class:`Store`. Envelopes and outbox rows are sealed
at rest by the backend under epoch keys (:mod:`node.atrest`), with nothing linkable left in
clear (docs/operations.md §5 "At rest"); callers see plain :class:`Envelope` values.
Backends: :class:`node.sqlite_store.SqliteStore` (default). One contract suite
(``tests/node/test_store_contract.py``) runs against every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from federation.clock import Clock
from federation.wire import Envelope

DAY_MS = 86_400_000


def day(ms: int) -> int:
    """The start of the UTC day of ``ms``: how times that need no finer grain are stored
    (account creation, a peer's last contact; docs/threat-model.md)."""
    return ms - ms % DAY_MS


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    account: str
    mailbox: bytes
    auth_key: bytes


@dataclass(frozen=True, slots=True)
class PeerRecord:
    node_id: str
    url: str
    host: str
    last_seen: int


@dataclass(frozen=True, slots=True)
class WriteBatch:
    """One group-commit transaction: everything in it commits together or not at all."""

    envelopes: tuple[Envelope, ...] = ()
    outbox: tuple[tuple[str, Envelope], ...] = ()
    delete_envelopes: tuple[bytes, ...] = ()
    delete_outbox: tuple[bytes, ...] = ()


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...

    # accounts, invites, devices
    async def create_account(self, name: str, now: int) -> bool: ...
    async def account_exists(self, name: str) -> bool: ...
    async def remove_account(self, name: str) -> int: ...
    async def add_invite(
        self, token_hash: bytes, name: str, expires: int, kind: str = "invite"
    ) -> None: ...
    async def redeem_invite(self, token_hash: bytes, now: int) -> tuple[str, str] | None: ...
    async def devices_of(self, account: str) -> list[bytes]: ...
    async def add_device(self, account: str, mailbox: bytes, auth_key: bytes) -> None: ...
    async def get_device(self, mailbox: bytes) -> DeviceRecord | None: ...
    async def remove_device(self, mailbox: bytes) -> None: ...
    async def set_device_list(
        self, account: str, version: int, blob: bytes, sig: bytes
    ) -> bool: ...
    async def get_device_list(self, account: str) -> tuple[bytes, bytes] | None: ...

    # one-time and fallback keys
    async def add_otks(self, mailbox: bytes, keys: list[tuple[str, str]]) -> int: ...
    async def set_fallback(self, mailbox: bytes, key_id: str, key: str) -> None: ...
    async def claim_otk(self, mailbox: bytes) -> tuple[str, str] | None: ...
    async def count_otks(self, mailbox: bytes) -> int: ...

    # envelopes and outbox
    async def write(self, batch: WriteBatch, now: int) -> None: ...
    async def existing_ids(self, ids: list[bytes]) -> set[bytes]: ...
    async def pending_for(self, mailbox: bytes, limit: int) -> list[Envelope]: ...
    async def outbox_batch(self, dest: str, limit: int) -> list[Envelope]: ...
    async def pending_page(
        self, mailbox: bytes, after_seq: int, limit: int
    ) -> list[tuple[int, Envelope]]:
        """Up to ``limit`` envelopes of ``mailbox`` with ``seq > after_seq``, oldest first.

        ``seq`` orders one mailbox's rows by arrival (a positive opaque key, unrelated across
        mailboxes); a cursor for streaming a backlog page by page. A new row's seq is above every
        seq handed out for its mailbox by this process; a reader restarts at 0 after a pass.
        """
        ...

    async def outbox_page(
        self, dest: str, after_seq: int, limit: int
    ) -> list[tuple[int, Envelope]]:
        """Up to ``limit`` outbox rows for ``dest`` with ``seq > after_seq``, by seq: arrival
        order per remote mailbox; rows for different mailboxes interleave in an unrelated
        order. A row written later has a seq above every seq returned for ``dest`` so far by
        this process, so a reader resuming after the last row it saw misses nothing."""
        ...

    async def outbox_counts(self) -> dict[str, int]:
        """Queued outbox rows per destination node."""
        ...

    async def outbox_destinations(self) -> list[str]: ...
    async def sweep_expired(self, now: int) -> int: ...
    async def begin(self, clock: Clock) -> int:
        """The node starts serving (the sweeper calls it once): destroy every at-rest key that
        seals nothing, re-seal leftovers whose epoch has passed; from then on :meth:`close`
        re-seals what is pending under a fresh key and destroys every other key. Offline
        commands never call it, so they leave a running node's keys alone."""
        ...

    async def rotate_epochs(self, now: int) -> int:
        """Destroy every key if nothing is pending; else re-seal rows under keys other than
        the current epoch's and destroy those keys. Returns the rows re-sealed."""
        ...

    async def checkpoint(self) -> None: ...

    def set_activity(self, counter: Callable[[], int]) -> None:
        """``counter`` grows with live work (submissions, acks); a re-seal running in the
        background yields to it (:data:`node.sqlite_store.RESEAL_BUSY_SHARE`)."""
        ...

    # peers
    async def get_peer(self, node_id: str) -> PeerRecord | None: ...
    async def peer_by_host(self, host: str) -> PeerRecord | None: ...
    async def upsert_peer(self, peer: PeerRecord) -> None:
        """Pin or update a peer; ``last_seen`` is kept at day granularity."""
        ...

    async def drop_stale_peers(self, before: int, keep: Collection[str] = ()) -> list[str]:
        """Delete pins whose ``last_seen`` is before ``before`` (ms), except those in ``keep``
        (e.g. peers with queued envelopes); returns the node ids dropped."""
        ...

    async def rename_peer(self, old_id: str, new: PeerRecord) -> None: ...

    async def all_mailboxes(self) -> list[bytes]: ...
    async def pending_counts(self) -> dict[bytes, int]: ...
    async def all_peers(self) -> list[PeerRecord]: ...

    # status
    async def counts(self) -> dict[str, int]: ...
