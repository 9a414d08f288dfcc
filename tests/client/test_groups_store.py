"""Device-side group formats: schema 5 (migrated from 4), payload keys ``wm``/``hide``/``gkey``."""

from __future__ import annotations

import os
from pathlib import Path

import msgpack
import pytest

from client import devicedb
from client.groups import GroupInfo, gid_of_ref
from client.payload import Payload
from client.state import DeviceState
from federation.errors import MalformedEnvelope

V5_TABLES = {"groups", "group_outbound", "group_inbound", "group_invites", "group_pending"}


def _tables(s: DeviceState) -> set[str]:
    rows = s.db.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    return {r[0] for r in rows}


def test_schema_4_home_migrates_to_5(tmp_path: Path) -> None:
    home = str(tmp_path / "dev")
    s = DeviceState(home)
    with s.tx() as db:  # make it a schema-4 home with a row to keep
        for t in V5_TABLES:
            db.execute(f"DROP TABLE {t}")
        db.execute("PRAGMA user_version=4")
        s.put(db, "kept", b"value")
    s.close()
    s = DeviceState(home, create=False)
    assert s.db.execute("PRAGMA user_version").fetchone()[0] == devicedb.SCHEMA_VERSION == 5
    assert V5_TABLES <= _tables(s)
    assert s.get("kept") == b"value"
    s.close()


def test_group_payload_keys_round_trip_and_stay_off_old_payloads() -> None:
    p = Payload(os.urandom(16), "read", "group:" + "ab" * 16, 5, wm={"a@x": 3}, hide=True)
    q = Payload.decode(p.encode())
    assert q.wm == {"a@x": 3} and q.hide and q.gkey == b""
    k = Payload(os.urandom(16), "group_key", "b@y", 6, gkey=b"\x80")
    assert Payload.decode(k.encode()).gkey == b"\x80"
    plain = msgpack.unpackb(Payload(os.urandom(16), "text", "b@y", 7, text="hi").encode())
    assert not {"wm", "hide", "gkey"} & set(plain)  # 1:1 payloads are encoded as before


@pytest.mark.parametrize(
    "change",
    [
        {"wm": {"a@x": -1}},
        {"wm": {"a@x": "soon"}},
        {"wm": {f"m{i}@x": 1 for i in range(1001)}},
        {"wm": [1, 2]},
        {"gkey": b"x" * 5000, "kind": "group_key"},
        {"gkey": b"x"},  # gkey on a kind that has none
        {"kind": "group_join"},  # a join without its secret
    ],
)
def test_bad_group_payload_fields_are_refused(change: dict[str, object]) -> None:
    obj = msgpack.unpackb(Payload(os.urandom(16), "read", "a@x", 1).encode())
    obj.update(change)
    with pytest.raises(MalformedEnvelope):
        Payload.decode(msgpack.packb(obj))


def test_group_info_shapes() -> None:
    gid = bytes(range(16))
    g = GroupInfo(gid, "hikers", ("a@x", "b@y"), ("a@x",), 3, 10, True)
    assert g.ref == "group:" + gid.hex() and gid_of_ref(g.ref) == gid
    assert g.to_json() == {
        "group_id": gid.hex(),
        "name": "hikers",
        "members": ["a@x", "b@y"],
        "admins": ["a@x"],
        "version": 3,
        "active": True,
        "superseded": [],
    }
    assert gid_of_ref("group:zz") is None and gid_of_ref("a@x") is None
