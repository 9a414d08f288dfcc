"""What an examiner gets from a raw image copy: scans, key finders, figures per image.

Ground truth comes from :class:`Ledger` (every envelope a test device handed to its node, tapped
on the client side; see ``workload.py``). The examiner side uses only the image: raw bytes,
unallocated blocks (``blkls``), carved SQLite records, and keys found *by file* on the image.
Keys the test read from live nodes during the workload (``Ledger.oracle_keys``) serve only to
attribute carved records to envelopes for scoring (linkage), never as examiner findings.

Format changes plug in here: :data:`NodeKeyFinder` / :data:`DeviceKeyFinder` return candidate
keys found on an image, :data:`Opener` opens one sealed value with one key, and
:data:`PageDecryptor` turns a raw image plus a database key into a buffer of plaintext pages
for the carver (for SQLCipher, decrypt every page-sized candidate: see ``sqlcipher.py``).
:data:`NodeRecordOpener` turns one carved node record plus the image's keys into the
plaintexts an examiner gets from it (schema v3: :func:`sealed_rows`, the row's one sealed
record opened with the store's own :class:`node.atrest.EpochKeys`); :class:`StoreKeys` also
derives the store's keyed index hashes, so an examiner holding a key matches known mailbox ids
against the index (``remote_mailboxes_by_index``).
"""

from __future__ import annotations

import re
import struct
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.pwhash
import nacl.secret

from .carve import PAGE, Record, carve
from .disk import BLOCK, files_named, unallocated
from .sqlcipher import sqlcipher_decryptor

NodeKeyFinder = Callable[[Path], list[tuple[int, bytes]]]  # image -> [(epoch, key)]
Opener = Callable[[bytes, bytes], bytes | None]  # key, sealed -> plaintext or None
PageDecryptor = Callable[[bytes, bytes], tuple[bytes, int]]  # raw, key -> pages, usable size
# one carved record, candidate (epoch, key)s -> [(epoch, plaintext)] an examiner gets from it
NodeRecordOpener = Callable[["Record", Sequence[tuple[int, bytes]]], list[tuple[int, bytes]]]
Carver = Callable[[bytes], Iterable[Record]]  # a buffer -> the records found in it


@dataclass
class DeviceKeys:
    """What a device key finder gets from an image: database keys (for page decryptors) and
    value keys (storage keys, every non-zero per-message slot) for sealed column values."""

    db: list[bytes] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)
    files: int = 0  # key files found
    protected: int = 0  # of them, wrapped (passphrase or keyring)

    def __iadd__(self, other: DeviceKeys) -> DeviceKeys:
        self.db += other.db
        self.values += other.values
        self.files += other.files
        self.protected += other.protected
        return self


DeviceKeyFinder = Callable[[Path, str | None], DeviceKeys]  # image, passphrase -> keys

_SLOT = struct.Struct(">Q32s")
TEXT = re.compile(rb"txt-[a-z_]+-[0-9]{3}-[0-9a-f]{12}")  # the shape of every workload text


def texts_in(corpus: Iterable[bytes]) -> set[bytes]:
    """Workload texts anywhere in ``corpus`` (one regex pass with a literal prefix per buffer)."""
    return {m for buf in corpus for m in TEXT.findall(buf)}


def present(buf: bytes, needles: Iterable[bytes]) -> set[bytes]:
    """The ``needles`` that occur in ``buf``, in about one pass for all of them: a needle of 15
    bytes or more wholly contains one 8-aligned 8-byte word of ``buf`` wherever it sits, so
    the words of ``buf`` are checked against the needles' 8-byte slices at every shift and only
    needles with a hit are searched for. Shorter needles are searched for one by one."""
    wanted = set(needles)
    out = {n for n in wanted if len(n) < 15 and n in buf}
    slices: dict[int, list[bytes]] = defaultdict(list)
    for n in wanted:
        if len(n) >= 15:
            for s in range(8):
                slices[int.from_bytes(n[s : s + 8], sys.byteorder)].append(n)
    words = memoryview(buf)[: len(buf) // 8 * 8].cast("Q")
    for w in set(slices).intersection(words):
        out.update(n for n in slices[w] if n in buf)
    return out


def secretbox_open(key: bytes, sealed: bytes) -> bytes | None:
    """XSalsa20-Poly1305 (``nacl.secret.SecretBox``): epoch keys and device storage keys."""
    if len(sealed) < 40:
        return None
    try:
        return bytes(nacl.secret.SecretBox(key).decrypt(sealed))
    except nacl.exceptions.CryptoError:
        return None


def parse_epoch_keys(data: bytes) -> list[tuple[int, bytes]]:
    """Live slots of one ``epochs.key`` (fixed ``>Q32s`` slots; zeroed slots are destroyed
    keys). The one place that knows the file's layout: the examiner's finder and the scoring
    oracle (``workload.read_epoch_keys``) both use it."""
    keys = []
    for i in range(len(data) // _SLOT.size):
        epoch, key = _SLOT.unpack_from(data, i * _SLOT.size)
        if epoch or any(key):
            keys.append((int(epoch), bytes(key)))
    return keys


def node_epoch_keys(image: Path) -> list[tuple[int, bytes]]:
    """Every live slot of every ``epochs.key`` on the image."""
    return [k for data in files_named(image, "epochs.key") for k in parse_epoch_keys(data)]


_WRAPPED = b"HVPW1"
V1_KEY_FILE = "device.key"  # version-1 homes (plain device.db), as client/devicedb.py names it


def device_v1_keys(image: Path, passphrase: str | None) -> DeviceKeys:
    """Version-1 ``device.key`` files (``HVPW1`` + salt + SecretBox under Argon2id with pynacl's
    default "sensitive" limits, or 32 raw bytes): a storage key for values in plain pages."""
    out = DeviceKeys()
    for data in files_named(image, V1_KEY_FILE):
        out.files += 1
        if not data.startswith(_WRAPPED):
            if len(data) == 32:
                out.values.append(data)
            continue
        out.protected += 1
        if not passphrase:
            continue
        salt_end = len(_WRAPPED) + nacl.pwhash.argon2id.SALTBYTES
        kek = nacl.pwhash.argon2id.kdf(32, passphrase.encode(), data[len(_WRAPPED) : salt_end])
        opened = secretbox_open(kek, data[salt_end:])
        if opened is not None:
            out.values.append(opened)
    return out


KEYS_FILE = "device.keys"
# client/keyslots.py: a 256-byte header slot (magic, version, mode, Argon2id opslimit and
# memlimit, salt, length of the wrapped key, then the wrapped key), then 32-byte slots; slot 0
# is a change token, every other non-zero slot the key of one history text.
_KS_HEADER = struct.Struct(">4sBBIQ16sH")
KS_MAGIC, KS_HEADER_SIZE, KS_SLOT = b"HVKS", 256, 32
KS_CLEAR, KS_PASSPHRASE, KS_KEYRING = 0, 1, 2


def unwrap_keyslots_header(data: bytes, passphrase: str | None) -> bytes | None:
    """The database key from a ``device.keys`` header slot: in clear (mode 0), or unwrapped
    with the passphrase (mode 1, Argon2id with the costs stored in the slot). A keyring wrap
    (mode 2) needs the OS keyring, which a disk examiner does not have: ``None``."""
    if len(data) < KS_HEADER_SIZE:
        return None
    magic, _version, mode, ops, mem, salt, n = _KS_HEADER.unpack_from(data)
    if magic != KS_MAGIC:
        return None
    wrapped = data[_KS_HEADER.size : _KS_HEADER.size + n]
    if mode == KS_CLEAR:
        return wrapped[:32] if len(wrapped) >= 32 else None
    if mode != KS_PASSPHRASE or not passphrase:
        return None
    kek = nacl.pwhash.argon2id.kdf(32, passphrase.encode(), salt, ops, mem)
    return secretbox_open(kek, wrapped)


def keyslot_keys(data: bytes) -> list[bytes]:
    """Every non-zero slot after the header (zeroed slots are shredded texts)."""
    zero = bytes(KS_SLOT)
    slots = (data[i : i + KS_SLOT] for i in range(KS_HEADER_SIZE, len(data), KS_SLOT))
    return [bytes(k) for k in slots if len(k) == KS_SLOT and k != zero]


def device_keyslots_keys(image: Path, passphrase: str | None) -> DeviceKeys:
    """Every ``device.keys`` on the image: its database key if the examiner can unwrap it
    (clear, or with the passphrase), the storage key derived from it (``client/devicedb.py``
    ``storage_key_for``), and every non-zero message-key slot (those are in clear: without the
    database key they only open values the examiner cannot reach)."""
    from client.devicedb import storage_key_for

    out = DeviceKeys()
    headers = []
    for data in files_named(image, KEYS_FILE):
        out.files += 1
        if len(data) >= 6 and data[5] != KS_CLEAR:
            out.protected += 1
        out.values += keyslot_keys(data)
        headers.append(data[:KS_HEADER_SIZE])
    # stale header slots anywhere on the image (freed blocks, old copies): files start on a
    # block boundary, so a header does too
    raw = image.read_bytes()
    for m in re.finditer(re.escape(KS_MAGIC), raw):
        if m.start() % BLOCK == 0:
            headers.append(raw[m.start() : m.start() + KS_HEADER_SIZE])
    for header in dict.fromkeys(headers):
        db_key = unwrap_keyslots_header(header, passphrase)
        if db_key is not None and db_key not in out.db:
            out.db.append(db_key)
            out.values.append(storage_key_for(db_key))
    return out


def device_storage_keys(image: Path, passphrase: str | None) -> DeviceKeys:
    """:data:`DeviceKeyFinder` for every device format: ``device.keys`` and version-1 files."""
    out = device_keyslots_keys(image, passphrase)
    out += device_v1_keys(image, passphrase)
    return out


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
    def of(cls, name: str, path: Path, carver: Carver = carve) -> Scan:
        """Read the copy, its unallocated blocks, and carve both (``carver``: SQLite records by
        default; ``pgcarve.carve_pg`` for a PostgreSQL data directory)."""
        raw = path.read_bytes()
        free = unallocated(path)
        return cls(name, path, raw, free, list(carver(raw)), sum(1 for _ in carver(free)))

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


def sealed_columns(opener: Opener = secretbox_open) -> NodeRecordOpener:
    """:data:`NodeRecordOpener` for a store that seals single columns: every blob column of at
    least 40 bytes (nonce + MAC) is a value sealed under one epoch key, opened with
    :data:`Opener`."""

    def open_record(rec: Record, keys: Sequence[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        out = []
        for v in rec.values:
            if isinstance(v, bytes) and len(v) >= 40:
                out += [(e, pt) for e, k in keys if (pt := opener(k, v)) is not None]
        return out

    return open_record


class StoreKeys:
    """The node's own at-rest code (``node/atrest.py``) for keys found on an image: one
    :class:`node.atrest.EpochKeys` per key (a one-slot key file in a scratch directory), so the
    examiner opens rows and derives index hashes exactly as the store does."""

    def __init__(self) -> None:
        import tempfile

        self._dir = tempfile.TemporaryDirectory(prefix="haven-examiner-")
        self._keys: dict[bytes, Any] = {}

    def get(self, raw: bytes) -> Any:
        from node.atrest import EpochKeys

        ks = self._keys.get(raw)
        if ks is None:
            path = Path(self._dir.name) / f"{len(self._keys)}.key"
            path.write_bytes(_SLOT.pack(1, raw) + bytes(_SLOT.size * 3))
            ks = self._keys[raw] = EpochKeys(str(path))
        return ks

    def open(self, raw: bytes, sealed: bytes) -> bytes | None:
        from federation.errors import StorageError

        try:
            return bytes(self.get(raw).open(0, sealed))
        except StorageError:
            return None

    def index(self, raw: bytes, purpose: bytes, value: bytes) -> bytes:
        return bytes(self.get(raw).index(0, purpose, value))


_STORE_KEYS: StoreKeys | None = None


def store_keys() -> StoreKeys:
    global _STORE_KEYS
    if _STORE_KEYS is None:
        _STORE_KEYS = StoreKeys()
    return _STORE_KEYS


def sealed_rows() -> NodeRecordOpener:
    """:data:`NodeRecordOpener` for schema v3 (``node/sqlite_store.py``): a row's one sealed
    blob (padded, at least a size bucket) opened with the store's own code; the plaintext is the
    length-prefixed msgpack record ``[id, to, expires, body, dest]`` (ids and body heads inside
    it attribute the row). Other blobs of at least 40 bytes are tried too (older formats)."""
    sk = store_keys()

    def open_record(rec: Record, keys: Sequence[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        out = []
        for v in rec.values:
            if isinstance(v, bytes) and len(v) >= 40:
                out += [(e, pt) for e, k in keys if (pt := sk.open(k, v)) is not None]
        return out

    return open_record


# index purposes of the mailbox columns (node/sqlite_store.py): envelopes.mbh, outbox.mbh
def _mailbox_purposes() -> tuple[bytes, ...]:
    from node.sqlite_store import ENV_MB, OBX_MB

    return (ENV_MB, OBX_MB)


def destination_index(ledger: Ledger, keys: Sequence[bytes]) -> set[bytes]:
    """Scoring only: the outbox's keyed destination hash of every node in the ledger under
    every oracle key (``node/sqlite_store.py`` ``OBX_DEST``)."""
    from node.sqlite_store import OBX_DEST

    sk = store_keys()
    nodes = {e.dest_node for e in ledger.envs.values()}
    return {sk.index(k, OBX_DEST, n.encode()) for k in keys for n in nodes}


def mailboxes_by_index(
    scan: Scan, keys: Sequence[tuple[int, bytes]], mailboxes: Sequence[bytes]
) -> int:
    """Known mailbox ids an examiner finds in the index: keyed hashes (every key on the image,
    every mailbox purpose) equal to a carved value or present anywhere in the raw image."""
    sk = store_keys()
    values = {v for r in scan.records for v in r.values if isinstance(v, bytes) and len(v) == 16}
    found = 0
    for m in mailboxes:
        hs = [sk.index(k, p, m) for _, k in keys for p in _mailbox_purposes()]
        found += any(h in values or scan.found(h) for h in hs)
    return found


def node_figures(
    scan: Scan,
    truth: NodeTruth,
    ledger: Ledger,
    canary: bytes,
    find_keys: NodeKeyFinder = node_epoch_keys,
    opener: Opener = secretbox_open,
    open_record: NodeRecordOpener | None = None,
) -> dict[str, Any]:
    """Node image figures. ``find_keys`` lists the keys on the image; ``open_record`` (default:
    :func:`sealed_columns` with ``opener``) opens one carved record with given keys. The
    oracle keys (``Ledger.oracle_keys``) go through the same opener, for attribution only."""
    open_rec = open_record or sealed_columns(opener)
    keys = find_keys(scan.path)
    by_index = mailboxes_by_index(scan, keys, truth.remote_mailboxes)
    newest = max((e for e, _ in keys), default=0)
    oracle = [(e, k) for k, e in ledger.oracle_keys.items()]
    # attribute every record to envelopes (scoring only) and note what the image's keys open
    attributed: dict[int, set[bytes]] = {}
    opened_by: dict[bytes, set[int]] = defaultdict(set)  # env id -> epochs of image keys
    opened_unattributed = 0
    opened_plain: list[bytes] = []
    for idx, rec in enumerate(scan.records):
        pts = [pt for _, pt in open_rec(rec, oracle)]
        ids = ledger.attribute(rec, pts) & set(truth.states)
        if ids:
            attributed[idx] = ids
        for epoch, pt in open_rec(rec, keys):
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
    mailboxes_opened = sum(any(m in pt for pt in opened_plain) for m in truth.remote_mailboxes)
    dest_index = destination_index(ledger, [k for _, k in oracle])
    eq_sends, eq_envs, adj_sends, multi, by_dest = _linkage(
        scan.records, attributed, ledger, dest_index
    )
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
        "remote_mailboxes": mailboxes,  # in clear (raw bytes, free blocks included)
        "remote_mailboxes_opened": mailboxes_opened,  # inside values the image's keys open
        # keyed hashes (under the image's keys) of remote mailboxes found in the index
        "remote_mailboxes_by_index": by_index,
        "sends_multi": multi,
        "linked_equal_sends": eq_sends,
        "linked_equal_envelopes": eq_envs,
        "linked_adjacent_sends": adj_sends,
        # sends whose rows only the outbox destination hash groups (names a node: residual)
        "linked_dest_index_sends": by_dest,
        "pending": len(pending),
        "pending_seen": len(pending & {i for ids in attributed.values() for i in ids}),
        "dead_envelopes": len(dead),
        "dead_decryptable": len(dead & set(opened_by)),
        "pending_old_key": sum(1 for i in pending if opened_by.get(i, set()) - {newest}),
        "opened_unattributed": opened_unattributed,
    }


def _linkage(
    records: list[Record],
    attributed: dict[int, set[bytes]],
    ledger: Ledger,
    dest_index: set[bytes] = frozenset(),  # type: ignore[assignment]
) -> tuple[int, int, int, int, int]:
    """Sends whose envelopes an examiner groups by an equal clear field, or by adjacent rowids.

    A group is the records (of any table, any column) sharing one clear value. It links a send
    when it holds at least two distinct envelopes and all of them belong to that send. Groups
    whose value is the outbox's keyed destination hash (``dest_index``: known to the scorer
    from the oracle keys, not to the examiner) are counted apart: that value is the same for
    every row to one destination node, whoever sent it to whom, so it names a destination node
    and groups one send only when a key sealed no other row to that node.
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
    by_dest: set[int] = set()
    for gk, ids in groups.items():
        sends = {ledger.envs[i].send for i in ids}
        if len(ids) >= 2 and len(sends) == 1:
            if gk[1] in dest_index:
                by_dest |= sends
                continue
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
        len(by_dest & multi),
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


def _open_all(records: Iterable[Record], keys: Sequence[bytes], opener: Opener) -> list[bytes]:
    """Every sealed value of ``records`` opened under every key that opens it."""
    blobs = {v for r in records for v in r.values if isinstance(v, bytes) and len(v) >= 40}
    return [pt for b in blobs for k in keys if (pt := opener(k, b)) is not None]


def device_figures(
    scan: Scan,
    truth: DeviceTruth,
    canary: bytes,
    passphrase: str | None,
    find_keys: DeviceKeyFinder = device_storage_keys,
    pages: Sequence[PageDecryptor] = (sqlcipher_decryptor,),
    opener: Opener = secretbox_open,
) -> dict[str, Any]:
    """With the passphrase: every page candidate of the image decrypted with every database key
    found, every carved value opened with every value key found (storage keys, every non-zero
    message slot), then searched for texts. Without it: the same with the keys an examiner
    finds without the passphrase; contact addresses, node ids/URLs and records with times."""
    decrypted: dict[bytes, list[tuple[bytes, list[Record]]]] = {}

    def open_pages(db_keys: list[bytes]) -> list[tuple[bytes, list[Record]]]:
        out = [(scan.raw, scan.records)]  # plain SQLite pages are readable as they are
        for k in db_keys:
            if k not in decrypted:
                decrypted[k] = []
                for decrypt in pages:
                    buf, usable = decrypt(scan.raw, k)
                    decrypted[k].append((buf, list(carve(buf, usable))))
            out += decrypted[k]
        return out

    keys = find_keys(scan.path, passphrase)
    bufs = open_pages(keys.db)
    records = [r for _, recs in bufs for r in recs]
    corpus = [b for b, _ in bufs] + _open_all(records, keys.values, opener)
    found = texts_in(corpus)
    # history rows (msg_id, peer, outgoing, sender, text, ...: client/devicedb.py) whose sealed
    # text no key opens: stale copies the examiner does find, of texts that are shredded
    texts_sealed = {
        r.values[5]
        for r in records
        if len(r.values) >= 15
        and isinstance(r.values[1], bytes)
        and len(r.values[1]) == 16
        and isinstance(r.values[5], bytes)
        and len(r.values[5]) >= 40
    }
    unopened = sum(1 for b in texts_sealed if all(opener(k, b) is None for k in keys.values))

    def count(needles: list[bytes]) -> int:
        return len(found & set(needles))

    clear = find_keys(scan.path, None)
    clear_bufs = open_pages(clear.db)
    clear_records = [r for _, recs in clear_bufs for r in recs]
    clear_corpus = [b for b, _ in clear_bufs] + _open_all(clear_records, clear.values, opener)

    def readable(needle: bytes) -> bool:
        return any(needle in c for c in clear_corpus)

    timed = sum(
        1
        for r in clear_records
        if any(isinstance(v, int) and truth.t_min <= v <= truth.t_max for v in r.values)
    )
    return {
        "canary": int(scan.found(canary) and canary in scan.free),
        "carved": len(scan.records),
        "carved_free": scan.free_records,
        "key_files": keys.files,
        "key_files_protected": keys.protected,
        "keys_with_phrase": len(keys.db),
        "value_keys": len(keys.values),
        "decrypted_records": len(records) - len(scan.records),
        "history_texts_carved": len(texts_sealed),  # distinct sealed texts in history rows
        "history_texts_unopened": unopened,  # of them, opened by no key on the image
        "keys_without_phrase": len(clear.db),
        "kept_readable": count(truth.kept),
        "kept_total": len(truth.kept),
        "deleted": count(truth.deleted),
        "deleted_total": len(truth.deleted),
        "expired": count(truth.expired),
        "expired_total": len(truth.expired),
        "edited_away": count(truth.edited_away),
        "edited_away_total": len(truth.edited_away),
        "contacts_clear": sum(readable(c) for c in truth.contacts),
        "contacts_total": len(truth.contacts),
        "peers_clear": sum(readable(p) for p in truth.peers),
        "peers_total": len(truth.peers),
        "records_with_times": timed,
        "texts_without_phrase": len(texts_in(clear_corpus)),
    }


# ---- attachments: the blob store (node/blobs.py, docs/protocol.md §10.5) --------------------

BLOB_EPOCHS = "blob-epochs.key"


def sample_windows(data: bytes, n: int, width: int = 64, seed: int = 0) -> list[bytes]:
    """``n`` windows of ``width`` bytes of ``data``: the first, the last and ``n - 2`` spread
    evenly between them, each shifted by a seeded pseudo-random amount (0..508 bytes), so not
    aligned in general."""
    if len(data) <= width:
        return [data]
    span = len(data) - width
    out = [data[:width], data[span:]]
    step = span / max(1, n - 1)
    for i in range(1, n - 1):
        off = min(span, int(i * step) + (seed * 7919 + i * 104729) % 509)
        out.append(data[off : off + width])
    return out[:n]


def windows_found(raw: bytes, windows: Sequence[bytes], slab: int = 1 << 20) -> set[int]:
    """Indexes of the ``windows`` (each at least 16 bytes) that occur anywhere in ``raw``, in one
    pass whatever their number: an occurrence at offset ``q`` has the 8 bytes at the next
    8-aligned offset ``q + j`` (``j = -q mod 8``) inside it, so every window's 8 possible
    8-byte anchors are looked up in the set of 8-aligned words of each slab of ``raw`` (a C
    set intersection), and each anchor hit is then compared in full. Anchors of all zero
    bytes are skipped (a window of random bytes has none)."""
    anchors: dict[bytes, list[tuple[int, int]]] = defaultdict(list)
    for n, win in enumerate(windows):
        for j in range(8):
            a = win[j : j + 8]
            if any(a):
                anchors[a].append((n, j))
    want = {int.from_bytes(a, sys.byteorder) for a in anchors}
    found: set[int] = set()
    usable = len(raw) - len(raw) % 8
    view = memoryview(raw)[:usable]
    for base in range(0, usable, slab):
        words = view[base : base + slab].cast("Q")
        hits = want.intersection(words)
        for h in hits:
            a = h.to_bytes(8, sys.byteorder)
            pos = raw.find(a, base, base + slab + 8)
            while pos >= 0:
                if pos % 8 == 0:
                    for n, j in anchors[a]:
                        start = pos - j
                        if start >= 0 and raw[start : start + len(windows[n])] == windows[n]:
                            found.add(n)
                pos = raw.find(a, pos + 1, base + slab + 8)
    return found


def image_keys(image: Path) -> list[bytes]:
    """Every live key slot of every ``blob-epochs.key`` and ``epochs.key`` on the image (the
    blob store's own epoch keys and the message store's): what an examiner tries on metas."""
    keys = {
        k
        for name in (BLOB_EPOCHS, "epochs.key")
        for data in files_named(image, name)
        for _, k in parse_epoch_keys(data)
    }
    return sorted(keys)


@dataclass(frozen=True)
class CarvedMeta:
    """A blob meta the examiner opened: where, and the per-blob key it reveals."""

    offset: int
    blob: bytes
    kind: str
    key: bytes
    prefix: bytes
    size: int


def _xor(a: bytes, b: bytes) -> bytes:
    n = min(len(a), len(b))
    return (int.from_bytes(a[:n]) ^ int.from_bytes(b[:n])).to_bytes(n)


def carve_blob_metas(raw: bytes, keys: Sequence[bytes]) -> list[CarvedMeta]:
    """Every sealed blob meta on ``raw`` that opens under one of ``keys``.

    A meta file is ``kid (1 byte) || SecretBox(meta)`` (XSalsa20-Poly1305: 24-byte nonce,
    16-byte tag, ciphertext) and, as every file's data on ext4, starts a block: live metas,
    replaced ones (``meta.new`` renamed over) and deleted ones in free blocks alike. For each
    block whose first byte could be a kid, the examiner decrypts the head under each key (the
    keystream is SecretBox's own encryption of zeros under that nonce) and looks for the
    msgpack head every meta starts with; a hit is decoded to its end (``msgpack``) and then
    authenticated in full, so only a real meta counts."""
    import msgpack
    import msgspec

    from node.blobs import _META_DEC, _META_ENC, _Meta

    head = _META_ENC.encode(_Meta(bytes(16), "", "", b"", b"", 0, (), (), (), 0))[:8]
    boxes = [nacl.secret.SecretBox(k) for k in keys]
    zeros = bytes(len(head))
    found = []
    for off in range(0, len(raw) - BLOCK + 1, BLOCK):
        if raw[off] >= 4 or not any(raw[off + 1 : off + 25]):  # kid < SLOTS; a nonce
            continue
        nonce = raw[off + 1 : off + 25]
        ct = raw[off + 41 : off + 41 + len(head)]
        for box in boxes:
            stream = bytes(box.encrypt(zeros, nonce))[40:]
            if _xor(ct, stream) != head:
                continue
            limit = min(len(raw) - off - 41, 1 << 16)  # a meta is at most ~37 KiB
            body = _xor(
                raw[off + 41 : off + 41 + limit], bytes(box.encrypt(bytes(limit), nonce))[40:]
            )
            unpacker = msgpack.Unpacker(raw=True, max_buffer_size=limit)
            unpacker.feed(body)
            try:
                unpacker.unpack()
            except (ValueError, msgpack.OutOfData, msgpack.ExtraData):
                continue
            n = unpacker.tell()
            try:
                pt = bytes(box.decrypt(raw[off + 1 : off + 41 + n]))
                meta = _META_DEC.decode(pt)
            except (nacl.exceptions.CryptoError, msgspec.MsgspecError):
                continue
            found.append(CarvedMeta(off, meta.blob, meta.kind, meta.key, meta.prefix, meta.size))
            break
    return found


def node_chunks_decryptable(
    raw: bytes, metas: Iterable[CarvedMeta], chunks: Sequence[bytes]
) -> int:
    """Node-side encrypted chunks on ``raw`` that open under a carved per-blob key (each
    distinct key once: a blob's replaced metas carry the same key).

    ``chunks`` is the ground truth (what the device uploaded: the node's plaintext). The node
    stores chunk ``i`` as XChaCha20-Poly1305 IETF under the blob's key with nonce prefix ||
    ``i``: a stream cipher, so encrypting the first 64 bytes of chunk ``i`` gives the first 64
    bytes of its stored form. Each occurrence found is then authenticated in full."""
    import nacl.bindings as nb

    n = 0
    for m in {(m.key, m.prefix): m for m in metas}.values():  # a blob's metas share its key
        for i, pt in enumerate(chunks):
            nonce = m.prefix + i.to_bytes(8, "big")
            want = nb.crypto_aead_xchacha20poly1305_ietf_encrypt(pt[:64], None, nonce, m.key)[:64]
            pos = raw.find(want)
            while pos >= 0:
                slot = raw[pos : pos + len(pt) + 16]
                try:
                    nb.crypto_aead_xchacha20poly1305_ietf_decrypt(slot, None, nonce, m.key)
                    n += 1
                    break
                except nacl.exceptions.CryptoError:
                    pos = raw.find(want, pos + 1)
    return n
