"""The ``haven`` command: user commands here, operator commands under ``haven node``.

This is the one process entry point, so it is the one place the client package reaches into
``node`` (to register ``haven node …`` and to run ``haven demo``); nothing else in ``client``
imports the node. Every command is a thin layer over :class:`client.device.Device`.

Handlers write through an :class:`Out` instead of printing, so that the same handlers run
standalone (``Out`` prints) and inside a running ``haven app`` daemon, where
:mod:`client.app.ipc` streams their output back over the device home's Unix socket. Before
opening a device, :func:`main` asks that socket; only if no daemon answers does the command
open the device itself (docs/cli.md, "Through a running app").
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from federation.clock import parse_duration
from federation.errors import HavenError, LocalProtocolError

from . import prefix
from .device import Device, ReceivedMessage
from .homes import device_home, node_home
from .state import (
    FILE_DOWNLOADED,
    FILE_FAILED,
    FILE_PENDING,
    FILE_SENT,
    STATUS_NAMES,
    Attachment,
    HistoryRow,
)

AUTO_DOWNLOAD_MB = 25.0  # recv downloads files up to this size (decimal MB)


class Out:
    """Where a command's output goes. This one prints; the daemon's streams to the socket."""

    def line(self, text: str) -> None:
        """One line for stdout."""
        print(text, flush=True)

    def err(self, text: str) -> None:
        """One line for stderr (warnings, diagnostics)."""
        print(text, file=sys.stderr, flush=True)

    def tty(self) -> bool:
        """Whether stdout is a terminal (QR codes are drawn only there)."""
        return sys.stdout.isatty()

    def tty_err(self) -> bool:
        """Whether stderr is a terminal."""
        return sys.stderr.isatty()

    def emit(self, args: argparse.Namespace, obj: Any, text: str) -> None:
        """``obj`` as one JSON line with ``--json``, else ``text``."""
        self.line(json.dumps(obj) if getattr(args, "json", False) else text)


Handler = Callable[[argparse.Namespace, Device, Out], Awaitable[int]]


def _duration_or_off(text: str) -> int:
    return 0 if text.lower() in ("off", "0") else parse_duration(text)


async def cmd_join(args: argparse.Namespace, dev: Device, out: Out) -> int:
    if args.register:
        from .linking import register_open

        address = await register_open(dev, args.invite, args.register, name=args.name or "")
    else:
        address = await dev.join(args.invite or args.link, name=args.name or "")
    out.emit(args, {"address": address}, f"joined; share your address with contacts:\n{address}")
    return 0


async def cmd_send(args: argparse.Namespace, dev: Device, out: Out) -> int:
    from . import group_cli

    gid = group_cli.group_target(dev, args.address)
    if gid is not None:
        return await group_cli.send(args, dev, out, gid)
    expires = None if args.expires is None else _duration_or_off(args.expires)
    if getattr(args, "file", None):
        return await _send_file(args, dev, out, expires)
    if not args.text:
        raise LocalProtocolError("give the message text, or --file PATH", code="bad_argument")
    res = await dev.send(
        args.address, args.text, ttl_ms=parse_duration(args.ttl), expires_in=expires
    )
    for w in res.warnings:
        out.err(f"warning: {w.message}")
    out.emit(
        args,
        {
            "msg_id": res.msg_id.hex(),
            "to": args.address,
            "devices": res.devices,
            "envelopes": res.envelopes,
            "warnings": [w.to_json() for w in res.warnings],
        },
        sent_text(args.address, res.devices),
    )
    return 0


async def _send_file(args: argparse.Namespace, dev: Device, out: Out, expires: int | None) -> int:
    from . import transfers
    from .progress import bar

    with bar(out, args) as progress:
        res = await transfers.send_file(
            dev,
            args.address,
            args.file,
            args.text or "",
            ttl_ms=parse_duration(args.ttl),
            expires_in=expires,
            mime=getattr(args, "mime", None),
            progress=progress,
        )
    row = res.row
    att = dev.state.attachment(row.msg_id)
    devices = {args.address: {"total": row.devices_total, "verified": row.devices_verified}}
    status = STATUS_NAMES.get(row.status, "pending")
    if row.error:
        raise LocalProtocolError(f"the file to {args.address} could not be sent", code=row.error)
    obj: dict[str, Any] = {
        "msg_id": row.msg_id.hex(),
        "to": args.address,
        "status": "queued" if status == "pending" else status,
        "devices": devices,
        "resumed": res.resumed,
        "kind": "file",
        "file": file_json(att),
    }
    if status == "pending":
        out.err("warning: the file is uploaded; its message is queued and sent on the next run")
        text = "queued"
    else:
        text = sent_text(args.address, devices)
        if res.resumed:
            text += " (resumed an interrupted upload)"
    out.emit(args, obj, text)
    return 0


def file_json(att: Attachment | None) -> dict[str, Any] | None:
    """The ``file`` object of JSON rows: name, size, mime, sha256 (of the file, hex; null
    until downloaded) and path (null until downloaded)."""
    if att is None:
        return None
    have = att.state in (FILE_DOWNLOADED, FILE_SENT)
    out: dict[str, Any] = {
        "name": att.ref.name,
        "size": att.ref.size,
        "mime": att.ref.mime,
        "sha256": att.plain_sha256.hex() if have and att.plain_sha256 else None,
        "path": att.path if have and att.path else None,
        "state": att.state,
    }
    if att.error:
        out["error"] = att.error
    return out


def human_size(n: int) -> str:
    """``1.2 MB`` (decimal units, as file managers show them)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def file_line(sender: str, att: Attachment, caption: str) -> str:
    """The text line of a received file: saved where, or how to get it."""
    what = f"{sender}: [file] {att.ref.name} ({human_size(att.ref.size)}, {att.ref.mime})"
    if caption:
        what += f" {caption}"
    if att.state == FILE_DOWNLOADED:
        return f"{what} saved to {att.path}"
    hint = f"haven download {att.msg_id.hex()[:8]}"
    if att.state == FILE_FAILED:
        return f"{what} could not be downloaded ({att.error}); try `{hint}`"
    return f"{what}; get it with `{hint}`"


def sent_text(address: str, devices: dict[str, dict[str, int]]) -> str:
    """The text line of a successful send."""
    mine = devices.get(address, {})
    return (
        f"sent to {address}: readable by {mine.get('total', 0)} device(s) of theirs "
        f"({mine.get('verified', 0)} verified)"
    )


def _msg_json(m: ReceivedMessage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "from": m.sender,
        "text": m.text,
        "sent_at": m.sent_at,
        "msg_id": m.msg_id.hex(),
        "kind": m.kind,
        "chat": getattr(m, "chat", "") or m.peer,
    }
    if m.target:
        out["target"] = m.target.hex()
    if m.kind == "moved":  # a contact's new address (docs/protocol.md §12.5)
        out["old"], out["new"] = m.sender, m.peer
    return out


def show_moved(args: argparse.Namespace, out: Out, m: ReceivedMessage) -> None:
    """Print a contact's address-change notice (docs/cli.md ``recv``): direct or via the app."""
    if args.json:
        out.line(json.dumps(_msg_json(m)))
    else:
        out.line(f"{m.sender}'s address changed to {m.peer}")


async def cmd_recv(args: argparse.Namespace, dev: Device, out: Out) -> int:
    files: list[ReceivedMessage] = []
    await _resume_uploads(dev)

    def show(m: ReceivedMessage) -> None:
        if m.kind == "file":
            files.append(m)  # printed once downloaded (or not: too large)
            return
        if m.kind not in ("text", "edit", "delete", "group_state", "moved"):
            return  # receipts, profiles and timers are applied, not printed
        chat = getattr(m, "chat", "")
        if m.kind == "moved":
            show_moved(args, out, m)
        elif args.json:
            out.line(json.dumps(_msg_json(m)))
        elif chat:
            from .group_cli import recv_line

            out.line(recv_line(dev, chat, m.sender, m.text, m.kind))
        elif m.kind == "text":
            out.line(f"{m.sender}: {m.text}")
        else:
            verb = {"edit": "edited", "delete": "deleted"}[m.kind]
            target = m.target.hex()[:8] if m.target else ""
            out.line(f"{m.sender} {verb} a message {target}")

    msgs = await dev.receive(wait_s=args.wait, on_message=show)
    if files:
        await _auto_download(args, dev, out, files)
    mark_printed(dev, getattr(args, "client", None) or "cli")
    if not any(m.kind in ("text", "file", "group_state", "moved") for m in msgs) and not args.json:
        out.err("no new messages")
    return 0


async def _resume_uploads(dev: Device) -> None:
    """Finish uploads an interrupted ``send --file`` left (only if there are any)."""
    if not dev.state.uploads():
        return
    from . import transfers

    conn = await dev.connect()
    try:
        await transfers.resume_uploads(dev, conn)
    finally:
        await dev.release(conn)


def save_dir(args: argparse.Namespace) -> str:
    from .transfers import default_save_dir

    return os.path.abspath(
        os.path.expanduser(getattr(args, "save_dir", None) or default_save_dir())
    )


async def _auto_download(
    args: argparse.Namespace, dev: Device, out: Out, files: list[ReceivedMessage]
) -> None:
    """Download the new files up to ``--auto-download`` MB, then print each one."""
    from . import transfers
    from .progress import bar

    limit = int(float(getattr(args, "auto_download", AUTO_DOWNLOAD_MB)) * 1_000_000)
    conn = await dev.connect()
    try:
        for m in files:
            att = dev.state.attachment(m.msg_id)
            if att is None:
                continue
            if att.ref.size <= limit:
                try:
                    with bar(out, args) as progress:
                        att = await transfers.download(
                            dev, m.msg_id, save_dir(args), progress=progress, conn=conn
                        )
                except HavenError as exc:
                    out.err(f"warning: {att.ref.name} not downloaded ({exc.code})")
                    att = dev.state.attachment(m.msg_id) or att
            if args.json:
                out.line(json.dumps(_msg_json(m) | {"file": file_json(att)}))
            else:
                out.line(file_line(m.sender, att, m.text))
    finally:
        await dev.release(conn)


async def cmd_download(args: argparse.Namespace, dev: Device, out: Out) -> int:
    from . import transfers
    from .progress import bar

    msg_id = prefix.message_id(dev.state.db, args.msg_id)
    await _resume_uploads(dev)
    with bar(out, args) as progress:
        att = await transfers.download(dev, msg_id, save_dir(args), progress=progress)
    obj = {"msg_id": msg_id.hex(), "kind": "file", "file": file_json(att)}
    out.emit(args, obj, f"saved to {att.path}")
    return 0


def mark_printed(dev: Device, client: str) -> None:
    """Move ``client``'s recv cursor past everything in history (standalone recv printed it),
    so that a later ``recv`` through a running app does not print it again."""
    top = dev.state.db.execute("SELECT coalesce(max(seq), 0) FROM history").fetchone()[0]
    if int(top) > dev.state.cursor(client):
        with dev.state.tx() as db:
            dev.state.set_cursor(db, client, int(top))


def _row_json(r: HistoryRow, att: Attachment | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "from": r.sender,
        "text": r.text,
        "sent_at": r.sent_at,
        "outgoing": r.outgoing,
        "msg_id": r.msg_id.hex(),
        "edited": r.edited,
        "expires_at": r.expire_at,
    }
    if r.outgoing:
        out["status"] = STATUS_NAMES[r.status]
        out["devices"] = {"total": r.devices_total, "verified": r.devices_verified}
        if r.error:
            out["error"] = r.error
    else:
        out["read"] = r.read
    if att is not None:
        out["kind"] = "file"
        out["file"] = file_json(att)
    return out


async def cmd_history(args: argparse.Namespace, dev: Device, out: Out) -> int:
    from . import group_cli

    gid = group_cli.group_target(dev, args.address)
    if gid is not None:
        return await group_cli.history(args, dev, out, gid)
    rows = dev.history(args.address)
    for r in rows:
        att = dev.state.attachment(r.msg_id)
        if args.json:
            out.line(json.dumps(_row_json(r, att)))
        else:
            out.line(history_line(r, att))
    if not args.no_mark_read:
        try:
            await dev.mark_read(args.address)
        except HavenError as exc:
            out.err(f"warning: read state not sent ({exc.code})")
    return 0


def history_line(r: HistoryRow, att: Attachment | None = None) -> str:
    """``ID8 > sender: text (edited) [status]``: the short id works with edit and delete
    (and ``download``, for a file: ``[file NAME, SIZE, STATE]`` before the caption)."""
    mark = f" [{STATUS_NAMES.get(r.status, r.status)}]" if r.outgoing else ""
    edited = " (edited)" if r.edited else ""
    arrow = ">" if r.outgoing else "<"
    text = r.text
    if att is not None:
        where = f": {att.path}" if att.path and att.state != FILE_PENDING else ""
        info = f"[file {att.ref.name}, {human_size(att.ref.size)}, {att.state}{where}]"
        text = f"{info} {text}" if text else info
    return f"{r.msg_id.hex()[:8]} {arrow} {r.sender}: {text}{edited}{mark}"


async def cmd_chats(args: argparse.Namespace, dev: Device, out: Out) -> int:
    chats = dev.chats()
    if args.json:
        out.line(json.dumps(chats))
    else:
        for c in chats:
            out.line(f"{c['address']}  {c['unread']} unread / {c['messages']}")
    return 0


async def cmd_edit(args: argparse.Namespace, dev: Device, out: Out) -> int:
    msg_id = prefix.message_id(dev.state.db, args.msg_id, args.address)
    res = await dev.edit(args.address, msg_id, args.text)
    out.emit(args, {"msg_id": msg_id.hex(), "edited": True, "envelopes": res.envelopes}, "edited")
    return 0


async def cmd_delete(args: argparse.Namespace, dev: Device, out: Out) -> int:
    msg_id = prefix.message_id(dev.state.db, args.msg_id, args.address)
    res = await dev.delete(args.address, msg_id)
    out.emit(args, {"msg_id": msg_id.hex(), "deleted": True, "envelopes": res.envelopes}, "deleted")
    return 0


async def cmd_timer(args: argparse.Namespace, dev: Device, out: Out) -> int:
    ms = _duration_or_off(args.duration)
    await dev.set_timer(args.address, ms)
    out.emit(
        args,
        {"address": args.address, "timer_ms": ms},
        timer_text(args.address, ms, args.duration),
    )
    return 0


def timer_text(address: str, ms: int, duration: str) -> str:
    """The text line of ``haven timer``."""
    if not ms:
        return f"messages with {address} are kept (for both of you)"
    return f"new messages with {address} disappear after {duration} (for both of you)"


async def cmd_settings(args: argparse.Namespace, dev: Device, out: Out) -> int:
    if args.read_receipts:
        dev.set_setting("read_receipts", args.read_receipts)
    if args.delivery_receipts:
        dev.set_setting("delivery_receipts", args.delivery_receipts)
    current = {k: dev.setting(k, "on") for k in ("read_receipts", "delivery_receipts")}
    out.emit(args, current, "  ".join(f"{k.replace('_', ' ')}: {v}" for k, v in current.items()))
    return 0


async def cmd_verify(args: argparse.Namespace, dev: Device, out: Out) -> int:
    from .trust import verify

    res = await verify(dev, args.address, confirm=args.confirm, accept_new_key=args.accept_new_key)
    if args.json:
        out.line(json.dumps({"safety_number": res["safety_number"], "verified": res["verified"]}))
    else:
        if out.tty():
            from node.cli import print_qr

            print_qr(res["safety_number"].replace(" ", ""))
        out.line(f"safety number with {args.address}:\n{res['safety_number']}")
        out.line(
            "verified"
            if res["verified"]
            else "not verified: compare in person, then run with --confirm"
        )
    return 0


async def cmd_device(args: argparse.Namespace, dev: Device, out: Out) -> int:
    from . import linking

    if args.device_cmd == "link":

        def show(code: str) -> None:
            out.line(code)
            if out.tty_err():
                from node.cli import print_qr

                print_qr(code)
            out.err("waiting for the new device: run `haven join --link CODE --home DIR`")

        res = await linking.link_device(
            dev,
            show,
            timeout_s=parse_duration(args.timeout) / 1000,
            with_history=args.with_history,
        )
        out.emit(args, res, f"linked {res['name']} ({res['id'][:8]})")
    elif args.device_cmd == "list":
        devices = await linking.list_devices(dev)
        if args.json:
            out.line(json.dumps(devices))
        else:
            for d in devices:
                out.line(f"{d['id']}  {d['name']}{'  (this device)' if d['this_device'] else ''}")
    else:
        ids = [d["id"] for d in await linking.list_devices(dev)]
        device_id = prefix.device_id(ids, args.id)
        await linking.remove_device(dev, device_id)
        out.emit(args, {"removed": device_id}, f"removed {device_id[:8]}")
    return 0


_PROTECTION_TEXT = {
    "passphrase": "encrypted; its key is wrapped by your passphrase",
    "keyring": "encrypted; its key is wrapped by a key in the OS keyring",
    "none": "encrypted, but its key is stored unprotected next to it (no passphrase): anyone "
    "who can read this disk can read it; set one with `haven passphrase`",
}


async def cmd_whoami(args: argparse.Namespace, dev: Device, out: Out) -> int:
    joined = dev.joined
    info: dict[str, Any] = {
        "address": dev.address if joined else None,
        "node_url": dev.node_url if joined else None,
        "device_id": dev.curve_key if joined else None,
        "display_name": getattr(dev, "display_name", "") if joined else "",
        "protected": dev.state.protected,
        "protection": dev.state.protection,
    }
    lines = [
        info["address"] or "not joined yet",
        f"storage: {_PROTECTION_TEXT[info['protection']]}",
    ]
    if joined:
        lines[1:1] = [f"device: {info['device_id']}", f"node: {info['node_url']}"]
        if info["display_name"]:
            lines.insert(1, f"name: {info['display_name']}")
    out.emit(args, info, "\n".join(lines))
    return 0


def _new_passphrase() -> str:
    new = os.environ.get("HAVEN_NEW_PASSPHRASE")
    if new is None and sys.stdin.isatty():
        new = getpass.getpass("new passphrase: ")
        if getpass.getpass("repeat it: ") != new:
            raise LocalProtocolError("the passphrases differ", code="bad_argument")
    if not new:
        raise LocalProtocolError(
            "give the new passphrase in HAVEN_NEW_PASSPHRASE (or use --remove)",
            code="bad_argument",
        )
    return new


async def cmd_group(args: argparse.Namespace, dev: Device, out: Out) -> int:
    from .group_cli import cmd_group as run

    return await run(args, dev, out)


async def cmd_passphrase(args: argparse.Namespace, dev: Device, out: Out) -> int:
    if args.remove:
        dev.state.change_passphrase(None)
    elif args.keyring:
        dev.state.change_passphrase(None, keyring=True)
    else:
        dev.state.change_passphrase(_new_passphrase())
    info = {"protected": dev.state.protected, "protection": dev.state.protection}
    out.emit(args, info, f"storage: {_PROTECTION_TEXT[dev.state.protection]}")
    return 0


COMMANDS: dict[str, Handler] = {
    "join": cmd_join,
    "send": cmd_send,
    "recv": cmd_recv,
    "download": cmd_download,
    "history": cmd_history,
    "chats": cmd_chats,
    "edit": cmd_edit,
    "delete": cmd_delete,
    "timer": cmd_timer,
    "settings": cmd_settings,
    "verify": cmd_verify,
    "device": cmd_device,
    "whoami": cmd_whoami,
    "passphrase": cmd_passphrase,
    "group": cmd_group,
}


HOME_HELP = "device home (default: $HAVEN_HOME/device, else ~/.haven/device)"


def _user_commands(sub: Any) -> None:
    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_)
        p.add_argument("--home", help=HOME_HELP)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    j = cmd("join", "redeem an invite or a device-link code (creates the device home)")
    j.add_argument(
        "invite", nargs="?", help="invite from `haven node invite` (with --register: node URL)"
    )
    j.add_argument("--link", help="code printed by `haven device link` on your other device")
    j.add_argument("--name", help="a name for this device (kept on your devices only)")
    j.add_argument(
        "--register",
        metavar="ACCOUNT",
        help="create ACCOUNT without an invite on a node with open registration; "
        "give the node's URL instead of an invite",
    )

    s = cmd("send", "send an end-to-end encrypted message (or a file, with --file)")
    s.add_argument("address", help="name@host, or a group (group:ID, an ID prefix or its name)")
    s.add_argument("text", nargs="?", help="the message (with --file: a caption, optional)")
    s.add_argument(
        "--file", metavar="PATH", help="send this file (up to the node's limit, 100 MB by default)"
    )
    s.add_argument("--mime", help="the file's MIME type (default: from its name)")
    s.add_argument("--ttl", default="7d", help="how long nodes may hold it undelivered")
    s.add_argument("--expires", help="disappear this long after it is shown (e.g. 1h, off)")

    r = cmd("recv", "receive new messages")
    r.add_argument(
        "--wait",
        type=float,
        default=2.0,
        help="return once this many seconds pass with nothing new (default 2; inf: forever)",
    )
    r.add_argument(
        "--client",
        default="cli",
        help="through a running app: the name of this reader's cursor (default cli)",
    )

    save_help = "where received files go (default ~/Downloads/Haven)"
    r.add_argument("--save-dir", help=save_help)
    r.add_argument(
        "--auto-download",
        type=float,
        default=AUTO_DOWNLOAD_MB,
        metavar="MB",
        help=f"download new files up to this size (default {AUTO_DOWNLOAD_MB:g} MB; 0: none)",
    )
    dl = cmd("download", "download the file of a received message")
    dl.add_argument("msg_id", help="message id (a unique prefix of 8+ hex characters)")
    dl.add_argument("--save-dir", help=save_help)

    h = cmd("history", "show a conversation (marks it read)")
    h.add_argument("address", help="name@host, or a group (group:ID, an ID prefix or its name)")
    h.add_argument("--no-mark-read", action="store_true", help="leave unread messages unread")

    cmd("chats", "list conversations with unread counts")

    id_help = "message id: a unique prefix of at least 8 hex characters (history shows 8)"
    e = cmd("edit", "edit one of your messages for everyone")
    e.add_argument("address")
    e.add_argument("msg_id", help=id_help)
    e.add_argument("text")

    d = cmd("delete", "delete one of your messages for everyone")
    d.add_argument("address")
    d.add_argument("msg_id", help=id_help)

    t = cmd("timer", "set a conversation's disappearing-message timer (shared with the peer)")
    t.add_argument("address")
    t.add_argument("duration", help="e.g. 1h, 7d, or off")

    st = cmd("settings", "device settings")
    st.add_argument("--read-receipts", choices=["on", "off"])
    st.add_argument(
        "--delivery-receipts",
        choices=["on", "off"],
        help="off: never tell senders a message arrived (less timing metadata)",
    )

    v = cmd("verify", "show the safety number with a contact")
    v.add_argument("address")
    v.add_argument("--confirm", action="store_true", help="mark the contact verified")
    v.add_argument(
        "--accept-new-key",
        action="store_true",
        help="accept a changed identity key (drops verification)",
    )

    cmd("whoami", "show this device's address, id, node and name, and how its storage is protected")
    pw = cmd("passphrase", "set or change the passphrase that protects this device's storage")
    how = pw.add_mutually_exclusive_group()
    how.add_argument(
        "--remove", action="store_true", help="store the key unprotected (not recommended)"
    )
    how.add_argument("--keyring", action="store_true", help="wrap the key by the OS keyring")

    from .group_cli import add_parser as add_group_parser

    add_group_parser(sub, HOME_HELP)

    dv = sub.add_parser("device", help="link, list and remove your devices")
    dsub = dv.add_subparsers(dest="device_cmd", required=True)
    for name, help_ in (
        ("link", "print a one-time code and link a new device"),
        ("list", "list this account's devices"),
        ("remove", "remove a device from this account"),
    ):
        p = dsub.add_parser(name, help=help_)
        p.add_argument("--home", help=HOME_HELP)
        p.add_argument("--json", action="store_true")
        if name == "link":
            p.add_argument("--timeout", default="5m", help="how long to wait (default 5m)")
            p.add_argument(
                "--with-history",
                action="store_true",
                help="also copy this device's history, end to end encrypted",
            )
        if name == "remove":
            p.add_argument(
                "id", help="device id from `haven device list` (a unique prefix of 8+ characters)"
            )


def version() -> str:
    """The installed package's version (``haven --version``)."""
    try:
        from importlib.metadata import PackageNotFoundError
        from importlib.metadata import version as dist_version

        return dist_version("haven")
    except (ImportError, PackageNotFoundError):
        return "0.1.0+source"


def build_parser() -> argparse.ArgumentParser:
    """The whole ``haven`` command line: user commands, ``haven node …``, ``app`` and ``demo``."""
    from node.cli import add_commands

    p = argparse.ArgumentParser(
        prog="haven",
        description="Haven: federated, end-to-end encrypted messaging that keeps nothing "
        "after delivery. Start with `haven app` (the app, in your browser) or "
        "`haven join INVITE`; every command has --help.",
    )
    p.add_argument("--version", action="version", version=f"haven {version()}")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    add_commands(sub)
    _user_commands(sub)
    from .app.main import add_parser as add_app_parser

    add_app_parser(sub)
    d = sub.add_parser("demo", help="two throwaway nodes, two users, a federated exchange")
    d.add_argument("--json", action="store_true")
    return p


def no_device_error(home: str) -> LocalProtocolError:
    """``no_device``: says which folder was meant if ``home`` is the parent of a device home."""
    from .state import exists

    inner = os.path.join(home, "device")
    if os.path.isdir(inner) and exists(inner):
        return LocalProtocolError(f"no device here — did you mean {inner}?", code="no_device")
    return LocalProtocolError(
        f"no device at {home}; create one with `haven join INVITE`", code="no_device"
    )


def open_device(home: str, *, create: bool = False, out: Out | None = None) -> Device:
    """The device at ``home``; asks for its passphrase on a terminal if the environment has
    none (``HAVEN_PASSPHRASE`` is the non-interactive way). Only ``join`` passes ``create``."""
    try:
        dev = Device(home, create=create)
    except LocalProtocolError as exc:
        if exc.code == "no_device":
            raise no_device_error(home) from None
        if exc.code != "passphrase_required" or not sys.stdin.isatty():
            raise
        dev = Device(home, passphrase=getpass.getpass("passphrase: ") or None, create=create)
    for notice in dev.state.notices:
        (out or Out()).err(notice)
    return dev


def report_error(args: argparse.Namespace, exc: Exception, out: Out) -> int:
    """``error: TEXT (CODE)`` on stderr (and the JSON error with ``--json``); returns 1."""
    code = getattr(exc, "code", "bad_argument")
    text = " ".join(str(exc).split())
    if getattr(args, "json", False):
        out.line(json.dumps({"error": code, "message": text}))
    out.err(f"error: {text} ({code})")
    return 1


async def _run(args: argparse.Namespace) -> int:
    out = Out()
    dev = open_device(args.home, create=args.cmd == "join", out=out)
    dev.flush_on_connect = True  # a command that connects sends what an earlier one queued
    try:
        return await COMMANDS[args.cmd](args, dev, out)
    finally:
        dev.close()


def main(argv: list[str] | None = None) -> int:
    """The ``haven`` entry point; returns the exit status (docs/cli.md, "Exit codes")."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `send ADDRESS --file PATH TEXT`: argparse takes the optional TEXT only before the
        # options, so a caption after them comes back here
        if args.cmd == "send" and args.text is None and len(extra) == 1 and extra[0][:1] != "-":
            args.text = extra[0]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.cmd is None:  # bare `haven`: help, as asked for
        parser.print_help()
        return 0
    try:
        return _main(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `haven history … | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # e.g. a full disk under the device home
        print(f"error: {exc.strerror or 'cannot read or write a file'} (os_error)", file=sys.stderr)
        return 1
    except Exception:  # noqa: BLE001 - last resort: a user never sees a traceback
        print("error: internal error; please report it (internal)", file=sys.stderr)
        return 70


def _main(args: argparse.Namespace) -> int:
    if args.cmd == "node":
        from node.cli import run_command

        explicit = args.home is not None
        args.home = node_home(args.home)
        if args.node_cmd == "init" and args.owner:
            from .personal import init_personal

            if not args.device_home and not explicit:
                args.device_home = device_home(None)
            return init_personal(args)
        return run_command(args)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.cmd == "app":
        from .app.main import run as run_app

        return run_app(args)
    if args.cmd == "demo":
        try:
            from .demo import run_demo

            return int(asyncio.run(run_demo()))
        except (HavenError, ValueError) as exc:
            return report_error(args, exc, Out())
    if args.cmd == "join" and not (args.invite or args.link):
        print("error: give an invite or --link CODE", file=sys.stderr)
        return 2
    if args.cmd == "join" and args.register and (args.link or not args.invite):
        print("error: --register ACCOUNT takes the node's URL (and no --link)", file=sys.stderr)
        return 2
    args.home = device_home(args.home)
    if args.cmd == "group":
        from .group_cli import prepare

        prepare(args)  # scalar arguments only, for the daemon
    for path_arg in ("file", "save_dir"):  # the daemon runs elsewhere: absolute paths
        if getattr(args, path_arg, None):
            setattr(args, path_arg, os.path.abspath(os.path.expanduser(getattr(args, path_arg))))
    try:
        from .app.ipc import through_daemon

        rc = through_daemon(args)  # None: no app runs for this home
        if rc is not None:
            return rc
        return asyncio.run(_run(args))
    except (HavenError, ValueError) as exc:
        return report_error(args, exc, Out())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
