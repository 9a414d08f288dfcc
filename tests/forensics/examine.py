"""What an examiner gets from a raw image copy: scans, key finders, figures per image.

Ground truth comes from :class:`Ledger` (every envelope a test device handed to its node, tapped
on the client side; see ``workload.py``). The examiner side uses only the image: raw bytes,
unallocated blocks (``blkls``), carved SQLite records, and keys found *by file* on the image.
Keys the test read from live nodes during the workload (``Ledger.oracle_keys``) serve only to
attribute carved records to envelopes for scoring (linkage), never as examiner findings.

Format changes plug in here: :data:`NodeKeyFinder` / :data:`DeviceKeyFinder` return candidate
keys found on an image, :data:`Opener` opens one sealed value with one key, and
:data:`PageDecryptor` turns a raw image plus a database key into a buffer of plaintext pages
for the carver (identity for plain SQLite; for SQLCipher, decrypt every page-sized candidate:
see ``sqlcipher.py``).
"""

from __future__ import annotations

import re
import struct
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.secret

from .carve import PAGE, Record, carve
from .disk import files_named, unallocated
from .sqlcipher import sqlcipher_decryptor

NodeKeyFinder = Callable[[Path], list[tuple[int, bytes]]]  # image -> [(epoch, key)]
DeviceKeyFinder = Callable[[Path, str | None], list[bytes]]  # image, passphrase -> keys
Opener = Callable[[bytes, bytes], bytes | None]  # key, sealed -> plaintext or None
PageDecryptor = Callable[[bytes, bytes], tuple[bytes, int]]  # raw, key -> pages, usable size

_SLOT = struct.Struct(">Q32s")
TEXT = re.compile(rb"txt-[a-z_]+-[0-9]{3}-[0-9a-f]{12}")  # the shape of every workload text


def texts_in(corpus: Iterable[bytes]) -> set[bytes]:
    """Workload texts anywhere in ``corpus`` (one regex pass with a literal prefix per buffer)."""
    return {m for buf in corpus for m in TEXT.findall(buf)}


def secretbox_open(key: bytes, sealed: bytes) -> bytes | None:
    """XSalsa20-Poly1305 (``nacl.secret.SecretBox``): epoch keys and device storage keys."""
    if len(sealed) < 40:
        return None
    try:
        return bytes(nacl.secret.SecretBox(key).decrypt(sealed))
    except nacl.exceptions.CryptoError:
        return None


def node_epoch_keys(image: Path) -> list[tuple[int, bytes]]:
    """Every live slot of every ``epochs.key`` on the image (fixed ``>Q32s`` slots)."""
    keys = []
    for data in files_named(image, "epochs.key"):
        for i in range(len(data) // _SLOT.size):
            epoch, key = _SLOT.unpack_from(data, i * _SLOT.size)
            if epoch or any(key):
                keys.append((int(epoch), bytes(key)))
    return keys


_WRAPPED = b"HVPW1"
DEVICE_KEY_FILES = ("device.key",)  # key files as client/state.py names them


def device_storage_keys(image: Path, passphrase: str | None) -> list[bytes]:
    """Device key files: raw 32-byte keys, or Argon2id-wrapped ones if we know the phrase.

    This mirrors ``client/state.py``'s ``device.key`` (``HVPW1`` + salt + SecretBox). A new
    key-file format (a wrapped SQLCipher key, per-message key slots) gets its own finder that
    returns every key it can open: the examiner tries each on every page and every value."""
    keys = []
    for data in (d for name in DEVICE_KEY_FILES for d in files_named(image, name)):
        if not data.startswith(_WRAPPED):
            if len(data) == 32:
                keys.append(data)
            continue
        if not passphrase:
            continue
        salt_end = len(_WRAPPED) + nacl.pwhash.argon2id.SALTBYTES
        kek = nacl.pwhash.argon2id.kdf(32, passphrase.encode(), data[len(_WRAPPED) : salt_end])
        opened = secretbox_open(kek, data[salt_end:])
        if opened is not None:
            keys.append(opened)
    return keys


def plain_pages(raw: bytes, key: bytes) -> tuple[bytes, int]:
    """Plain SQLite: pages are readable as they are (values inside are sealed separately)."""
    del key
    return raw, PAGE


@dataclass
class Scan:
    """One image copy: raw bytes, unallocated blocks, and records carved from both."""

    name: str
    path: Path
    raw: bytes
    free: bytes
    records: list[Record]
    free_records: int

    @classmethod
    def of(cls, name: str, path: Path) -> Scan:
        raw = path.read_bytes()
        free = unallocated(path)
        return cls(name, path, raw, free, list(carve(raw)), sum(1 for _ in carve(free)))

    def found(self, needle: bytes) -> bool:
        return needle in self.raw

    def blobs(self) -> Iterable[tuple[Record, bytes]]:
        for r in self.records:
            for v in r.values:
                if isinstance(v, bytes) and len(v) >= 40:
                    yield r, v


# ---- ground truth ----------------------------------------------------------------------------


@dataclass
class Env:
    id: bytes
    mailbox: bytes
    body_head: bytes
    send: int
    sender_node: str
    dest_node: str
    forwarded: bool = False  # accepted by the destination node (outbox row gone)
    delivered: bool = False  # acked by the recipient device
    expired: bool = False


@dataclass
class Ledger:
    envs: dict[bytes, Env] = field(default_factory=dict)
    sends: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))
    oracle_keys: dict[bytes, int] = field(default_factory=dict)  # key -> epoch (scoring only)
    heads: dict[bytes, bytes] = field(default_factory=dict)

    def add(self, env: Env) -> None:
        self.envs[env.id] = env
        self.sends[env.send].append(env.id)
        self.heads[env.body_head] = env.id

    def state_on(self, node_id: str) -> dict[bytes, str]:
        """Per envelope that has (had) a row on ``node_id``: pending, done or expired."""
        out = {}
        for e in self.envs.values():
            if e.dest_node == node_id:
                done = e.delivered
            elif e.sender_node == node_id:
                done = e.forwarded or e.delivered
            else:
                continue
            out[e.id] = "expired" if e.expired else ("done" if done else "pending")
        return out

    def attribute(self, rec: Record, plaintexts: Iterable[bytes] = ()) -> set[bytes]:
        """Envelope ids a record is about: a clear id column, or an id/body inside plaintext."""
        found = {v for v in rec.values if isinstance(v, bytes) and v in self.envs}
        for pt in plaintexts:
            for i in range(max(0, len(pt) - 15)):
                w = pt[i : i + 16]
                if w in self.envs:
                    found.add(w)
                h = self.heads.get(pt[i : i + 32])
                if h is not None:
                    found.add(h)
        return found


# ---- node figures ----------------------------------------------------------------------------


@dataclass
class NodeTruth:
    node_id: str
    texts: list[bytes]  # every text ever sent
    remote_names: list[bytes]  # account and device names not homed on this node
    remote_mailboxes: list[bytes]
    states: dict[bytes, str]  # Ledger.state_on(node_id) at the time of the copy


def node_figures(
    scan: Scan,
    truth: NodeTruth,
    ledger: Ledger,
    canary: bytes,
    find_keys: NodeKeyFinder = node_epoch_keys,
    opener: Opener = secretbox_open,
) -> dict[str, Any]:
    keys = find_keys(scan.path)
    newest = max((e for e, _ in keys), default=0)
    oracle = list(ledger.oracle_keys)
    # attribute every record to envelopes (scoring only) and note what the image's keys open
    attributed: dict[int, set[bytes]] = {}
    opened_by: dict[bytes, set[int]] = defaultdict(set)  # env id -> epochs of image keys
    opened_unattributed = 0
    opened_plain: list[bytes] = []
    for idx, rec in enumerate(scan.records):
        blobs = [v for v in rec.values if isinstance(v, bytes) and len(v) >= 40]
        pts = [pt for b in blobs for k in oracle if (pt := opener(k, b)) is not None]
        ids = ledger.attribute(rec, pts) & set(truth.states)
        if ids:
            attributed[idx] = ids
        for b in blobs:
            for epoch, k in keys:
                pt = opener(k, b)
                if pt is None:
                    continue
                opened_plain.append(pt)
                got = ledger.attribute(rec, [pt]) & set(truth.states)
                if not got:
                    opened_unattributed += 1
                for i in got:
                    opened_by[i].add(epoch)
    corpus = [scan.raw, *opened_plain]

    def anywhere(needle: bytes) -> bool:
        return any(needle in c for c in corpus)

    texts = len(texts_in(corpus) & set(truth.texts))
    names = sum(anywhere(n) for n in truth.remote_names)
    mailboxes = sum(scan.found(m) for m in truth.remote_mailboxes)
    eq_sends, eq_envs, adj_sends, multi = _linkage(scan.records, attributed, ledger)
    states = truth.states
    dead = {i for i, s in states.items() if s != "pending"}
    pending = {i for i, s in states.items() if s == "pending"}
    return {
        "canary": int(scan.found(canary) and canary in scan.free),
        "carved": len(scan.records),
        "carved_free": scan.free_records,
        "keys_on_image": len(keys),
        "texts": texts,
        "names": names,
        "remote_mailboxes": mailboxes,
        "sends_multi": multi,
        "linked_equal_sends": eq_sends,
        "linked_equal_envelopes": eq_envs,
        "linked_adjacent_sends": adj_sends,
        "pending": len(pending),
        "pending_seen": len(pending & {i for ids in attributed.values() for i in ids}),
        "dead_envelopes": len(dead),
        "dead_decryptable": len(dead & set(opened_by)),
        "pending_old_key": sum(1 for i in pending if opened_by.get(i, set()) - {newest}),
        "opened_unattributed": opened_unattributed,
    }


def _linkage(
    records: list[Record], attributed: dict[int, set[bytes]], ledger: Ledger
) -> tuple[int, int, int, int]:
    """Sends whose envelopes an examiner groups by an equal clear field, or by adjacent rowids.

    A group is the records (of any table, any column) sharing one clear value. It links a send
    when it holds at least two distinct envelopes and all of them belong to that send.
    """
    one = {idx: next(iter(ids)) for idx, ids in attributed.items() if len(ids) == 1}
    present: dict[int, set[bytes]] = defaultdict(set)
    for eid in one.values():
        present[ledger.envs[eid].send].add(eid)
    multi = {s for s, ids in present.items() if len(ids) >= 2}
    groups: dict[tuple[Any, ...], set[bytes]] = defaultdict(set)
    rowids: dict[tuple[Any, int], dict[bytes, int]] = defaultdict(dict)
    for idx, eid in one.items():
        rec = records[idx]
        for v in rec.values:
            if v is not None and not (isinstance(v, bytes) and v == eid):
                groups[(type(v).__name__, v)].add(eid)  # equal anywhere, any table
        if rec.rowid is not None:
            rowids[(rec.shape, ledger.envs[eid].send)].setdefault(eid, rec.rowid)
    linked: dict[int, set[bytes]] = defaultdict(set)
    for ids in groups.values():
        sends = {ledger.envs[i].send for i in ids}
        if len(ids) >= 2 and len(sends) == 1:
            linked[sends.pop()] |= ids
    adjacent = set()
    for (_, send), by_env in rowids.items():
        rs = sorted(by_env.values())
        if len(rs) >= 2 and rs[-1] - rs[0] == len(rs) - 1:
            adjacent.add(send)
    return (
        len(set(linked) & multi),
        sum(len(v) for s, v in linked.items() if s in multi),
        len(adjacent & multi),
        len(multi),
    )


# ---- device figures --------------------------------------------------------------------------


@dataclass
class DeviceTruth:
    kept: list[bytes]  # texts still in history
    deleted: list[bytes]
    expired: list[bytes]
    edited_away: list[bytes]
    contacts: list[bytes]  # addresses of contacts
    peers: list[bytes]  # node ids and node URLs of contacts
    t_min: int
    t_max: int


def device_figures(
    scan: Scan,
    truth: DeviceTruth,
    canary: bytes,
    passphrase: str | None,
    find_keys: DeviceKeyFinder = device_storage_keys,
    pages: Sequence[PageDecryptor] = (plain_pages, sqlcipher_decryptor),
    opener: Opener = secretbox_open,
) -> dict[str, Any]:
    """With the passphrase: every page decrypted, every value opened, then searched. Without:
    what is readable in clear (contact addresses, node ids/URLs, records with times)."""
    keys = find_keys(scan.path, passphrase)
    corpus = [scan.raw]
    decrypted_pages = 0
    for k in keys:
        for decrypt in pages:
            buf, usable = decrypt(scan.raw, k)
            records = scan.records if buf is scan.raw else list(carve(buf, usable))
            if buf is not scan.raw:
                decrypted_pages += len({r.offset for r in records})
                corpus.append(buf)
            for rec in records:
                for v in rec.values:
                    if isinstance(v, bytes) and (pt := opener(k, v)) is not None:
                        corpus.append(pt)

    found = texts_in(corpus)

    def count(needles: list[bytes]) -> int:
        return len(found & set(needles))

    clear_keys = find_keys(scan.path, None)
    timed = sum(
        1
        for r in scan.records
        if any(isinstance(v, int) and truth.t_min <= v <= truth.t_max for v in r.values)
    )
    return {
        "canary": int(scan.found(canary) and canary in scan.free),
        "carved": len(scan.records),
        "carved_free": scan.free_records,
        "keys_with_phrase": len(keys),
        "decrypted_pages": decrypted_pages,
        "keys_without_phrase": len(clear_keys),
        "kept_readable": count(truth.kept),
        "kept_total": len(truth.kept),
        "deleted": count(truth.deleted),
        "deleted_total": len(truth.deleted),
        "expired": count(truth.expired),
        "expired_total": len(truth.expired),
        "edited_away": count(truth.edited_away),
        "edited_away_total": len(truth.edited_away),
        "contacts_clear": sum(scan.found(c) for c in truth.contacts),
        "peers_clear": sum(scan.found(p) for p in truth.peers),
        "records_with_times": timed,
    }
