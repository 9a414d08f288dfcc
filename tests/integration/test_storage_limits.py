"""A full store refuses new envelopes with a clear code, loses nothing acknowledged, recovers."""

from __future__ import annotations

import re
from pathlib import Path

from client.device import Device
from federation.errors import HavenError

from .harness import NodeProc


async def test_full_store_refuses_then_recovers(tmp_path: Path, nodes: list[NodeProc]) -> None:
    node = NodeProc.create(tmp_path, "A")
    conf = node.home / "node.toml"
    conf.write_text(re.sub(r"max_db_mb = \d+", "max_db_mb = 1", conf.read_text()))
    nodes.append(node.start())
    alice, bob = Device(str(tmp_path / "alice")), Device(str(tmp_path / "bob"))
    try:
        await alice.join(node.invite("alice"))
        bob_addr = await bob.join(node.invite("bob"))
        accepted: list[str] = []
        refused: HavenError | None = None
        conn = await alice.connect()
        try:
            for i in range(2000):  # 1 MiB of store fills up long before this
                try:
                    await alice.send(bob_addr, f"m{i} " + "x" * 1500, conn=conn)
                    accepted.append(f"m{i}")
                except HavenError as exc:
                    refused = exc
                    break
        finally:
            await conn.__aexit__(None, None, None)
        assert refused is not None and refused.code == "storage_error"
        assert node.proc is not None and node.proc.poll() is None  # still serving
        got = [m.text.split()[0] for m in await bob.receive(wait_s=1.0) if m.kind == "text"]
        assert got == accepted  # every acknowledged message, once, in order
        # acks freed the space: sending works again
        await alice.send(bob_addr, "after the disk was full")
        assert [m.text for m in await bob.receive(wait_s=1.0)] == ["after the disk was full"]
    finally:
        alice.close()
        bob.close()


async def test_per_mailbox_quota(tmp_path: Path, nodes: list[NodeProc]) -> None:
    """A mailbox holding its quota refuses more (quota_exceeded); acks make room again."""
    node = NodeProc.create(tmp_path, "A")
    conf = node.home / "node.toml"
    conf.write_text(
        re.sub(r"max_pending_per_mailbox = \d+", "max_pending_per_mailbox = 5", conf.read_text())
    )
    nodes.append(node.start())
    alice, bob = Device(str(tmp_path / "alice")), Device(str(tmp_path / "bob"))
    try:
        await alice.join(node.invite("alice"))
        bob_addr = await bob.join(node.invite("bob"))
        for i in range(5):
            await alice.send(bob_addr, f"m{i}")
        try:
            await alice.send(bob_addr, "one too many")
            raise AssertionError("the sixth envelope should have been refused")
        except HavenError as exc:
            assert exc.code == "quota_exceeded"
        got = [m.text for m in await bob.receive(wait_s=1.0) if m.kind == "text"]
        assert got == [f"m{i}" for i in range(5)]
        assert "one too many" not in [r.text for r in alice.history(bob_addr)]
        await alice.send(bob_addr, "room again")
        assert [m.text for m in await bob.receive(wait_s=1.0)] == ["room again"]
    finally:
        alice.close()
        bob.close()
