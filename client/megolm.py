"""Megolm sessions for groups, with the duplicate, replay and gap rules vodozemac leaves to us
(docs/protocol.md, group messages).

Each member device sends with its own :class:`Outbound` session; its session key travels to the
other member devices over the existing 1:1 Olm channels (payload kind ``group_key``), and each
of them holds an :class:`Inbound` session per sender device.

vodozemac decrypts the same message twice, and out of order, without complaint. So before
decrypting, :meth:`Inbound.decrypt` reads the message index from the clear Megolm message and:

- an index below the session's first known index cannot be decrypted (``undecryptable``): a
  member who joined later does not read earlier messages;
- an index more than :data:`MAX_GAP` above the highest seen is refused without decrypting
  (``megolm_gap``): ratcheting that far costs time, and no honest sender skips so many;
- an index seen before with the same ciphertext is a duplicate (the caller drops it silently);
  with another ciphertext it is ``megolm_replay`` (the sender's key signed two different
  messages at one index);
- indices further than :data:`SEEN_WINDOW` below the highest seen are refused as
  ``megolm_replay``: the window that remembers them is bounded.

A sender starts a new session after :data:`ROTATE_MESSAGES` messages or :data:`ROTATE_MS`, and
on its next send after a member or a member's device was removed (the caller decides that; the
removed devices never get the new key).

Pickles are sealed under the device's storage key (as :mod:`client.state` does for Olm).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import nacl.exceptions
import nacl.secret
import vodozemac as vz

from federation.errors import MalformedEnvelope, MalformedFrame
from federation.wire import packb, unpackb

from .group_state import GID_LEN, GroupError

ROTATE_MESSAGES = 100
ROTATE_MS = 7 * 86_400_000
MAX_GAP = 10_000
SEEN_WINDOW = 4096
MAX_MESSAGE = 64 * 1024  # a Megolm message inside a group body (federation/multi.py MAX_GBODY)
_HASH_LEN = 8
_PICKLE_MAX = 1 << 20

REPLAY = "megolm_replay"
GAP = "megolm_gap"
UNDECRYPTABLE = "undecryptable"


def _seal(storage_key: bytes, obj: object) -> bytes:
    return bytes(nacl.secret.SecretBox(storage_key).encrypt(packb(obj)))


def _unseal(storage_key: bytes, raw: bytes, n: int) -> list[Any]:
    """The stored list of ``n`` items sealed by :func:`_seal`; raises GroupError ``malformed``."""
    try:
        data = nacl.secret.SecretBox(storage_key).decrypt(raw)
        obj = unpackb(data, max_len=_PICKLE_MAX)
    except (nacl.exceptions.CryptoError, MalformedEnvelope, MalformedFrame) as exc:
        raise GroupError("bad stored group session", code="malformed") from exc
    if not isinstance(obj, list) or len(obj) != n:
        raise GroupError("bad stored group session", code="malformed")
    return obj


def message_index(message: bytes) -> int:
    """The index of a Megolm message, read from its clear header (no key needed)."""
    if len(message) > MAX_MESSAGE:
        raise GroupError("group message too large", code=UNDECRYPTABLE)
    try:
        return int(vz.MegolmMessage.from_bytes(message).message_index())
    except ValueError as exc:
        raise GroupError("not a Megolm message", code=UNDECRYPTABLE) from exc


@dataclass(slots=True)
class Outbound:
    """This device's sending session for one group."""

    session: vz.GroupSession
    created_at: int
    sent: int = 0
    shared_with: set[str] = field(default_factory=set)  # device ids that got the key

    @classmethod
    def new(cls, now: int) -> Outbound:
        """A fresh session (created at ``now``, ms)."""
        return cls(vz.GroupSession(), now)

    @property
    def session_id(self) -> str:
        return str(self.session.session_id)

    def session_key(self) -> str:
        """The key to share (base64), valid from the next message on: a device given it now
        cannot decrypt what was sent before."""
        return str(self.session.session_key.to_base64())

    def encrypt(self, plaintext: bytes) -> bytes:
        """Encrypt one group payload; returns the Megolm message bytes."""
        self.sent += 1
        return bytes(self.session.encrypt(plaintext).to_bytes())

    def needs_rotation(self, now: int) -> bool:
        """True after ROTATE_MESSAGES messages or ROTATE_MS since creation."""
        return self.sent >= ROTATE_MESSAGES or now - self.created_at >= ROTATE_MS

    def missing(self, device_ids: Iterable[str]) -> list[str]:
        """The devices among ``device_ids`` that do not have this session's key yet."""
        return sorted(set(device_ids) - self.shared_with)

    def mark_shared(self, device_ids: Iterable[str]) -> None:
        self.shared_with.update(device_ids)

    def pickle(self, storage_key: bytes) -> bytes:
        return _seal(
            storage_key,
            [
                self.session.pickle(storage_key),
                self.created_at,
                self.sent,
                sorted(self.shared_with),
            ],
        )

    @classmethod
    def from_pickle(cls, raw: bytes, storage_key: bytes) -> Outbound:
        p, created, sent, shared = _unseal(storage_key, raw, 4)
        try:
            return cls(vz.GroupSession.from_pickle(p, storage_key), created, sent, set(shared))
        except (TypeError, ValueError) as exc:
            raise GroupError("bad stored group session", code="malformed") from exc


@dataclass(slots=True)
class Inbound:
    """One sender device's session in one group, with the indices seen so far."""

    session: vz.InboundGroupSession
    sender_device: str
    gid: bytes
    first_index: int
    highest: int = -1
    seen: dict[int, bytes] = field(default_factory=dict)  # index -> 8-byte ciphertext hash

    @classmethod
    def from_key(cls, key: str, *, sender_device: str, gid: bytes) -> Inbound:
        """From a shared session key (``group_key`` payload); raises GroupError ``malformed``."""
        if len(gid) != GID_LEN or len(key) > 4096:
            raise GroupError("bad group session key", code="malformed")
        try:
            session = vz.InboundGroupSession(vz.SessionKey(key))
        except ValueError:
            try:
                session = vz.InboundGroupSession.import_session(vz.ExportedSessionKey(key))
            except ValueError as exc:
                raise GroupError("bad group session key", code="malformed") from exc
        first = int(session.first_known_index)
        return cls(session, sender_device, gid, first, first - 1)

    @property
    def session_id(self) -> str:
        return str(self.session.session_id)

    def decrypt(self, message: bytes) -> tuple[bytes, int, bool]:
        """``(plaintext, index, duplicate)``; a duplicate has no plaintext (drop it silently).

        Raises GroupError ``undecryptable``, ``megolm_gap`` or ``megolm_replay``; nothing is
        remembered then.
        """
        index = message_index(message)
        digest = hashlib.blake2b(message, digest_size=_HASH_LEN).digest()
        if index < self.first_index:
            raise GroupError("sent before this device got the key", code=UNDECRYPTABLE)
        if index > self.highest + MAX_GAP:
            raise GroupError("message index too far ahead", code=GAP)
        known = self.seen.get(index)
        if known == digest:
            return b"", index, True
        if known is None and index <= self.highest - SEEN_WINDOW:
            raise GroupError("message index too old to check", code=REPLAY)
        try:
            plain = bytes(self.session.decrypt(vz.MegolmMessage.from_bytes(message)).plaintext)
        except ValueError as exc:
            raise GroupError("cannot decrypt this group message", code=UNDECRYPTABLE) from exc
        if known is not None:
            raise GroupError("another message at an index already seen", code=REPLAY)
        self._remember(index, digest)
        return plain, index, False

    def _remember(self, index: int, digest: bytes) -> None:
        self.seen[index] = digest
        if index > self.highest:
            self.highest = index
        if len(self.seen) > SEEN_WINDOW + SEEN_WINDOW // 8:
            floor = self.highest - SEEN_WINDOW
            self.seen = {i: h for i, h in self.seen.items() if i > floor}

    def pickle(self, storage_key: bytes) -> bytes:
        seen = b"".join(i.to_bytes(4, "big") + h for i, h in sorted(self.seen.items()))
        return _seal(
            storage_key,
            [
                self.session.pickle(storage_key),
                self.sender_device,
                self.gid,
                self.first_index,
                self.highest,
                seen,
            ],
        )

    @classmethod
    def from_pickle(cls, raw: bytes, storage_key: bytes) -> Inbound:
        p, dev, gid, first, highest, seen = _unseal(storage_key, raw, 6)
        try:
            step = 4 + _HASH_LEN
            marks = {
                int.from_bytes(seen[k : k + 4], "big"): bytes(seen[k + 4 : k + step])
                for k in range(0, len(seen), step)
            }
            session = vz.InboundGroupSession.from_pickle(p, storage_key)
            return cls(session, dev, gid, first, highest, marks)
        except (TypeError, ValueError) as exc:
            raise GroupError("bad stored group session", code="malformed") from exc


__all__ = [
    "MAX_GAP",
    "ROTATE_MESSAGES",
    "ROTATE_MS",
    "SEEN_WINDOW",
    "Inbound",
    "Outbound",
    "message_index",
]
