"""The device daemon end to end: real nodes, real ``haven app`` subprocesses, the local API and
its WebSocket events (no polling of the messages endpoint for live delivery)."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from client.app.core import SUBSCRIBER_BACKLOG, AppCore
from federation.clock import FakeClock
from tests.integration.forkcli import haven, invite, join, recv, run
from tests.integration.harness import ROOT, NodeProc, async_wait_until, wait_until

from .conftest import Pair
from .daemon import DaemonProc, EventSocket, wait_message


def test_onboarding_on_an_empty_home(
    tmp_path: Path, app_node: NodeProc, start_daemon: Callable[..., DaemonProc]
) -> None:
    d = start_daemon("minsu")
    st = d.state()
    assert st["joined"] is False and st["locked"] is False and st["me"] is None
    assert not (tmp_path / "dev-minsu" / "device.db").exists()  # nothing created before join
    status, err = d.api("GET", "/api/chats", expect=None)
    assert status == 409 and err["error"] == "not_joined"

    st = d.join(invite(app_node, "minsu"), "김민수")
    assert st["joined"] is True
    assert st["me"]["display_name"] == "김민수"
    assert st["me"]["address"] == f"minsu@{app_node.host}"
    assert st["me"]["node_url"] == app_node.url
    d.wait_state(lambda s: s["connection"] == "online", what="online after joining")
    status, err = d.api("POST", "/api/join", {"invite": invite(app_node, "x")}, expect=None)
    assert status == 409 and err["error"] == "already_joined"


async def test_live_exchange_ticks_outage_and_recovery(alice_bob: Pair) -> None:
    p = alice_bob
    for d in (p.alice, p.bob):
        d.wait_state(lambda s: s["connection"] == "online", what="both online")
    async with EventSocket(p.alice) as a_ws, EventSocket(p.bob) as b_ws:
        assert a_ws.hello is not None and a_ws.hello["state"]["joined"] is True

        # live: bob's event socket gets it; nobody polls the messages endpoint
        sent = p.alice.send(p.bob_addr, "안녕 bob <b>hi</b>")
        assert sent["outgoing"] is True and sent["status"] in ("pending", "sent")
        ev = await b_ws.next(lambda e: e["type"] == "message")
        assert ev["message"]["id"] == sent["id"]
        assert ev["message"]["text"] == "안녕 bob <b>hi</b>"
        assert ev["message"]["sender"] == p.alice_addr and ev["message"]["outgoing"] is False
        chat = await b_ws.next(lambda e: e["type"] == "chat" and e["chat"]["unread"] == 1)
        assert chat["chat"]["address"] == p.alice_addr

        def status_is(want: str) -> Callable[[dict], bool]:  # type: ignore[type-arg]
            return lambda e: (
                e["type"] == "update"
                and e["message"]["id"] == sent["id"]
                and e["message"]["status"] == want
            )

        await a_ws.next(status_is("delivered"))
        _, read = p.bob.api("POST", f"/api/chats/{p.alice_addr}/read")
        assert read == {"count": 1}
        await a_ws.next(status_is("read"))
        await b_ws.next(lambda e: e["type"] == "chat" and e["chat"]["unread"] == 0)

        ping = p.bob.send(p.alice_addr, "ping")
        await a_ws.next(lambda e: e["type"] == "message" and e["message"]["id"] == ping["id"])

        # a group with bob (its state reaches his device before the outage)
        _, grp = p.alice.api(
            "POST", "/api/groups", {"name": "outage", "members": [p.bob_addr]}, timeout=60
        )
        gref = grp["ref"]
        gpath = f"/api/chats/{quote(gref, safe='')}/messages"
        wait_until(lambda: p.bob.api("GET", gpath, expect=None)[0] == 200, 30, "bob's group")

        # alice's home node dies (SIGKILL): she sees it, and what she types waits, pending
        p.a.kill()
        await a_ws.next(
            lambda e: e["type"] == "state" and e["state"]["connection"] in ("connecting", "offline")
        )
        queued = p.alice.send(p.bob_addr, "typed during the outage")
        assert queued["status"] == "pending"
        assert p.alice.state()["connection"] in ("connecting", "offline")
        [row] = [m for m in p.alice.messages(p.bob_addr) if m["id"] == queued["id"]]
        assert row["status"] == "pending"
        _, read = p.alice.api("POST", f"/api/chats/{p.bob_addr}/read")  # read while offline
        assert read == {"count": 1}
        gqueued = p.alice.send(gref, "group text during the outage")  # queued like a 1:1 text
        assert (gqueued["status"], gqueued["group"], gqueued["error"]) == ("pending", True, None)

        # back on the same port: the queue is sent, bob receives it once
        p.a.start()
        await a_ws.next(lambda e: e["type"] == "state" and e["state"]["connection"] == "online")
        await a_ws.next(
            lambda e: (
                e["type"] == "update"
                and e["message"]["id"] == queued["id"]
                and e["message"]["status"] in ("sent", "delivered")
            )
        )
        ev = await b_ws.next(lambda e: e["type"] == "message" and not e["message"]["outgoing"])
        assert ev["message"]["id"] == queued["id"]
        assert ev["message"]["text"] == "typed during the outage"
        # the read receipt alice gave offline was queued too, and arrives
        await b_ws.next(
            lambda e: (
                e["type"] == "update"
                and e["message"]["id"] == ping["id"]
                and e["message"]["status"] == "read"
            )
        )

        # alice did not go deaf: a message to her after the restart arrives live
        reply = p.bob.send(p.alice_addr, "welcome back")
        ev = await a_ws.next(lambda e: e["type"] == "message" and not e["message"]["outgoing"])
        assert ev["message"]["id"] == reply["id"] and ev["message"]["text"] == "welcome back"

    got = [m for m in p.bob.messages(p.alice_addr) if m["text"] == "typed during the outage"]
    assert [m["id"] for m in got] == [queued["id"]]  # exactly once
    ids = [m["id"] for m in p.bob.messages(p.alice_addr)]
    assert len(ids) == len(set(ids)) == 4
    wait_message(
        p.alice, p.bob_addr, lambda m: m["id"] == queued["id"] and m["status"] != "pending"
    )
    # the group text went out on the reconnect too: sent, and bob has it once
    wait_message(p.alice, gref, lambda m: m["id"] == gqueued["id"] and m["status"] == "sent")
    wait_message(p.bob, gref, lambda m: m["id"] == gqueued["id"], timeout=30)
    assert [m["id"] for m in p.bob.messages(gref)] == [gqueued["id"]]


def test_locked_home_unlocks_through_the_api(
    app_node: NodeProc, start_daemon: Callable[..., DaemonProc]
) -> None:
    d = start_daemon("carol")
    st = d.join(invite(app_node, "carol"), "Carol", passphrase="correct horse")
    assert st["protection"] == "passphrase"
    address = st["me"]["address"]
    assert d.stop() == 0  # SIGTERM: a clean shutdown

    d.start()  # no HAVEN_PASSPHRASE, not a terminal: locked until the UI unlocks it
    st = d.state()
    assert st["locked"] is True and st["joined"] is False and st["me"] is None
    status, err = d.api("GET", "/api/chats", expect=None)
    assert status == 423 and err["error"] == "locked"
    for _ in range(5):
        status, err = d.api("POST", "/api/unlock", {"passphrase": "wrong"}, expect=None)
        assert status == 403 and err["error"] == "wrong_passphrase"
    status, err = d.api("POST", "/api/unlock", {"passphrase": "correct horse"}, expect=None)
    assert status == 429 and err["error"] == "too_many_attempts"  # backs off after 5

    st = wait_until(
        lambda: (
            (r := d.api("POST", "/api/unlock", {"passphrase": "correct horse"}, expect=None))[0]
            == 200
            and r[1]
        ),
        timeout=10,
        what="the unlock back-off to pass",
    )
    assert st["locked"] is False and st["joined"] is True and st["me"]["address"] == address
    assert st["me"]["display_name"] == "Carol"
    d.wait_state(lambda s: s["connection"] == "online", what="online after unlocking")
    assert d.stop() == 0

    # HAVEN_PASSPHRASE is the non-interactive way: open from the start
    d.env["HAVEN_PASSPHRASE"] = "correct horse"
    d.start()
    st = d.wait_state(lambda s: s["connection"] == "online", what="online with the env")
    assert st["locked"] is False and st["me"]["address"] == address
    assert d.stop() == 0
    del d.env["HAVEN_PASSPHRASE"]

    # on a terminal it asks once, before serving (the daemon's stdin/stdout/stderr on a pty)
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec the daemon (its controlling terminal is the pty)
        env = {k: v for k, v in os.environ.items() if k != "HAVEN_PASSPHRASE"}
        try:
            os.chdir(ROOT)
            os.execve(sys.executable, d.argv(), env | {"PYTHONPATH": str(ROOT)})
        finally:
            os._exit(127)  # only if exec failed: never run the test's code twice
    try:
        seen = _read_pty_until(fd, rb"passphrase.*: ")
        os.write(fd, b"correct horse\n")
        seen = _read_pty_until(fd, rb"http://127\.0\.0\.1:\d+/#k=[\w-]+\r?\n", seen)
        m = re.search(rb"http://127\.0\.0\.1:\d+/#k=[\w-]+", seen)
        assert m is not None
        url = m.group().decode()
        d.secret = url.partition("/#k=")[2]
        d.port = int(url.split("/#k=")[0].rsplit(":", 1)[1])
        st = d.wait_state(lambda s: s["connection"] == "online", what="online after the prompt")
        assert st["locked"] is False and st["me"]["address"] == address
        assert b"correct horse" not in seen  # not echoed
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
        os.close(fd)


def _read_pty_until(fd: int, pattern: bytes, out: bytes = b"", timeout: float = 30) -> bytes:
    """Read a pty until ``pattern`` (a regex) matches what was read (select with a deadline)."""
    deadline = time.monotonic() + timeout
    while re.search(pattern, out) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {pattern!r} on the terminal: {out!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            out += os.read(fd, 4096)
    return out


async def test_tick_marks_not_delivered_and_purges_what_disappeared(
    tmp_path: Path, app_node: NodeProc
) -> None:
    """In-process core with an injected clock (the node and bob's device are real)."""
    clock = FakeClock(int(time.time() * 1000))
    _, bob_addr = join(app_node, tmp_path, "bob-tick")  # bob never comes online
    core = AppCore(str(tmp_path / "dev-alice"), clock)
    await core.start()
    q = core.subscribe()
    try:
        await core.join({"invite": invite(app_node, "alice-tick"), "display_name": "Alice"})

        async def online() -> bool:
            return core.connection == "online"

        await async_wait_until(online, what="the core's link")
        kept = await core.send_text(bob_addr, "never read")
        await core.set_timer(bob_addr, 60_000)
        gone = await core.send_text(bob_addr, "disappears")
        assert gone["expire_at"] == clock.now_ms() + 60_000

        async def all_sent() -> bool:
            return all(m["status"] == "sent" for m in core.messages(bob_addr))

        await async_wait_until(all_sent, what="both messages accepted by the node")
        while not q.empty():
            q.get_nowait()

        clock.advance(61_000)
        core.tick()
        ev = q.get_nowait()
        assert ev == {"type": "delete", "chat": bob_addr, "id": gone["id"]}
        assert [m["id"] for m in core.messages(bob_addr)] == [kept["id"]]

        core.tick()  # nothing new: no event
        assert all(e["type"] != "update" for e in _drain(q))
        clock.advance(7 * 86_400_000)  # past the TTL with no delivered receipt
        core.tick()
        [upd] = [e for e in _drain(q) if e["type"] == "update"]
        assert upd["message"]["id"] == kept["id"] and upd["message"]["not_delivered"] is True
        core.tick()  # shown once
        assert all(e["type"] != "update" for e in _drain(q))
    finally:
        await core.close()


def _drain(q: Any) -> list[dict[str, Any]]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


async def test_link_a_second_device_through_both_apps(
    app_node: NodeProc, new_user: Callable[..., DaemonProc], start_daemon: Callable[..., DaemonProc]
) -> None:
    old = new_user(app_node, "gina", "Gina")
    async with EventSocket(old) as ws:
        _, link = old.api("POST", "/api/devices/link")
        assert link["code"].startswith("haven:link:") and link["qr"] and link["qr"][0]
        new = start_daemon("gina-laptop")
        _, st = new.api(
            "POST", "/api/join", {"link": link["code"], "display_name": "Gina"}, timeout=60
        )
        assert st["joined"] is True and st["me"]["address"] == old.address
        ev = await ws.next(lambda e: e["type"] == "link")
        assert ev["ok"] is True and ev["device"]["id"] == st["me"]["device_id"]
    _, devices = old.api("GET", "/api/devices")
    assert {d["id"] for d in devices} == {old.state()["me"]["device_id"], st["me"]["device_id"]}
    # the old device's link still receives (the receive loop resumed after linking)
    bob = new_user(app_node, "bob-link")
    bob.open_chat(old.address)
    sent = bob.send(old.address, "to both of gina's devices")
    for d in (old, new):
        wait_message(d, bob.address, lambda m: m["id"] == sent["id"], what="the message")


def test_a_second_daemon_on_the_same_home_is_refused(
    app_node: NodeProc, new_user: Callable[..., DaemonProc]
) -> None:
    d = new_user(app_node, "hana")
    proc = run(DaemonProc(d.home).argv()[3:], timeout=30)  # the arguments after -m client.cli
    assert proc.returncode == 1 and proc.stdout == ""
    assert "the app is already running for" in proc.stderr
    assert proc.stderr.rstrip().endswith("(app_running)")
    assert d.state()["connection"] == "online"  # the first one is untouched


def test_open_starts_the_browser_on_the_url(tmp_path: Path, daemons: list[DaemonProc]) -> None:
    opened = tmp_path / "opened.txt"
    # webbrowser honours $BROWSER; this "browser" records the URL it was given
    d = DaemonProc(
        tmp_path / "dev-ivy",
        args=["--open"],
        env={"BROWSER": f"sh -c 'echo %s > {opened}'"},
    )
    daemons.append(d)
    d.start()
    wait_until(lambda: opened.exists() and opened.read_text().strip(), what="the browser")
    assert opened.read_text().strip() == d.url
    assert d.url == f"http://127.0.0.1:{d.port}/#k={d.secret}" and len(d.secret) >= 43


async def test_a_client_that_falls_behind_is_dropped(tmp_path: Path) -> None:
    core = AppCore(str(tmp_path / "dev-none"))
    await core.start()
    try:
        slow, fast = core.subscribe(), core.subscribe()
        for i in range(SUBSCRIBER_BACKLOG + 10):
            core._publish({"type": "state", "n": i})
            while not fast.empty():
                fast.get_nowait()
        items = _drain(slow)
        assert len(items) == SUBSCRIBER_BACKLOG + 1 and items[-1] is None  # then "reconnect"
        core._publish({"type": "state", "n": -1})
        assert slow.empty() and fast.get_nowait() == {"type": "state", "n": -1}
    finally:
        await core.close()


async def test_changed_identity_key_shows_the_new_number_before_accepting(
    tmp_path: Path, app_node: NodeProc, new_user: Callable[..., DaemonProc]
) -> None:
    alice = new_user(app_node, "alice-key")
    _, bob_addr = join(app_node, tmp_path, "bob-key")  # bob is a CLI device
    alice.open_chat(bob_addr)
    v = f"/api/contacts/{bob_addr}/verify"
    _, first = alice.api("GET", v)
    assert first["key_changed"] is False and first["new_safety_number"] is None
    assert len(first["safety_number"].replace(" ", "")) == 60 and first["qr"]
    _, ok = alice.api("POST", v, {"confirm": True})
    assert ok["verified"] is True

    # bob reinstalls: the same address, a new identity key
    haven("node", "remove-account", "--home", str(app_node.home), "bob-key")
    new_home = tmp_path / "dev-bob-new"
    haven("join", invite(app_node, "bob-key"), "--home", str(new_home))
    async with EventSocket(alice) as ws:
        blocked = alice.send(bob_addr, "blocked until accepted")
        ev = await ws.next(lambda e: e["type"] == "update" and e["message"]["id"] == blocked["id"])
        assert ev["message"]["error"] == "identity_changed"
        assert ev["message"]["not_delivered"] is True
        ev = await ws.next(lambda e: e["type"] == "contact")
        assert ev["contact"]["key_changed"] is True
    _, changed = alice.api("GET", v)
    assert changed["key_changed"] is True and changed["safety_number"] == first["safety_number"]
    assert changed["new_safety_number"] not in (None, first["safety_number"])
    status, err = alice.api("POST", v, {"confirm": True}, expect=None)
    assert status == 409 and err["error"] == "identity_changed"
    _, accepted = alice.api("POST", v, {"accept_new_key": True})
    assert accepted["key_changed"] is False and accepted["verified"] is False
    assert accepted["safety_number"] == changed["new_safety_number"]
    after = alice.send(bob_addr, "after accepting")
    got = wait_until(
        lambda: [m for m in recv(new_home) if m.get("text") == "after accepting"],
        what="the new bob to receive",
    )
    assert got[0]["msg_id"] == after["id"]


async def test_edit_delete_timer_and_profile_reach_the_peer_as_events(
    app_node: NodeProc, new_user: Callable[..., DaemonProc]
) -> None:
    alice = new_user(app_node, "alice", "Alice")
    bob = new_user(app_node, "bob", "Bob")
    alice.open_chat(bob.address)
    async with EventSocket(bob) as ws:
        m = alice.send(bob.address, "first version")
        await ws.next(lambda e: e["type"] == "message" and e["message"]["id"] == m["id"])

        _, edited = alice.api("PATCH", f"/api/messages/{m['id'][:8]}", {"text": "second"})
        assert edited["text"] == "second" and edited["edited"] is True
        ev = await ws.next(lambda e: e["type"] == "update" and e["message"]["id"] == m["id"])
        assert ev["message"]["text"] == "second" and ev["message"]["edited"] is True

        _, chat = alice.api("PUT", f"/api/chats/{bob.address}/timer", {"timer_ms": 3_600_000})
        assert chat["timer_ms"] == 3_600_000
        ev = await ws.next(lambda e: e["type"] == "chat" and e["chat"]["timer_ms"] == 3_600_000)
        assert ev["chat"]["address"] == alice.address

        alice.api("PUT", "/api/profile", {"display_name": "앨리스"})
        ev = await ws.next(
            lambda e: e["type"] == "contact" and e["contact"]["display_name"] == "앨리스"
        )
        assert ev["contact"]["address"] == alice.address

        _, gone = alice.api("DELETE", f"/api/messages/{m['id']}")
        assert gone == {"deleted": m["id"]}
        ev = await ws.next(lambda e: e["type"] == "delete")
        assert ev == {"type": "delete", "chat": alice.address, "id": m["id"]}
    assert bob.messages(alice.address) == []
    [c] = [c for c in bob.api("GET", "/api/chats")[1] if c["address"] == alice.address]
    assert c["display_name"] == "앨리스" and c["timer_ms"] == 3_600_000 and c["last"] is None
