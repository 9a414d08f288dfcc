"""The device store at rest: SQLCipher as a whole, a wrapped key, crypto-shredded texts."""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import nacl.exceptions
import nacl.pwhash
import nacl.secret
import nacl.utils
import pytest
import sqlcipher3
import vodozemac as vz

from client import devicedb, keyslots
from client.keyslots import HEADER_SIZE, SLOT_SIZE, KeySlots
from client.state import Contact, DeviceState, HistoryRow
from federation.errors import HavenError

ROOT = Path(__file__).resolve().parents[2]
ALICE = "alice-zq81@node-a.example"
BOB = "bob-xw42@node-b.example"


def row(n: int, text: str, expire_at: int | None = None, peer: str = BOB) -> HistoryRow:
    return HistoryRow(
        bytes([n]) * 16, peer, False, peer, text, 1000 + n, 2000 + n, expire_at=expire_at
    )


def fill(s: DeviceState) -> None:
    with s.tx() as db:
        s.put(db, "address", ALICE.encode())
        s.save_contact(db, Contact(BOB, b"k" * 32, "node-b-id", b"dl", b"sig"))
        s.add_history(db, row(1, "kept-text-1"))
        s.add_history(db, row(2, "deleted-text-2"))
        s.add_history(db, row(3, "expiring-text-3", expire_at=5000))
        s.add_history(db, row(4, "edited-away-text-4"))


def raw_home(home: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(home.iterdir()) if p.is_file())


def slots_of(s: DeviceState) -> dict[bytes, tuple[int, bytes]]:
    return {r[0]: (r[1], r[2]) for r in s.db.execute("SELECT msg_id, slot, text FROM history")}


def cli(
    home: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HAVEN_")}
    base["PYTHON_KEYRING_BACKEND"] = "keyring.backends.fail.Keyring"  # never the user's keyring
    return subprocess.run(
        [sys.executable, "-m", "client.cli", *args, "--home", str(home), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=base | {"PYTHONPATH": str(ROOT)} | (env or {}),
    )


def test_sqlcipher_4_is_bundled() -> None:
    db = sqlcipher3.connect(":memory:")
    (version,) = db.execute("PRAGMA cipher_version").fetchone()
    assert int(version.split(".")[0]) >= 4


def test_database_has_no_header_and_no_plaintext(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    s = DeviceState(str(home), passphrase="correct horse")
    fill(s)
    s.db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    during = raw_home(home)  # WAL and all, while open
    s.close()
    after = raw_home(home)
    assert (home / "device.db").read_bytes()[:16] != b"SQLite format 3\x00"
    for data in (during, after):
        assert b"SQLite format" not in data
        for needle in (b"alice-zq81", b"bob-xw42", b"node-b-id", b"kept-text", b"deleted-text"):
            assert needle not in data, needle
    # the key file holds no clear database key: it does not open the database
    keys = (home / "device.keys").read_bytes()
    assert KeySlots(str(home / "device.keys")).protection == "passphrase"
    with pytest.raises(HavenError):
        devicedb.connect(str(home / "device.db"), keys[26:58])
    assert os.stat(home / "device.db").st_mode & 0o077 == 0
    assert os.stat(home / "device.keys").st_mode & 0o077 == 0


def test_wrong_or_missing_passphrase_fails_with_a_code(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    s = DeviceState(str(home), passphrase="right")
    fill(s)
    s.close()
    with pytest.raises(HavenError) as err:
        DeviceState(str(home), passphrase="wrong")
    assert err.value.code == "wrong_passphrase"
    with pytest.raises(HavenError) as err:
        DeviceState(str(home))
    assert err.value.code == "passphrase_required"
    res = cli(home, "whoami", env={"HAVEN_PASSPHRASE": "wrong"})
    assert res.returncode == 1
    assert '"error": "wrong_passphrase"' in res.stdout
    assert "Traceback" not in res.stderr and "hmac" not in res.stderr
    res = cli(home, "whoami")
    assert res.returncode == 1 and '"error": "passphrase_required"' in res.stdout
    assert next(r.text for r in DeviceState(str(home), passphrase="right").history(BOB)) == (
        "kept-text-1"
    )


def test_delete_expire_edit_shred_the_text_even_for_the_database_key(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    s = DeviceState(str(home), passphrase="pw")
    fill(s)
    before = slots_of(s)
    # an examiner's best case: every page the database ever had, taken before the deletes
    s.db.execute("PRAGMA wal_checkpoint(RESTART)")
    snapshot = tmp_path / "snapshot.db"
    shutil.copy(home / "device.db", snapshot)
    with s.tx() as db:
        assert s.delete_history(db, bytes([2]) * 16)
        assert s.edit_history(db, bytes([4]) * 16, "the new text")
    assert s.purge_expired(6000) == 1
    assert [r.text for r in s.history(BOB)] == ["kept-text-1", "the new text"]
    after = slots_of(s)
    s.close()

    keyfile = (home / "device.keys").read_bytes()

    def slot_bytes(i: int) -> bytes:
        return keyfile[HEADER_SIZE + i * SLOT_SIZE : HEADER_SIZE + (i + 1) * SLOT_SIZE]

    gone = [bytes([n]) * 16 for n in (2, 3, 4)]
    for mid in gone:  # zeroed in place, and not reused by the edit's new key
        assert slot_bytes(before[mid][0]) == bytes(SLOT_SIZE)
    assert after[bytes([4]) * 16][0] not in {before[mid][0] for mid in gone}
    assert slot_bytes(before[bytes([1]) * 16][0]) != bytes(SLOT_SIZE)

    # open the pre-delete copy with the database key, as someone holding the passphrase would
    db_key = KeySlots(str(home / "device.keys")).unwrap("pw")
    old = devicedb.connect(str(snapshot), db_key)
    carved = {r[0]: (r[1], r[2]) for r in old.execute("SELECT msg_id, slot, text FROM history")}
    old.close()
    assert set(carved) == set(before)
    live_keys = [slot_bytes(i) for i in range((len(keyfile) - HEADER_SIZE) // SLOT_SIZE)]
    live_keys = [k for k in live_keys if k != bytes(SLOT_SIZE)]
    live_keys.append(devicedb.storage_key_for(db_key))
    opened = []
    for mid, (_slot, sealed) in carved.items():
        for k in live_keys:
            try:
                opened.append((mid, bytes(nacl.secret.SecretBox(k).decrypt(sealed))))
            except nacl.exceptions.CryptoError:
                continue
    assert opened == [(bytes([1]) * 16, b"kept-text-1")]  # only the text still in history
    for needle in (b"deleted-text", b"expiring-text", b"edited-away"):
        assert needle not in raw_home(home)


def test_key_slots_are_written_once_per_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = DeviceState(str(tmp_path / "dev"))
    syncs: list[int] = []
    real = os.fsync
    monkeypatch.setattr(keyslots.os, "fsync", lambda fd: (syncs.append(fd), real(fd))[1])
    with s.tx() as db:  # 300 rows: more than one growth step of the key file
        for n in range(300):
            s.add_history(
                db, HistoryRow(n.to_bytes(16, "big"), BOB, False, BOB, f"t{n}", 1, 2, expire_at=10)
            )
    assert len(syncs) == 1
    syncs.clear()
    assert s.purge_expired(20) == 300
    assert len(syncs) == 1
    syncs.clear()
    with s.tx() as db:  # a duplicate takes no slot and writes nothing
        assert s.add_history(db, row(1, "x"))
        assert not s.add_history(db, row(1, "x"))
    assert len(syncs) == 1
    s.close()
    ks = KeySlots(str(tmp_path / "dev" / "device.keys"))
    assert sum(ks.key(i) is not None for i in range(512)) == 1


def test_rolled_back_or_crashed_transaction_leaves_no_key(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    s = DeviceState(str(home))
    with pytest.raises(RuntimeError), s.tx() as db:
        s.add_history(db, row(1, "never"))
        raise RuntimeError("boom")
    assert s.message(bytes([1]) * 16) is None
    # a crash between the key write and the commit: the key is on disk, no row refers to it
    s.keys.allocate()
    s.keys.flush()
    s.db.close()
    leaked = KeySlots(str(home / "device.keys"))
    assert sum(leaked.key(i) is not None for i in range(256)) == 1
    s = DeviceState(str(home))  # reconciles on open
    assert sum(s.keys.key(i) is not None for i in range(256)) == 0
    s.close()


def test_passphrase_change_rewraps_only_the_key_slot(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    s = DeviceState(str(home), passphrase="old pass")
    fill(s)
    s.purge_expired(2**62)  # what the CLI's open would do (it changes the database)
    s.close()
    db_before = hashlib.sha256((home / "device.db").read_bytes()).hexdigest()
    keys_before = (home / "device.keys").read_bytes()
    res = cli(
        home, "passphrase", env={"HAVEN_PASSPHRASE": "old pass", "HAVEN_NEW_PASSPHRASE": "new"}
    )
    assert res.returncode == 0, res.stderr
    assert '"protection": "passphrase"' in res.stdout
    assert hashlib.sha256((home / "device.db").read_bytes()).hexdigest() == db_before
    keys_after = (home / "device.keys").read_bytes()
    assert keys_after[HEADER_SIZE:] == keys_before[HEADER_SIZE:]
    assert keys_after[:HEADER_SIZE] != keys_before[:HEADER_SIZE]
    with pytest.raises(HavenError) as err:
        DeviceState(str(home), passphrase="old pass")
    assert err.value.code == "wrong_passphrase"
    res = cli(home, "passphrase", "--keyring", env={"HAVEN_PASSPHRASE": "new"})
    assert res.returncode == 1 and '"error": "keyring_unavailable"' in res.stdout
    assert (home / "device.keys").read_bytes() == keys_after  # nothing changed
    s = DeviceState(str(home), passphrase="new")
    assert next(r.text for r in s.history(BOB)) == "kept-text-1"
    s.change_passphrase(None)
    assert not s.protected
    s.close()
    assert DeviceState(str(home)).protection == "none"


def test_whoami_reports_protection(tmp_path: Path) -> None:
    import json

    # only `join` creates a device home now (docs/cli.md "Homes"): make both first
    DeviceState(str(tmp_path / "plain"), keyring=False).close()
    DeviceState(str(tmp_path / "prot"), passphrase="pw").close()
    res = cli(tmp_path / "plain", "whoami")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["protected"] is False and info["protection"] == "none"
    assert info["address"] is None
    res = cli(tmp_path / "prot", "whoami", env={"HAVEN_PASSPHRASE": "pw"})
    info = json.loads(res.stdout)
    assert info["protected"] is True and info["protection"] == "passphrase"
    text = subprocess.run(
        [sys.executable, "-m", "client.cli", "whoami", "--home", str(tmp_path / "plain")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("HAVEN_")}
        | {"PYTHONPATH": str(ROOT)},
    ).stdout
    assert "unprotected" in text


class FakeKeyring:
    """The two calls of the ``keyring`` API this store uses, in memory."""

    def __init__(self) -> None:
        self.secrets: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, user: str) -> str | None:
        return self.secrets.get((service, user))

    def set_password(self, service: str, user: str, secret: str) -> None:
        self.secrets[(service, user)] = secret

    def delete_password(self, service: str, user: str) -> None:
        del self.secrets[(service, user)]


def test_keyring_wraps_the_key_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kr = FakeKeyring()
    monkeypatch.setattr(keyslots, "_keyring", lambda: kr)
    home = tmp_path / "dev"
    s = DeviceState(str(home), keyring=True)
    fill(s)
    s.close()
    assert len(kr.secrets) == 1
    s = DeviceState(str(home))
    assert s.protection == "keyring" and s.protected
    s.change_passphrase("pw")  # moving to a passphrase drops the keyring entry
    s.close()
    assert kr.secrets == {}
    monkeypatch.setattr(keyslots, "_keyring", lambda: None)
    assert DeviceState(str(home), passphrase="pw").protection == "passphrase"


# ---- migration of a version-1 home (plaintext device.db + device.key) --------------------------


def write_v1_home(home: Path, passphrase: str | None) -> dict[str, str]:
    """A home as the version-1 store wrote it: SQLite in clear, secrets sealed by device.key."""
    home.mkdir(mode=0o700)
    key = nacl.utils.random(32)
    data = key
    if passphrase:
        salt = nacl.utils.random(nacl.pwhash.argon2id.SALTBYTES)
        kek = nacl.pwhash.argon2id.kdf(
            32, passphrase.encode(), salt, devicedb.V1_OPSLIMIT, devicedb.V1_MEMLIMIT
        )
        data = b"HVPW1" + salt + nacl.secret.SecretBox(kek).encrypt(key)
    (home / "device.key").write_bytes(data)
    box = nacl.secret.SecretBox(key)
    account, other = vz.Account(), vz.Account()
    other.generate_one_time_keys(1)
    otk = next(iter(other.one_time_keys.values()))
    session = account.create_outbound_session(other.curve25519_key, otk)
    db = sqlite3.connect(home / "device.db")
    db.executescript(devicedb.SCHEMA_V1)
    db.execute("PRAGMA user_version=1")
    db.execute("INSERT INTO kv VALUES ('address', ?)", (box.encrypt(ALICE.encode()),))
    db.execute("INSERT INTO kv VALUES ('account', ?)", (box.encrypt(account.pickle(key).encode()),))
    db.execute(
        "INSERT INTO sessions VALUES (?, ?, ?, 7)",
        (
            str(other.curve25519_key.to_base64()),
            session.session_id,
            box.encrypt(session.pickle(key).encode()),
        ),
    )
    db.execute("INSERT INTO device_names VALUES ('dev1', ?)", (box.encrypt(b"alice-phone"),))
    db.execute(
        "INSERT INTO contacts VALUES (?, ?, 'node-b-id', x'00', x'00', 1, 0)", (BOB, b"k" * 32)
    )
    for n, text in ((1, "old-text-one"), (2, "old-text-two")):
        db.execute(
            "INSERT INTO history (msg_id, peer, outgoing, sender, text, sent_at, received_at) "
            "VALUES (?, ?, 0, ?, ?, ?, ?)",
            (bytes([n]) * 16, BOB, BOB, box.encrypt(text.encode()), n, n),
        )
    db.commit()
    db.close()
    return {"curve": str(account.curve25519_key.to_base64()), "session": session.session_id}


@pytest.mark.parametrize("passphrase", [None, "v1 pass"])
def test_v1_home_migrates_on_first_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, passphrase: str | None
) -> None:
    home = tmp_path / "dev"
    if passphrase:  # v1's 1 GiB Argon2id would take ~12 s per derivation here
        monkeypatch.setattr(devicedb, "V1_OPSLIMIT", nacl.pwhash.argon2id.OPSLIMIT_INTERACTIVE)
        monkeypatch.setattr(devicedb, "V1_MEMLIMIT", nacl.pwhash.argon2id.MEMLIMIT_INTERACTIVE)
    ids = write_v1_home(home, passphrase)
    assert b"bob-xw42" in (home / "device.db").read_bytes()  # the examiner's view before
    if passphrase:
        with pytest.raises(HavenError) as err:
            DeviceState(str(home), passphrase="wrong")
        assert err.value.code == "wrong_passphrase"
        assert devicedb.is_plaintext(str(home / "device.db"))  # untouched by the failed open
        first = DeviceState(str(home), passphrase=passphrase)
        assert first.notices == [devicedb.MIGRATED_NOTICE]
        first.close()
    else:  # through the CLI: the user is told once, on stderr
        res = cli(home, "whoami")
        assert res.returncode == 0, res.stderr
        assert (
            "free space" not in res.stdout and "may remain in the disk's free space" in res.stderr
        )
    assert sorted(p.name for p in home.iterdir()) == ["device.db", "device.keys"]
    raw = raw_home(home)
    for needle in (b"SQLite format", b"bob-xw42", b"alice-zq81", b"node-b-id", b"alice-phone"):
        assert needle not in raw
    s = DeviceState(str(home), passphrase=passphrase)
    assert s.notices == []  # told once
    assert s.protection == ("passphrase" if passphrase else "none")
    assert [r.text for r in s.history(BOB)] == ["old-text-one", "old-text-two"]
    assert s.get("address") == ALICE.encode()
    acc = vz.Account.from_pickle(s.get("account").decode(), s.storage_key)  # type: ignore[union-attr]
    assert str(acc.curve25519_key.to_base64()) == ids["curve"]
    ((sid, pickle),) = s.sessions(s.db.execute("SELECT peer_key FROM sessions").fetchone()[0])
    assert sid == ids["session"]
    vz.Session.from_pickle(pickle, s.storage_key)
    c = s.contact(BOB)
    assert c is not None and c.verified
    assert len({slot for slot, _ in slots_of(s).values()}) == 2
    s.close()


def test_interrupted_migration_is_finished_on_next_open(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    write_v1_home(home, None)
    DeviceState(str(home)).close()
    # the state after "device.db -> device.db.old" but before "device.db.new -> device.db"
    os.replace(home / "device.db", home / "device.db.new")
    (home / "device.db.old").write_bytes(b"SQLite format 3\x00 stale plaintext")
    (home / "device.key").write_bytes(b"k" * 32)
    s = DeviceState(str(home))
    assert [r.text for r in s.history(BOB)] == ["old-text-one", "old-text-two"]
    s.close()
    assert sorted(p.name for p in home.iterdir()) == ["device.db", "device.keys"]


def test_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "dev"
    DeviceState(str(home)).close()
    (home / "device.keys").unlink()
    with pytest.raises(HavenError) as err:
        DeviceState(str(home))
    assert err.value.code == "key_file_missing"


def test_rolled_back_delete_keeps_the_text_even_after_its_slots_were_written(
    tmp_path: Path,
) -> None:
    home = tmp_path / "dev"
    s = DeviceState(str(home))
    fill(s)
    with pytest.raises(RuntimeError), s.tx() as db:
        s.delete_history(db, bytes([2]) * 16)
        s.edit_history(db, bytes([4]) * 16, "not applied")
        s.keys.flush()  # as if COMMIT failed right after the group write
        raise RuntimeError("commit failed")
    s.close()
    s = DeviceState(str(home))  # from disk: the zeroed keys were restored
    assert [r.text for r in s.history(BOB)] == [
        "kept-text-1",
        "deleted-text-2",
        "expiring-text-3",
        "edited-away-text-4",
    ]
    s.close()


def test_two_processes_on_one_home_never_share_a_slot(tmp_path: Path) -> None:
    home = str(tmp_path / "dev")
    a = DeviceState(home)
    b = DeviceState(home)  # its own key-slot cache, as another process would have
    for n in range(1, 7):
        first, second = (a, b) if n % 2 else (b, a)
        with first.tx() as db:
            first.add_history(db, row(n, f"text-{n}"))
        assert second.message(bytes([n]) * 16).text == f"text-{n}"  # type: ignore[union-attr]
        if n == 3:
            with second.tx() as db:
                second.delete_history(db, bytes([1]) * 16)
    want = [f"text-{n}" for n in range(2, 7)]
    assert [r.text for r in a.history(BOB)] == want
    assert [r.text for r in b.history(BOB)] == want
    slots = [slot for slot, _ in slots_of(a).values()]
    assert len(set(slots)) == len(slots) == 5
    a.close()
    b.close()
    assert [r.text for r in DeviceState(home).history(BOB)] == want
