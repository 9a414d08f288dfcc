"""A node on PostgreSQL: ``haven node init --store DSN`` then ``serve``, real processes on
127.0.0.1. Two devices exchange messages; a message pending across a restart (clean stop:
re-sealed under a fresh key in the key file, never in the database) is delivered after it."""

from __future__ import annotations

from pathlib import Path

from client.device import Device

from .harness import NodeProc, haven, wait_until


def slot_keys(path: Path) -> set[bytes]:
    """The live keys in an epochs.key file (40-byte slots: 8-byte epoch + 32-byte key)."""
    data = path.read_bytes()
    return {data[i + 8 : i + 40] for i in range(0, len(data), 40) if any(data[i : i + 8])}


async def test_devices_exchange_and_a_pending_message_survives_a_restart(
    tmp_path: Path, nodes: list[NodeProc], pg_dsn: str
) -> None:
    node = NodeProc.create(tmp_path, "org", "--store", pg_dsn)
    assert f'store = "{pg_dsn}"' in (node.home / "node.toml").read_text()
    assert not (node.home / "store.db").exists()
    nodes.append(node.start())
    key_file = node.home / "epochs.key"
    alice, bob = Device(str(tmp_path / "alice")), Device(str(tmp_path / "bob"))
    try:
        alice_addr = await alice.join(node.invite("alice"))
        bob_addr = await bob.join(node.invite("bob"))
        await alice.send(bob_addr, "hello bob")
        assert [m.text for m in await bob.receive(wait_s=1.0)] == ["hello bob"]
        await bob.send(alice_addr, "hello alice")
        assert "hello alice" in [m.text for m in await alice.receive(wait_s=1.0)]

        await alice.send(bob_addr, "while you were away")
        wait_until(lambda: node.status()["pending_envelopes"] >= 1, what="the message stored")
        live = slot_keys(key_file)
        node.stop()  # clean stop: re-sealed under a fresh key, the old one destroyed
        stopped = slot_keys(key_file)
        assert len(stopped) == 1 and not stopped & live
        assert node.status()["accounts"] == 2  # an offline command on PostgreSQL
        node.start()
        assert "while you were away" in [m.text for m in await bob.receive(wait_s=1.0)]
        await alice.receive(wait_s=0.5)  # bob's device answered alice's session
        wait_until(
            lambda: node.stats()["counts"]["pending_envelopes"] == 0, what="everything delivered"
        )
        wait_until(lambda: not any(key_file.read_bytes()), what="no key once nothing is pending")
    finally:
        alice.close()
        bob.close()


def test_init_with_an_unreachable_store_fails_in_one_line(tmp_path: Path, pg_dsn: str) -> None:
    bad = pg_dsn.rsplit(":", 1)[0] + ":1/haven"  # nothing listens on port 1
    out = haven(
        "node",
        "init",
        "--home",
        str(tmp_path / "n"),
        "--public-url",
        "http://127.0.0.1:1",
        "--store",
        bad,
        check=False,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith("(storage_error)") and len(out.stderr.splitlines()) == 1
    assert not (tmp_path / "n" / "node.toml").exists()
