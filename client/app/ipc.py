"""CLI commands through a running ``haven app``: a Unix socket in the device home.

While a daemon runs for a device home it holds the device's one connection to the home node; a
standalone CLI command would open a second one and the node would drop the daemon's. So the CLI
first asks ``DEVICE_HOME/app.sock``: if a daemon answers, the command runs *inside* the daemon,
with the same handlers as standalone (:data:`client.cli.COMMANDS`) writing through an
:class:`client.cli.Out` that streams to the socket; ``dev.connect()`` then hands out the
daemon's connection. Only ``send`` and ``recv`` differ: ``send`` queues durably through the
daemon's outbox, and ``recv`` prints what this reader (``--client``, default ``cli``) has not
printed yet, from a per-client cursor over the stored history (the daemon receives live itself).

Access: the socket is created with mode 0600 in the device home (itself 0700), and every
connection's peer uid is checked with ``SO_PEERCRED``: another uid is refused even if the modes
were loosened. Protocol: one request line of JSON, ``{"cmd", "args", "client"}``, at most
:data:`MAX_REQUEST` bytes; answer lines ``{"out": TEXT}`` (stdout), ``{"err": TEXT}`` (stderr)
and a final ``{"rc": INT}``, after a first ``{"accepted": true}`` once the request is read
(a client that gets no first line within :data:`ANSWER_TIMEOUT_S` reports the daemon as not
answering rather than opening the device itself beside it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import re
import socket
import stat
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from federation.clock import parse_duration
from federation.errors import HavenError, LocalProtocolError

log = logging.getLogger(__name__)

SOCKET_NAME = "app.sock"
MAX_REQUEST = 1 << 20
CONNECT_TIMEOUT_S = 1.0
ANSWER_TIMEOUT_S = 15.0  # for the daemon's first line; a live one answers in milliseconds
_CLIENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Commands a daemon runs for the CLI; `url` is the daemon's own (haven app --url).
_REFUSED = {
    "join": "the app is running for this device home, and it has joined already "
    "(stop the app to use another home)",
    "passphrase": "the app is running for this device home: change the passphrase in its "
    "settings, or stop the app first",
}


def socket_path(home: str) -> str:
    """Where a daemon for ``home`` listens."""
    return os.path.join(home, SOCKET_NAME)


@contextlib.contextmanager
def _addr(path: str) -> Iterator[str]:
    """A name ``bind``/``connect`` accept: Unix socket paths are limited to ~107 bytes, so a
    long one goes through the directory's descriptor (Linux ``/proc/self/fd``)."""
    if len(os.fsencode(path)) < 100 or not os.path.isdir("/proc/self/fd"):
        yield path
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


def _connect(path: str) -> socket.socket | None:
    """A connected socket to a daemon at ``path``, or None if nothing answers there."""
    if not os.path.exists(path):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CONNECT_TIMEOUT_S)
    try:
        with _addr(path) as a:
            s.connect(a)
    except OSError:  # refused (a stale socket), gone, not ours to open, or a timeout
        s.close()
        return None
    s.settimeout(None)
    return s


def is_running(home: str) -> bool:
    """Whether a daemon answers on ``home``'s socket."""
    s = _connect(socket_path(home))
    if s is None:
        return False
    s.close()
    return True


# ---- client side (the `haven` CLI process) -------------------------------------------------


def _request(home: str, req: dict[str, Any]) -> int | None:
    """Send one request to the daemon for ``home`` and relay its answer to stdout/stderr.

    Returns the command's exit status, or None when no daemon answers (run standalone).
    """
    s = _connect(socket_path(home))
    if s is None:
        return None
    with s, s.makefile("rb") as f:
        try:
            s.sendall(json.dumps(req).encode() + b"\n")
            # The first line (``accepted``, or a refusal) comes at once from a live daemon; after
            # it a command may legitimately stay silent for long (recv --wait inf, device link).
            s.settimeout(ANSWER_TIMEOUT_S)
            for raw in f:
                s.settimeout(None)
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                if "out" in msg:
                    print(str(msg["out"]), flush=True)
                elif "err" in msg:
                    print(str(msg["err"]), file=sys.stderr, flush=True)
                elif "rc" in msg:
                    return int(msg["rc"])
        except TimeoutError:
            print(f"error: the app for {home} does not answer (app_unresponsive)", file=sys.stderr)
            return 1
        except BrokenPipeError:
            if sys.stdout.closed or _stdout_gone():
                raise  # our reader left (`| head`); the CLI exits quietly
        except OSError:
            pass
    print("error: the app stopped before answering (app_gone)", file=sys.stderr)
    return 1


def _stdout_gone() -> bool:
    """Whether writing to stdout fails (its reader closed the pipe)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    return False


def through_daemon(args: argparse.Namespace) -> int | None:
    """Run a user command through the daemon for ``args.home``, if one answers.

    Returns:
        the exit status, or None if no daemon runs for that home (run standalone then).
    """
    params = {
        k: v for k, v in vars(args).items() if v is None or isinstance(v, str | int | float | bool)
    }
    client = getattr(args, "client", None) or "cli"
    return _request(args.home, {"cmd": args.cmd, "args": params, "client": client})


def print_url(home: str) -> int:
    """``haven app --url``: print the running daemon's URL on stdout; 1 if none runs."""
    rc = _request(home, {"cmd": "url", "args": {}, "client": "cli"})
    if rc is None:
        print(f"error: no app running for {home} (no_app)", file=sys.stderr)
        return 1
    return rc


# ---- server side (inside `haven app`) --------------------------------------------------------


class _SocketOut:
    """:class:`client.cli.Out` for a command running in the daemon: lines go to the socket."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._w = writer

    def _send(self, obj: dict[str, Any]) -> None:
        if not self._w.is_closing():
            self._w.write(json.dumps(obj).encode() + b"\n")

    def line(self, text: str) -> None:
        self._send({"out": text})

    def err(self, text: str) -> None:
        self._send({"err": text})

    def tty(self) -> bool:
        return False

    def tty_err(self) -> bool:
        return False

    def emit(self, args: argparse.Namespace, obj: Any, text: str) -> None:
        self.line(json.dumps(obj) if getattr(args, "json", False) else text)

    def rc(self, code: int) -> None:
        self._send({"rc": code})

    def accepted(self) -> None:
        """The first line for a well-formed request: the command runs now."""
        self._send({"accepted": True})


class IpcServer:
    """The daemon's socket server; :meth:`close` stops it and removes the socket file."""

    def __init__(self, server: asyncio.AbstractServer, path: str) -> None:
        self._server = server
        self.path = path
        self._ino = os.stat(path).st_ino

    async def close(self) -> None:
        """Stop accepting, end open connections, and remove our socket file."""
        self._server.close()
        with contextlib.suppress(Exception):
            self._server.close_clients()  # type: ignore[attr-defined]  # Python 3.13+
        await self._server.wait_closed()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._ino:  # not a newer daemon's
                os.unlink(self.path)


async def serve(core: Any, path: str) -> IpcServer:
    """Listen on ``path`` (mode 0600) for CLI commands to run in ``core``'s daemon.

    A stale socket file (nothing answers on it) is replaced.

    Raises:
        LocalProtocolError: ``app_running`` (a daemon answers there already), or ``path``
            is something other than a socket.
    """
    _clear_stale(path)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _handle(core, reader, writer)

    old = os.umask(0o177)  # the socket file is born 0600: no window where others can connect
    try:
        with _addr(path) as a:
            server = await asyncio.start_unix_server(handle, path=a, limit=MAX_REQUEST)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return IpcServer(server, path)


def _clear_stale(path: str) -> None:
    """Remove a socket file nothing answers on; refuse if a daemon answers or it is no socket."""
    if not os.path.lexists(path):
        return
    probe = _connect(path)
    if probe is not None:
        probe.close()
        raise LocalProtocolError(
            f"the app is already running for {os.path.dirname(path)}", code="app_running"
        )
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        raise LocalProtocolError(f"{path} exists and is not a socket", code="not_a_socket")
    os.unlink(path)


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    """The uid of the process at the other end of a Unix socket (``SO_PEERCRED``)."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


async def _handle(core: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    out = _SocketOut(writer)
    try:
        if peer_uid(writer) != os.getuid():
            log.warning("refused a command from another user on the app socket")
            out.err("error: this app belongs to another user (forbidden)")
            out.rc(1)
            await _discard(reader, writer)
            return
        try:
            async with asyncio.timeout(30):
                line = await reader.readline()
        except (ValueError, asyncio.LimitOverrunError):
            out.err(f"error: request larger than {MAX_REQUEST} bytes (too_large)")
            out.rc(2)
            await _discard(reader, writer)
            return
        except TimeoutError:
            return
        req = _parse(line)
        if isinstance(req, str):
            out.err(f"error: {req} (bad_request)")
            out.rc(2)
            return
        out.accepted()
        await writer.drain()
        await _run_until_hangup(core, req, reader, out)
    except (ConnectionError, OSError):
        pass  # the CLI went away (Ctrl-C); nothing to tell it
    finally:
        with contextlib.suppress(ConnectionError, OSError):
            await writer.drain()
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def _discard(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int = 16 * MAX_REQUEST
) -> None:
    """End our side, then read and drop what the client still sends (briefly, bounded), so
    that closing does not reset the connection before it has read our answer."""
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(2):
            while limit > 0:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                limit -= len(chunk)


async def _run_until_hangup(
    core: Any, req: dict[str, Any], reader: asyncio.StreamReader, out: _SocketOut
) -> None:
    """Run the command; cancel it if the CLI hangs up first (e.g. Ctrl-C on ``recv --wait``)."""

    async def hangup() -> None:
        while await reader.read(4096):
            pass

    async with asyncio.TaskGroup() as tg:
        cmd = tg.create_task(run_request(core, req, out))
        gone = tg.create_task(hangup())
        await asyncio.wait({cmd, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not cmd.done():
            cmd.cancel()
        gone.cancel()
    if not cmd.cancelled():
        out.rc(cmd.result())


def _parse(line: bytes) -> dict[str, Any] | str:
    """The request, or why it is refused."""
    try:
        req = json.loads(line)
    except ValueError:
        return "the request is not JSON"
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        return "the request needs a command"
    args = req.get("args", {})
    if not isinstance(args, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str | int | float | bool))
        for k, v in args.items()
    ):
        return "bad command arguments"
    client = req.get("client", "cli")
    if not isinstance(client, str) or not _CLIENT_NAME.fullmatch(client):
        return "--client must be 1-64 of A-Z a-z 0-9 . _ -"
    return {"cmd": req["cmd"], "args": args, "client": client}


def _lock(core: Any) -> Any:
    """The core's device lock if it has one (operations that span awaits hold it)."""
    lock = getattr(core, "lock", None)
    return lock if lock is not None else contextlib.nullcontext()


def _file_lock(core: Any, msg_id: bytes) -> Any:
    """The core's per-file download lock if it has one (its auto-download shares the file)."""
    lock = getattr(core, "file_lock", None)
    return lock(msg_id) if lock is not None else contextlib.nullcontext()


async def run_request(core: Any, req: dict[str, Any], out: Any) -> int:
    """Run one CLI request inside the daemon; returns the exit status."""
    from client import cli

    name = req["cmd"]
    args = argparse.Namespace(**req["args"])
    args.client = req["client"]
    if name == "url":
        out.line(str(core.url))
        return 0
    if name in _REFUSED:
        why = _REFUSED[name]
        if name == "join" and not getattr(core, "joined", True):
            why = "the app is running for this device home: join in its window (its address: "
            why += "haven app --url)"
        return cli.report_error(args, LocalProtocolError(why, code="app_running"), out)
    handler = _DAEMON_COMMANDS.get(name)
    plain = cli.COMMANDS.get(name)
    if handler is None and plain is None:
        return cli.report_error(args, LocalProtocolError(f"unknown command {name}"), out)
    try:
        dev = _device(core)
        if handler is not None:
            return await handler(core, args, dev, out)
        assert plain is not None
        if name == "group":  # the page shows what the command changed
            try:
                async with _lock(core):
                    return await plain(args, dev, out)
            finally:
                _refresh_groups(core)
        if name == "device" and getattr(args, "device_cmd", "") == "link":
            return await plain(args, dev, out)  # waits minutes: never under the lock
        async with _lock(core):
            return await plain(args, dev, out)
    except (HavenError, ValueError) as exc:
        return cli.report_error(args, exc, out)
    except asyncio.CancelledError:
        raise
    except Exception:  # noqa: BLE001 - the daemon keeps running; the CLI gets no traceback
        log.error("a CLI command failed inside the app (internal)")
        out.err("error: internal error; please report it (internal)")
        return 70


def _refresh_groups(core: Any) -> None:
    refresh = getattr(core, "refresh_groups", None)
    if callable(refresh):
        try:
            refresh()
        except HavenError as exc:
            log.info("groups not refreshed after a CLI command (%s)", exc.code)


def _device(core: Any) -> Any:
    state = core.state() if callable(getattr(core, "state", None)) else {}
    if state.get("locked"):
        raise LocalProtocolError(
            "the app is locked: unlock it in its window (haven app --url)", code="locked"
        )
    dev = getattr(core, "device", None)
    if dev is None or not dev.joined:
        raise LocalProtocolError(
            "this device has not joined yet: join in the app's window (haven app --url)",
            code="not_joined",
        )
    return dev


# ---- the commands that differ under the daemon -----------------------------------------------

DaemonHandler = Callable[[Any, argparse.Namespace, Any, Any], Awaitable[int]]
SEND_WAIT_S = 10.0  # how long `send` waits for the node to accept before saying "queued"


async def _send(core: Any, args: argparse.Namespace, dev: Any, out: Any) -> int:
    """Queue through the daemon's durable outbox; report ``sent`` once the node accepted it."""
    from client import cli, group_cli

    if getattr(args, "file", None) or group_cli.group_target(dev, args.address) is not None:
        # a file: upload on the daemon's connection, then its outbox; a group: one submission
        try:
            async with _lock(core):
                return await cli.cmd_send(args, dev, out)
        finally:
            _refresh_groups(core)
    ttl_ms = parse_duration(args.ttl) if getattr(args, "ttl", None) else None
    expires = None if args.expires is None else cli._duration_or_off(args.expires)
    q = core.subscribe()
    try:
        msg = await _queue(core, args.address, args.text, ttl_ms, expires)
        msg_id = msg["id"]
        final = msg if msg.get("status") != "pending" else await _await_sent(core, q, msg_id)
    finally:
        core.unsubscribe(q)
    obj: dict[str, Any] = {"msg_id": msg_id, "to": args.address}
    if final is None or final.get("status") == "pending":
        reason = _offline_reason(core)
        out.err(f"warning: {reason}; the message is queued on this device and is sent then")
        out.emit(args, obj | {"status": "queued"}, "queued")
        return 0
    if final.get("error"):
        raise LocalProtocolError(
            f"the message to {args.address} could not be sent", code=str(final["error"])
        )
    devices = {args.address: final.get("devices", {"total": 0, "verified": 0})}
    out.emit(
        args, obj | {"status": "sent", "devices": devices}, cli.sent_text(args.address, devices)
    )
    return 0


async def _queue(
    core: Any, address: str, text: str, ttl_ms: int | None, expires: int | None
) -> dict[str, Any]:
    """``core.send_text`` with the options it accepts; the queued Message object."""
    kwargs: dict[str, Any] = {}
    if ttl_ms is not None:
        kwargs["ttl_ms"] = ttl_ms
    if expires is not None:
        kwargs["expires_in"] = expires
    res = await core.send_text(address, text, **kwargs)
    if isinstance(res, dict):
        return res
    from client.app.events import message_obj

    return message_obj(res, int(dev_now(core)))


def dev_now(core: Any) -> int:
    """The daemon's clock, in ms."""
    return int(core.device.clock.now_ms())


async def _await_sent(core: Any, q: asyncio.Queue[Any], msg_id: str) -> dict[str, Any] | None:
    """The message once it left ``pending`` (or None after :data:`SEND_WAIT_S`, or at once
    when the node is known to be unreachable)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SEND_WAIT_S
    while True:
        if _connection(core) == "offline":
            return None
        remaining = deadline - loop.time()
        if remaining <= 0:
            return None
        try:
            async with asyncio.timeout(min(remaining, 0.5)):
                ev = await q.get()
        except TimeoutError:
            continue
        if ev is None:  # the core dropped this subscriber (it fell behind)
            return None
        m = ev.get("message") if isinstance(ev, dict) else None
        if isinstance(m, dict) and m.get("id") == msg_id and m.get("status") != "pending":
            return m


def _connection(core: Any) -> str:
    state = core.state() if callable(getattr(core, "state", None)) else {}
    return str(state.get("connection", "connecting"))


def _offline_reason(core: Any) -> str:
    url = getattr(core.device, "node_url", "") or "your node"
    if _connection(core) == "offline":
        return f"the home node at {url} is unreachable"
    return f"the home node at {url} has not accepted it yet"


async def _recv(core: Any, args: argparse.Namespace, dev: Any, out: Any) -> int:
    """Print what this reader has not printed yet; with ``--wait``, also what arrives until
    that many seconds pass with nothing new. Opens no node connection (the daemon receives)."""
    client = args.client or "cli"
    wait = float(args.wait)
    q = core.subscribe()
    files: list[Any] = []
    try:
        printed = _print_moved(core, client, args, out) + _print_new(dev, client, args, out, files)
        await _files(core, dev, args, out, files)
        loop = asyncio.get_running_loop()
        deadline = math.inf if math.isinf(wait) else loop.time() + wait
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                async with asyncio.timeout(None if math.isinf(remaining) else remaining):
                    ev = await q.get()
            except TimeoutError:
                break
            if ev is None:  # dropped by the core (fell behind): print what is new, and stop
                printed += _print_new(dev, client, args, out, files)
                await _files(core, dev, args, out, files)
                break
            if isinstance(ev, dict) and ev.get("type") in ("message", "moved"):
                n = _print_moved(core, client, args, out) + _print_new(
                    dev, client, args, out, files
                )
                await _files(core, dev, args, out, files)
                if n and not math.isinf(wait):
                    deadline = loop.time() + wait
                printed += n
    finally:
        core.unsubscribe(q)
    if not printed and not args.json:
        out.err("no new messages")
    return 0


async def _files(core: Any, dev: Any, args: argparse.Namespace, out: Any, rows: list[Any]) -> None:
    """Download the new files up to ``--auto-download`` MB (into the daemon's save folder or
    ``--save-dir``) and print each; the rest wait for ``haven download``."""
    from client import cli, transfers

    limit = int(float(getattr(args, "auto_download", cli.AUTO_DOWNLOAD_MB)) * 1_000_000)
    todo, rows[:] = list(rows), []
    for r in todo:
        att = dev.state.attachment(r.msg_id)
        if att is None:
            continue
        if att.ref.size <= limit:
            try:
                async with _lock(core), _file_lock(core, r.msg_id):
                    att = await transfers.download(dev, r.msg_id, cli.save_dir(args))
            except HavenError as exc:
                out.err(f"warning: {att.ref.name} not downloaded ({exc.code})")
                att = dev.state.attachment(r.msg_id) or att
        if args.json:
            obj = {
                "from": r.sender,
                "text": r.text,
                "sent_at": r.sent_at,
                "msg_id": r.msg_id.hex(),
                "kind": "file",
                "chat": r.peer,
                "file": cli.file_json(att),
            }
            out.line(json.dumps(obj))
        else:
            out.line(cli.file_line(r.sender, att, r.text))


def _print_moved(core: Any, client: str, args: argparse.Namespace, out: Any) -> int:
    """Print the contacts' address changes the daemon followed that ``client`` has not seen
    (held in memory by the daemon: client/app/events.py ``MovedNotices``); how many."""
    from client import cli

    notices = core.moved.take(client)
    for m in notices:
        cli.show_moved(args, out, m)
    return len(notices)


def _print_new(
    dev: Any, client: str, args: argparse.Namespace, out: Any, files: list[Any] | None = None
) -> int:
    """Print incoming messages after ``client``'s cursor and move the cursor; how many.
    Rows with a file go to ``files`` instead (printed by :func:`_files` once downloaded)."""
    n = 0
    seq = dev.state.cursor(client)
    while True:
        rows = dev.state.history_after(seq)
        if not rows:
            break
        for r in rows:
            if r.outgoing:
                continue
            n += 1
            if files is not None and dev.state.attachment(r.msg_id) is not None:
                files.append(r)
                continue
            if args.json:
                obj = {
                    "from": r.sender,
                    "text": r.text,
                    "sent_at": r.sent_at,
                    "msg_id": r.msg_id.hex(),
                    "kind": "text",
                    "chat": r.peer,
                }
                out.line(json.dumps(obj))
            elif r.peer.startswith("group:"):
                from client.group_cli import recv_line

                out.line(recv_line(dev, r.peer, r.sender, r.text))
            else:
                out.line(f"{r.sender}: {r.text}")
        seq = rows[-1].seq
        with dev.state.tx() as db:
            dev.state.set_cursor(db, client, seq)
    return n


async def _edit(core: Any, args: argparse.Namespace, dev: Any, out: Any) -> int:
    """``edit`` through the core, so the app's window shows it too."""
    from client import prefix

    msg_id = prefix.message_id(dev.state.db, args.msg_id, args.address)
    await core.edit(msg_id, args.text)
    out.emit(args, {"msg_id": msg_id.hex(), "edited": True}, "edited")
    return 0


async def _delete(core: Any, args: argparse.Namespace, dev: Any, out: Any) -> int:
    """``delete`` (for everyone) through the core."""
    from client import prefix

    msg_id = prefix.message_id(dev.state.db, args.msg_id, args.address)
    await core.delete(msg_id)
    out.emit(args, {"msg_id": msg_id.hex(), "deleted": True}, "deleted")
    return 0


async def _timer(core: Any, args: argparse.Namespace, dev: Any, out: Any) -> int:
    """``timer`` through the core (shared with the peer, shown in the chat header)."""
    from client import cli

    ms = cli._duration_or_off(args.duration)
    if dev.state.contact(args.address) is None:
        raise LocalProtocolError(f"{args.address} is not a contact yet")
    await core.set_timer(args.address, ms)
    out.emit(
        args,
        {"address": args.address, "timer_ms": ms},
        cli.timer_text(args.address, ms, args.duration),
    )
    return 0


async def _history(core: Any, args: argparse.Namespace, dev: Any, out: Any) -> int:
    """``history``; marking read goes through the core (unread badges in the window)."""
    from client import cli, group_cli

    if group_cli.group_target(dev, args.address) is not None:
        async with _lock(core):
            return await cli.cmd_history(args, dev, out)
    for r in dev.history(args.address):
        att = dev.state.attachment(r.msg_id)
        out.line(json.dumps(cli._row_json(r, att)) if args.json else cli.history_line(r, att))
    if not args.no_mark_read:
        await core.mark_read(args.address)
    return 0


async def _device_cmd(core: Any, args: argparse.Namespace, dev: Any, out: Any) -> int:
    """``device link`` through the core (which pauses its receive loop meanwhile)."""
    from client import cli

    if args.device_cmd != "link":
        async with _lock(core):
            return await cli.COMMANDS["device"](args, dev, out)
    if args.with_history:
        raise LocalProtocolError(
            "--with-history is not available while the app runs; stop it first",
            code="app_running",
        )
    q = core.subscribe()
    try:
        linked = await core.link_device()
        out.line(linked["code"])
        out.err("waiting for the new device: run `haven join --link CODE --home DIR`")
        async with asyncio.timeout(parse_duration(args.timeout) / 1000):
            while True:
                ev = await q.get()
                if ev is None:
                    raise LocalProtocolError("lost track of the link", code="link_failed")
                if isinstance(ev, dict) and ev.get("type") == "link":
                    break
    except TimeoutError:
        raise LocalProtocolError("no device joined in time", code="timeout") from None
    finally:
        core.unsubscribe(q)
    if not ev.get("ok"):
        raise LocalProtocolError("linking failed", code=str(ev.get("error", "link_failed")))
    d = ev.get("device") or {}
    out.emit(args, d, f"linked {d.get('name', '')} ({str(d.get('id', ''))[:8]})")
    return 0


async def _settings(core: Any, args: argparse.Namespace, dev: Any, out: Any) -> int:
    """``settings`` through the core (the window shows the change)."""
    body = {
        k: v
        for k, v in (
            ("read_receipts", args.read_receipts),
            ("delivery_receipts", args.delivery_receipts),
        )
        if v
    }
    st = core.set_settings(body) if body else core.state()
    current = {k: st["settings"][k] for k in ("read_receipts", "delivery_receipts")}
    out.emit(args, current, "  ".join(f"{k.replace('_', ' ')}: {v}" for k, v in current.items()))
    return 0


async def _verify(core: Any, args: argparse.Namespace, dev: Any, out: Any) -> int:
    """``verify`` through the core (the window's contact updates too)."""
    res = await core.verify(
        args.address, confirm=bool(args.confirm), accept_new_key=bool(args.accept_new_key)
    )
    if args.json:
        out.line(json.dumps({"safety_number": res["safety_number"], "verified": res["verified"]}))
        return 0
    out.line(f"safety number with {args.address}:\n{res['safety_number']}")
    if res.get("key_changed"):
        out.line(
            f"the identity key of {args.address} changed; the new safety number is:\n"
            f"{res['new_safety_number']}\ncompare it in person, then run with --accept-new-key"
        )
    else:
        out.line(
            "verified"
            if res["verified"]
            else "not verified: compare in person, then run with --confirm"
        )
    return 0


_DAEMON_COMMANDS: dict[str, DaemonHandler] = {
    "settings": _settings,
    "verify": _verify,
    "send": _send,
    "recv": _recv,
    "edit": _edit,
    "delete": _delete,
    "timer": _timer,
    "history": _history,
    "device": _device_cmd,
}
