"""A truly full disk under the node home (a small tmpfs mounted by the test; we run as root).

The attack: the disk fills up (another process, a flood of envelopes, a log gone wild) while a
legitimate pair is messaging. The node must refuse new envelopes cleanly (``storage_error``),
keep deleting what devices ack (no redelivery after reconnect), lose nothing acknowledged, log
SQLite's own error without a traceback, and take new envelopes again once space is back.
Operator commands on a full disk print one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.device import Device
from federation.errors import HavenError

from .harness import NodeProc, haven, wait_until

DISK_MB = 112  # room for the default 32 MiB ballast + its 16 MiB margin once the filler is gone
TEXT = "y" * 1500  # the disk fills in a few hundred sends


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_MB mounted at ``tmp_path/disk`` for this test only, always unmounted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m,mode=0700", "tmpfs", str(mnt)],
        check=True,
    )
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> int:
    """Write ``path`` until the disk is full (ENOSPC): returns the bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    written = 0
    try:
        for size in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            chunk = bytes(size)
            while True:
                try:
                    n = os.write(fd, chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n
                if n < size:
                    break
    finally:
        os.close(fd)
    return written


def assert_one_line(proc: subprocess.CompletedProcess[str]) -> None:
    """An operator command that failed: one line, an error code, no traceback."""
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert lines[0].endswith(("(storage_error)", "(os_error)")), lines[0]


async def delivered_on_reconnect(dev: Device, wait_s: float = 1.0) -> int:
    """Envelopes the node pushes to a fresh connection (not acked, not opened)."""
    conn = await dev.connect()
    count = 0
    try:
        while True:
            try:
                async with asyncio.timeout(wait_s):
                    count += len(await conn.deliveries.get())
            except TimeoutError:
                return count
    finally:
        await conn.__aexit__(None, None, None)


async def test_full_disk_refuses_keeps_acks_and_recovers(
    tmp_path: Path, small_disk: Path, nodes: list[NodeProc]
) -> None:
    node = NodeProc.create(small_disk, "A")  # default config: ballast_mb = 32, no max_db_mb
    node.log = tmp_path / "A.log"  # the log must not live on the disk we fill
    nodes.append(node.start())
    ballast = node.home / "ballast.bin"
    wait_until(lambda: ballast.exists() and ballast.stat().st_size == 32 << 20, 10, "ballast")
    alice, bob = Device(str(tmp_path / "alice")), Device(str(tmp_path / "bob"))
    try:
        await alice.join(node.invite("alice"))
        bob_addr = await bob.join(node.invite("bob"))
        accepted: list[str] = []
        refused: HavenError | None = None
        conn = await alice.connect()
        try:
            for i in range(300):  # waiting for bob when the disk fills
                await alice.send(bob_addr, f"m{i} {TEXT}", conn=conn)
                accepted.append(f"m{i}")
            assert fill(small_disk / "filler-1") > 0  # the disk is now truly full
            for i in range(300, 3000):  # the WAL reserve (8 MiB) holds a few hundred more
                try:
                    await alice.send(bob_addr, f"m{i} {TEXT}", conn=conn)
                    accepted.append(f"m{i}")
                except HavenError as exc:
                    refused = exc
                    break
        finally:
            await conn.__aexit__(None, None, None)
        assert refused is not None and refused.code == "storage_error"
        print(f"accepted {len(accepted)} envelopes ({len(accepted) - 300} on the full disk)")
        wait_until(lambda: "disk full: ballast released" in node.log.read_text(), 10, "release")
        assert not ballast.exists()
        assert node.proc is not None and node.proc.poll() is None  # still serving

        # While full, new envelopes are refused cleanly ...
        try:
            await alice.send(bob_addr, "while full")
            raise AssertionError("a send while the disk is full should be refused")
        except HavenError as exc:
            assert exc.code == "storage_error"
        # ... but the device gets everything acknowledged, once, in order, and its acks delete.
        got = [m.text.split()[0] for m in await bob.receive(wait_s=1.0) if m.kind == "text"]
        assert got == accepted
        drained = wait_until(
            lambda: node.stats()["counts"]["pending_envelopes"] == 0, 10, "acks to delete"
        )
        redelivered = await delivered_on_reconnect(bob)
        assert drained and redelivered == 0, f"{redelivered} acked envelopes redelivered"

        # Operator commands on the full disk: they work or print one line, never a traceback.
        status = haven("node", "status", "--home", str(node.home), "--json", check=False)
        if status.returncode != 0:
            assert_one_line(status)
        invite = haven("node", "invite", "--home", str(node.home), "carol", check=False)
        if invite.returncode != 0:
            assert_one_line(invite)
        assert "Traceback" not in status.stderr + invite.stderr
        print(f"while full: status exit {status.returncode}, invite exit {invite.returncode}")

        # Space comes back: the ballast is restored and messages flow again, no restart.
        (small_disk / "filler-1").unlink()
        wait_until(lambda: "space back: ballast restored" in node.log.read_text(), 10, "restore")
        assert ballast.stat().st_size == 32 << 20
        await alice.send(bob_addr, "after the disk was full")
        got_after = [m.text for m in await bob.receive(wait_s=1.0) if m.kind == "text"]
        assert got_after == ["after the disk was full"]

        node.stop()  # clean shutdown on the recovered disk
        log = node.log.read_text()
        assert "database or disk is full" in log  # SQLite's own error, not a masked one
        assert "cannot rollback" not in log
        assert "Traceback" not in log
        assert log.count("disk full: ballast released") == 1  # once per state change
    finally:
        node.kill()
        alice.close()
        bob.close()


async def test_operator_commands_on_a_full_disk_print_one_line(
    tmp_path: Path, small_disk: Path
) -> None:
    """`haven node invite` / `status` on a node whose disk is full: one line, exit code 2."""
    home = small_disk / "A"
    haven("node", "init", "--home", str(home), "--public-url", "http://127.0.0.1:9")
    fresh = small_disk / "B"  # a node whose store was never created
    haven("node", "init", "--home", str(fresh), "--public-url", "http://127.0.0.1:9")
    haven("node", "status", "--home", str(home))  # creates the store and the epoch key file
    assert fill(small_disk / "filler") > 0
    # the WAL and its 8 MiB reserve are kept when the store closes: a small write still fits
    assert haven("node", "invite", "--home", str(home), "alice", check=False).returncode == 0
    for name in ("store.db-wal", "store.db-shm"):  # a store without that reserve:
        (home / name).unlink()
    fill(small_disk / "filler2")
    invite = haven("node", "invite", "--home", str(home), "alice", check=False)
    assert invite.returncode == 2, invite.stdout + invite.stderr
    assert_one_line(invite)
    assert "disk" in invite.stderr and "[SQLITE_" in invite.stderr  # SQLite's own error
    for args in (("invite", "alice"), ("status",), ("status", "--json")):
        proc = haven("node", args[0], "--home", str(fresh), *args[1:], check=False)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert_one_line(proc)
        assert "disk is full" in proc.stderr or "No space left on device" in proc.stderr
