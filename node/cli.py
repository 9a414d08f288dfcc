"""``haven node …``: operator commands. Registered by the single ``haven`` entry point."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

from federation.clock import SystemClock, parse_duration
from federation.errors import HavenError, LocalProtocolError
from federation.ids import valid_name
from federation.signing import NodeKey, b64e
from federation.wire import packb

from .app import build
from .client_api import invite_hash
from .config import KEY_NAME, MAX_TTL_MS, NodeConfig, validate_public_url


def make_invite(url: str, node_id: str, name: str, token: bytes) -> str:
    """The invite string a device redeems: carries the node URL and id, so the device pins it."""
    return "haven:invite:" + b64e(packb({"url": url, "node": node_id, "name": name, "t": token}))


def init_node(home: str, public_url: str, listen: str, ttl_ms: int, lan: bool) -> NodeConfig:
    """Create the node identity, config and store in ``home``."""
    os.makedirs(home, mode=0o700, exist_ok=True)
    if os.path.exists(os.path.join(home, KEY_NAME)):
        raise LocalProtocolError(f"{home} already holds a node")
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise LocalProtocolError("--listen must be HOST:PORT")
    if ttl_ms > MAX_TTL_MS:
        raise LocalProtocolError("--ttl may be at most 14d")
    config = NodeConfig(
        public_url=validate_public_url(public_url),
        listen_host=host,
        listen_port=int(port),
        ttl_ms=ttl_ms,
        lan=lan,
    )
    key = NodeKey.generate()
    fd = os.open(os.path.join(home, KEY_NAME), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.seed)
        f.flush()
        os.fsync(f.fileno())
    config.save(home)
    return config  # the store is created (and migrated) on first open


async def create_invite(home: str, name: str, expires_ms: int) -> str:
    if not valid_name(name):
        raise LocalProtocolError("names are 1-32 of a-z 0-9 . _ - and start with a letter or digit")
    config = NodeConfig.load(home)
    node = build(home)
    store = node.store
    await store.open()
    try:
        now = SystemClock().now_ms()
        await store.create_account(name, now)
        token = os.urandom(24)
        await store.add_invite(invite_hash(token), name, now + expires_ms)
    finally:
        await store.close()
    return make_invite(config.public_url, node.key.node_id, name, token)


async def node_status(home: str) -> dict[str, Any]:
    node = build(home)
    await node.store.open()
    try:
        counts = await node.store.counts()
    finally:
        await node.store.close()
    return {"node_id": node.key.node_id, "public_url": node.config.public_url, **counts}


async def remove_account(home: str, name: str) -> int:
    node = build(home)
    await node.store.open()
    try:
        if not await node.store.account_exists(name):
            raise LocalProtocolError(f"no account {name!r}")
        n = await node.store.remove_account(name)
        await node.store.checkpoint()
        return n
    finally:
        await node.store.close()


async def serve(home: str, announce: bool = True) -> None:
    node = build(home)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(node.run(stop))
    ready = asyncio.create_task(node.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if node.ready.is_set() and announce:
        print(
            f"haven node {node.key.node_id} listening on "
            f"{node.config.listen_host}:{node.port} as {node.config.public_url}",
            flush=True,
        )
    ready.cancel()
    await task


def add_commands(sub: Any) -> None:
    p = sub.add_parser("node", help="operate a node (init, serve, invite, status, remove-account)")
    nsub = p.add_subparsers(dest="node_cmd", required=True)

    i = nsub.add_parser("init", help="create a node: identity key, config and store")
    i.add_argument("--home", required=True, help="node home directory")
    i.add_argument(
        "--public-url",
        required=True,
        help="URL peers and devices reach, e.g. https://haven.example.org",
    )
    i.add_argument(
        "--listen", default="127.0.0.1:8765", help="HOST:PORT to bind (default 127.0.0.1:8765)"
    )
    i.add_argument(
        "--ttl", default="7d", help="how long undelivered envelopes are kept (default 7d, max 14d)"
    )
    i.add_argument(
        "--owner", help="also create this user's account and first device (personal node)"
    )
    i.add_argument("--device-home", help="device home directory for --owner")
    i.add_argument(
        "--lan", dest="lan", action="store_true", default=None, help="announce on the LAN"
    )
    i.add_argument("--no-lan", dest="lan", action="store_false")
    i.add_argument("--json", action="store_true")

    s = nsub.add_parser("serve", help="run the node until SIGINT/SIGTERM")
    s.add_argument("--home", required=True)

    v = nsub.add_parser("invite", help="create an account (if new) and print a single-use invite")
    v.add_argument("--home", required=True)
    v.add_argument("name")
    v.add_argument("--expires", default="7d", help="invite lifetime (default 7d)")
    v.add_argument("--json", action="store_true")

    st = nsub.add_parser("status", help="counts read from the store (running or not)")
    st.add_argument("--home", required=True)
    st.add_argument("--json", action="store_true")

    r = nsub.add_parser("remove-account", help="delete an account and purge its mailboxes")
    r.add_argument("--home", required=True)
    r.add_argument("name")
    r.add_argument("--json", action="store_true")


def run_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").disabled = True
    try:
        return _run(args)
    except (HavenError, ValueError) as exc:
        code = getattr(exc, "code", "bad_argument")
        print(f"error: {exc} ({code})", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    cmd = args.node_cmd
    if cmd == "init":
        lan = args.lan if args.lan is not None else bool(args.owner)
        config = init_node(args.home, args.public_url, args.listen, parse_duration(args.ttl), lan)
        node_id = NodeKey(open(os.path.join(args.home, KEY_NAME), "rb").read()).node_id
        out = {"node_id": node_id, "public_url": config.public_url, "home": args.home}
        print(json.dumps(out) if args.json else f"created node {node_id} in {args.home}")
        return 0
    if cmd == "serve":
        asyncio.run(serve(args.home))
        return 0
    if cmd == "invite":
        invite = asyncio.run(create_invite(args.home, args.name, parse_duration(args.expires)))
        if args.json:
            print(json.dumps({"invite": invite, "name": args.name}))
        else:
            print(f"invite for {args.name} (single use); redeem with: haven join INVITE --home DIR")
            print(invite)
        return 0
    if cmd == "status":
        status = asyncio.run(node_status(args.home))
        if args.json:
            print(json.dumps(status))
        else:
            for k, v in status.items():
                print(f"{k}: {v}")
        return 0
    if cmd == "remove-account":
        n = asyncio.run(remove_account(args.home, args.name))
        print(
            json.dumps({"removed": args.name, "mailboxes": n})
            if args.json
            else f"removed {args.name} and {n} mailbox(es)"
        )
        return 0
    raise LocalProtocolError(f"unknown command {cmd}")
