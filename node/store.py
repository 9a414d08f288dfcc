"""The node's narrow storage interface (ARCHITECTURE §4 "Storage").

Everything the node persists goes through :class:`Store`. Envelopes and outbox rows are sealed
at rest by the backend under epoch keys (:mod:`node.atrest`), with nothing linkable left in
clear (docs/operations.md §5 "At rest"); callers see plain :class:`Envelope` values.
Backends: :class:`node.sqlite_store.SqliteStore` (the embedded default: a file in the node home)
and :class:`node.pg_store.PgStore` (PostgreSQL, for organisation nodes; ``store`` in
``node.toml``). Both share the sealed-row code of :mod:`node.sealed_rows`; the epoch keys stay in
the home's key file on either (never in a database). One contract suite
(``tests/node/test_store_contract.py``, with ``tests/node/test_store_accounts.py``) runs against
every backend.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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
class AccountInfo:
    """One account as an operator sees it: counts only, never content or correspondents."""

    name: str
    created: int  # ms, day granularity (as stored)
    disabled: bool
    quota: int  # max pending envelopes per mailbox of this account; 0 = the node's default
    devices: int
    pending: int  # envelopes pending for this account's devices


@dataclass(frozen=True, slots=True)
class InviteInfo:
    """One unexpired invite: ``ref`` (the first 12 hex digits of the token hash) is what
    ``haven node invites revoke`` takes; the token itself is never stored."""

    ref: str
    name: str  # the account it is for
    kind: str  # "invite" | "link"
    expires: int  # ms
    uses_left: int


INVITE_REF_DIGITS = 12  # hex digits of the token hash shown as an invite's ref
MIN_REVOKE_DIGITS = 8  # a revoke names at least this many


def revoke_prefix(ref: str) -> str | None:
    """``ref`` as lowercase hex digits if it can name an invite (8 to 64 hex digits), else
    None: backends match it against the start of the token hash's hex."""
    ref = ref.strip().lower()
    if not MIN_REVOKE_DIGITS <= len(ref) <= 64 or any(c not in "0123456789abcdef" for c in ref):
        return None
    return ref


ACCOUNTS_SQL = (  # the same in both backends' SQL dialects
    "SELECT a.name, a.created, a.disabled, a.quota, "
    "(SELECT count(*) FROM devices d WHERE d.account = a.name) "
    "FROM accounts a ORDER BY a.name"
)


def account_infos(
    rows: Iterable[Sequence[Any]],
    devices: Iterable[Sequence[Any]],
    pending: dict[bytes, int],
) -> list[AccountInfo]:
    """:class:`AccountInfo` rows from ``ACCOUNTS_SQL``'s rows, ``(mailbox, account)`` device
    rows and the pending count per mailbox (both backends)."""
    per_account: dict[str, int] = {}
    for mb, account in devices:
        n = pending.get(bytes(mb), 0)
        if n:
            per_account[str(account)] = per_account.get(str(account), 0) + n
    return [
        AccountInfo(str(n), int(c), bool(d), int(q), int(dv), per_account.get(str(n), 0))
        for n, c, d, q, dv in rows
    ]


def invite_infos(rows: Iterable[Sequence[Any]]) -> list[InviteInfo]:
    """:class:`InviteInfo` rows from ``(token_hash, name, kind, expires, uses)`` rows."""
    return [
        InviteInfo(bytes(h).hex()[:INVITE_REF_DIGITS], str(n), str(k), int(e), int(u))
        for h, n, k, e, u in rows
    ]


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
        self, token_hash: bytes, name: str, expires: int, kind: str = "invite", uses: int = 1
    ) -> None:
        """Store an invite good for ``uses`` redemptions until ``expires`` (ms)."""
        ...

    async def redeem_invite(self, token_hash: bytes, now: int) -> tuple[str, str] | None:
        """Use a token once: ``(account, kind)``, or None if unknown or expired. Decrements
        its uses atomically (two concurrent redemptions of a last use: one wins) and deletes
        the row when none is left."""
        ...

    # operator tools (docs/cli.md "Accounts and invites")
    async def list_accounts(self) -> list[AccountInfo]:
        """Every account, by name, with device and pending counts."""
        ...

    async def account_status(self, name: str) -> str | None:
        """``"active"``, ``"disabled"``, or None for no such account."""
        ...

    async def set_account_disabled(self, name: str, disabled: bool) -> bool:
        """Disable or enable an account; False if there is no such account."""
        ...

    async def set_account_quota(self, name: str, quota: int) -> bool:
        """Max pending envelopes per mailbox of the account (0 = the node's default); False
        if there is no such account."""
        ...

    async def list_invites(self, now: int) -> list[InviteInfo]:
        """Unexpired invites, soonest expiry first."""
        ...

    async def revoke_invite(self, ref: str) -> int:
        """Delete the invites whose token hash starts with the hex digits ``ref`` (at least
        :data:`MIN_REVOKE_DIGITS`; a shorter or non-hex ref matches nothing). Rows removed."""
        ...

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
    async def add_peer_host(self, host: str, node_id: str) -> None:
        """Keep ``host``, a peer's former host, resolving to ``node_id`` in
        :meth:`peer_by_host` (a signed locator change: docs/protocol.md §12.5)."""
        ...

    async def peer_moved_at(self, node_id: str) -> int:
        """``created`` of the last locator change followed for ``node_id``, 0 for none
        (docs/protocol.md §12.5: statements not newer are skipped)."""
        ...

    async def set_peer_moved_at(self, node_id: str, created: int) -> None:
        """Note ``created`` as the last locator change followed for ``node_id`` (never
        lowered; nothing for an unpinned node)."""
        ...

    async def all_mailboxes(self) -> list[bytes]: ...
    async def pending_counts(self) -> dict[bytes, int]: ...
    async def all_peers(self) -> list[PeerRecord]: ...

    # status
    async def counts(self) -> dict[str, int]: ...
