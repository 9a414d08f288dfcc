"""``haven group …`` and groups in ``send`` / ``recv`` / ``history``, as real CLI processes on
two real nodes (docs/cli.md, "haven group").

One world: alice and carol on node A, bob and dave on node B. Alice creates a group with bob and
carol, sends to it by name, and watches the counter of her message fall as bob reads (carol has
read receipts off: hidden). Then the error codes a user meets (a non-admin's change, an
ambiguous name, a bad invite), and an invite redeemed by dave. In between, alice's home node
is stopped: her texts are queued on her device and sent by her next command once it is back.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from .forkcli import haven, join
from .harness import NodeProc, wait_until


def _json(*args: str) -> Any:
    return json.loads(haven(*args, "--json").stdout)


def _lines(*args: str) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in haven(*args, "--json").stdout.splitlines() if ln.strip()]


def _code(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 1, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr and "Error" not in p.stderr, p.stderr
    return str(json.loads(p.stdout)["error"])


def _has_group(home: Path, gid: str) -> bool:
    haven("recv", "--home", str(home), "--wait", "0.2")
    return any(g["group_id"] == gid for g in _json("group", "list", "--home", str(home)))


def test_group_commands_end_to_end(tmp_path: Path, nodes: list[NodeProc]) -> None:
    a = NodeProc.create(tmp_path, "A").start()
    nodes.append(a)
    b = NodeProc.create(tmp_path, "B").start()
    nodes.append(b)
    alice_h, alice = join(a, tmp_path, "alice")
    carol_h, carol = join(a, tmp_path, "carol")
    bob_h, bob = join(b, tmp_path, "bob")
    dave_h, dave = join(b, tmp_path, "dave")
    al, bo, ca, da = (("--home", str(h)) for h in (alice_h, bob_h, carol_h, dave_h))
    haven("settings", *ca, "--read-receipts", "off")

    made = _json("group", "create", "team", "--member", bob, carol, *al)
    gid = made["group_id"]
    ref = "group:" + gid
    assert len(gid) == 32 and made["name"] == "team"
    assert made["members"] == sorted([alice, bob, carol])
    assert haven("group", "list", *al).stdout.split() == [
        "group:" + gid[:8],
        "team",
        "3",
        "member(s)",
    ]
    listed = _json("group", "list", *al)
    assert [(g["group_id"], g["name"]) for g in listed] == [(gid, "team")]
    info = _json("group", "info", gid[:8], *al)
    assert (info["admins"], info["version"], info["active"]) == ([alice], 1, True)
    assert {bob, carol} <= {r["address"] for r in info["readers"]}
    assert all(set(r) >= {"address", "device_id", "verified", "changed"} for r in info["readers"])
    for home in (bob_h, carol_h):
        wait_until(lambda h=home: _has_group(h, gid), 20, "members to learn the group")

    sent = _json("send", "team", "hello, team", *al)
    assert sent["chat"] == ref and len(sent["msg_id"]) == 32
    got: list[dict[str, Any]] = []

    def bob_got() -> bool:
        got.extend(r for r in _lines("recv", *bo, "--wait", "0.3") if r["kind"] == "text")
        return bool(got)

    wait_until(bob_got, 20, "bob to receive the group message")
    assert [(r["chat"], r["from"], r["text"]) for r in got] == [(ref, alice, "hello, team")]

    def counter() -> dict[str, Any]:
        haven("recv", *al, "--wait", "0.2")
        rows = _lines("history", ref, *al, "--no-mark-read")
        assert [r["msg_id"] for r in rows] == [sent["msg_id"]] and rows[0]["chat"] == ref
        return rows[0]

    first = counter()
    assert (first["unread_by"], first["unread_members"]) == (2, sorted([bob, carol]))
    assert first["receipts_hidden"] == 0
    rows = _lines("history", "team", *bo)  # bob reads (and sends his watermark)
    assert rows[0]["from"] == alice and rows[0]["chat"] == ref
    wait_until(lambda: _has_group(carol_h, gid), 20, "carol's device to be up to date")
    _lines("history", ref, *ca)  # carol reads, receipts off: she counts as hidden
    wait_until(
        lambda: (c := counter())["unread_by"] == 0 and c["receipts_hidden"] == 1,
        20,
        "the counter to fall to 0 with carol hidden",
    )

    # alice's home node is down: the text is queued on her device (as a 1:1 text through the
    # app), and the next command that connects sends it; every member gets it once
    a.stop()
    queued = haven("send", "team", "typed while A is down", *al, "--json")
    assert json.loads(queued.stdout)["status"] == "queued", queued.stdout
    assert "queued on this device" in queued.stderr and "Traceback" not in queued.stderr
    assert haven("send", "team", "and a second one", *al).stdout.strip() == "queued"
    pending = _lines("history", ref, *al, "--no-mark-read")[-2:]
    assert [(r["text"], r["status"]) for r in pending] == [
        ("typed while A is down", "pending"),
        ("and a second one", "pending"),
    ]
    a.start()
    haven("recv", *al, "--wait", "0")  # connects: flushes the queue first
    flushed = _lines("history", ref, *al, "--no-mark-read")[-2:]
    assert [r["status"] for r in flushed] == ["sent", "sent"] and flushed[0]["devices"]["total"]
    want = ["typed while A is down", "and a second one"]
    for home in (bob_h, carol_h):
        texts: list[str] = []

        def member_got(h: Path = home, texts: list[str] = texts) -> bool:
            texts.extend(
                r["text"]
                for r in _lines("recv", "--home", str(h), "--wait", "0.3")
                if r["kind"] == "text"
            )
            return len(texts) >= 2

        wait_until(member_got, 30, "the members to receive the queued texts")
        haven("recv", "--home", str(home), "--wait", "0.3")  # nothing more (a duplicate) comes
        rows = [r for r in _lines("history", ref, "--home", str(home)) if r["from"] == alice]
        assert [r["text"] for r in rows] == ["hello, team", *want] and texts == want

    # errors a user meets: a non-admin's change, an ambiguous name, a bad invite
    assert _code(haven("group", "add", "team", dave, *bo, "--json", check=False)) == "not_admin"
    assert _code(haven("group", "add", ref, "nobody", *al, "--json", check=False)) == (
        "bad_argument"
    )
    _json("group", "create", "team", *al)  # a second group of that name, alice alone
    assert _code(haven("send", "team", "?", *al, "--json", check=False)) == "ambiguous_group"
    assert _code(haven("group", "info", "nosuch", *al, "--json", check=False)) == "unknown_group"
    bad = haven("group", "join", "haven:group:AAAA", *da, "--json", check=False)
    assert _code(bad) == "invalid_group_invite"

    # an invite, redeemed by dave: alice's device adds him
    code = _json("group", "invite", ref, "--uses", "1", *al)["code"]
    assert code.startswith("haven:group:")
    asked = _json("group", "join", code, *da)
    assert asked["status"] == "requested" and asked["group_id"] == gid

    def dave_in() -> bool:
        haven("recv", *al, "--wait", "0.2")  # alice's device takes the request
        return _has_group(dave_h, gid)

    wait_until(dave_in, 30, "dave to be added through the invite")
    assert dave in _json("group", "info", ref, *al)["members"]
