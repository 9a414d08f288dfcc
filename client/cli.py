"""The ``haven`` command: user commands here, operator commands under ``haven node``.

This is the one process entry point, so it is the one place the client package reaches into
``node`` (to register ``haven node …`` and to run ``haven demo``); nothing else in ``client``
imports the node. Every command is a thin layer over :class:`client.device.Device`.
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

from .device import Device, ReceivedMessage
from .state import STATUS_NAMES, HistoryRow

Handler = Callable[[argparse.Namespace, Device], Awaitable[int]]


def _out(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj) if getattr(args, "json", False) else text, flush=True)


def _duration_or_off(text: str) -> int:
    return 0 if text.lower() in ("off", "0") else parse_duration(text)


async def cmd_join(args: argparse.Namespace, dev: Device) -> int:
    address = await dev.join(args.invite or args.link, name=args.name or "")
    if args.json:
        print(json.dumps({"address": address}))
    else:
        print(f"joined; share your address with contacts:\n{address}")
    return 0


async def cmd_send(args: argparse.Namespace, dev: Device) -> int:
    expires = None if args.expires is None else _duration_or_off(args.expires)
    res = await dev.send(
        args.address, args.text, ttl_ms=parse_duration(args.ttl), expires_in=expires
    )
    for w in res.warnings:
        print(f"warning: {w.message}", file=sys.stderr)
    total = res.devices.get(args.address, {}).get("total", 0)
    _out(
        args,
        {
            "msg_id": res.msg_id.hex(),
            "to": args.address,
            "devices": res.devices,
            "envelopes": res.envelopes,
            "warnings": [w.to_json() for w in res.warnings],
        },
        f"sent to {args.address}: readable by {total} device(s) of theirs "
        f"({res.devices.get(args.address, {}).get('verified', 0)} verified)",
    )
    return 0


def _msg_json(m: ReceivedMessage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "from": m.sender,
        "text": m.text,
        "sent_at": m.sent_at,
        "msg_id": m.msg_id.hex(),
        "kind": m.kind,
        "chat": m.peer,
    }
    if m.target:
        out["target"] = m.target.hex()
    return out


async def cmd_recv(args: argparse.Namespace, dev: Device) -> int:
    def show(m: ReceivedMessage) -> None:
        if m.kind in ("delivered", "read"):
            return
        if args.json:
            print(json.dumps(_msg_json(m)), flush=True)
        elif m.kind == "text":
            print(f"{m.sender}: {m.text}", flush=True)
        else:
            verb = {"edit": "edited", "delete": "deleted"}.get(m.kind, m.kind)
            print(f"{m.sender} {verb} a message {m.target.hex()[:8]}", flush=True)

    msgs = await dev.receive(wait_s=args.wait, on_message=show)
    if not any(m.kind == "text" for m in msgs) and not args.json:
        print("no new messages", file=sys.stderr)
    return 0


def _row_json(r: HistoryRow) -> dict[str, Any]:
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
    else:
        out["read"] = r.read
    return out


async def cmd_history(args: argparse.Namespace, dev: Device) -> int:
    rows = dev.history(args.address)
    for r in rows:
        if args.json:
            print(json.dumps(_row_json(r)))
        else:
            mark = f" [{STATUS_NAMES[r.status]}]" if r.outgoing else ""
            edited = " (edited)" if r.edited else ""
            print(f"{'>' if r.outgoing else '<'} {r.sender}: {r.text}{edited}{mark}")
    if not args.no_mark_read:
        try:
            await dev.mark_read(args.address)
        except HavenError as exc:
            print(f"warning: read state not sent ({exc.code})", file=sys.stderr)
    return 0


async def cmd_chats(args: argparse.Namespace, dev: Device) -> int:
    chats = dev.chats()
    if args.json:
        print(json.dumps(chats))
    else:
        for c in chats:
            print(f"{c['address']}  {c['unread']} unread / {c['messages']}")
    return 0


async def cmd_edit(args: argparse.Namespace, dev: Device) -> int:
    res = await dev.edit(args.address, bytes.fromhex(args.msg_id), args.text)
    _out(args, {"msg_id": args.msg_id, "edited": True, "envelopes": res.envelopes}, "edited")
    return 0


async def cmd_delete(args: argparse.Namespace, dev: Device) -> int:
    res = await dev.delete(args.address, bytes.fromhex(args.msg_id))
    _out(args, {"msg_id": args.msg_id, "deleted": True, "envelopes": res.envelopes}, "deleted")
    return 0


async def cmd_timer(args: argparse.Namespace, dev: Device) -> int:
    ms = _duration_or_off(args.duration)
    dev.set_timer(args.address, ms)
    _out(
        args,
        {"address": args.address, "timer_ms": ms},
        f"new messages with {args.address} disappear after {args.duration}"
        if ms
        else f"messages with {args.address} are kept",
    )
    return 0


async def cmd_settings(args: argparse.Namespace, dev: Device) -> int:
    if args.read_receipts:
        dev.set_setting("read_receipts", args.read_receipts)
    if args.delivery_receipts:
        dev.set_setting("delivery_receipts", args.delivery_receipts)
    current = {k: dev.setting(k, "on") for k in ("read_receipts", "delivery_receipts")}
    _out(args, current, "  ".join(f"{k.replace('_', ' ')}: {v}" for k, v in current.items()))
    return 0


async def cmd_verify(args: argparse.Namespace, dev: Device) -> int:
    from .trust import verify

    res = await verify(dev, args.address, confirm=args.confirm, accept_new_key=args.accept_new_key)
    if args.json:
        print(json.dumps({"safety_number": res["safety_number"], "verified": res["verified"]}))
    else:
        if sys.stdout.isatty():
            from node.cli import print_qr

            print_qr(res["safety_number"].replace(" ", ""))
        print(f"safety number with {args.address}:\n{res['safety_number']}")
        print(
            "verified"
            if res["verified"]
            else "not verified: compare in person, then run with --confirm"
        )
    return 0


async def cmd_device(args: argparse.Namespace, dev: Device) -> int:
    from . import linking

    if args.device_cmd == "link":

        def show(code: str) -> None:
            print(code, flush=True)
            if sys.stderr.isatty():
                from node.cli import print_qr

                print_qr(code)
            print(
                "waiting for the new device: run `haven join --link CODE --home DIR`",
                file=sys.stderr,
                flush=True,
            )

        res = await linking.link_device(
            dev,
            show,
            timeout_s=parse_duration(args.timeout) / 1000,
            with_history=args.with_history,
        )
        _out(args, res, f"linked {res['name']} ({res['id'][:8]})")
    elif args.device_cmd == "list":
        devices = await linking.list_devices(dev)
        if args.json:
            print(json.dumps(devices))
        else:
            for d in devices:
                print(f"{d['id']}  {d['name']}{'  (this device)' if d['this_device'] else ''}")
    else:
        await linking.remove_device(dev, args.id)
        _out(args, {"removed": args.id}, f"removed {args.id[:8]}")
    return 0


_PROTECTION_TEXT = {
    "passphrase": "encrypted; its key is wrapped by your passphrase",
    "keyring": "encrypted; its key is wrapped by a key in the OS keyring",
    "none": "encrypted, but its key is stored unprotected next to it (no passphrase): anyone "
    "who can read this disk can read it; set one with `haven passphrase`",
}


async def cmd_whoami(args: argparse.Namespace, dev: Device) -> int:
    joined = dev.joined
    info: dict[str, Any] = {
        "address": dev.address if joined else None,
        "node_url": dev.node_url if joined else None,
        "device_id": dev.curve_key if joined else None,
        "protected": dev.state.protected,
        "protection": dev.state.protection,
    }
    lines = [
        info["address"] or "not joined yet",
        f"storage: {_PROTECTION_TEXT[info['protection']]}",
    ]
    if joined:
        lines[1:1] = [f"device: {info['device_id']}", f"node: {info['node_url']}"]
    _out(args, info, "\n".join(lines))
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


async def cmd_passphrase(args: argparse.Namespace, dev: Device) -> int:
    if args.remove:
        dev.state.change_passphrase(None)
    elif args.keyring:
        dev.state.change_passphrase(None, keyring=True)
    else:
        dev.state.change_passphrase(_new_passphrase())
    info = {"protected": dev.state.protected, "protection": dev.state.protection}
    _out(args, info, f"storage: {_PROTECTION_TEXT[dev.state.protection]}")
    return 0


COMMANDS: dict[str, Handler] = {
    "join": cmd_join,
    "send": cmd_send,
    "recv": cmd_recv,
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
}


def _user_commands(sub: Any) -> None:
    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_)
        p.add_argument("--home", required=True, help="device home directory")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    j = cmd("join", "redeem an invite or a device-link code")
    j.add_argument("invite", nargs="?", help="invite from `haven node invite`")
    j.add_argument("--link", help="code printed by `haven device link` on your other device")
    j.add_argument("--name", help="a name for this device (kept on your devices only)")

    s = cmd("send", "send an end-to-end encrypted message")
    s.add_argument("address", help="name@host")
    s.add_argument("text")
    s.add_argument("--ttl", default="7d", help="how long nodes may hold it undelivered")
    s.add_argument("--expires", help="disappear this long after it is shown (e.g. 1h, off)")

    r = cmd("recv", "receive new messages")
    r.add_argument(
        "--wait",
        type=float,
        default=2.0,
        help="return once this many seconds pass with nothing new (default 2)",
    )

    h = cmd("history", "show a conversation (marks it read)")
    h.add_argument("address")
    h.add_argument("--no-mark-read", action="store_true", help="leave unread messages unread")

    cmd("chats", "list conversations with unread counts")

    e = cmd("edit", "edit one of your messages for everyone")
    e.add_argument("address")
    e.add_argument("msg_id", help="hex id from history --json")
    e.add_argument("text")

    d = cmd("delete", "delete one of your messages for everyone")
    d.add_argument("address")
    d.add_argument("msg_id")

    t = cmd("timer", "set a conversation's disappearing-message timer")
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

    cmd("whoami", "show this device's address, id and how its storage is protected")
    pw = cmd("passphrase", "set or change the passphrase that protects this device's storage")
    how = pw.add_mutually_exclusive_group()
    how.add_argument(
        "--remove", action="store_true", help="store the key unprotected (not recommended)"
    )
    how.add_argument("--keyring", action="store_true", help="wrap the key by the OS keyring")

    dv = sub.add_parser("device", help="link, list and remove your devices")
    dsub = dv.add_subparsers(dest="device_cmd", required=True)
    for name, help_ in (
        ("link", "print a one-time code and link a new device"),
        ("list", "list this account's devices"),
        ("remove", "remove a device from this account"),
    ):
        p = dsub.add_parser(name, help=help_)
        p.add_argument("--home", required=True)
        p.add_argument("--json", action="store_true")
        if name == "link":
            p.add_argument("--timeout", default="5m", help="how long to wait (default 5m)")
            p.add_argument(
                "--with-history",
                action="store_true",
                help="also copy this device's history, end to end encrypted",
            )
        if name == "remove":
            p.add_argument("id", help="device id from `haven device list`")


def build_parser() -> argparse.ArgumentParser:
    from node.cli import add_commands

    p = argparse.ArgumentParser(
        prog="haven",
        description="Haven: federated, end-to-end encrypted messaging that keeps nothing "
        "after delivery.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    add_commands(sub)
    _user_commands(sub)
    from .app.main import add_parser as add_app_parser

    add_app_parser(sub)
    d = sub.add_parser("demo", help="two throwaway nodes, two users, a federated exchange")
    d.add_argument("--json", action="store_true")
    return p


def _open_device(home: str) -> Device:
    """The device at ``home``; asks for its passphrase on a terminal if the environment has
    none (``HAVEN_PASSPHRASE`` is the non-interactive way)."""
    try:
        dev = Device(home)
    except LocalProtocolError as exc:
        if exc.code != "passphrase_required" or not sys.stdin.isatty():
            raise
        dev = Device(home, passphrase=getpass.getpass("passphrase: ") or None)
    for notice in dev.state.notices:
        print(notice, file=sys.stderr)
    return dev


async def _run(args: argparse.Namespace) -> int:
    dev = _open_device(args.home)
    try:
        return await COMMANDS[args.cmd](args, dev)
    finally:
        dev.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # e.g. a full disk under the device home
        print(f"error: {exc.strerror or exc} (os_error)", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - last resort: a user never sees a traceback
        print(f"error: internal error ({type(exc).__name__})", file=sys.stderr)
        return 70


def _main(args: argparse.Namespace) -> int:
    if args.cmd == "node":
        from node.cli import run_command

        if args.node_cmd == "init" and args.owner:
            from .personal import init_personal

            return init_personal(args)
        return run_command(args)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    if args.cmd == "app":
        from .app.main import run as run_app

        return run_app(args)
    try:
        if args.cmd == "demo":
            from .demo import run_demo

            return int(asyncio.run(run_demo()))
        if args.cmd == "join" and not (args.invite or args.link):
            print("error: give an invite or --link CODE", file=sys.stderr)
            return 2
        return asyncio.run(_run(args))
    except (HavenError, ValueError) as exc:
        code = getattr(exc, "code", "bad_argument")
        if getattr(args, "json", False):
            print(json.dumps({"error": code, "message": str(exc)}))
        print(f"error: {exc} ({code})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
