"""A personal node behind NAT reachable through a relay (issue 14, docs/protocol.md §12).

One NAT world (tests/integration/natns.py): the relay node in ``relay``, the home node in
``home`` behind the router (no inbound connection possible), a public node in ``peer``. The home
node is made with ``haven node init --via-relay CODE`` and keeps one outbound link to the relay;
its public host ``<label>.relay.test:8080`` resolves to the relay, which routes by Host over the
link. Real CLI devices on home and peer exchange 1:1 and group messages both ways and a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import wait_until
from .natns import NatWorld, NsDevice, NsNode, nat_world


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatWorld]:
    with nat_world(tmp_path_factory.mktemp("relay")) as w:
        yield w


@pytest.fixture(scope="module")
def nodes(world: NatWorld) -> dict[str, NsNode]:
    relay = NsNode.create(world, "relay", "node-relay", "--relay")
    code = json.loads(relay.node("relay-invite", "--json"))
    host = code["host"]
    assert host.endswith(".relay.test:8080") and code["code"].startswith("haven:relay:")
    world.add_host(host.rsplit(":", 1)[0], world.ip("relay"))
    home = NsNode.create(world, "home", "node-home", "--via-relay", code["code"], public_url="")
    home.public_url = "http://" + host
    peer = NsNode.create(world, "peer", "node-peer")
    return {"relay": relay.start(), "home": home.start(), "peer": peer.start()}


def _clients(relay: NsNode) -> list[dict[str, Any]]:
    return json.loads(relay.node("relay-clients", "--json"))  # type: ignore[no-any-return]


def _group(dev: NsDevice, *args: str) -> Any:
    """``haven group ARGS --home HOME --json`` in the device's namespace."""
    out = dev.world.haven(dev.role, "group", *args, "--home", str(dev.home), "--json").stdout
    return json.loads(out)


def _texts(dev: NsDevice, into: list[dict[str, Any]]) -> list[dict[str, Any]]:
    into.extend(m for m in dev.recv(0.3) if m.get("kind") == "text")
    return into


def test_home_and_peer_talk_through_the_relay(world: NatWorld, nodes: dict[str, NsNode]) -> None:
    relay, home, peer = nodes["relay"], nodes["home"], nodes["peer"]
    home_id = home.status()["node_id"]
    peer_id = peer.status()["node_id"]
    wait_until(lambda: any(c["connected"] for c in _clients(relay)), 30, "the relay link")
    # negative control: the home node is not reachable directly from outside
    assert not world.connect("peer", world.ip("home"), home.port, 1.0)
    # the relay bound the label with the token, which the home node then forgot
    relay_json = json.loads((home.home / "relay.json").read_text())
    assert "token" not in relay_json and relay_json["host"] == home.public_url[len("http://") :]
    assert (home.home / "relay.json").stat().st_mode & 0o777 == 0o600

    # from outside, only federation paths of the home node answer through the relay
    via = "http://" + relay_json["host"]
    assert world.get("peer", via + "/.well-known/haven/node")["status"] == 200
    assert world.get("peer", via + "/haven/v1/stats")["status"] == 404

    hana, pete = home.join("hana"), peer.join("pete")
    assert hana.address.endswith("@" + relay_json["host"])
    hana.send(pete.address, "hello from behind NAT")
    got: list[dict[str, Any]] = []
    wait_until(lambda: _texts(pete, got), 40, "pete to receive hana's message")
    assert [(m["from"], m["text"]) for m in got] == [(hana.address, "hello from behind NAT")]

    pete.send(hana.address, "hello through the relay")  # peer -> relay -> link -> home
    back: list[dict[str, Any]] = []
    wait_until(lambda: _texts(hana, back), 40, "hana to receive pete's answer")
    assert [(m["from"], m["text"]) for m in back] == [(pete.address, "hello through the relay")]

    # a group (issue 10): fan-out from the peer reaches the home node through the relay
    made = _group(pete, "create", "porch", "--member", hana.address)
    gid = made["group_id"]

    def hana_has_group() -> bool:
        hana.recv(0.3)
        return any(g["group_id"] == gid for g in _group(hana, "list"))

    wait_until(hana_has_group, 40, "hana to learn the group")
    pete.haven("send", "porch", "group hello")
    grp: list[dict[str, Any]] = []
    wait_until(lambda: _texts(hana, grp), 40, "hana to receive the group message")
    assert [(m["chat"], m["text"]) for m in grp] == [("group:" + gid, "group hello")]

    # a file (attachments): pete's node fetches hana's blob from the home node via the relay
    src = world.base / "photo.bin"
    src.write_bytes(os.urandom(300_000))
    hana.haven("send", pete.address, "--file", str(src))
    save = world.base / "pete-files"
    files: list[dict[str, Any]] = []

    def pete_got_file() -> bool:
        out = pete.haven("recv", "--wait", "0.5", "--json", "--save-dir", str(save), timeout=120)
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        files.extend(r for r in rows if r.get("kind") == "file")
        return bool(files)

    wait_until(pete_got_file, 60, "pete to receive hana's file")
    row = files[0]
    path = row["file"]["path"]  # small: fetched during recv
    assert path is not None, row
    assert Path(path).read_bytes() == src.read_bytes()

    # the operator's view: the client, its traffic, nothing about its peers
    rows = _clients(relay)
    assert len(rows) == 1
    row = rows[0]
    assert row["client"] == home_id and row["connected"] is True
    assert row["bytes_in"] > 0 and row["bytes_out"] > 0 and row["quota"] == 64 * 1024 * 1024
    text = relay.node("relay-clients", "--json")
    assert peer_id not in text and "peer.test" not in text and "pete" not in text
    # the peer pinned the home node's own key under its relayed host: the relay is no party
    pinned = peer.peers()[relay_json["host"]]
    assert pinned["node_id"] == home_id
    assert relay.status()["node_id"] not in json.dumps(peer.peers())
    # the relay is killed and restarts: the home node links again (backoff), reachable as before
    relay.kill()
    relay.start()
    wait_until(lambda: any(c["connected"] for c in _clients(relay)), 60, "the link to return")
    pete.send(hana.address, "after the relay restarted")
    again: list[dict[str, Any]] = []
    wait_until(lambda: _texts(hana, again), 40, "hana to receive after the restart")
    assert [m["text"] for m in again] == ["after the relay restarted"]
    home_log = home.log.read_text()
    assert home_log.count("relay link up") >= 2 and "Traceback" not in home_log
    assert world.ip("relay") not in home_log and "relay.test" not in home_log.split("/metrics")[-1]

    log = relay.log.read_text()
    assert "Traceback" not in log and world.ip("peer") not in log and world.ip("home") not in log


def test_home_offline_gets_everything_held_once_in_order(
    world: NatWorld, nodes: dict[str, NsNode]
) -> None:
    """Held mode (§12.4): the home node stops; the peer's messages are held at the relay
    (``relay-clients`` shows them, the peer's node deletes its copies on the relay-signed
    answer); the home node comes back and its device gets each message once, in order."""
    relay, home, peer = nodes["relay"], nodes["home"], nodes["peer"]
    wait_until(lambda: any(c["connected"] for c in _clients(relay)), 60, "the relay link")
    hiro, paul = home.join("hiro"), peer.join("paul")
    paul.send(hiro.address, "before")  # keys, session and the peer's measurement, while online
    first: list[dict[str, Any]] = []
    wait_until(lambda: _texts(hiro, first), 40, "hiro to receive the first message")
    assert [m["text"] for m in first] == ["before"]

    home.stop()
    wait_until(lambda: not any(c["connected"] for c in _clients(relay)), 30, "the link to drop")
    texts = [f"held {i}" for i in range(5)]
    for text in texts:
        paul.send(hiro.address, text)
    wait_until(lambda: _clients(relay)[0]["held"] == len(texts), 60, "the relay to hold them")
    # the peer took the relay's signed answers as delivery: its outbox is empty
    wait_until(lambda: peer.stats()["counts"]["outbox_envelopes"] == 0, 30, "the peer's outbox")

    home.start()
    got: list[dict[str, Any]] = []
    wait_until(lambda: len(_texts(hiro, got)) >= len(texts), 60, "hiro to get the held messages")
    assert [m["text"] for m in got] == texts
    assert _texts(hiro, got)[len(texts) :] == []  # nothing twice
    wait_until(lambda: _clients(relay)[0]["held"] == 0, 30, "the relay to forget them")


def test_home_moves_to_a_second_relay_and_stays_reachable(
    world: NatWorld, nodes: dict[str, NsNode]
) -> None:
    """``haven node move-relay`` (docs/protocol.md §12.5): the home node on relay 1 moves to
    relay 2; the peer follows the signed move it pushes, keeps the old host as an alias (an
    address at it still arrives), and the home user's device follows the new address."""
    home, peer = nodes["home"], nodes["peer"]
    home_id = home.status()["node_id"]
    relay2 = NsNode.create(world, "relay2", "node-relay2", "--relay").start()
    code = json.loads(relay2.node("relay-invite", "--json"))
    world.add_host(code["host"].rsplit(":", 1)[0], world.ip("relay2"))
    hm, pm = home.join("hm"), peer.join("pm")
    hm.send(pm.address, "before the move")  # the home node pins the peer: it is told
    first: list[dict[str, Any]] = []
    wait_until(lambda: _texts(pm, first), 40, "pm to receive hm's message")
    old_address = hm.address

    home.stop()
    out = json.loads(home.node("move-relay", code["code"], "--json"))
    assert out["host"] == code["host"] and old_address.endswith("@" + out["old_host"])
    home.public_url = "http://" + code["host"]
    home.start()
    wait_until(lambda: any(c["connected"] for c in _clients(relay2)), 30, "the new relay link")
    wait_until(
        lambda: peer.peers().get(code["host"], {}).get("node_id") == home_id, 40, "the re-pin"
    )

    pm.send(old_address, "to the old address")  # the peer's alias: the old host is this node
    got: list[dict[str, Any]] = []
    wait_until(lambda: _texts(hm, got), 40, "hm to receive at the old address")
    assert [m["text"] for m in got] == ["to the old address"]
    who = json.loads(hm.haven("whoami", "--json"))
    assert who["address"] == "hm@" + code["host"]
    pm.send(who["address"], "to the new address")
    new: list[dict[str, Any]] = []
    wait_until(lambda: _texts(hm, new), 40, "hm to receive at the new address")
    assert [m["text"] for m in new] == ["to the new address"]
    assert "Traceback" not in home.log.read_text()
