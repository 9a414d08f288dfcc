"""``haven node init --owner NAME --device-home DIR``: a personal node in one step."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from federation.errors import HavenError, LocalProtocolError

from .device import Device


async def _join_owner(home: str, owner: str, device_home: str) -> str:
    from node.app import build
    from node.cli import create_invite

    invite = await create_invite(home, owner, 600_000)
    node = build(home)
    node.lan_enabled = False  # only the owner's device joins over loopback here
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    ready = asyncio.create_task(node.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()  # raises the start-up error
    dev = Device(device_home)
    try:
        return await dev.join(invite)
    finally:
        dev.close()
        stop.set()
        await task


def init_personal(args: argparse.Namespace) -> int:
    from node.cli import init_from_args

    try:
        if not args.device_home:
            raise LocalProtocolError("--owner needs --device-home DIR for the owner's device")
        config = init_from_args(args)
        address = asyncio.run(_join_owner(args.home, args.owner, args.device_home))
    except (HavenError, ValueError) as exc:
        print(f"error: {exc} ({getattr(exc, 'code', 'bad_argument')})", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"public_url": config.public_url, "address": address}))
    else:
        print(f"personal node ready in {args.home}; your device is in {args.device_home}")
        print(address)
    return 0
