"""Signed group state: who is in a group, who administers it, and how concurrent changes converge
(docs/protocol.md §11.1).

A group lives on its members' devices, not on nodes. Each change is a :class:`GroupState` with a
version one above its parent's, signed by the account identity key of the admin who made it
(:class:`SignedState`). Every member device checks each change against its parent before
believing it, and keeps the valid ones in a :class:`StateBook`:

- version 1 (a creation) is valid when its signer is one of its admins and the signature checks;
- version n+1 is valid when its parent (named by the BLAKE2b-256 digest of the parent's blob) is
  a valid state of version n, the signer is an admin in the parent (or a member signing only its
  own departure) and the signature checks under the signer's pinned identity key.

Two admins may change the same version concurrently; both changes are valid. The **current**
state is the valid one with the greatest ``(version, identity key of the signer)`` (then the
digest, for two devices of one admin), so every device that holds the same changes picks the
same state whatever order they arrived in. Valid states off the current state's chain are shown
as *superseded*. A change whose parent has not arrived yet is kept aside (``stale_state``) and
tried again when the parent comes.

This module is pure: bytes and values in, values out. Time comes in as arguments.
"""

from __future__ import annotations

import hashlib
import itertools
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import nacl.signing

from federation.errors import HavenError, MalformedEnvelope, MalformedFrame
from federation.signing import b64d, b64e, verify_detached
from federation.wire import packb, unpackb

STATE_TAG = b"haven-group-v1\x00"
STATE_VERSION = 1
GID_LEN = 16
DIGEST_LEN = 32
NAME_MAX = 64  # characters
MAX_ADDRESS = 300
MAX_MEMBERS = 1000
MAX_GROUP_DEVICES = 2000  # recipient devices of one group message
# A signed state must fit, with the group-body framing, in one 64 KiB group copy
# (federation/multi.py MAX_GBODY): 63 KiB of blob leaves room for the signature and the inner.
MAX_STATE_BYTES = 63 * 1024
MAX_SIGNED_BYTES = MAX_STATE_BYTES + 128
MAX_PENDING = 64  # changes kept aside per group while their parent is missing
KEEP_VERSIONS = 8  # valid states kept below the current version (older ones cannot win;
# a 1,000-member state is ~28 KiB, and the book is stored whole)
MAX_SUPERSEDED_SHOWN = 20
INVITE_PREFIX = "haven:group:"
INVITE_SECRET_LEN = 32
MAX_INVITE_TEXT = 1024

# Stable codes (docs/cli.md lists the ones users can see).
FORGED = "forged_state"
UNKNOWN_GROUP = "unknown_group"
STALE = "stale_state"
TOO_MANY = "too_many_members"
TOO_LARGE = "group_too_large"
NOT_MEMBER = "not_member"
NOT_ADMIN = "not_admin"
AMBIGUOUS = "ambiguous_group"
BAD_INVITE = "invalid_group_invite"
MALFORMED = "malformed"


class GroupError(HavenError):
    """A group operation or a received group change was refused; ``code`` says why.

    Codes: ``forged_state``, ``unknown_group``, ``stale_state``, ``too_many_members``,
    ``group_too_large``, ``not_member``, ``not_admin``, ``ambiguous_group``, ``megolm_replay``,
    ``megolm_gap``, ``undecryptable``, ``invalid_group_invite``, ``malformed``, and for local
    commands ``no_change``, ``last_admin``, ``invalid_name``, ``bad_argument``.
    """

    code = "group_error"


def state_digest(blob: bytes) -> bytes:
    """The name of a state as a parent: BLAKE2b-256 of its blob."""
    return hashlib.blake2b(blob, digest_size=DIGEST_LEN).digest()


def ref_of(gid: bytes) -> str:
    """The text form of a group id: ``group:`` + 32 lowercase hex digits."""
    return "group:" + gid.hex()


def _is_address(a: Any) -> bool:
    return isinstance(a, str) and 3 <= len(a) <= MAX_ADDRESS and a.count("@") == 1


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _strictly_sorted(xs: tuple[str, ...]) -> bool:
    return all(a < b for a, b in itertools.pairwise(xs))


@dataclass(frozen=True, slots=True)
class GroupState:
    """One version of a group: the unsigned content of a :class:`SignedState`."""

    gid: bytes
    version: int
    name: str
    members: tuple[str, ...]
    admins: tuple[str, ...]
    by: str
    parent: bytes
    at: int

    def check(self) -> None:
        """Raise GroupError (``malformed`` / ``too_many_members``) unless well formed."""
        if len(self.members) > MAX_MEMBERS:
            raise GroupError(f"more than {MAX_MEMBERS} members", code=TOO_MANY)
        ok = (
            isinstance(self.gid, bytes)
            and len(self.gid) == GID_LEN
            and _is_int(self.version)
            and self.version >= 1
            and isinstance(self.name, str)
            and len(self.name) <= NAME_MAX
            and all(_is_address(m) for m in self.members)
            and _strictly_sorted(self.members)
            and all(_is_address(a) for a in self.admins)
            and _strictly_sorted(self.admins)
            and set(self.admins) <= set(self.members)
            and (len(self.admins) >= 1 or not self.members)
            and _is_address(self.by)
            and isinstance(self.parent, bytes)
            and len(self.parent) == (0 if self.version == 1 else DIGEST_LEN)
            and _is_int(self.at)
        )
        if not ok:
            raise GroupError("bad group state", code=MALFORMED)

    def blob(self) -> bytes:
        """The signed bytes (docs/protocol.md §11.1)."""
        self.check()
        blob = packb(
            {
                "v": STATE_VERSION,
                "g": self.gid,
                "ver": self.version,
                "name": self.name,
                "members": list(self.members),
                "admins": list(self.admins),
                "by": self.by,
                "parent": self.parent,
                "at": self.at,
            }
        )
        if len(blob) > MAX_STATE_BYTES:
            raise GroupError("group state too large", code=TOO_MANY)
        return blob

    @classmethod
    def from_blob(cls, blob: bytes) -> GroupState:
        """Decode and check a blob; raises GroupError (``malformed`` / ``too_many_members``)."""
        obj = _unpack(blob, MAX_STATE_BYTES, "bad group state")
        keys = {"v", "g", "ver", "name", "members", "admins", "by", "parent", "at"}
        if not isinstance(obj, dict) or set(obj) != keys or obj["v"] != STATE_VERSION:
            raise GroupError("bad group state (unknown version)", code=MALFORMED)
        members, admins = obj["members"], obj["admins"]
        if not isinstance(members, list) or not isinstance(admins, list):
            raise GroupError("bad group state", code=MALFORMED)
        if len(members) > MAX_MEMBERS or len(admins) > MAX_MEMBERS:
            raise GroupError(f"more than {MAX_MEMBERS} members", code=TOO_MANY)
        state = cls(
            obj["g"],
            obj["ver"],
            obj["name"],
            tuple(members),
            tuple(admins),
            obj["by"],
            obj["parent"],
            obj["at"],
        )
        state.check()
        return state

    @property
    def ref(self) -> str:
        return ref_of(self.gid)


def _unpack(raw: bytes, limit: int, what: str) -> Any:
    """msgpack-decode at most ``limit`` bytes; too long is ``too_many_members``, undecodable is
    ``malformed`` (``what`` names it)."""
    if len(raw) > limit:
        raise GroupError("group state too large", code=TOO_MANY)
    try:
        return unpackb(raw, max_len=limit)
    except (MalformedEnvelope, MalformedFrame) as exc:
        raise GroupError(what, code=MALFORMED) from exc


@dataclass(frozen=True, slots=True)
class SignedState:
    """``[blob, signature]``: a group state as it travels and as it is stored."""

    blob: bytes
    sig: bytes

    def encode(self) -> bytes:
        return packb([self.blob, self.sig])

    @classmethod
    def decode(cls, raw: bytes) -> SignedState:
        """Parse the wire form (sizes first). Raises GroupError: malformed, too_many_members."""
        obj = _unpack(raw, MAX_SIGNED_BYTES, "bad signed group state")
        if (
            not isinstance(obj, list)
            or len(obj) != 2
            or not isinstance(obj[0], bytes)
            or not isinstance(obj[1], bytes)
            or len(obj[1]) != 64
        ):
            raise GroupError("bad signed group state", code=MALFORMED)
        return cls(obj[0], obj[1])

    def open(self) -> GroupState:
        """The content, checked for shape only (the signature needs the signer's key: verify)."""
        return GroupState.from_blob(self.blob)

    def verify(self, identity_key: bytes) -> None:
        """Raise GroupError ``forged_state`` unless signed by ``identity_key``."""
        try:
            verify_detached(identity_key, STATE_TAG + self.blob, self.sig)
        except HavenError as exc:
            raise GroupError("group state signature does not verify", code=FORGED) from exc

    @property
    def digest(self) -> bytes:
        return state_digest(self.blob)


def sign_state(state: GroupState, signing_key: nacl.signing.SigningKey) -> SignedState:
    """Sign ``state`` with the account identity key of ``state.by``."""
    blob = state.blob()
    return SignedState(blob, signing_key.sign(STATE_TAG + blob).signature)


# ---- making changes (local commands) ---------------------------------------------------------


def new_gid() -> bytes:
    """A fresh random group id."""
    return os.urandom(GID_LEN)


def _name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > NAME_MAX:
        raise GroupError(f"a group name has 1 to {NAME_MAX} characters", code="invalid_name")
    return name


def _members(addresses: Iterable[str]) -> tuple[str, ...]:
    out = tuple(sorted(set(addresses)))
    for a in out:
        if not _is_address(a):
            raise GroupError(f"not an address: {a!r} (expected name@host)", code="bad_argument")
    if len(out) > MAX_MEMBERS:
        raise GroupError(f"a group has at most {MAX_MEMBERS} members", code=TOO_MANY)
    return out


def create(gid: bytes, name: str, members: Iterable[str], creator: str, *, at: int) -> GroupState:
    """Version 1 of a new group: ``creator`` is its only admin and a member."""
    state = GroupState(
        gid, 1, _name(name), _members([*members, creator]), (creator,), creator, b"", at
    )
    state.check()
    return state


def changed(
    current: SignedState,
    *,
    by: str,
    at: int,
    add: Iterable[str] = (),
    remove: Iterable[str] = (),
    rename: str | None = None,
    admin: tuple[str, bool] | None = None,
    leave: str | None = None,
) -> GroupState:
    """The next version of ``current`` with the given changes, made by ``by``.

    Only admins change a group; the one exception is ``leave=by``: any member may sign its own
    departure (and nothing else). Leaving or removing the last admin makes the first remaining
    member (in address order) an admin, so a group with members always has one.

    Raises GroupError: ``not_admin``, ``not_member``, ``too_many_members``, ``no_change``,
    ``last_admin`` (demoting the only admin), ``invalid_name``.
    """
    parent = current.open()
    members, admins = set(parent.members), set(parent.admins)
    if by not in members:
        raise GroupError("you are not a member of this group", code=NOT_MEMBER)
    is_leave = leave is not None
    if is_leave and (leave != by or add or remove or rename is not None or admin is not None):
        raise GroupError("a member can only sign its own departure", code=NOT_ADMIN)
    if not is_leave and by not in admins:
        raise GroupError("only an admin can change this group", code=NOT_ADMIN)
    name = parent.name if rename is None else _name(rename)
    members |= set(add)
    for a in [*remove, *([leave] if leave else [])]:
        if a not in members:
            raise GroupError(f"{a} is not a member", code=NOT_MEMBER)
        members.discard(a)
        admins.discard(a)
    if admin is not None:
        who, on = admin
        if who not in members:
            raise GroupError(f"{who} is not a member", code=NOT_MEMBER)
        if on:
            admins.add(who)
        elif admins == {who}:
            raise GroupError("the group's only admin cannot be demoted", code="last_admin")
        else:
            admins.discard(who)
    new_members = _members(members)
    if new_members and not admins:
        admins = {new_members[0]}
    new = GroupState(
        parent.gid,
        parent.version + 1,
        name,
        new_members,
        tuple(sorted(admins)),
        by,
        current.digest,
        at,
    )
    if (new.name, new.members, new.admins) == (parent.name, parent.members, parent.admins):
        raise GroupError("nothing to change", code="no_change")
    new.check()
    return new


def describe(parent: GroupState | None, state: GroupState) -> str:
    """A short, plain description of what ``state`` changed (for users; no group name)."""
    if parent is None or state.version == 1:
        return f"{state.by} created the group"
    added = sorted(set(state.members) - set(parent.members))
    removed = sorted(set(parent.members) - set(state.members))
    parts: list[str] = []
    if removed == [state.by] and not added:
        parts.append(f"{state.by} left")
    elif removed:
        parts.append(f"{state.by} removed " + ", ".join(removed))
    if added:
        parts.append(f"{state.by} added " + ", ".join(added))
    if state.name != parent.name:
        parts.append(f"{state.by} renamed the group")
    promoted = sorted(set(state.admins) - set(parent.admins))
    demoted = sorted((set(parent.admins) - set(state.admins)) & set(state.members))
    if promoted:
        parts.append(f"{state.by} made " + ", ".join(promoted) + " admin")
    if demoted:
        parts.append(f"{state.by} took admin from " + ", ".join(demoted))
    return "; ".join(parts) or f"{state.by} changed the group"


# ---- the book of valid states of one group ----------------------------------------------------

IdentityKeyOf = Callable[[str], bytes | None]


@dataclass(frozen=True, slots=True)
class AddResult:
    """What :meth:`StateBook.add` made of one received state.

    ``outcome``: ``current`` (the current state changed: to this one or to a change waiting on
    it), ``superseded`` (valid but outranked), ``duplicate``, ``ancestor`` (the parent of the
    state the book started from: valid, not news; ``accepted`` lists only changes that were
    waiting on it), ``pending`` (parent unknown: kept
    aside, code ``stale_state``), ``old`` (below the kept window: ignored), ``unknown_signer``
    (no pinned identity key for the signer yet: fetch it and add again; ``current`` with
    ``jumped``: a later version whose parent we lack, signed by an admin of our current state,
    accepted as it is), or a refusal with
    ``code``: ``forged`` (``forged_state``), ``stale`` (``stale_state``: version is not
    parent + 1), ``unknown_group``, ``malformed`` / ``too_many_members``.
    """

    outcome: str
    code: str = ""
    current: GroupState | None = None
    changed: bool = False
    accepted: tuple[GroupState, ...] = ()  # states that became valid, in order
    jumped: bool = False  # accepted without its parent: an admin of our current state vouched

    @property
    def ok(self) -> bool:
        return self.outcome in ("current", "superseded", "duplicate", "ancestor")


@dataclass(slots=True)
class _Valid:
    signed: SignedState
    state: GroupState
    by_key: bytes
    digest: bytes = b""

    def __post_init__(self) -> None:
        self.digest = self.signed.digest  # hashed once: a 1,000-member blob is ~25 KiB

    def rank(self) -> tuple[int, bytes, bytes]:
        return (self.state.version, self.by_key, self.digest)


@dataclass(slots=True)
class StateBook:
    """The valid (and pending) states of one group, and which one is current."""

    gid: bytes
    _valid: dict[bytes, _Valid] = field(default_factory=dict)
    _pending: dict[bytes, tuple[SignedState, GroupState]] = field(default_factory=dict)
    _current: bytes = b""

    # ---- reading ----
    @property
    def current(self) -> GroupState | None:
        v = self._valid.get(self._current)
        return v.state if v else None

    @property
    def current_signed(self) -> SignedState | None:
        v = self._valid.get(self._current)
        return v.signed if v else None

    def get(self, digest: bytes) -> GroupState | None:
        """A valid state by digest."""
        v = self._valid.get(digest)
        return v.state if v else None

    def handoff(self) -> list[SignedState]:
        """What to give a new member so its book can follow this one: the current state, then
        its parent. The first goes to :meth:`add` with ``root=True``; the parent then comes in
        as an *ancestor* (authenticated by the root's digest of it), so that a concurrent
        change of the same parent validates on the new member's device too."""
        cur = self._valid.get(self._current)
        if cur is None:
            return []
        parent = self._valid.get(cur.state.parent)
        return [cur.signed, parent.signed] if parent else [cur.signed]

    def _chain(self) -> set[bytes]:
        out: set[bytes] = set()
        d = self._current
        while d in self._valid and d not in out:
            out.add(d)
            d = self._valid[d].state.parent
        return out

    def _lost(self) -> list[_Valid]:
        """The valid changes off the current chain that are shown as superseded, newest first."""
        chain = self._chain()
        # below a gap in the chain (a jump, :meth:`_jump`) states are history, not rivals
        bottom = min((self._valid[d].state.version for d in chain), default=1)
        return sorted(
            (v for d, v in self._valid.items() if d not in chain and v.state.version >= bottom),
            key=lambda v: v.rank(),
            reverse=True,
        )[:MAX_SUPERSEDED_SHOWN]

    def transfer(self) -> list[SignedState]:
        """What a newly linked device of a member needs to show this book (docs/protocol.md
        §11.6): the current state (its root), the chain below it down to the parents of the
        superseded changes (at least the parent: ancestors), then those changes, oldest first
        (each validates against a parent it already holds)."""
        cur = self._valid.get(self._current)
        if cur is None:
            return []
        lost = self._lost()
        floor = min((v.state.version - 1 for v in lost), default=cur.state.version - 1)
        out: list[SignedState] = []
        d, seen = self._current, set()
        while d in self._valid and d not in seen and self._valid[d].state.version >= floor:
            seen.add(d)
            out.append(self._valid[d].signed)
            d = self._valid[d].state.parent
        return out + [v.signed for v in reversed(lost)]

    def superseded(self) -> tuple[dict[str, Any], ...]:
        """Valid changes that lost: ``{"version", "by", "at", "change"}``, newest first."""
        out = []
        for v in self._lost():
            parent = self._valid.get(v.state.parent)
            out.append(
                {
                    "version": v.state.version,
                    "by": v.state.by,
                    "at": v.state.at,
                    "change": describe(parent.state if parent else None, v.state),
                }
            )
        return tuple(out)

    def _floor(self) -> int:
        cur = self.current
        return 1 if cur is None else max(1, cur.version - KEEP_VERSIONS)

    # ---- adding ----
    def add(
        self, signed: SignedState, identity_key_of: IdentityKeyOf, *, root: bool = False
    ) -> AddResult:
        """Take one received state. Never raises for bad input: the result says what happened.

        ``identity_key_of(address)`` gives the pinned Ed25519 identity key of an account (or
        None). ``root=True`` accepts a state without its parent, only while the book holds no
        valid state: for the chain an admin hands a new member (:meth:`handoff`), which the
        caller received over an authenticated channel. A root must still be signed by its
        ``by``, who must be one of its admins (or have just left it).
        """
        try:
            state = signed.open()
        except GroupError as exc:
            return AddResult("malformed", exc.code, self.current)
        if state.gid != self.gid:
            return AddResult("unknown_group", UNKNOWN_GROUP, self.current)
        digest = signed.digest
        if digest in self._valid:
            return AddResult("duplicate", current=self.current)
        if self._valid and state.version < self._floor():
            return AddResult("old", current=self.current)
        if not self._valid and (root or state.version == 1):
            return self._add_root(signed, state, identity_key_of)
        if any(v.state.parent == digest for v in self._valid.values()):
            return self._add_ancestor(signed, state, identity_key_of)
        if state.version == 1:
            # A second "creation" of an existing group id: nobody may re-found a group. (A book
            # that started from a handoff never saw the creation and cannot judge: ignore it.)
            founded = any(v.state.version == 1 for v in self._valid.values())
            return (
                AddResult("forged", FORGED, self.current)
                if founded
                else AddResult("old", current=self.current)
            )
        parent = self._valid.get(state.parent)
        if parent is None:
            jump = self._jump(signed, state, identity_key_of)
            return jump if jump is not None else self._keep_pending(signed, state, digest)
        before = self._current
        res = self._validate(signed, state, parent, identity_key_of)
        if res is not None:
            return res
        accepted = [state, *self._resolve(digest, identity_key_of)]
        changed = self._current != before
        if changed:
            self._prune()
        outcome = "current" if changed else "superseded"
        return AddResult(outcome, "", self.current, changed, tuple(accepted))

    def _add_root(
        self, signed: SignedState, state: GroupState, identity_key_of: IdentityKeyOf
    ) -> AddResult:
        if state.by not in state.admins and state.by in state.members:
            return AddResult("forged", FORGED, None)
        refused = self._admit(signed, state, identity_key_of)
        if refused is not None:
            return refused
        accepted = [state, *self._resolve(signed.digest, identity_key_of)]
        return AddResult("current", "", self.current, True, tuple(accepted))

    def _add_ancestor(
        self, signed: SignedState, state: GroupState, identity_key_of: IdentityKeyOf
    ) -> AddResult:
        """The parent of a state we started from (a handoff's root). Its content is bound by
        the root's ``parent`` digest; the signature is checked anyway, and the signer's key
        ranks it against its siblings."""
        before = self._current
        refused = self._admit(signed, state, identity_key_of)
        if refused is not None:
            return refused
        resolved = tuple(self._resolve(signed.digest, identity_key_of))
        changed = self._current != before
        return AddResult("current" if changed else "ancestor", "", self.current, changed, resolved)

    def _jump(
        self, signed: SignedState, state: GroupState, identity_key_of: IdentityKeyOf
    ) -> AddResult | None:
        """A state whose parent we lack, of a version above our current one, signed by an
        admin of our current state: the signer vouches for the versions we missed (they may
        never come: expired on the way, or older than any book keeps), so it is taken as it
        is (docs/protocol.md §11.1). None: not such a state (it waits as pending). A skipped
        parent that still comes is taken as an ancestor; states below the gap are not shown as
        superseded (:meth:`superseded`)."""
        cur = self._valid.get(self._current)
        if cur is None or state.version <= cur.state.version or state.by not in cur.state.admins:
            return None
        refused = self._admit(signed, state, identity_key_of)
        if refused is not None:
            return refused
        self._pending.pop(signed.digest, None)
        accepted = [state, *self._resolve(signed.digest, identity_key_of)]
        self._prune()
        return AddResult("current", "", self.current, True, tuple(accepted), jumped=True)

    def _keep_pending(self, signed: SignedState, state: GroupState, digest: bytes) -> AddResult:
        if digest not in self._pending:
            if len(self._pending) >= MAX_PENDING:
                oldest = min(self._pending, key=lambda d: self._pending[d][1].version)
                del self._pending[oldest]
            self._pending[digest] = (signed, state)
        return AddResult("pending", STALE, self.current)

    def _validate(
        self,
        signed: SignedState,
        state: GroupState,
        parent: _Valid,
        identity_key_of: IdentityKeyOf,
    ) -> AddResult | None:
        """Check ``state`` against its parent; insert it if valid (None), else the refusal."""
        p = parent.state
        if state.version != p.version + 1:
            return AddResult("stale", STALE, self.current)
        if state.by not in p.admins and not _is_own_leave(p, state):
            return AddResult("forged", FORGED, self.current)
        return self._admit(signed, state, identity_key_of)

    def _admit(
        self, signed: SignedState, state: GroupState, identity_key_of: IdentityKeyOf
    ) -> AddResult | None:
        """Insert ``state`` if it verifies under its signer's pinned key (None), else the
        refusal: ``unknown_signer`` (no key yet: fetch it and add again) or ``forged``."""
        key = identity_key_of(state.by)
        if key is None:
            return AddResult("unknown_signer", "", self.current)
        try:
            signed.verify(key)
        except GroupError as exc:
            return AddResult("forged", exc.code, self.current)
        self._insert(_Valid(signed, state, key))
        return None

    def _insert(self, v: _Valid) -> None:
        self._valid[v.digest] = v
        cur = self._valid.get(self._current)
        if cur is None or v.rank() > cur.rank():
            self._current = v.digest

    def _resolve(self, digest: bytes, identity_key_of: IdentityKeyOf) -> list[GroupState]:
        """Validate pending changes that were waiting on ``digest`` (and on those, in turn)."""
        out: list[GroupState] = []
        todo = [digest]
        while todo:
            parent_digest = todo.pop()
            waiting = [d for d, (_, s) in self._pending.items() if s.parent == parent_digest]
            for d in sorted(waiting):
                signed, state = self._pending.pop(d)
                if self._validate(signed, state, self._valid[parent_digest], identity_key_of):
                    continue
                out.append(state)
                todo.append(d)
        return out

    def _prune(self) -> None:
        floor = self._floor()
        for d in [d for d, v in self._valid.items() if v.state.version < floor]:
            del self._valid[d]
        for d in [d for d, (_, s) in self._pending.items() if s.version < floor]:
            del self._pending[d]

    # ---- storage ----
    def dump(self) -> bytes:
        """Bytes for local storage (the caller seals them)."""
        return packb(
            {
                "v": 1,
                "g": self.gid,
                "s": [[v.signed.blob, v.signed.sig, v.by_key] for v in self._valid.values()],
                "p": [[s.blob, s.sig] for s, _ in self._pending.values()],
            }
        )

    @classmethod
    def load(cls, raw: bytes) -> StateBook:
        """The inverse of :meth:`dump`. Raises GroupError ``malformed``."""
        try:
            obj = unpackb(raw, max_len=len(raw))
            book = cls(obj["g"])
            for blob, sig, key in obj["s"]:
                signed = SignedState(blob, sig)
                book._insert(_Valid(signed, signed.open(), key))
            for blob, sig in obj["p"]:
                signed = SignedState(blob, sig)
                book._pending[signed.digest] = (signed, signed.open())
        except (MalformedEnvelope, MalformedFrame, KeyError, TypeError, ValueError) as exc:
            raise GroupError("bad stored group", code=MALFORMED) from exc
        return book


def _is_own_leave(parent: GroupState, state: GroupState) -> bool:
    """A non-admin may sign exactly one change: its own removal, nothing else changed."""
    by = state.by
    return (
        by in parent.members
        and state.members == tuple(m for m in parent.members if m != by)
        and state.admins == parent.admins
        and state.name == parent.name
    )


# ---- invite codes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupInvite:
    """A parsed invite code: which group, whose device to ask, the secret, the group name."""

    gid: bytes
    admin: str
    secret: bytes
    name: str


def invite_code(gid: bytes, admin: str, secret: bytes, name: str) -> str:
    """``haven:group:`` + base64url(msgpack({"g", "a", "k", "n"}))."""
    if len(gid) != GID_LEN or len(secret) != INVITE_SECRET_LEN or not _is_address(admin):
        raise GroupError("bad invite", code=BAD_INVITE)
    return INVITE_PREFIX + b64e(packb({"g": gid, "a": admin, "k": secret, "n": name[:NAME_MAX]}))


def parse_invite_code(text: str) -> GroupInvite:
    """Parse an invite code; raises GroupError ``invalid_group_invite``."""
    text = text.strip()
    if not text.startswith(INVITE_PREFIX) or len(text) > MAX_INVITE_TEXT:
        raise GroupError("not a group invite code", code=BAD_INVITE)
    try:
        raw = b64d(text[len(INVITE_PREFIX) :])
        obj = unpackb(raw, max_len=MAX_INVITE_TEXT)
    except (MalformedEnvelope, MalformedFrame) as exc:
        raise GroupError("not a group invite code", code=BAD_INVITE) from exc
    if (
        not isinstance(obj, dict)
        or set(obj) != {"g", "a", "k", "n"}
        or not isinstance(obj["g"], bytes)
        or len(obj["g"]) != GID_LEN
        or not _is_address(obj["a"])
        or not isinstance(obj["k"], bytes)
        or len(obj["k"]) != INVITE_SECRET_LEN
        or not isinstance(obj["n"], str)
        or len(obj["n"]) > NAME_MAX
    ):
        raise GroupError("not a group invite code", code=BAD_INVITE)
    return GroupInvite(obj["g"], obj["a"], obj["k"], obj["n"])


def invite_secret_hash(secret: bytes) -> bytes:
    """What the admin's device keeps of an invite secret: BLAKE2b-256(k)."""
    return hashlib.blake2b(secret, digest_size=32).digest()


__all__ = [
    "MAX_GROUP_DEVICES",
    "MAX_MEMBERS",
    "AddResult",
    "GroupError",
    "GroupInvite",
    "GroupState",
    "SignedState",
    "StateBook",
    "changed",
    "create",
    "describe",
    "invite_code",
    "invite_secret_hash",
    "new_gid",
    "parse_invite_code",
    "ref_of",
    "sign_state",
    "state_digest",
]
