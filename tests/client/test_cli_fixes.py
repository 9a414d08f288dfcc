"""CLI fixes a newcomer hit (issue 9, item 3), tested in process: default homes, no device
created by a typo, no class names in errors, --version, bare ``haven``, whoami --json, and ids
given as unique prefixes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from client import cli, prefix
from client.device import Device
from client.homes import device_home, node_home
from client.state import DeviceState, HistoryRow
from federation.errors import LocalProtocolError


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("HAVEN_HOME", "HAVEN_PASSPHRASE", "HAVEN_KEYRING"):
        monkeypatch.delenv(k, raising=False)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_default_homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    assert device_home(None) == str(tmp_path / "me" / ".haven" / "device")
    assert node_home(None) == str(tmp_path / "me" / ".haven" / "node")
    monkeypatch.setenv("HAVEN_HOME", str(tmp_path / "hv"))  # the PARENT folder
    assert device_home(None) == str(tmp_path / "hv" / "device")
    assert node_home(None) == str(tmp_path / "hv" / "node")
    assert device_home("elsewhere") == "elsewhere"
    assert node_home("n") == "n"


def test_missing_home_is_not_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HAVEN_HOME", str(tmp_path / "hv"))
    rc, out, err = run(["whoami"], capsys)
    assert rc == 1
    want = f"error: no device at {tmp_path / 'hv' / 'device'}; create one with `haven join INVITE`"
    assert err.strip() == f"{want} (no_device)"
    assert not (tmp_path / "hv").exists()
    for argv in (["send", "a@b.c", "hi"], ["recv"], ["history", "a@b.c"], ["device", "list"]):
        rc, _, err = run(argv, capsys)
        assert rc == 1 and "(no_device)" in err, (argv, err)
    assert not (tmp_path / "hv").exists()
    rc, out, _ = run(["whoami", "--json"], capsys)
    assert rc == 1 and json.loads(out)["error"] == "no_device"


def test_parent_of_a_device_home_gets_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    DeviceState(str(tmp_path / "device")).close()  # a device home one level down
    rc, _, err = run(["chats", "--home", str(tmp_path)], capsys)
    assert rc == 1
    assert err.strip() == f"error: no device here — did you mean {tmp_path / 'device'}? (no_device)"


def test_a_file_is_not_a_device_home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "notes.txt"
    f.write_text("x")
    rc, _, err = run(["whoami", "--home", str(f)], capsys)
    assert rc == 1
    assert err.strip() == f"error: {f} is a file, not a device home (not_a_directory)"


def test_internal_errors_name_no_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    DeviceState(str(tmp_path)).close()

    async def boom(*_: object) -> int:
        raise KeyError("secret detail")

    monkeypatch.setitem(cli.COMMANDS, "whoami", boom)
    rc, out, err = run(["whoami", "--home", str(tmp_path)], capsys)
    assert rc == 70
    assert err.strip() == "error: internal error; please report it (internal)"
    assert "KeyError" not in err + out and "secret detail" not in err + out
    assert "Traceback" not in err


def test_version_and_bare_haven(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("haven ") and out.split()[1][0].isdigit()
    rc, out, _ = run([], capsys)
    assert rc == 0
    assert out.startswith("usage: haven") and "join" in out and "app" in out


def test_whoami_json_fields(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    DeviceState(str(tmp_path)).close()  # created but not joined yet
    rc, out, _ = run(["whoami", "--home", str(tmp_path), "--json"], capsys)
    assert rc == 0
    info = json.loads(out)
    assert {"address", "device_id", "node_url", "display_name", "protection"} <= set(info)
    assert info["address"] is None and info["display_name"] == ""


def _row(msg_id: bytes, peer: str = "bob@127.0.0.1:1") -> HistoryRow:
    return HistoryRow(msg_id, peer, True, "me@127.0.0.1:1", "t", 1, 1)


def test_message_id_prefixes(tmp_path: Path) -> None:
    dev = Device(str(tmp_path))
    try:
        a = bytes.fromhex("abcdef01" + "11" * 12)
        b = bytes.fromhex("abcdef01" + "22" * 12)
        c = bytes.fromhex("12345678" + "33" * 12)
        with dev.state.tx() as db:
            for m in (a, b):
                dev.state.add_history(db, _row(m))
            dev.state.add_history(db, _row(c, "carol@127.0.0.1:1"))
        db = dev.state.db
        assert prefix.message_id(db, "12345678") == c
        assert prefix.message_id(db, "1234567833") == c
        assert prefix.message_id(db, "ABCDEF0111") == a  # hex is case-insensitive
        assert prefix.message_id(db, b.hex()) == b  # a full id works too
        with pytest.raises(LocalProtocolError) as e:
            prefix.message_id(db, "abcdef01")
        assert e.value.code == "ambiguous_id"
        with pytest.raises(LocalProtocolError) as e:
            prefix.message_id(db, "1234567")
        assert e.value.code == "bad_argument" and "at least 8" in str(e.value)
        with pytest.raises(LocalProtocolError) as e:
            prefix.message_id(db, "ffffffff")
        assert e.value.code == "not_found"
        with pytest.raises(LocalProtocolError) as e:
            prefix.message_id(db, "12345678", "bob@127.0.0.1:1")  # another conversation's
        assert e.value.code == "not_found"
        with pytest.raises(LocalProtocolError) as e:
            prefix.message_id(db, "not-hex-at-all")
        assert e.value.code == "bad_argument"
    finally:
        dev.close()


def test_device_id_prefixes() -> None:
    ids = ["wLSwgFHHrvB2T9nPS3g6fpJK86BL+QOG4GhDcGDsrXg", "wLSwgFHHxx", "boMgpDAmX0Jym+sPFS/y"]
    assert prefix.device_id(ids, "boMgpDAm") == ids[2]
    assert prefix.device_id(ids, "wLSwgFHHr") == ids[0]
    assert prefix.device_id(ids, "wLSwgFHHxx") == ids[1]  # exact beats prefix
    for given, code in (
        ("wLSwgFHH", "ambiguous_id"),
        ("bomgpdam", "not_found"),  # device ids are case-sensitive
        ("boMg", "bad_argument"),
    ):
        with pytest.raises(LocalProtocolError) as e:
            prefix.device_id(ids, given)
        assert e.value.code == code, given


def test_history_shows_short_ids() -> None:
    row = _row(bytes.fromhex("0123456789abcdef" * 2))
    assert cli.history_line(row).startswith("01234567 > me@127.0.0.1:1: t")


def test_node_commands_default_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HAVEN_HOME", str(tmp_path))
    rc, _, err = run(["node", "status"], capsys)
    assert rc == 2 and str(tmp_path / "node") in err
    assert not os.path.exists(tmp_path / "node")


async def _serve(app: object) -> tuple[object, str]:
    from aiohttp import web

    from tests.integration.harness import free_port

    runner = web.AppRunner(app)  # type: ignore[arg-type]
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(
    ("answer", "code", "text"),
    [
        ("404", "not_a_haven_node", "is not a Haven node (wrong port?)"),
        ("text-ws", "not_a_haven_node", "is not a Haven node (wrong port?)"),
        ("502", "node_unreachable", "(it answered HTTP 502)"),
    ],
)
async def test_connection_errors_say_what_answered(answer: str, code: str, text: str) -> None:
    """Something answers at the node's URL, but not as a Haven node would."""
    from aiohttp import web

    from client.connection import CLIENT_PATH, NodeConnection
    from federation.errors import TransportError

    async def handler(request: web.Request) -> web.StreamResponse:
        if answer == "502":
            return web.Response(status=502)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("hello")
        return ws

    app = web.Application()
    if answer != "404":
        app.router.add_get(CLIENT_PATH, handler)
    runner, url = await _serve(app)
    try:
        with pytest.raises(TransportError) as e:
            async with NodeConnection(url, timeout_s=5):
                pass
        assert e.value.code == code
        assert str(e.value).endswith(text) and url in str(e.value)
        assert "Error" not in str(e.value)  # no class names
    finally:
        await runner.cleanup()  # type: ignore[attr-defined]


class _UrlCore:
    url = "http://127.0.0.1:1/#k=test"


async def test_ipc_socket_mode_stale_file_and_long_paths(tmp_path: Path) -> None:
    import asyncio
    import stat

    from client.app import ipc

    deep = tmp_path / ("d" * 60) / ("e" * 60)  # beyond the ~107-byte limit of socket paths
    deep.mkdir(parents=True)
    path = str(deep / ipc.SOCKET_NAME)
    assert len(path.encode()) > 110
    server = await ipc.serve(_UrlCore(), path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert await asyncio.to_thread(ipc.is_running, str(deep))
        with pytest.raises(LocalProtocolError) as e:
            await ipc.serve(_UrlCore(), path)  # one app per home
        assert e.value.code == "app_running"
        rc = await asyncio.to_thread(ipc._request, str(deep), {"cmd": "url", "args": {}})
        assert rc == 0
    finally:
        await server.close()
    assert not await asyncio.to_thread(os.path.exists, path)
    # a socket file nothing answers on (a killed app) is replaced
    import socket as so

    stale = so.socket(so.AF_UNIX)
    stale.bind(str(tmp_path / ipc.SOCKET_NAME))
    stale.close()
    server = await ipc.serve(_UrlCore(), str(tmp_path / ipc.SOCKET_NAME))
    await server.close()
    # a regular file there is not ours to remove
    (tmp_path / ipc.SOCKET_NAME).write_text("keep me")
    with pytest.raises(LocalProtocolError):
        await ipc.serve(_UrlCore(), str(tmp_path / ipc.SOCKET_NAME))
    assert (tmp_path / ipc.SOCKET_NAME).read_text() == "keep me"
