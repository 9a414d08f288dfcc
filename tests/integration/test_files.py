"""Attachments end to end: real nodes, real devices, the ``haven`` CLI (issue 11).

A 20 MB file across two nodes to a recipient with two devices; an upload interrupted by
killing the sending device, resumed by the next run without sending finished chunks again;
a hostile file name and HTML/SVG MIME types arriving safely.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

import pytest

from client import attachments as A
from client import transfers
from client.device import Device
from tests.client.devworld import linked

from .forkcli import create_node, haven, invite
from .harness import ROOT, NodeProc, wait_until


@pytest.fixture(scope="module")
def _module_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProc, NodeProc]]:
    base = tmp_path_factory.mktemp("nodes")
    a, b = create_node(base, "A").start(), create_node(base, "B").start()
    yield a, b
    a.kill()
    b.kill()


@pytest.fixture
def pair(_module_pair: tuple[NodeProc, NodeProc]) -> tuple[NodeProc, NodeProc]:
    """Two federated nodes shared by the module (a node start is paid once); each test has
    account names of its own and compares counters before and after."""
    a, b = _module_pair
    return a.running(), b.running()


_NAMES = count(1)


def join(node: NodeProc, base: Path, name: str) -> tuple[Path, str]:
    """A new account (a name no other test of the module uses) with its device at
    ``base/dev-NAME``."""
    home = base / f"dev-{name}"
    account = f"{name}{next(_NAMES)}"
    out = haven("join", invite(node, account), "--home", str(home)).stdout.strip()
    return home, out.splitlines()[-1]


def _random_file(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 1 << 20))
            f.write(block)
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def _sha(path: str) -> str:
    return A.file_sha256(path).hex()


def _events(node: NodeProc) -> dict[str, int]:
    return dict(node.stats()["events"])


def _recv_files(home: Path, save: Path) -> list[dict[str, Any]]:
    out = haven(
        "recv", "--home", str(home), "--wait", "1", "--json", "--save-dir", str(save), timeout=120
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "file"]


async def _bob_with_two_devices(b: NodeProc, tmp: Path) -> tuple[Path, Path, str]:
    bob = Device(str(tmp / "dev-bob"))
    addr = await bob.join(invite(b, f"bob{next(_NAMES)}"), name="bob-phone")
    bob2 = await linked(bob, tmp, "dev-bob2")
    bob.close()
    bob2.close()
    return tmp / "dev-bob", tmp / "dev-bob2", addr


async def test_20mb_file_reaches_both_devices_across_nodes(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice, _ = join(a, tmp_path, "alice")
    bob1, bob2, bob_addr = await _bob_with_two_devices(b, tmp_path)
    src = tmp_path / "holiday.bin"
    size = 20 * 1000 * 1000
    digest = _random_file(src, size)
    bytes_in = _events(a).get("blob.chunk_bytes_in", 0)
    uploads, copies = a.stats()["blobs"]["uploads"], b.stats()["blobs"]["copies"]

    sent = json.loads(
        haven(
            "send",
            "--home",
            str(alice),
            bob_addr,
            "--file",
            str(src),
            "the photos",
            "--json",
            timeout=120,
        ).stdout
    )
    assert sent["status"] == "sent" and sent["kind"] == "file"
    assert sent["devices"][bob_addr]["total"] == 2
    assert sent["file"]["sha256"] == digest and sent["file"]["size"] == size
    padded = A.padded_size(size)
    assert _events(a)["blob.chunk_bytes_in"] - bytes_in == padded  # every chunk uploaded once
    assert a.stats()["blobs"]["uploads"] == uploads + 1

    for home in (bob1, bob2):
        save = home.parent / f"save-{home.name}"
        (row,) = _recv_files(home, save)
        assert row["text"] == "the photos"
        f = row["file"]
        assert f["name"] == "holiday.bin" and f["size"] == size
        assert f["path"] == str(save / "holiday.bin")
        assert _sha(f["path"]) == digest == f["sha256"]
    # both recipient devices have it: the origin deleted the blob, B its fetched copies
    wait_until(lambda: a.stats()["blobs"]["uploads"] == uploads, what="A to delete the blob")
    wait_until(lambda: b.stats()["blobs"]["copies"] == copies, what="B to drop its copies")
    hist = haven("history", "--home", str(bob1), "--json", _alice(alice))
    rows = [json.loads(line) for line in hist.stdout.splitlines()]
    assert rows[-1]["kind"] == "file" and rows[-1]["file"]["path"] is not None


def _alice(home: Path) -> str:
    return str(json.loads(haven("whoami", "--home", str(home), "--json").stdout)["address"])


def _popen_send(alice: Path, to: str, src: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "client.cli", "send", "--home", str(alice), to, "--file", str(src)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )


async def test_killed_upload_resumes_without_resending_chunks(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice, _ = join(a, tmp_path, "alice")
    bob, bob_addr = join(b, tmp_path, "bob")
    src = tmp_path / "big.bin"
    size = 40 * 1000 * 1000
    digest = _random_file(src, size)
    padded = A.padded_size(size)
    start = _events(a).get("blob.chunk_bytes_in", 0)

    proc = _popen_send(alice, bob_addr, src)
    try:
        wait_until(
            lambda: _events(a).get("blob.chunk_bytes_in", 0) - start >= 2 * A.CHUNK or proc.poll(),
            timeout=60,
            what="the upload to start",
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=20)
    before = _events(a).get("blob.chunk_bytes_in", 0) - start
    assert 0 < before < padded, "the upload finished before the device was killed"
    pending = tmp_path / "dev-alice" / transfers.TRANSFERS_DIR
    assert [p.name for p in pending.iterdir() if p.name.startswith("up-")]  # copy kept

    sent = json.loads(
        haven(
            "send", "--home", str(alice), bob_addr, "--file", str(src), "--json", timeout=120
        ).stdout
    )
    assert sent["status"] == "sent" and sent["resumed"] is True
    # the node got each chunk once: the resumed run sent only what was missing
    assert _events(a)["blob.chunk_bytes_in"] - start == padded
    assert not [p.name for p in pending.iterdir() if p.name.startswith("up-")]
    save = tmp_path / "save"
    (row,) = _recv_files(bob, save)  # one message, not two
    # over the auto-download size (25 MB): it waits for `haven download`
    assert row["file"]["path"] is None and row["file"]["state"] == "pending"
    got = json.loads(
        haven(
            "download",
            "--home",
            str(bob),
            row["msg_id"][:8],
            "--save-dir",
            str(save),
            "--json",
            timeout=120,
        ).stdout
    )
    assert got["file"]["path"] == str(save / "big.bin")
    assert _sha(got["file"]["path"]) == digest == got["file"]["sha256"]


async def test_hostile_name_and_mime_arrive_safely(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    bob, bob_addr = join(b, tmp_path, "bob")
    save = tmp_path / "save"
    save.mkdir()
    (save / "x.html").write_text("bob's own file")
    outside = tmp_path / "outside.html"
    alice = Device(str(tmp_path / "dev-alice"))
    await alice.join(invite(a, f"alice{next(_NAMES)}"))
    page = tmp_path / "page.html"
    page.write_text("<script>alert(document.cookie)</script>")
    svg = tmp_path / "pic.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>')
    # a hostile sender: names are not cleaned on its side
    names = iter(["../../../outside.html\x00", "/etc/passwd"])
    monkeypatch.setattr(transfers.A, "safe_name", lambda _n: next(names))
    try:
        await transfers.send_file(alice, bob_addr, str(page), ttl_ms=60_000, mime="text/html")
        await transfers.send_file(alice, bob_addr, str(svg), ttl_ms=60_000, mime="image/svg+xml")
    finally:
        alice.close()
    monkeypatch.undo()

    rows = _recv_files(bob, save)
    by_mime = {r["file"]["mime"]: r["file"] for r in rows}
    html, pic = by_mime["text/html"], by_mime["image/svg+xml"]
    assert html["name"] == "outside.html"
    assert html["path"] == str(save / "outside.html")
    assert pic["name"] == "passwd" and pic["path"] == str(save / "passwd")
    assert not outside.exists()
    assert (save / "x.html").read_text() == "bob's own file"
    assert sorted(p.name for p in save.iterdir()) == ["outside.html", "passwd", "x.html"]
    for f in (html, pic):
        assert os.stat(f["path"]).st_mode & 0o111 == 0  # never executable
    # the same name again: a new file beside it, nothing overwritten
    again = tmp_path / "again" / "outside.html"
    again.parent.mkdir()
    again.write_text("second")
    alice = Device(str(tmp_path / "dev-alice"))
    try:
        await transfers.send_file(alice, bob_addr, str(again), ttl_ms=60_000)
    finally:
        alice.close()
    (row,) = _recv_files(bob, save)
    assert row["file"]["path"] == str(save / "outside (1).html")
    assert (save / "outside.html").read_text().startswith("<script>")


def test_send_file_and_recv_through_a_running_app(tmp_path: Path, nodes: list[NodeProc]) -> None:
    from tests.app.daemon import DaemonProc, wait_message

    node = NodeProc.create(tmp_path, "N").start()
    nodes.append(node)
    alice, alice_addr = join(node, tmp_path, "alice")
    bob, bob_addr = join(node, tmp_path, "bob")
    haven("send", "--home", str(bob), alice_addr, "hello before the app")
    d = DaemonProc(alice)
    try:
        d.start()
        wait_message(d, bob_addr, lambda m: m["text"] == "hello before the app", 20, "delivery")
        out_file = tmp_path / "report.pdf"
        digest = _random_file(out_file, 3 * 1000 * 1000 + 1)
        # through the daemon: uploaded on its connection, sent by its outbox
        sent = json.loads(
            haven("send", "--home", str(alice), bob_addr, "--file", str(out_file), "--json").stdout
        )
        assert sent["status"] == "sent" and sent["file"]["mime"] == "application/pdf"
        (row,) = _recv_files(bob, tmp_path / "bob-save")
        assert _sha(row["file"]["path"]) == digest

        back = tmp_path / "reply.txt"
        back.write_text("got it")
        haven("send", "--home", str(bob), alice_addr, "--file", str(back))
        save = tmp_path / "alice-save"

        def arrived() -> list[dict[str, Any]]:
            return _recv_files(alice, save)  # the daemon received it; recv downloads it

        (got,) = wait_until(arrived, timeout=30, what="the file through the app")
        assert got["file"]["path"] == str(save / "reply.txt")
        assert (save / "reply.txt").read_text() == "got it"
        again = json.loads(haven("download", "--home", str(alice), got["msg_id"], "--json").stdout)
        assert again["file"]["path"] == got["file"]["path"]  # already there: not fetched again
    finally:
        d.kill()


def _popen_download(home: Path, msg_id: str, save: Path) -> subprocess.Popen[bytes]:
    argv = ["download", "--home", str(home), msg_id, "--save-dir", str(save), "--json"]
    return subprocess.Popen(
        [sys.executable, "-m", "client.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )


async def test_download_resumes_after_the_recipients_node_is_killed(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    alice, _ = join(a, tmp_path, "alice")
    bob, bob_addr = join(b, tmp_path, "bob")
    src = tmp_path / "film.bin"
    size = 40 * 1000 * 1000
    digest = _random_file(src, size)
    padded = A.padded_size(size)
    haven("send", "--home", str(alice), bob_addr, "--file", str(src), timeout=120)
    save = tmp_path / "save"
    (row,) = _recv_files(bob, save)  # over 25 MB: not downloaded by recv
    assert row["file"]["path"] is None

    parts = tmp_path / "dev-bob" / transfers.TRANSFERS_DIR

    def written() -> int:  # what the device has kept so far (served is not yet written)
        return max((p.stat().st_size for p in parts.glob("down-*.part")), default=0)

    proc = _popen_download(bob, row["msg_id"], save)
    try:
        wait_until(
            lambda: written() >= A.CHUNK or proc.poll() is not None,
            timeout=60,
            what="the download to keep its first chunk",
        )
        b.kill()  # the recipient's node dies mid-download
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and b"node_unreachable" in err
    part = next(parts.glob("down-*.part"))
    kept = part.stat().st_size
    assert 0 < kept < padded and kept % A.CHUNK == 0
    assert not save.exists() or not list(save.iterdir())  # nothing half-decrypted is left
    fetched_before = _events(a).get("blob.bytes_served_federation", 0)

    b.start()
    got = json.loads(
        haven(
            "download",
            "--home",
            str(bob),
            row["msg_id"],
            "--save-dir",
            str(save),
            "--json",
            timeout=120,
        ).stdout
    )
    assert _sha(got["file"]["path"]) == digest
    # the device fetched only the chunks it did not have (B's counters started again at 0)
    assert _events(b)["blob.bytes_served"] == padded - kept
    # and B's fetched copy survived its restart: A did not serve the whole file again
    assert _events(a)["blob.bytes_served_federation"] - fetched_before < padded - kept + 8 * A.CHUNK
    assert not part.exists()


def test_a_refused_file_leaves_nothing_behind(tmp_path: Path, nodes: list[NodeProc]) -> None:
    node = create_node(tmp_path, "S")
    conf = node.home / "node.toml"
    conf.write_text(re.sub(r"max_file_mb = \d+", "max_file_mb = 1", conf.read_text()))
    nodes.append(node.start())
    alice, _ = join(node, tmp_path, "alice")
    bob, bob_addr = join(node, tmp_path, "bob")
    big = tmp_path / "big.bin"
    _random_file(big, 2 * 1000 * 1000)
    res = haven("send", "--home", str(alice), bob_addr, "--file", str(big), "--json", check=False)
    assert res.returncode == 1
    assert json.loads(res.stdout)["error"] == "too_large"
    assert "(too_large)" in res.stderr and "Traceback" not in res.stderr
    left = tmp_path / "dev-alice" / transfers.TRANSFERS_DIR
    assert list(left.iterdir()) == []  # no encrypted copy, no upload to resume
    # nothing else is lost: a small file and a text still go through
    small = tmp_path / "small.txt"
    small.write_text("fits")
    haven("send", "--home", str(alice), bob_addr, "--file", str(small))
    haven("send", "--home", str(alice), bob_addr, "and a text")
    out = haven("recv", "--home", str(bob), "--json", "--save-dir", str(tmp_path / "save"))
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["kind"] for r in rows) == ["file", "text"]
    assert (tmp_path / "save" / "small.txt").read_text() == "fits"
    assert "big.bin" not in {r.get("file", {}).get("name") for r in rows}


async def test_the_senders_other_device_gets_the_file_too(
    tmp_path: Path, pair: tuple[NodeProc, NodeProc]
) -> None:
    a, b = pair
    bob, bob_addr = join(b, tmp_path, "bob")
    alice = Device(str(tmp_path / "dev-alice"))
    await alice.join(invite(a, f"alice{next(_NAMES)}"), name="alice-phone")
    laptop = await linked(alice, tmp_path, "dev-alice2")
    alice.close()
    laptop.close()
    src = tmp_path / "notes.txt"
    src.write_text("shared with my laptop too")
    sent = json.loads(
        haven(
            "send", "--home", str(tmp_path / "dev-alice"), bob_addr, "--file", str(src), "--json"
        ).stdout
    )
    assert sent["status"] == "sent"
    for home in (tmp_path / "dev-alice2", bob):
        save = tmp_path / f"save-{home.name}"
        (row,) = _recv_files(home, save)
        assert (save / "notes.txt").read_text() == "shared with my laptop too"
        assert row["msg_id"] == sent["msg_id"]
