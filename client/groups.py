"""Groups on the device: signed state, Megolm sessions, one upload per message, the "1" counter.

A group lives on its members' devices, not on nodes (docs/protocol.md §11). Its state (name,
members, admins, version) is a chain of changes, each signed by an admin's account identity key
(:mod:`client.group_state`); every member device verifies each change and agrees on the current
state by a total order. Messages are Megolm-encrypted (:mod:`client.megolm`): each member device
has one outbound session per group whose key travels to every other member device over the
existing 1:1 Olm channels (a ``group_key`` payload). The Megolm ciphertext is sealed once under a
fresh key K, with one 48-byte header per recipient device (:mod:`federation.multi`), and
submitted once: the home node fans it out (``send_multi``), or, when it lacks the ``multi``
feature, the device composes each recipient's copy and sends them as ordinary envelopes.

Receiving: a body that is not a sealed box for us is tried as a group copy. A state change is
checked against the chain; a Megolm message is decrypted with the sender device's inbound
session (duplicates dropped, replays and absurd gaps refused) and applied only if the sender is
a current member and the payload names the session's group. A copy whose session key has not
arrived yet waits, sealed, in a bounded table until the ``group_key`` does (keys and messages
travel different paths). Every drop has a stable code, is logged by that code and counted in
:attr:`Groups.drops`; nothing is changed by a dropped copy.

Read receipts are per-reader watermarks (``wm``: sender → sent_at) in one group upload per read;
the counter of every message is computed from them on every member device
(:mod:`client.group_receipts`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from federation import frames as F
from federation.devicelist import DeviceInfo, SignedDeviceList
from federation.errors import (
    HavenError,
    IdentityChanged,
    KeysUnavailable,
    MalformedEnvelope,
    RemoteProtocolError,
    UntrustedKey,
)
from federation.ids import Address, new_envelope_id
from federation.multi import (
    FEATURE,
    INNER_MEGOLM,
    INNER_STATE,
    MAX_RECIPIENTS,
    GroupInner,
    seal_multi,
)
from federation.sealing import SealedContent, seal
from federation.wire import Envelope, packb, unpackb

from . import group_state as gs
from .applying import ReceivedMessage
from .connection import NodeConnection, expect
from .group_receipts import Watermarks, count_unread, watermarks_for
from .group_state import GroupError, GroupState, SignedState, StateBook
from .megolm import Inbound, Outbound
from .payload import Payload
from .state import HistoryRow

if TYPE_CHECKING:
    from .device import Device, SendResult, SendWarning

log = logging.getLogger("haven.groups")

MAX_GROUP_DEVICES = gs.MAX_GROUP_DEVICES  # recipient devices per group (members' and ours)
SEND_CHUNK = 200  # items per ``send`` frame (key shares, the per-device fallback)
SEND_FRAME_BYTES = 3_670_016  # 3.5 MiB: a ``send`` frame stays well under the 4 MiB frame limit
ITEM_OVERHEAD = 96  # bytes a ``send`` item adds to its body and node id (ids, expiry, msgpack)
RETRY_DELAY_S = (0.25, 1.0)  # between rounds of rate-limited key queries (docs/protocol.md §6)
RETRY_STALLS = 3  # rounds in a row without one answer before the rest count as unreachable
RETRY_BUDGET_S = 60.0  # at most this long retrying rate-limited key queries for one call
QUERY_CHUNK = 1000  # addresses per ``query_keys_multi``
FALLBACK_IN_FLIGHT = 16  # ``query_keys`` in flight at once on a home node without ``multi``
# Verified member device lists are reused for LIST_TTL_S by sends and read receipts: asking
# for every member's keys on every message costs ~25 bytes per member on the upload and, on a
# home node without ``multi``, one rate-limited (20/s) query per remote member. Reuse is
# dropped at once after any group state change, when our own device list changed, when a
# group copy or key comes from a device of a member we do not have listed, after a failed
# send, whenever the lists came with warnings, and for one member when it sends a ``devices``
# notice (it linked or removed a device: client/group_link.py). Without the notice (an older
# member device), for up to LIST_TTL_S after a member unlinks (or links) a device, our sends
# may still address it (or miss the new one): docs/protocol.md §11.2, "Reused member lists".
LIST_TTL_S = 60.0
UNKNOWN_KEYS_MAX = 256  # session keys kept for groups we do not know yet (the oldest go first)
PENDING_MAX = 5000  # group copies waiting for their session key (the oldest go first)
DEFAULT_TTL_MS = 7 * 86_400_000
INVITE_TTL_MS = 7 * 86_400_000
# Invites we redeemed whose hand-off has not come yet (docs/protocol.md §11.1, "Joining by
# invite"): one sealed ``kv`` row, at most JOINS_MAX entries (the oldest go first), each kept
# for JOIN_TTL_MS (an invite's default lifetime: the code itself carries no expiry).
JOINS_KEY = "group_joins"
JOINS_MAX = 64
JOIN_TTL_MS = INVITE_TTL_MS
REF_PREFIX = "group:"
RATE_LIMITED = "rate_limited"
UNKNOWN_KEYS = "unknown_group_keys"  # drop code: a key for an unknown group evicted the oldest
NOT_FOUND = "not_found"
NO_SUCH_ACCOUNT = "no_such_account"  # the 1:1 code (Device.fetch_contact)
ref_of = gs.ref_of


def gid_of_ref(ref: str) -> bytes | None:
    """The group id in ``group:<hex>`` (None if ``ref`` is not one)."""
    if not ref.startswith(REF_PREFIX):
        return None
    try:
        gid = bytes.fromhex(ref[len(REF_PREFIX) :])
    except ValueError:
        return None
    return gid if len(gid) == gs.GID_LEN else None


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """A group as this device knows it (its current state)."""

    gid: bytes
    name: str
    members: tuple[str, ...]
    admins: tuple[str, ...]
    version: int
    joined_at: int  # ms, when this device learnt it is a member
    active: bool  # False after we left or were removed
    superseded: tuple[dict[str, Any], ...] = ()  # losing changes: {"version", "by", "at", "change"}

    @property
    def ref(self) -> str:
        """``group:<hex>``."""
        return ref_of(self.gid)

    def to_json(self) -> dict[str, Any]:
        """The CLI's ``group info --json`` shape (without ``readers``)."""
        return {
            "group_id": self.gid.hex(),
            "name": self.name,
            "members": list(self.members),
            "admins": list(self.admins),
            "version": self.version,
            "active": self.active,
            "superseded": [dict(s) for s in self.superseded],
        }


@dataclass
class Target:
    """One member's devices a group upload goes to, from its verified (pinned) list."""

    address: str
    node_id: str
    devices: list[DeviceInfo]
    verified: bool
    identity_key: bytes
    list_version: int
    claimed: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class Resolved:
    """The verified device lists of a group's members (and ours), and what went wrong."""

    targets: list[Target] = field(default_factory=list)
    warnings: list[SendWarning] = field(default_factory=list)
    unreachable: set[str] = field(default_factory=set)  # members nothing could reach now
    refused: dict[str, str] = field(default_factory=dict)  # address -> code of a failed claim
    no_account: set[str] = field(default_factory=set)  # addresses whose node has no such account

    def devices(self, only: set[str] | None = None) -> list[tuple[str, DeviceInfo]]:
        """``(node_id, device)`` of every target (or of the addresses in ``only``)."""
        return [
            (t.node_id, d)
            for t in self.targets
            if only is None or t.address in only
            for d in t.devices
        ]


@dataclass
class _Row:
    gid: bytes
    joined_at: int
    active: bool
    rotate: bool
    book: StateBook
    marks: Watermarks
    since: dict[str, int]


def send_chunks(
    items: list[tuple[str, Envelope]],
) -> list[tuple[tuple[str, Envelope], ...]]:
    """``items`` cut into ``send`` frames of at most SEND_CHUNK items and SEND_FRAME_BYTES
    encoded bytes (200 state copies of 64 KiB would be a 13 MB frame, which a node refuses)."""
    out: list[tuple[tuple[str, Envelope], ...]] = []
    cur: list[tuple[str, Envelope]] = []
    size = 0
    for node_id, env in items:
        n = len(env.body) + len(node_id) + ITEM_OVERHEAD
        if cur and (len(cur) >= SEND_CHUNK or size + n > SEND_FRAME_BYTES):
            out.append(tuple(cur))
            cur, size = [], 0
        cur.append((node_id, env))
        size += n
    if cur:
        out.append(tuple(cur))
    return out


def multi_supported(conn: NodeConnection) -> bool:
    """Whether the home node advertised the ``multi`` feature in its challenge."""
    ch = conn.challenge
    return ch is not None and FEATURE in tuple(ch.features or ())


def _warning(code: str, peer: str, text: str) -> SendWarning:
    from .device import SendWarning

    return SendWarning(code, peer, text)


def _check_accepted(ans: F.Accepted) -> None:
    if ans.rejected:
        codes = sorted({c for _, c in ans.rejected})
        raise RemoteProtocolError(f"node refused envelopes: {', '.join(codes)}", code=codes[0])


class Groups:
    """The group half of a :class:`client.device.Device` (which delegates to it)."""

    def __init__(self, dev: Device) -> None:
        self.dev = dev
        self.drops: Counter[str] = Counter()  # dropped group input, by stable code
        self.waited = 0  # copies that had to wait for their session key or group state
        self._after: list[tuple[bytes, str]] = []  # (gid, joiner) to add once a batch is stored
        self._retried: list[ReceivedMessage] = []  # waiting copies a new group's state opened
        self._cache: dict[bytes, _Row] | None = None  # groups loaded during one batch
        # reused verified member lists: member addresses -> (expires, our list's sig, lists)
        self._lists: dict[tuple[str, ...], tuple[float, bytes, Resolved]] = {}
        self._listed: set[str] = set()  # device ids in the reused lists
        self.list_queries = 0  # member key queries made (reused lists ask nothing)
        self.state_jumps = 0  # changes taken without their parent (an admin vouched)
        self.device_notices = 0  # ``devices`` notices applied (a member's device list changed)

    def begin_batch(self) -> None:
        """Keep groups loaded while one delivered batch is stored (one book load per group)."""
        self._cache = {}

    def end_batch(self) -> None:
        """Forget what the batch loaded (another process may change the store next)."""
        self._cache = None

    def forget(self) -> None:
        """A savepoint rolled back: what the batch loaded may be ahead of the store."""
        if self._cache is not None:
            self._cache = {}

    # ---- storage -----------------------------------------------------------------------------

    def _identity_of(self, address: str) -> bytes | None:
        """The pinned account identity key of ``address`` (ours for our own address)."""
        if address == self.dev.address:
            return bytes(self.dev.identity().verify_key)
        c = self.dev.state.contact(address)
        return None if c is None else bytes(c.identity_key)

    def _joins(self, now: int) -> dict[bytes, tuple[str, bytes, int]]:
        """Pending joins, unexpired: gid -> (inviting admin, its pinned identity key, expires)."""
        raw = self.dev.state.get(JOINS_KEY)
        if raw is None:
            return {}
        items = unpackb(raw, max_len=len(raw))
        out = {bytes(g): (str(a), bytes(k), int(e)) for g, a, k, e in items}
        return {g: v for g, v in out.items() if v[2] > now}

    def _save_joins(self, db: Any, joins: dict[bytes, tuple[str, bytes, int]]) -> None:
        keep = sorted(joins.items(), key=lambda kv: kv[1][2])[-JOINS_MAX:]
        self.dev.state.put(db, JOINS_KEY, packb([[g, a, k, e] for g, (a, k, e) in keep]))

    def pending_join(self, gid: bytes) -> tuple[str, bytes] | None:
        """The inviting admin (address, pinned identity key) of an unanswered join, if any."""
        got = self._joins(self.dev.clock.now_ms()).get(gid)
        return None if got is None else (got[0], got[1])

    def _root_allowed(self, signed: SignedState, now: int) -> bool:
        """A root for a group we asked to join (a pending join) must come from the inviting
        admin: signed by the identity key pinned when the join was sent, listing that admin as
        an admin. Without a pending join any valid root is taken (trust on first use)."""
        st = signed.open()
        want = self._joins(now).get(st.gid)
        if want is None:
            return True
        admin, key, _ = want
        if st.by != admin or admin not in st.admins:
            return False
        try:
            signed.verify(key)
        except GroupError:
            return False
        return True

    def _load(self, gid: bytes, db: Any = None) -> _Row | None:
        if self._cache is not None and gid in self._cache:
            return self._cache[gid]
        db = self.dev.state.db if db is None else db
        r = db.execute(
            "SELECT joined_at, active, rotate, book, marks, since FROM groups WHERE gid=?", (gid,)
        ).fetchone()
        if r is None:
            return None
        st = self.dev.state
        raw_since = st.open(r[5])
        since = unpackb(raw_since, max_len=len(raw_since))
        row = _Row(
            gid,
            int(r[0]),
            bool(r[1]),
            bool(r[2]),
            StateBook.load(st.open(r[3])),
            Watermarks.load(st.open(r[4])),
            {str(k): int(v) for k, v in dict(since).items()},
        )
        if self._cache is not None:
            self._cache[gid] = row
        return row

    def _save(self, db: Any, row: _Row) -> None:
        st = self.dev.state
        db.execute(
            "INSERT OR REPLACE INTO groups VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                row.gid,
                row.joined_at,
                int(row.active),
                int(row.rotate),
                st.seal(row.book.dump()),
                st.seal(row.marks.dump()),
                st.seal(packb(row.since)),
            ),
        )

    def _save_marks(self, db: Any, row: _Row) -> None:
        """Only the watermarks changed (a read receipt): the book is not rewritten."""
        db.execute(
            "UPDATE groups SET marks=? WHERE gid=?",
            (self.dev.state.seal(row.marks.dump()), row.gid),
        )

    def _outbound(self, gid: bytes) -> Outbound | None:
        r = self.dev.state.db.execute(
            "SELECT pickle FROM group_outbound WHERE gid=?", (gid,)
        ).fetchone()
        if r is None:
            return None
        return Outbound.from_pickle(r[0], self.dev.state.storage_key)

    def _save_outbound(self, db: Any, gid: bytes, out: Outbound) -> None:
        db.execute(
            "INSERT OR REPLACE INTO group_outbound VALUES (?, ?)",
            (gid, out.pickle(self.dev.state.storage_key)),
        )

    def _inbound(self, db: Any, sender_device: str, sid: str) -> tuple[str, Inbound] | None:
        r = db.execute(
            "SELECT sender, pickle FROM group_inbound WHERE sender_device=? AND session_id=?",
            (sender_device, sid),
        ).fetchone()
        if r is None:
            return None
        return str(r[0]), Inbound.from_pickle(r[1], self.dev.state.storage_key)

    def _save_inbound(self, db: Any, sender: str, inb: Inbound) -> None:
        db.execute(
            "INSERT OR REPLACE INTO group_inbound VALUES (?, ?, ?, ?, ?)",
            (
                inb.sender_device,
                inb.session_id,
                inb.gid,
                sender,
                inb.pickle(self.dev.state.storage_key),
            ),
        )

    # ---- reading state -----------------------------------------------------------------------

    def _info(self, row: _Row) -> GroupInfo | None:
        st = row.book.current
        if st is None:
            return None
        return GroupInfo(
            row.gid,
            st.name,
            tuple(st.members),
            tuple(st.admins),
            st.version,
            row.joined_at,
            row.active and self.dev.address in st.members,
            row.book.superseded(),
        )

    def info(self, gid: bytes) -> GroupInfo | None:
        """What we know of one group (None: not a group of ours)."""
        row = self._load(gid)
        return None if row is None else self._info(row)

    def all(self) -> list[GroupInfo]:
        """Every group this device knows, most recently joined first."""
        rows = self.dev.state.db.execute(
            "SELECT gid FROM groups ORDER BY joined_at DESC, rowid DESC"
        ).fetchall()
        out = [self.info(bytes(r[0])) for r in rows]
        return [g for g in out if g is not None]

    def resolve(self, ref: str) -> bytes:
        """``group:<hex>``, a hex prefix (with or without ``group:``) or a unique name → the
        group id. Raises GroupError ``unknown_group`` or ``ambiguous_group``."""
        groups = self.all()
        gid = gid_of_ref(ref)
        if gid is not None:
            if any(g.gid == gid for g in groups):
                return gid
            raise GroupError("no such group on this device", code=gs.UNKNOWN_GROUP)
        text = ref[len(REF_PREFIX) :] if ref.startswith(REF_PREFIX) else ref
        low = text.lower()
        by_prefix = (
            [g for g in groups if g.gid.hex().startswith(low)]
            if low and all(c in "0123456789abcdef" for c in low)
            else []
        )
        by_name = [g for g in groups if g.name == text]
        found = {g.gid for g in (by_prefix or by_name)}
        if len(found) > 1:
            raise GroupError("more than one group matches; use group:<id>", code=gs.AMBIGUOUS)
        if not found:
            raise GroupError("no such group on this device", code=gs.UNKNOWN_GROUP)
        return found.pop()

    def check_member(self, gid: bytes) -> None:
        """Raise GroupError ``unknown_group`` / ``not_member`` unless we are in the group."""
        self._member_row(gid)

    def _member_row(self, gid: bytes) -> tuple[_Row, GroupState, SignedState]:
        row = self._load(gid)
        if row is None or row.book.current is None or row.book.current_signed is None:
            raise GroupError("no such group on this device", code=gs.UNKNOWN_GROUP)
        if not row.active or self.dev.address not in row.book.current.members:
            raise GroupError("you are not a member of this group", code=gs.NOT_MEMBER)
        return row, row.book.current, row.book.current_signed

    def history(self, gid: bytes) -> list[HistoryRow]:
        """The group's messages, in local order (``peer`` = the group's ref)."""
        return self.dev.history(ref_of(gid))

    # ---- member device resolution ------------------------------------------------------------

    async def _query(
        self, conn: NodeConnection, addresses: list[str], claim: bool
    ) -> dict[str, tuple[str, SignedDeviceList | None, dict[str, tuple[str, str]], str]]:
        """``address -> (node_id, signed list or None, claimed, code)``: one batched query per
        1,000 addresses when the home node has ``multi``, else one query per address (a few
        in flight at once on the one connection)."""
        out: dict[str, tuple[str, SignedDeviceList | None, dict[str, tuple[str, str]], str]] = {}
        if multi_supported(conn):
            for i in range(0, len(addresses), QUERY_CHUNK):
                chunk = tuple(addresses[i : i + QUERY_CHUNK])
                ans = expect(
                    await conn.request(F.QueryKeysMulti(conn.next_rid(), chunk, claim)),
                    F.KeysMulti,
                )
                for addr, node_id, signed, claimed, code in ans.results:
                    out[str(addr)] = (str(node_id), signed, dict(claimed), str(code))
            return out
        # Without ``multi`` the node charges each remote address to ``remotekeys:<account>``
        # (20/s, burst 200): a large group runs it dry. Rate-limited addresses are asked again
        # in rounds 0.25-1 s apart while the rounds make progress (bounded: RETRY_STALLS rounds
        # without an answer, RETRY_BUDGET_S in all); what is left keeps ``rate_limited``.
        gate = asyncio.Semaphore(FALLBACK_IN_FLIGHT)
        todo = list(addresses)
        stalls = 0
        deadline = time.monotonic() + RETRY_BUDGET_S

        async def one(addr: str, limited: list[str], answered: list[int]) -> None:
            async with gate:
                if limited:  # the budget is empty: wait for the next round
                    limited.append(addr)
                    return
                try:
                    frame = F.QueryKeys(conn.next_rid(), addr, claim)
                    keys = expect(await conn.request(frame), F.Keys)
                    out[addr] = (keys.node_id, keys.device_list, dict(keys.claimed), "")
                    answered.append(1)
                except RemoteProtocolError as exc:
                    if exc.code == RATE_LIMITED:
                        limited.append(addr)
                    else:  # a remote node's not_found comes back inside keys_unavailable
                        code = NOT_FOUND if f"({NOT_FOUND})" in str(exc) else exc.code
                        out[addr] = ("", None, {}, code)
                        answered.append(1)

        while todo:
            limited: list[str] = []
            answered: list[int] = []
            await asyncio.gather(*(one(a, limited, answered) for a in todo))
            todo = limited
            stalls = 0 if answered else stalls + 1
            if todo and (stalls >= RETRY_STALLS or time.monotonic() >= deadline):
                break
            if todo:
                await asyncio.sleep(random.uniform(*RETRY_DELAY_S))
        for addr in todo:
            out[addr] = ("", None, {}, RATE_LIMITED)
        if todo:
            log.warning("key queries for %d group members stayed rate-limited", len(todo))
        return out

    def forget_lists(self) -> None:
        """Drop the reused member device lists: the next send asks for them again."""
        self._lists.clear()
        self._listed.clear()

    def member_devices_changed(self, address: str) -> None:
        """A member told its group that its device list changed (a ``devices`` notice, §11.6):
        drop the reused lists that include it, so the next send asks for its list again."""
        self.device_notices += 1
        for key in [k for k in self._lists if address in k]:
            del self._lists[key]
        self._listed = {
            d.device_id for _, _, r in self._lists.values() for t in r.targets for d in t.devices
        }

    def seen_device(self, device_id: str) -> None:
        """A group copy or key came from ``device_id``: a device not in the reused lists
        means a member's list changed, so the next send asks again."""
        if self._lists and device_id not in self._listed and device_id != self.dev.curve_key:
            self.forget_lists()

    def _own_mark(self) -> bytes:
        own = self.dev.state.contact(self.dev.address)
        return b"" if own is None else bytes(own.sig)

    async def members_for(self, conn: NodeConnection, members: list[str]) -> Resolved:
        """:meth:`resolve_members`, reusing the lists of the last LIST_TTL_S seconds (see
        LIST_TTL_S for when they are dropped). Each caller gets its own copy (claims and
        warnings are per send)."""
        key = tuple(sorted(set(members) | {self.dev.address}))
        hit = self._lists.get(key)
        now = time.monotonic()
        if hit is not None and hit[0] > now and hit[1] == self._own_mark():
            return Resolved(
                [replace(t, devices=list(t.devices), claimed={}) for t in hit[2].targets]
            )
        res = await self.resolve_members(conn, members)
        if self._remember(members, res):
            res = Resolved([replace(t, devices=list(t.devices), claimed={}) for t in res.targets])
        return res

    def _remember(self, members: list[str] | tuple[str, ...], res: Resolved) -> bool:
        """Keep freshly verified lists of ``members`` (and ours) for reuse; not when they came
        with warnings. Returns whether they were kept."""
        key = tuple(sorted(set(members) | {self.dev.address}))
        if res.warnings or res.unreachable:
            self._lists.pop(key, None)
            return False
        targets = [t for t in res.targets if t.address in key]
        self._lists[key] = (time.monotonic() + LIST_TTL_S, self._own_mark(), Resolved(targets))
        self._listed.update(d.device_id for t in targets for d in t.devices)
        return True

    async def resolve_members(self, conn: NodeConnection, members: list[str]) -> Resolved:
        """Every member's verified device list (and ours, for our other devices), verified
        and pinned as :meth:`Device.fetch_contact` pins one, in one transaction. A changed
        identity key skips that member with a warning (never sent to an unverified list); a
        list that does not verify or cannot be fetched falls back to the pinned one.

        Raises GroupError ``group_too_large`` above :data:`MAX_GROUP_DEVICES` devices.
        """
        me = self.dev.address
        addrs = sorted(set(members) | {me})
        res = Resolved()
        self.list_queries += 1
        answers = await self._query(conn, addrs, False)
        with self.dev.state.tx() as db:
            for addr in addrs:
                node_id, signed, _, code = answers.get(addr, ("", None, {}, "keys_unavailable"))
                t = self._pin(db, addr, node_id, signed, code, res)
                if t is not None:
                    res.targets.append(t)
        total = sum(len(t.devices) for t in res.targets)
        if total > MAX_GROUP_DEVICES:
            raise GroupError(f"more than {MAX_GROUP_DEVICES} member devices", code=gs.TOO_LARGE)
        return res

    def _pin(
        self,
        db: Any,
        addr: str,
        node_id: str,
        signed: SignedDeviceList | None,
        code: str,
        res: Resolved,
    ) -> Target | None:
        dev = self.dev
        known = dev.state.contact(addr)
        if signed is None and code == NOT_FOUND:
            res.no_account.add(addr)
        try:
            if signed is None:
                raise KeysUnavailable(f"keys for {addr} unavailable ({code or 'none'})")
            contact, dl = dev.pin_list(addr, node_id, signed, db=db)
        except IdentityChanged:
            res.warnings.append(
                _warning(
                    "identity_changed",
                    addr,
                    f"the identity key of {addr} changed; nothing goes to them until you "
                    f"check the safety number (`haven verify {addr} --accept-new-key`)",
                )
            )
            log.warning("a group member's identity key changed; skipped")
            return None
        except (KeysUnavailable, UntrustedKey, MalformedEnvelope) as exc:
            if known is None:
                res.warnings.append(
                    _warning("keys_unavailable", addr, f"no verified keys for {addr}; skipped")
                )
                res.unreachable.add(addr)
                log.warning("no keys for a group member (%s)", exc.code)
                return None
            dl = SignedDeviceList(known.device_list, known.sig).open(expected_address=addr)
            contact = known
            res.warnings.append(
                _warning(
                    "device_list_stale",
                    addr,
                    f"the keys of {addr} could not be checked now; used the last verified list",
                )
            )
        devices = [d for d in dl.devices if d.device_id != dev.curve_key]
        return Target(
            addr,
            contact.node_id,
            devices,
            addr == dev.address or contact.verified,
            dl.identity_key,
            dl.version,
        )

    async def _claim(self, conn: NodeConnection, res: Resolved, need: set[str]) -> None:
        """One-time keys for the devices in ``need`` that have no Olm session with us yet."""
        state = self.dev.state
        lacking = [
            t
            for t in res.targets
            if any(d.device_id in need and not state.has_session(d.device_id) for d in t.devices)
        ]
        if not lacking:
            return
        answers = await self._query(conn, [t.address for t in lacking], True)
        for t in lacking:
            _, signed, claimed, code = answers.get(t.address, ("", None, {}, "keys_unavailable"))
            if signed is None:
                res.refused[t.address] = code or "keys_unavailable"
                continue
            try:
                dl = signed.open(expected_address=t.address)
            except HavenError:
                continue
            if dl.version == t.list_version and dl.identity_key == t.identity_key:
                t.claimed = claimed

    # ---- submission ----------------------------------------------------------------------------

    async def submit(
        self,
        conn: NodeConnection,
        inner: GroupInner,
        devices: list[tuple[str, DeviceInfo]],
        ttl_ms: int = DEFAULT_TTL_MS,
    ) -> int:
        """Seal ``inner`` once for all ``devices`` and submit it: ``send_multi`` grouped by node
        when the home node has ``multi``, else one composed envelope per device in ``send``
        frames. Returns the number of envelopes."""
        if not devices:
            return 0
        sealed = seal_multi(inner, [d.sealing for _, d in devices])
        expires = self.dev.clock.now_ms() + ttl_ms
        ids = [new_envelope_id() for _ in devices]
        if multi_supported(conn):
            for start in range(0, len(devices), MAX_RECIPIENTS):
                by_node: dict[str, list[tuple[bytes, bytes, bytes]]] = {}
                for i in range(start, min(start + MAX_RECIPIENTS, len(devices))):
                    node_id, d = devices[i]
                    by_node.setdefault(node_id, []).append((ids[i], d.mailbox, sealed.headers[i]))
                dests = tuple((n, tuple(r)) for n, r in by_node.items())
                frame = F.SendMulti(conn.next_rid(), sealed.eph, expires, sealed.gbody, dests)
                _check_accepted(expect(await conn.request(frame), F.Accepted))
            return len(devices)
        items = [
            (node_id, Envelope(ids[i], d.mailbox, expires, sealed.copy_for(i)))
            for i, (node_id, d) in enumerate(devices)
        ]
        await self._send_items(conn, items)
        return len(items)

    async def _send_items(self, conn: NodeConnection, items: list[tuple[str, Envelope]]) -> None:
        for chunk in send_chunks(items):
            _check_accepted(expect(await conn.request(F.Send(conn.next_rid(), chunk)), F.Accepted))

    # ---- key distribution ------------------------------------------------------------------

    def _share_key(
        self, db: Any, gid: bytes, out: Outbound, res: Resolved, need: set[str], now: int
    ) -> list[tuple[str, Envelope]]:
        """``group_key`` payloads (1:1 Olm, the per-device path) for the devices in ``need``,
        encrypted inside ``db`` (their Olm sessions commit with it); the caller sends them."""
        dev = self.dev
        gkey = packb({"g": gid, "s": out.session_id, "k": out.session_key()})
        items: list[tuple[str, Envelope]] = []
        for t in res.targets:
            data = Payload(os.urandom(16), "group_key", t.address, now, gkey=gkey).encode()
            for d in t.devices:
                if d.device_id not in need:
                    continue
                olm = dev._encrypt_for(db, d, t.claimed.get(d.device_id), data, now)
                if olm is None and t.address in res.refused:  # the claim itself failed
                    res.unreachable.add(t.address)
                    continue
                if olm is None:
                    res.warnings.append(
                        _warning(
                            "no_keys_left",
                            t.address,
                            f"a device of {t.address} has no keys left; it cannot read this "
                            "group until it comes online",
                        )
                    )
                    continue
                body = seal(d.sealing, SealedContent(dev.address, dev.curve_key, *olm))
                env = Envelope(new_envelope_id(), d.mailbox, now + DEFAULT_TTL_MS, body)
                items.append((t.node_id, env))
                out.mark_shared([d.device_id])
        return items

    # ---- sending -----------------------------------------------------------------------------

    async def send_payload(
        self,
        gid: bytes,
        payload: Payload,
        *,
        conn: NodeConnection | None = None,
        ttl_ms: int = DEFAULT_TTL_MS,
        record: str | None = None,
        only_own: bool = False,
    ) -> SendResult:
        """Megolm-encrypt ``payload`` (``to`` = the group) and submit it once to every current
        member device (or, ``only_own``, only to our other devices), after sharing our session
        key with the devices that lack it. A new session first when members or devices were
        removed since the key was shared, or after ROTATE_MESSAGES / ROTATE_MS. Durable first:
        the session, the key shares' Olm sessions and the history row commit before any
        ciphertext leaves."""
        from .device import SendResult

        if conn is None:
            c = await self.dev.connect()
            try:
                return await self.send_payload(
                    gid, payload, conn=c, ttl_ms=ttl_ms, record=record, only_own=only_own
                )
            finally:
                await self.dev.release(c)
        row, st, _ = self._member_row(gid)
        me = self.dev.address
        res = await self.members_for(conn, [me] if only_own else list(st.members))
        now = self.dev.clock.now_ms()
        member_devs = {d.device_id for _, d in res.devices()}
        out = self._outbound(gid)
        if (
            out is None
            or row.rotate
            or out.needs_rotation(now)
            or (not only_own and bool(out.shared_with - member_devs))
        ):
            out = Outbound.new(now)  # the others get its key, from then on, with the next send
        need = set(out.missing(member_devs))
        if need:
            await self._claim(conn, res, need)
        counts = _counts(res)
        with self.dev.state.tx() as db:
            key_items = self._share_key(db, gid, out, res, need, now)
            message = out.encrypt(payload.encode())
            self._save_outbound(db, gid, out)
            if not only_own:
                db.execute("UPDATE groups SET rotate=0 WHERE gid=?", (gid,))
            if record is not None:
                others = {a: v for a, v in counts.items() if a != me}
                self.dev.state.add_history(
                    db,
                    HistoryRow(
                        payload.id,
                        ref_of(gid),
                        True,
                        me,
                        record,
                        payload.sent_at,
                        now,
                        read=True,
                        devices_total=sum(v["total"] for v in others.values()),
                        devices_verified=sum(v["verified"] for v in others.values()),
                        ttl_at=now + ttl_ms,
                    ),
                )
        inner = GroupInner(INNER_MEGOLM, me, self.dev.curve_key, packb([out.session_id, message]))
        try:
            if key_items:
                await self._send_items(conn, key_items)
            n = await self.submit(conn, inner, res.devices(), ttl_ms)
        except HavenError:
            self.forget_lists()
            if record is not None:  # not accepted: don't show it as sent
                with self.dev.state.tx() as db:
                    self.dev.state.delete_history(db, payload.id)
            raise
        return SendResult(
            payload.id, counts, n + len(key_items), tuple(_with_unreachable(res, ref_of(gid)))
        )

    async def send_text(
        self,
        gid: bytes,
        text: str,
        *,
        conn: NodeConnection | None = None,
        ttl_ms: int = DEFAULT_TTL_MS,
    ) -> SendResult:
        """Send a text to the group; its history row has ``peer`` = the group's ref."""
        p = Payload(os.urandom(16), "text", ref_of(gid), self.dev.clock.now_ms(), text=text)
        return await self.send_payload(gid, p, conn=conn, ttl_ms=ttl_ms, record=text)

    # ---- state changes -------------------------------------------------------------------------

    async def _publish(
        self, conn: NodeConnection | None, signed: SignedState, before: tuple[str, ...]
    ) -> GroupInfo:
        """Apply our own signed change here, then send it to the old and new members' devices; a
        newcomer gets the book's hand-off (the change and its parent) instead."""
        if conn is None:
            c = await self.dev.connect()
            try:
                return await self._publish(c, signed, before)
            finally:
                await self.dev.release(c)
        st = signed.open()
        now = self.dev.clock.now_ms()
        res = await self.resolve_members(conn, sorted(set(before) | set(st.members)))
        nobody = sorted(res.no_account & (set(st.members) - set(before)))
        if nobody:  # refused before anything is stored or sent
            raise KeysUnavailable(
                f"there is no account {nobody[0]} (its node is reachable; check the name)",
                code=NO_SUCH_ACCOUNT,
            )
        with self.dev.state.tx() as db:
            self._accept(db, signed, now, local=True)
            row = self._load(st.gid, db)
            handoff = row.book.handoff() if row is not None else [signed]
        self._remember(st.members, res)  # asked just now, after the change: the next send's lists
        me, key = self.dev.address, self.dev.curve_key
        newcomers = set(st.members) - set(before) - {me}
        old = {t.address for t in res.targets} - newcomers
        await self.submit(conn, GroupInner(INNER_STATE, me, key, signed.encode()), res.devices(old))
        if newcomers:
            for s in handoff:
                inner = GroupInner(INNER_STATE, me, key, s.encode())
                await self.submit(conn, inner, res.devices(newcomers))
        info = self.info(st.gid)
        if info is None:  # our own change did not apply (cannot happen for a valid change)
            raise GroupError("the change was not applied here", code=gs.STALE)
        return info

    def _accept(
        self, db: Any, signed: SignedState, now: int, *, local: bool = False
    ) -> tuple[gs.AddResult, GroupState | None]:
        """Add a signed change to its group's book (creating the group when it is new to us
        and lists us). Returns the book's verdict and the current state before it."""
        st = signed.open()
        row = self._load(st.gid, db)
        new_group = row is None
        if row is None:
            if not local and self.dev.address not in st.members:
                # a group we are not in (the parent in a newcomer's hand-off): nothing to keep
                return gs.AddResult("ignored"), None
            if not local and not self._root_allowed(signed, now):
                return gs.AddResult("forged", gs.FORGED), None
            prev = None
            row = _Row(st.gid, now, True, False, StateBook(st.gid), Watermarks(), {})
            res = row.book.add(signed, self._identity_of, root=True)
        else:
            prev = row.book.current
            res = row.book.add(signed, self._identity_of)
            if (
                res.outcome == "pending"
                and not row.active
                and self.dev.address in st.members
                and self._root_allowed(signed, now)
            ):
                # added back after a removal: the hand-off starts the book over, as for any
                # newcomer (the changes made while we were out never reached us)
                fresh = StateBook(st.gid)
                again = fresh.add(signed, self._identity_of, root=True)
                if again.ok:
                    row.book, res, prev = fresh, again, None
        if res.outcome == "pending" and not new_group:
            self._save(db, row)  # kept aside in the book until its parent comes
        if not res.ok or row.book.current is None:
            return res, prev
        if res.changed:
            self.forget_lists()
            self._follow(row, prev, row.book.current)
        self._save(db, row)
        if row.active and prev is None:
            self._joined(db, st.gid, now)
        if new_group and not local:  # messages that came before the group's state
            for dev_id, sid in db.execute(
                "SELECT sender_device, session_id FROM group_inbound WHERE gid=?", (st.gid,)
            ).fetchall():
                self._retried += self.retry_pending(db, dev_id, sid, now)
        return res, prev

    def _follow(self, row: _Row, before: GroupState | None, cur: GroupState) -> None:
        """The current state changed from ``before`` to ``cur``: membership, join times,
        rotation after a removal (post-removal secrecy), our own membership."""
        me = self.dev.address
        old = set(before.members) if before is not None else set()
        if before is None:
            for m in cur.members:
                row.since.setdefault(m, cur.at if cur.version == 1 else 0)
        for m in set(cur.members) - old:
            row.since.setdefault(m, cur.at)
        gone = old - set(cur.members)
        for m in gone:
            row.since.pop(m, None)
        if gone:
            row.rotate = True
            row.marks.forget(gone)
        was = row.active
        row.active = me in cur.members
        if row.active and not was:
            row.joined_at = self.dev.clock.now_ms()

    async def create(
        self, name: str, members: list[str], *, conn: NodeConnection | None = None
    ) -> GroupInfo:
        """A new group: us as its only admin, ``members`` (addresses) as the others."""
        for m in members:
            Address.parse(m)
        me = self.dev.address
        st = gs.create(gs.new_gid(), name, members, me, at=self.dev.clock.now_ms())
        return await self._publish(conn, gs.sign_state(st, self.dev.identity()), ())

    async def change(
        self, gid: bytes, *, conn: NodeConnection | None = None, **how: Any
    ) -> GroupInfo:
        """Sign and publish one change of :func:`client.group_state.changed` (``add``,
        ``remove``, ``rename``, ``admin``, ``leave``)."""
        row = self._load(gid)
        if row is None or row.book.current_signed is None or row.book.current is None:
            raise GroupError("no such group on this device", code=gs.UNKNOWN_GROUP)
        if not row.active:
            raise GroupError("you are not a member of this group", code=gs.NOT_MEMBER)
        before = tuple(row.book.current.members)
        new = gs.changed(
            row.book.current_signed, by=self.dev.address, at=self.dev.clock.now_ms(), **how
        )
        return await self._publish(conn, gs.sign_state(new, self.dev.identity()), before)

    # ---- invites -------------------------------------------------------------------------------

    def invite(self, gid: bytes, *, uses: int = 1, ttl_ms: int = INVITE_TTL_MS) -> str:
        """An invite code for the group (admins only): redeemable ``uses`` times until it
        expires. Only a hash of its secret stays here."""
        _, st, _ = self._member_row(gid)
        me = self.dev.address
        if me not in st.admins:
            raise GroupError("only an admin can invite", code=gs.NOT_ADMIN)
        if uses < 1:
            raise GroupError("an invite has at least one use", code=gs.BAD_INVITE)
        secret = os.urandom(gs.INVITE_SECRET_LEN)
        with self.dev.state.tx() as db:
            db.execute(
                "INSERT INTO group_invites VALUES (?, ?, ?, ?)",
                (gs.invite_secret_hash(secret), gid, uses, self.dev.clock.now_ms() + ttl_ms),
            )
        return gs.invite_code(gid, me, secret, st.name)

    async def join(self, code: str, *, conn: NodeConnection | None = None) -> dict[str, Any]:
        """Ask the inviting admin's devices to add us (a 1:1 ``group_join`` payload), and
        remember the request: the group's first state must then come from that admin."""
        inv = gs.parse_invite_code(code)
        gkey = packb({"g": inv.gid, "k": inv.secret})
        now = self.dev.clock.now_ms()
        p = Payload(os.urandom(16), "group_join", inv.admin, now, gkey=gkey)
        await self.dev.send_payload(inv.admin, p, conn=conn, include_self=False)
        key = self._identity_of(inv.admin)  # pinned by send_payload (it fetched the list)
        row = self._load(inv.gid)
        if key is not None and (row is None or not row.active):
            with self.dev.state.tx() as db:
                joins = self._joins(now)
                joins[inv.gid] = (inv.admin, key, now + JOIN_TTL_MS)
                self._save_joins(db, joins)
        return {"group_id": inv.gid.hex(), "name": inv.name, "status": "requested"}

    def _joined(self, db: Any, gid: bytes, now: int) -> None:
        """The group's root was taken: its pending join, if any, is answered."""
        joins = self._joins(now)
        if joins.pop(gid, None) is not None:
            self._save_joins(db, joins)

    # ---- receiving -----------------------------------------------------------------------------

    def drop(self, code: str) -> None:
        """Count and log one dropped piece of group input by its stable code."""
        self.drops[code] += 1
        log.warning("dropped a group message that failed checks (%s)", code)

    async def prepare(self, conn: NodeConnection, inner: GroupInner) -> None:
        """Phase 1 of a batch (may ask the node): pin the identity key of a state's signer
        that is not a contact yet (TOFU, as for any first contact)."""
        if inner.kind != INNER_STATE:
            return
        try:
            by = SignedState.decode(inner.data).open().by
            if self._identity_of(by) is None:
                await self.dev.fetch_contact(conn, by, claim=False)
        except HavenError as exc:
            log.info("a group change's signer is unknown (%s)", exc.code)

    def apply_copy(self, db: Any, inner: GroupInner, now: int) -> list[ReceivedMessage]:
        """Phase 2: apply one opened group copy inside the batch's transaction. Raises
        HavenError (a stable code) to drop it; a copy whose key has not come yet waits."""
        if inner.kind == INNER_STATE:
            self.seen_device(inner.sender_device)
            return self._apply_state(db, inner, now)
        if inner.kind != INNER_MEGOLM:
            log.debug("ignored a group body of a kind this version does not know")
            return []
        try:
            sid, message = unpackb(inner.data, max_len=len(inner.data))
            sid, message = str(sid), bytes(message)
        except (HavenError, TypeError, ValueError) as exc:
            raise MalformedEnvelope("bad group message") from exc
        got = self._inbound(db, inner.sender_device, sid)
        if got is None:
            self._keep(db, inner, sid, now)
            return []
        return self._decrypt(db, inner, got[0], got[1], message, now)

    def _keep(self, db: Any, inner: GroupInner, sid: str, now: int) -> None:
        """A copy whose session key has not arrived yet: kept sealed, bounded, with a TTL."""
        self.waited += 1
        db.execute(
            "INSERT INTO group_pending (sender_device, session_id, data, expires) "
            "VALUES (?, ?, ?, ?)",
            (inner.sender_device, sid, self.dev.state.seal(inner.encode()), now + DEFAULT_TTL_MS),
        )
        db.execute("DELETE FROM group_pending WHERE expires <= ?", (now,))
        (n,) = db.execute("SELECT count(*) FROM group_pending").fetchone()
        if n > PENDING_MAX:
            db.execute(
                "DELETE FROM group_pending WHERE seq IN "
                "(SELECT seq FROM group_pending ORDER BY seq LIMIT ?)",
                (n - PENDING_MAX,),
            )
            self.drop("pending_full")

    def _decrypt(
        self,
        db: Any,
        inner: GroupInner,
        key_sender: str,
        inb: Inbound,
        message: bytes,
        now: int,
    ) -> list[ReceivedMessage]:
        if key_sender != inner.sender:
            raise UntrustedKey("the group session is not the sender's")
        row = self._load(inb.gid, db)
        if row is None or row.book.current is None:  # its state has not come yet: wait
            self._keep(db, inner, inb.session_id, now)
            return []
        plain, _, duplicate = inb.decrypt(message)
        if duplicate:
            return []
        p = Payload.decode(plain)
        ref = ref_of(inb.gid)
        if p.to != ref:
            raise GroupError("a group message for another group", code=gs.UNKNOWN_GROUP)
        if inner.sender not in row.book.current.members:
            raise GroupError("the sender is not a member of this group", code=gs.NOT_MEMBER)
        # only a member's device may make us ask for the lists again (not a non-member's)
        self.seen_device(inner.sender_device)
        self._save_inbound(db, key_sender, inb)  # the seen index, before anything applies
        own = inner.sender == self.dev.address
        if p.kind == "text":
            added = self.dev.state.add_history(
                db,
                HistoryRow(
                    p.id, ref, own, inner.sender, p.text, p.sent_at, now, read=own, ttl_at=None
                ),
            )
            if not added:
                return []
            return [ReceivedMessage(inner.sender, p.text, p.sent_at, p.id, "text", ref, chat=ref)]
        if p.kind == "read":
            hide = True if p.hide else (False if p.wm else None)
            row.marks.update(inner.sender, p.wm, hide=hide)
            if own:
                self._mark_local(db, ref, p.wm)
            self._save_marks(db, row)
            return [ReceivedMessage(inner.sender, "", p.sent_at, p.id, "read", ref, chat=ref)]
        if p.kind == "devices":  # the sender's device list changed (§11.6)
            self.member_devices_changed(inner.sender)
            return []
        log.debug("ignored a group payload of a kind this version does not know")
        return []

    def _mark_local(self, db: Any, ref: str, wm: dict[str, int]) -> None:
        for sender, at in wm.items():
            db.execute(
                "UPDATE history SET read=1 WHERE peer=? AND outgoing=0 AND sender=? AND sent_at<=?",
                (ref, sender, at),
            )

    def _apply_state(self, db: Any, inner: GroupInner, now: int) -> list[ReceivedMessage]:
        signed = SignedState.decode(inner.data)
        st = signed.open()
        self._retried = []
        res, prev = self._accept(db, signed, now)
        retried, self._retried = self._retried, []
        if res.outcome == "unknown_signer":
            raise GroupError("the signer of a group change is unknown", code=gs.FORGED)
        if res.outcome == "ignored":
            return []
        if res.outcome == "pending":
            log.info("a group change waits for its parent (stale_state)")
            return []
        if not res.ok:
            raise GroupError("a group change was refused", code=res.code or gs.MALFORMED)
        if res.outcome == "duplicate":
            return []
        ref = ref_of(st.gid)
        lost = " (superseded)" if res.outcome == "superseded" else ""
        if res.jumped:
            self.state_jumps += 1
            log.info("a group change was taken without the versions before it (state_jump)")
        out: list[ReceivedMessage] = []
        for i, s in enumerate(res.accepted):
            # a jump's parent never came: it is told against the state we had before
            parent = prev if res.jumped and i == 0 else _parent_state(db, self, s)
            out.append(
                ReceivedMessage(
                    s.by,
                    gs.describe(parent, s) + lost,
                    s.at,
                    gs.state_digest(s.blob())[:16],
                    "group_state",
                    ref,
                    chat=ref,
                )
            )
        return out + retried

    def apply_key(
        self,
        db: Any,
        sender: str,
        sender_device: str,
        p: Payload,
        now: int,
    ) -> list[ReceivedMessage]:
        """A ``group_key`` (1:1 Olm, from ``sender_device`` of ``sender``): store the inbound
        session, then open the copies that were waiting for it. A key is bound to the Olm
        sender device that brought it; a message is accepted only from a current member."""
        try:
            obj = unpackb(p.gkey, max_len=len(p.gkey))
            gid, sid, key = bytes(obj["g"]), str(obj["s"]), str(obj["k"])
        except (HavenError, KeyError, TypeError, ValueError) as exc:
            raise MalformedEnvelope("bad group key") from exc
        # Kept even before the group's state arrives (keys, states and messages travel
        # different paths); in a group we know, only from a current member. Membership is
        # checked again per message.
        row = self._load(gid, db)
        if row is not None and row.book.current is not None:
            if sender not in row.book.current.members:
                raise GroupError("a group key from a non-member", code=gs.NOT_MEMBER)
            self.seen_device(sender_device)
        inb = Inbound.from_key(key, sender_device=sender_device, gid=gid)
        if inb.session_id != sid:
            raise MalformedEnvelope("the group key does not match its session id")
        if self._inbound(db, sender_device, sid) is None:
            self._save_inbound(db, sender, inb)
            if row is None:
                self._bound_unknown_keys(db)
        return self.retry_pending(db, sender_device, sid, now)

    def _bound_unknown_keys(self, db: Any) -> None:
        """Keys for groups we do not know (their state may still be on its way) are kept, but
        at most UNKNOWN_KEYS_MAX of them: anyone with an Olm session with us could otherwise
        fill the store with keys for random group ids. Beyond it the oldest go, counted
        ``unknown_group_keys``."""
        unknown = "FROM group_inbound WHERE gid NOT IN (SELECT gid FROM groups)"
        (n,) = db.execute(f"SELECT count(*) {unknown}").fetchone()
        if n > UNKNOWN_KEYS_MAX:
            db.execute(
                f"DELETE FROM group_inbound WHERE rowid IN (SELECT rowid {unknown} "
                "ORDER BY rowid LIMIT ?)",
                (n - UNKNOWN_KEYS_MAX,),
            )
            self.drop(UNKNOWN_KEYS)

    def retry_pending(
        self, db: Any, sender_device: str, sid: str, now: int
    ) -> list[ReceivedMessage]:
        """Open the waiting copies of one session, each in its own savepoint."""
        rows = db.execute(
            "SELECT seq, data, expires FROM group_pending WHERE sender_device=? AND "
            "session_id=? ORDER BY seq",
            (sender_device, sid),
        ).fetchall()
        out: list[ReceivedMessage] = []
        for seq, data, expires in rows:
            db.execute("DELETE FROM group_pending WHERE seq=?", (seq,))
            if expires <= now:
                continue
            db.execute("SAVEPOINT pending_copy")
            try:
                inner = GroupInner.decode(self.dev.state.open(data))
                out += self.apply_copy(db, inner, now)
            except HavenError as exc:
                db.execute("ROLLBACK TO pending_copy")
                self.forget()
                db.execute("DELETE FROM group_pending WHERE seq=?", (seq,))
                self.drop(exc.code)
            db.execute("RELEASE pending_copy")
        return out

    def apply_join(self, db: Any, sender: str, p: Payload, now: int) -> None:
        """A ``group_join`` to us, an admin: with a live invite secret, consume one use and
        add the joiner once the batch is stored."""
        try:
            obj = unpackb(p.gkey, max_len=len(p.gkey))
            gid, secret = bytes(obj["g"]), bytes(obj["k"])
        except (HavenError, KeyError, TypeError, ValueError) as exc:
            raise MalformedEnvelope("bad group join") from exc
        h = gs.invite_secret_hash(secret)
        r = db.execute(
            "SELECT uses, expires FROM group_invites WHERE hash=? AND gid=?", (h, gid)
        ).fetchone()
        if r is None or r[1] <= now or r[0] < 1:
            raise GroupError("no such invite, or it expired", code=gs.BAD_INVITE)
        if r[0] <= 1:
            db.execute("DELETE FROM group_invites WHERE hash=?", (h,))
        else:
            db.execute("UPDATE group_invites SET uses=uses-1 WHERE hash=?", (h,))
        self._after.append((gid, sender))

    async def after_batch(self, conn: NodeConnection) -> None:
        """Changes a stored batch asked for: add the joiners whose invite was valid."""
        todo, self._after = self._after, []
        for gid, joiner in todo:
            info = self.info(gid)
            if info is None or joiner in info.members:
                continue
            try:
                await self.change(gid, conn=conn, add=[joiner])
            except HavenError as exc:
                log.warning("an invited member was not added (%s)", exc.code)

    # ---- receipts and the counter --------------------------------------------------------------

    async def mark_read(self, gid: bytes, *, conn: NodeConnection | None = None) -> int:
        """Mark the group read here and send one watermark upload (``read`` with ``wm``): to
        every member, or, with read receipts off, ``hide`` once to every member and the
        watermarks only to our own devices. Returns how many rows became read."""
        ref = ref_of(gid)
        me = self.dev.address
        rows = self.dev.state.history(ref)
        unread = [r.msg_id for r in rows if not r.outgoing and not r.read]
        if not unread:
            return 0
        wm = watermarks_for((r.sender, r.sent_at) for r in rows if not r.outgoing)
        receipts = self.dev.setting("read_receipts", "on") == "on"
        with self.dev.state.tx() as db:
            db.executemany("UPDATE history SET read=1 WHERE msg_id=?", [(m,) for m in unread])
            row = self._load(gid, db)
            if row is not None:
                row.marks.update(me, wm, hide=not receipts)
                self._save_marks(db, row)
        now = self.dev.clock.now_ms()
        if receipts:
            p = Payload(os.urandom(16), "read", ref, now, wm=wm)
            await self.send_payload(gid, p, conn=conn)
            self.dev.set_setting(f"group_hide:{gid.hex()}", "0")
        else:
            if self.dev.setting(f"group_hide:{gid.hex()}", "0") != "1":
                hide = Payload(os.urandom(16), "read", ref, now, hide=True)
                await self.send_payload(gid, hide, conn=conn)
                self.dev.set_setting(f"group_hide:{gid.hex()}", "1")
            p = Payload(os.urandom(16), "read", ref, now, wm=wm, hide=True)
            await self.send_payload(gid, p, conn=conn, only_own=True)
        return len(unread)

    def counts(self, gid: bytes) -> dict[bytes, tuple[tuple[str, ...], int]]:
        """``msg_id -> (unread_members, receipts_hidden)`` for every message of the group.
        Reads only each row's id, sender and sent_at: no message text is opened."""
        row = self._load(gid)
        if row is None or row.book.current is None:
            raise GroupError("no such group on this device", code=gs.UNKNOWN_GROUP)
        members = row.book.current.members
        out: dict[bytes, tuple[tuple[str, ...], int]] = {}
        for msg_id, sender, sent_at in self.dev.state.history_keys(ref_of(gid)):
            u = count_unread(sender, sent_at, members, row.marks, row.since)
            out[msg_id] = (u.unread_members, u.receipts_hidden)
        return out

    async def readers(
        self, gid: bytes, *, conn: NodeConnection | None = None
    ) -> list[dict[str, Any]]:
        """ "Who can read this": every member device a message to the group is encrypted to,
        whether its account is verified, and ``changed`` when its device list or identity key
        changed since it was verified."""
        if conn is None:
            c = await self.dev.connect()
            try:
                return await self.readers(gid, conn=c)
            finally:
                await self.dev.release(c)
        _, st, _ = self._member_row(gid)
        res = await self.resolve_members(conn, list(st.members))
        out: list[dict[str, Any]] = []
        for t in res.targets:
            mark = self.dev.state.get("verified_list:" + t.address)
            changed = mark is not None and mark != t.identity_key + str(t.list_version).encode()
            for d in t.devices:
                out.append(
                    {
                        "address": t.address,
                        "device_id": d.device_id,
                        "verified": t.verified,
                        "changed": changed,
                    }
                )
        return out


def _parent_of(row: _Row, state: GroupState) -> GroupState | None:
    return row.book.get(state.parent) if state.parent else None


def _parent_state(db: Any, groups: Groups, state: GroupState) -> GroupState | None:
    row = groups._load(state.gid, db)
    return None if row is None else _parent_of(row, state)


def _with_unreachable(res: Resolved, ref: str) -> list[SendWarning]:
    """The send's warnings, plus one ``members_unreachable`` with the count of members (or
    devices of members) nothing reached now: never a silent drop. Their devices get the
    session key on a later send (it is shared with every device that lacks it)."""
    if not res.unreachable:
        return list(res.warnings)
    n = len(res.unreachable)
    codes = sorted(set(res.refused.values())) or ["keys_unavailable"]
    text = (
        f"{n} member{'s' if n != 1 else ''} could not be reached now ({', '.join(codes)}): "
        "a later send tries again"
    )
    return [*res.warnings, _warning("members_unreachable", ref, text)]


def _counts(res: Resolved) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for t in res.targets:
        n = len(t.devices)
        out[t.address] = {"total": n, "verified": n if t.verified else 0}
    return out
