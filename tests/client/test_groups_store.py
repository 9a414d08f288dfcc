"""Device-side group formats: schema 5 (migrated from 4), payload keys ``wm``/``hide``/``gkey``."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import msgpack
import nacl.signing
import pytest

from client import devicedb
from client import group_state as gs
from client import groups as groups_mod
from client.groups import (
    GroupInfo,
    Groups,
    Resolved,
    Target,
    _with_unreachable,
    gid_of_ref,
    send_chunks,
)
from client.payload import Payload
from client.state import DeviceState
from federation import frames as F
from federation.devicelist import DeviceInfo
from federation.errors import MalformedEnvelope, RateLimited
from federation.ids import new_envelope_id
from federation.wire import Envelope, packb

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


class RateLimitedLink:
    """Answers ``query_keys`` like a home node without ``multi`` whose ``remotekeys`` budget
    is empty: each address is refused ``rate_limited`` its first ``refusals`` times."""

    challenge = None  # no ``multi`` feature

    def __init__(self, refusals: int) -> None:
        self.refusals = refusals
        self.asked: Counter[str] = Counter()
        self._rid = 0

    def next_rid(self) -> int:
        self._rid += 1
        return self._rid

    async def request(self, frame: F.Frame) -> F.Frame:
        assert isinstance(frame, F.QueryKeys)
        self.asked[frame.address] += 1
        if self.asked[frame.address] <= self.refusals:
            raise RateLimited("too many remote key queries")
        return F.Keys(frame.rid, "node-b", None, {})


async def test_rate_limited_key_queries_are_retried_then_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(groups_mod, "RETRY_DELAY_S", (0.001, 0.002))
    engine = Groups.__new__(Groups)  # _query uses only the connection
    addrs = [f"m{i}@b.example" for i in range(5)]
    link = RateLimitedLink(refusals=1)
    got = await engine._query(link, addrs, True)  # type: ignore[arg-type]
    assert {a: got[a][0] for a in addrs} == dict.fromkeys(addrs, "node-b")
    assert all(got[a][3] == "" for a in addrs) and set(link.asked.values()) == {2}
    stuck = RateLimitedLink(refusals=10**6)  # never refills: bounded, then reported
    got = await engine._query(stuck, addrs, True)  # type: ignore[arg-type]
    assert {got[a][3] for a in addrs} == {"rate_limited"}
    assert sum(stuck.asked.values()) == groups_mod.RETRY_STALLS  # one try per stalled round
    res = Resolved(unreachable=set(addrs[:3]), refused={a: "rate_limited" for a in addrs})
    (w,) = _with_unreachable(res, "group:" + "ab" * 16)
    assert w.code == "members_unreachable" and w.peer == "group:" + "ab" * 16
    assert w.message.startswith("3 members could not be reached now (rate_limited)")


def test_send_frames_are_bounded_by_bytes_and_count() -> None:
    def item(size: int) -> tuple[str, Envelope]:
        return ("node-b", Envelope(new_envelope_id(), os.urandom(16), 1, b"x" * size))

    big = [item(64 * 1024) for _ in range(200)]  # 200 state copies of a 1,000-member group
    chunks = send_chunks(big)
    assert [len(c) for c in chunks] == [55, 55, 55, 35]
    for c in chunks:
        frame = F.Send(1, c).encode()
        assert len(frame) <= groups_mod.SEND_FRAME_BYTES
    assert [len(c) for c in send_chunks([item(100) for _ in range(450)])] == [200, 200, 50]
    assert send_chunks([]) == []


def test_a_device_not_on_the_reused_lists_drops_them() -> None:
    engine = Groups.__new__(Groups)  # only the reuse bookkeeping is exercised
    engine.dev = SimpleNamespace(curve_key="me")  # type: ignore[assignment]
    engine._lists, engine._listed = {}, set()
    engine._lists[("a@x",)] = (float("inf"), b"", Resolved())
    engine._listed.update({"dev-a", "dev-b"})
    for known in ("dev-a", "me"):  # a listed device, or our own: the lists stay
        engine.seen_device(known)
        assert engine._lists
    engine.seen_device("dev-new")  # a member linked a device we do not know: ask again
    assert engine._lists == {} and engine._listed == set()


def test_a_devices_notice_drops_only_the_lists_with_its_member() -> None:
    engine = Groups.__new__(Groups)
    engine.dev = SimpleNamespace(curve_key="me")  # type: ignore[assignment]
    engine._lists, engine._listed, engine.device_notices = {}, set(), 0
    dev = DeviceInfo("dev-c", b"e" * 32, b"s" * 32, b"m" * 16, 0)
    engine._lists[("a@x", "me@x")] = (float("inf"), b"", Resolved())
    kept = Resolved([Target("c@x", "n", [dev], True, b"", 1)])
    engine._lists[("c@x", "me@x")] = (float("inf"), b"", kept)
    engine._listed.update({"dev-a", "dev-c"})
    engine.member_devices_changed("a@x")
    assert list(engine._lists) == [("c@x", "me@x")] and engine._listed == {"dev-c"}
    assert engine.device_notices == 1


def test_group_hand_over_chunks_fit_one_link_message_each() -> None:
    from client.group_link import GROUP_CHUNK_BYTES, group_chunks
    from client.linking import _open, _seal

    k = os.urandom(32)
    items = [["s", os.urandom(16), os.urandom(n)] for n in (64_600, 28_000, 100, 40_000)]
    since = {f"m{i}@x": i for i in range(50)}
    items += [["g", os.urandom(16), 1, b"", since] for _ in range(1000)]
    chunks = group_chunks(items)
    assert [it for c in chunks for it in c] == items
    assert len(chunks) > 4
    for i, c in enumerate(chunks):
        assert sum(len(packb(it)) for it in c) <= GROUP_CHUNK_BYTES or len(c) == 1
        msg = {"gchunk": i, "items": c}
        assert _open(k, _seal(k, msg)) == msg  # one 64 KiB bucket at most


def test_a_bad_group_hand_over_is_refused_with_one_code() -> None:
    import nacl.signing

    from client import group_state as gs
    from client.group_link import _parse

    key = nacl.signing.SigningKey.generate()
    gid = gs.new_gid()
    signed = gs.sign_state(gs.create(gid, "g", ["b@x"], "a@x", at=1), key)
    states, metas = _parse([["s", gid, signed.encode()], ["g", gid, 5, b"", {"b@x": 1}]])
    assert states == {gid: [signed]} and metas == {gid: [5, b"", {"b@x": 1}]}
    for bad in (
        [["s", gid, b"\x00" * 40]],  # not a signed state
        [["s", gid]],  # too short
        [["g", gid, "soon", b"", {}]],  # not a time
        [["g", gid, 5, b"", {"b@x": "x"}]],  # not a join time
    ):
        with pytest.raises(MalformedEnvelope):
            _parse(bad)


def test_pending_joins_are_sealed_bounded_and_bind_the_first_state(tmp_path: Path) -> None:
    s = DeviceState(str(tmp_path / "dev"))
    clock = SimpleNamespace(now_ms=lambda: 1_000)
    engine = Groups(SimpleNamespace(state=s, clock=clock, address="me@a.example"))  # type: ignore[arg-type]
    admin, other = nacl.signing.SigningKey.generate(), nacl.signing.SigningKey.generate()
    gid = gs.new_gid()
    joins = {gid: ("ann@a.example", bytes(admin.verify_key), 5_000)}
    joins |= {
        gs.new_gid(): ("ann@a.example", bytes(admin.verify_key), 6_000 + i)
        for i in range(groups_mod.JOINS_MAX)
    }
    with s.tx() as db:
        engine._save_joins(db, joins)
    (raw,) = s.db.execute("SELECT v FROM kv WHERE k=?", (groups_mod.JOINS_KEY,)).fetchone()
    assert b"ann@a.example" not in raw  # sealed like the other rows
    kept = engine._joins(1_000)
    assert len(kept) == groups_mod.JOINS_MAX and gid not in kept  # the oldest went
    with s.tx() as db:
        engine._save_joins(db, {gid: joins[gid]})
    assert engine.pending_join(gid) == ("ann@a.example", bytes(admin.verify_key))
    assert engine._joins(5_000) == {}  # expired with the invite's lifetime

    st = gs.create(gid, "g", ["me@a.example"], "ann@a.example", at=1)
    assert engine._root_allowed(gs.sign_state(st, admin), 1_000)
    assert not engine._root_allowed(gs.sign_state(st, other), 1_000)  # not the pinned key
    by_other = gs.create(gid, "g", ["me@a.example", "ann@a.example"], "eve@a.example", at=1)
    assert not engine._root_allowed(gs.sign_state(by_other, other), 1_000)  # not the admin
    unasked = gs.create(gs.new_gid(), "g", ["me@a.example"], "eve@a.example", at=1)
    assert engine._root_allowed(gs.sign_state(unasked, other), 1_000)  # no join: TOFU
    s.close()
