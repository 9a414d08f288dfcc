"""``haven group …`` and the group side of ``haven send`` / ``haven history`` (docs/cli.md,
"haven group").

A thin layer over the Device's group API (:mod:`client.groups`), like every command in
:mod:`client.cli`: parse, call, print text or one JSON value per line. A GROUP argument is
``group:<32 hex>``, a prefix of the hex id, or a unique group name; the Device resolves it
(``ambiguous_group`` / ``unknown_group`` otherwise).

Through a running app the handlers run inside the daemon (:mod:`client.app.ipc`), which passes
only scalar arguments: :func:`prepare` turns the repeated ``--member`` into one string first.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from federation.clock import parse_duration
from federation.errors import HavenError, LocalProtocolError

from .cli import Out, _row_json, history_line
from .device import Device
from .group_state import GroupError, parse_invite_code, ref_of
from .groups import GroupInfo
from .state import STATUS_PENDING, HistoryRow

GROUP_HELP = "group:<id>, a unique prefix of the id, or a unique group name"
INVITE_DEFAULT_TTL = "7d"


def prepare(args: argparse.Namespace) -> None:
    """Make the parsed arguments scalar (the daemon takes only those): ``--member`` lists
    become one comma-separated ``members`` string (addresses hold no comma)."""
    if getattr(args, "cmd", None) == "group" and hasattr(args, "member"):
        args.members = ",".join(args.member or [])
        del args.member


def _members(args: argparse.Namespace) -> list[str]:
    raw = getattr(args, "members", None) or ""
    return [m.strip() for m in raw.split(",") if m.strip()]


def _short(gid: bytes) -> str:
    return ref_of(gid)[:14]


def _info_lines(info: GroupInfo, me: str) -> list[str]:
    role = ", you are an admin" if me in info.admins else ""
    state = "" if info.active else " (you are no longer a member)"
    lines = [
        f"{info.name}  {info.ref}{state}",
        f"version {info.version}, {len(info.members)} member(s){role}",
    ]
    for m in info.members:
        lines.append(f"  {m}{'  (admin)' if m in info.admins else ''}")
    for s in info.superseded:
        lines.append(f"superseded: version {s['version']} by {s['by']}: {s['change']}")
    return lines


def group_target(dev: Device, arg: str) -> bytes | None:
    """The group id ``arg`` names for ``send`` / ``history``, or None for a contact.

    An argument with ``@`` is a contact; one starting with ``group:`` is a group (errors if
    unknown); any other is a group if it names one (``ambiguous_group`` if several)."""
    if "@" in arg:
        return None
    try:
        return dev.resolve_group(arg)
    except GroupError as exc:
        if exc.code == "unknown_group" and not arg.startswith("group:"):
            return None  # not a group: the contact path says what is wrong with it
        raise


# ---- haven group … ------------------------------------------------------------------------


async def cmd_group(args: argparse.Namespace, dev: Device, out: Out) -> int:
    """Run one ``haven group`` subcommand."""
    handler = _HANDLERS[args.group_cmd]
    return await handler(args, dev, out)


async def _create(args: argparse.Namespace, dev: Device, out: Out) -> int:
    info = await dev.group_create(args.name, _members(args))
    obj = {"group_id": info.gid.hex(), "name": info.name, "members": list(info.members)}
    text = f"created {info.name} ({_short(info.gid)}…) with {len(info.members)} members"
    out.emit(args, obj, text)
    return 0


def _changed(args: argparse.Namespace, out: Out, info: GroupInfo, text: str) -> int:
    out.emit(args, info.to_json(), text)
    return 0


async def _add(args: argparse.Namespace, dev: Device, out: Out) -> int:
    info = await dev.group_add(dev.resolve_group(args.group), args.address)
    return _changed(args, out, info, f"added {args.address} to {info.name}")


async def _remove(args: argparse.Namespace, dev: Device, out: Out) -> int:
    info = await dev.group_remove(dev.resolve_group(args.group), args.address)
    return _changed(args, out, info, f"removed {args.address} from {info.name}")


async def _admin(args: argparse.Namespace, dev: Device, out: Out) -> int:
    on = bool(args.on)
    info = await dev.group_set_admin(dev.resolve_group(args.group), args.address, on)
    verb = "is now an admin of" if on else "is no longer an admin of"
    return _changed(args, out, info, f"{args.address} {verb} {info.name}")


async def _rename(args: argparse.Namespace, dev: Device, out: Out) -> int:
    info = await dev.group_rename(dev.resolve_group(args.group), args.name)
    return _changed(args, out, info, f"renamed to {info.name}")


async def _leave(args: argparse.Namespace, dev: Device, out: Out) -> int:
    info = await dev.group_leave(dev.resolve_group(args.group))
    return _changed(args, out, info, f"you left {info.name}")


async def _invite(args: argparse.Namespace, dev: Device, out: Out) -> int:
    gid = dev.resolve_group(args.group)
    uses = int(args.uses)
    if uses < 1:
        raise LocalProtocolError("--uses must be at least 1", code="bad_argument")
    ttl_ms = parse_duration(args.expires)
    code = await dev.group_invite(gid, uses=uses, ttl_ms=ttl_ms)
    obj = {"code": code, "group_id": gid.hex(), "uses": uses, "expires_in_ms": ttl_ms}
    if not getattr(args, "json", False):
        out.err(f"an invite for {uses} use(s), valid for {args.expires}:")
    out.emit(args, obj, code)
    return 0


async def _join(args: argparse.Namespace, dev: Device, out: Out) -> int:
    invite = parse_invite_code(args.code)  # invalid_group_invite before any network
    res = dict(await dev.group_join(args.code))
    name = res.get("name") or invite.name
    text = f"asked {invite.admin} to add you to {name}; you are in once their device agrees"
    out.emit(args, res, text)
    return 0


async def _list(args: argparse.Namespace, dev: Device, out: Out) -> int:
    groups = dev.groups()
    if args.json:
        out.line(json.dumps([g.to_json() for g in groups]))
        return 0
    if not groups:
        out.err("no groups yet: `haven group create NAME --member ADDRESS`")
    for g in groups:
        left = "" if g.active else "  (left)"
        out.line(f"{_short(g.gid)}  {g.name}  {len(g.members)} member(s){left}")
    return 0


async def _info(args: argparse.Namespace, dev: Device, out: Out) -> int:
    gid = dev.resolve_group(args.group)
    info = dev.group(gid)
    if info is None:
        raise GroupError("no such group", code="unknown_group")
    readers: list[dict[str, Any]] = []
    warning = ""
    try:
        readers = list(await dev.group_readers(gid))
    except HavenError as exc:  # the node is out of reach: still show what is known locally
        warning = f"warning: the member devices could not be listed ({exc.code})"
    if warning:
        out.err(warning)
    if args.json:
        out.line(json.dumps(info.to_json() | {"readers": readers}))
        return 0
    for line in _info_lines(info, dev.address):
        out.line(line)
    if readers:
        verified = sum(1 for r in readers if r.get("verified"))
        out.line(f"readable by {len(readers)} device(s), {verified} verified")
        for r in readers:
            if r.get("changed"):
                out.line(f"  warning: {r['address']}'s devices or key changed since verified")
    return 0


_HANDLERS = {
    "create": _create,
    "add": _add,
    "remove": _remove,
    "admin": _admin,
    "rename": _rename,
    "leave": _leave,
    "invite": _invite,
    "join": _join,
    "list": _list,
    "info": _info,
}


# ---- send / history on a group ------------------------------------------------------------


async def send(args: argparse.Namespace, dev: Device, out: Out, gid: bytes) -> int:
    """``haven send GROUP TEXT``."""
    if getattr(args, "file", None) or getattr(args, "expires", None) is not None:
        raise LocalProtocolError(
            "files and disappearing messages are not available in groups yet", code="bad_argument"
        )
    if not args.text:
        raise LocalProtocolError("give the message text", code="bad_argument")
    res = await dev.group_send_or_queue(gid, args.text, ttl_ms=parse_duration(args.ttl))
    if isinstance(res, HistoryRow):
        return _queued(args, dev, out, gid, res)
    for w in res.warnings:
        out.err(f"warning: {w.message}")
    total = sum(d.get("total", 0) for d in res.devices.values())
    verified = sum(d.get("verified", 0) for d in res.devices.values())
    obj = {
        "msg_id": res.msg_id.hex(),
        "to": ref_of(gid),
        "chat": ref_of(gid),
        "devices": res.devices,
        "envelopes": res.envelopes,
        "warnings": [w.to_json() for w in res.warnings],
    }
    text = (
        f"sent to {ref_of(gid)[:14]}…: readable by {total} device(s) of {len(res.devices)} "
        f"member(s) ({verified} verified)"
    )
    out.emit(args, obj, text)
    return 0


def _queued(args: argparse.Namespace, dev: Device, out: Out, gid: bytes, row: HistoryRow) -> int:
    """The answer for a group text that went through the device's outbox: ``queued`` as a
    1:1 text through the app (docs/cli.md), ``sent to …``, or its failure code."""
    if row.error:
        raise LocalProtocolError(f"the message to {ref_of(gid)} could not be sent", code=row.error)
    obj: dict[str, Any] = {"msg_id": row.msg_id.hex(), "to": ref_of(gid), "chat": ref_of(gid)}
    if row.status == STATUS_PENDING:
        out.err(
            f"warning: the home node at {dev.node_url} is unreachable or busy; the message "
            "is queued on this device and is sent then"
        )
        out.emit(args, obj | {"status": "queued"}, "queued")
        return 0
    devices = {"total": row.devices_total, "verified": row.devices_verified}
    out.emit(
        args,
        obj | {"status": "sent", "devices": devices},
        f"sent to {ref_of(gid)[:14]}…: readable by {row.devices_total} device(s) "
        f"({row.devices_verified} verified)",
    )
    return 0


def history_rows(dev: Device, gid: bytes) -> list[dict[str, Any]]:
    """The ``history --json`` rows of a group, each with ``chat`` and the counter."""
    counts = dev.group_counts(gid)
    rows = []
    for r in dev.group_history(gid):
        obj = _row_json(r, dev.state.attachment(r.msg_id)) | {"chat": ref_of(gid)}
        if r.msg_id in counts:
            unread, hidden = counts[r.msg_id]
            obj |= {
                "unread_by": len(unread),
                "unread_members": list(unread),
                "receipts_hidden": hidden,
            }
        rows.append(obj)
    return rows


async def history(args: argparse.Namespace, dev: Device, out: Out, gid: bytes) -> int:
    """``haven history GROUP``: the group's messages with their counters; marks them read."""
    if args.json:
        for obj in history_rows(dev, gid):
            out.line(json.dumps(obj))
    else:
        counts = dev.group_counts(gid)
        for r in dev.group_history(gid):
            line = history_line(r, dev.state.attachment(r.msg_id))
            n = len(counts[r.msg_id][0]) if r.msg_id in counts else 0
            out.line(f"{line}  {n}" if n else line)
    if not args.no_mark_read:
        try:
            await dev.group_mark_read(gid)
        except HavenError as exc:
            out.err(f"warning: read state not sent ({exc.code})")
    return 0


def recv_line(dev: Device, chat: str, sender: str, text: str, kind: str = "text") -> str:
    """The text line of a received group message, ``[NAME] sender: text``, or of a change of
    the group, ``[NAME] description``."""
    name = chat[:14]
    try:
        info = dev.group(bytes.fromhex(chat.removeprefix("group:")))
    except ValueError:
        info = None
    if info is not None:
        name = info.name
    return f"[{name}] {text}" if kind == "group_state" else f"[{name}] {sender}: {text}"


# ---- the parser ---------------------------------------------------------------------------


def add_parser(sub: Any, home_help: str) -> None:
    """Register ``haven group …`` on the top-level subparsers."""
    g = sub.add_parser("group", help="create and manage groups (end-to-end encrypted)")
    gsub = g.add_subparsers(dest="group_cmd", required=True, metavar="SUBCOMMAND")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = gsub.add_parser(name, help=help_)
        p.add_argument("--home", help=home_help)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    c = cmd("create", "create a group; you are its first admin")
    c.add_argument("name", help="the group's name (up to 64 characters; members see it)")
    c.add_argument(
        "--member",
        action="extend",
        nargs="+",
        metavar="ADDR",
        help="name@host to add (several after one --member, or --member repeated)",
    )
    for name, help_ in (
        ("add", "add a member (admins only)"),
        ("remove", "remove a member (admins only)"),
    ):
        p = cmd(name, help_)
        p.add_argument("group", help=GROUP_HELP)
        p.add_argument("address", help="name@host")
    a = cmd("admin", "make a member an admin, or not")
    a.add_argument("group", help=GROUP_HELP)
    a.add_argument("address", help="name@host")
    onoff = a.add_mutually_exclusive_group(required=True)
    onoff.add_argument("--on", action="store_true", default=None)
    onoff.add_argument("--off", dest="on", action="store_false")
    r = cmd("rename", "rename a group")
    r.add_argument("group", help=GROUP_HELP)
    r.add_argument("name")
    lv = cmd("leave", "leave a group")
    lv.add_argument("group", help=GROUP_HELP)
    i = cmd("invite", "print an invite code for a group (admins only)")
    i.add_argument("group", help=GROUP_HELP)
    i.add_argument("--uses", type=int, default=1, help="how many people may use it (default 1)")
    i.add_argument(
        "--expires", default=INVITE_DEFAULT_TTL, help="how long it is valid (default 7d)"
    )
    j = cmd("join", "ask to join a group with an invite code")
    j.add_argument("code", help="haven:group:… from `haven group invite`")
    cmd("list", "list your groups")
    info = cmd("info", "show a group: members, admins, who can read its messages")
    info.add_argument("group", help=GROUP_HELP)


__all__ = ["add_parser", "cmd_group", "group_target", "history", "prepare", "send"]
