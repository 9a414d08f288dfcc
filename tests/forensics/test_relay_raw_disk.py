"""A seized relay disk keeps nothing of its client's conversations (issue 14; threat model §3).

The relay R's home (store, keys, node.toml, its log) lives on a loop-mounted ext4 image
(``disk.LoopImage``). Its client C was made with ``haven node init --via-relay``; the peer A
reaches C only as ``<label>.relay.test:<R's port>`` (A runs in a mount namespace of its own
whose ``/etc/hosts`` names 127.0.0.1 for that host; nothing but 127.0.0.1 is used). Workload:
alicezq on A writes to carolvk on C through the relay (live forwarding), carolvk answers
(directly, C -> A), then C goes offline and alicezq writes again (while the client has no link
the relay answers for it or refuses, per its held mode) and C comes back and gets everything.
The relay is then restarted cleanly (a clean shutdown and start each end the epoch: its epoch
keys die, docs/threat-model.md §3).

Examined on raw copies of R's image (every block, allocated or not, records carved from it,
values opened with every epoch key on the image):

- no workload text, no account name (alicezq, carolvk), no mailbox of either;
- no id or key of the peer node A, nor A's host: the relay keeps nothing that links a peer to
  its client (its own client table names the client; that is what its config must hold);
- after delivery and the restart, no carved record opens with any key on the image.

A copy taken while the relay holds the offline client's envelopes shows the same zeros, except
that the live epoch key on it opens the held rows (positive control: the examiner sees them
where they exist). Positive controls on the last copy: the client's node id and label are found
(the relay's client table is on the image, so the scan does see the store), and a planted
free-space canary is found.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from federation.ids import key_from_node_id

from ..conftest import LONG
from ..integration.harness import NodeProc, free_port, haven, join, recv, wait_until
from ..integration.hostsns import HostsNode, hosts_file
from .disk import LoopImage, tools_missing
from .examine import Scan, node_epoch_keys, present, sealed_rows, texts_in

N = 20 if LONG else 3  # messages per phase
IMAGE_MB = 128 if LONG else 64


def _text(phase: str, i: int) -> str:
    return f"txt-{phase}-{i:03d}-{secrets.token_hex(6)}"


def _connected(r: NodeProc) -> bool:
    out = haven("node", "relay-clients", "--home", str(r.home), "--json").stdout
    return any(row["connected"] for row in json.loads(out))


def _recv_all(home: Path, want: set[str]) -> set[str]:
    got: set[str] = set()

    def more() -> bool:
        got.update(m["text"] for m in recv(home, wait=0.5) if m.get("kind", "text") == "text")
        return want <= got

    wait_until(more, 90, f"every message at the device ({len(want - got)} missing)")
    return got


def test_a_seized_relay_keeps_no_conversation(tmp_path: Path) -> None:
    missing = tools_missing()
    assert not missing, f"seizure harness needs {missing} (scripts/test installs sleuthkit)"
    assert os.geteuid() == 0 and shutil.which("unshare"), "needs root and unshare, as CI has"
    img = LoopImage(tmp_path / "R.img", tmp_path / "mR", IMAGE_MB).create()
    nodes: list[NodeProc] = []
    try:
        r = NodeProc.create(img.mnt, "R", "--relay", "--no-lan")
        cfg = r.home / "node.toml"
        cfg.write_text(cfg.read_text().replace('relay_domain = ""', 'relay_domain = "relay.test"'))
        code = json.loads(haven("node", "relay-invite", "--home", str(r.home), "--json").stdout)
        host = str(code["host"])
        label = host.split(".", 1)[0]
        c_port = free_port()
        haven(
            *("node", "init", "--home", str(tmp_path / "C"), "--via-relay", str(code["code"])),
            *("--listen", f"127.0.0.1:{c_port}", "--no-lan"),
        )
        c = NodeProc(tmp_path / "C", c_port)
        hosts = hosts_file(tmp_path / "A.hosts", host)
        a = HostsNode.of(NodeProc.create(tmp_path, "A", "--no-lan"), hosts)
        for n in (r, c, a):
            n.start()
            nodes.append(n)
        wait_until(lambda: _connected(r), 30, "the client's link to the relay")
        a_id, c_id = str(a.status()["node_id"]), str(c.status()["node_id"])
        alice, alice_addr = join(a, tmp_path, "alicezq")
        carol, carol_addr = join(c, tmp_path, "carolvk")
        assert carol_addr == f"carolvk@{host}"

        texts = [_text("live", i) for i in range(N)]
        for t in texts:
            haven("send", "--home", str(alice), carol_addr, t)
        assert _recv_all(carol, set(texts)) == set(texts)
        reply = _text("reply", 0)
        haven("send", "--home", str(carol), alice_addr, reply)
        assert _recv_all(alice, {reply}) == {reply}

        # the client goes offline; the peer keeps writing; the client comes back
        c.stop()
        wait_until(lambda: not _connected(r), 30, "the relay to see the client gone")
        away = [_text("away", i) for i in range(N)]
        for t in away:
            haven("send", "--home", str(alice), carol_addr, t)
        # held mode: the relay accepted them for its client, as sealed outbox rows
        wait_until(lambda: r.status()["outbox_envelopes"] == N, 60, "the relay to hold them")
        held = Scan.of("R-held", img.snapshot(tmp_path / "R-held.img"))
        c.start()
        wait_until(lambda: _connected(r), 60, "the client's link again")
        # carol writes back at once (whatever the relay did not hold, A backs off for, up to
        # minutes; C's request tells A that C is back, as any contact from a peer does)
        back = _text("back", 0)
        haven("send", "--home", str(carol), alice_addr, back)
        try:
            assert _recv_all(carol, set(away)) == set(away)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; A: {a.status()}; C: {c.status()}") from None
        wait_until(lambda: a.status()["outbox_envelopes"] == 0, 90, "A's outbox drained")
        wait_until(lambda: r.status()["outbox_envelopes"] == 0, 90, "nothing held at the relay")
        r.stop()  # a clean shutdown ends the epoch: the keys of anything it held die
        r.start()
        canary = img.plant_canary()
        scan = Scan.of("R", img.snapshot(tmp_path / "R-copy.img"))
    finally:
        for n in nodes:
            n.stop()
        img.unmount()

    workload = {t.encode() for t in [*texts, reply, *away, back]}

    def figures_of(scan: Scan) -> dict[str, object]:
        keys = node_epoch_keys(scan.path)
        opened = [pt for rec in scan.records for _, pt in sealed_rows()(rec, keys)]
        corpus = [scan.raw, *opened]
        return {
            "texts": len(texts_in(corpus) & workload),
            "names": sorted(n.decode() for n in present(scan.raw, [b"alicezq", b"carolvk"])),
            "peer_id": a_id.encode() in scan.raw,
            "peer_key": key_from_node_id(a_id) in scan.raw,
            "peer_host": a.host.encode() in scan.raw,
            "opened_rows": len(opened),
        }

    # positive controls: the scan sees the store, the free space and (while held) the rows
    assert scan.found(c_id.encode()), "the relay's client table is on the image"
    assert scan.found(label.encode())
    assert canary in scan.free
    while_held, after = figures_of(held), figures_of(scan)
    assert while_held["opened_rows"] >= N, while_held  # the live key opens the held rows
    nothing = {"texts": 0, "names": [], "peer_id": False, "peer_key": False, "peer_host": False}
    assert {k: v for k, v in while_held.items() if k != "opened_rows"} == nothing, while_held
    assert after == nothing | {"opened_rows": 0}, after
