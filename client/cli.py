"""The ``haven`` command: user commands here, operator commands under ``haven node``.

This is the one process entry point, so it is the one place the client package reaches into
``node`` (to register ``haven node …`` and to run ``haven demo``); nothing else in ``client``
imports the node.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from federation.clock import parse_duration
from federation.errors import HavenError

from .device import Device, ReceivedMessage


def _device(home: str) -> Device:
    return Device(home)


async def cmd_join(args: argparse.Namespace) -> int:
    dev = _device(args.home)
    try:
        address = await dev.join(args.invite)
    finally:
        dev.close()
    if args.json:
        print(json.dumps({"address": address}))
    else:
        print(f"joined; share your address with contacts:\n{address}")
    return 0


async def cmd_send(args: argparse.Namespace) -> int:
    dev = _device(args.home)
    try:
        res = await dev.send(args.address, args.text, ttl_ms=parse_duration(args.ttl))
    finally:
        dev.close()
    if args.json:
        print(
            json.dumps(
                {
                    "msg_id": res.msg_id.hex(),
                    "to": args.address,
                    "devices": {args.address: {"total": res.devices, "verified": 0}},
                    "envelopes": res.envelopes,
                }
            )
        )
    else:
        print(f"sent to {args.address} ({res.envelopes} device(s))")
    return 0


def _print_msg(m: ReceivedMessage, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {"from": m.sender, "text": m.text, "sent_at": m.sent_at, "msg_id": m.msg_id.hex()}
            ),
            flush=True,
        )
    else:
        print(f"{m.sender}: {m.text}", flush=True)


async def cmd_recv(args: argparse.Namespace) -> int:
    dev = _device(args.home)
    try:
        msgs = await dev.receive(wait_s=args.wait)
    finally:
        dev.close()
    for m in msgs:
        _print_msg(m, args.json)
    if not msgs and not args.json:
        print("no new messages", file=sys.stderr)
    return 0


async def cmd_history(args: argparse.Namespace) -> int:
    dev = _device(args.home)
    try:
        rows = dev.history(args.address)
    finally:
        dev.close()
    for r in rows:
        if args.json:
            print(
                json.dumps(
                    {
                        "from": r.sender,
                        "text": r.text,
                        "sent_at": r.sent_at,
                        "outgoing": r.outgoing,
                        "msg_id": r.msg_id.hex(),
                    }
                )
            )
        else:
            print(f"{'>' if r.outgoing else '<'} {r.sender}: {r.text}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from node.cli import add_commands

    p = argparse.ArgumentParser(
        prog="haven",
        description="Haven: federated, end-to-end "
        "encrypted messaging that keeps nothing after delivery.",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    add_commands(sub)

    j = sub.add_parser("join", help="redeem an invite: create this device's keys and register")
    j.add_argument("invite")
    j.add_argument("--home", required=True, help="device home directory")
    j.add_argument("--json", action="store_true")

    s = sub.add_parser("send", help="send an end-to-end encrypted message")
    s.add_argument("--home", required=True)
    s.add_argument("address", help="name@host")
    s.add_argument("text")
    s.add_argument("--ttl", default="7d", help="how long nodes may hold it undelivered")
    s.add_argument("--json", action="store_true")

    r = sub.add_parser("recv", help="receive new messages")
    r.add_argument("--home", required=True)
    r.add_argument(
        "--wait",
        type=float,
        default=2.0,
        help="return once this many seconds pass with nothing new (default 2)",
    )
    r.add_argument("--json", action="store_true")

    h = sub.add_parser("history", help="show the local conversation with a contact")
    h.add_argument("--home", required=True)
    h.add_argument("address")
    h.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="two throwaway nodes, two users, a federated exchange")
    d.add_argument("--json", action="store_true")
    return p


COMMANDS: dict[str, Any] = {
    "join": cmd_join,
    "send": cmd_send,
    "recv": cmd_recv,
    "history": cmd_history,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.cmd == "node":
        from node.cli import run_command

        if args.node_cmd == "init" and args.owner:
            from .personal import init_personal

            return init_personal(args)
        return run_command(args)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.cmd == "demo":
            from .demo import run_demo

            return asyncio.run(run_demo())
        return int(asyncio.run(COMMANDS[args.cmd](args)))
    except HavenError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": exc.code, "message": str(exc)}))
        print(f"error: {exc} ({exc.code})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
