"""``haven node …``: operator commands. Registered by the single ``haven`` entry point."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast
from urllib.parse import urlsplit

from federation.clock import SystemClock, parse_duration
from federation.errors import HavenError, KeyChanged, LocalProtocolError
from federation.ids import key_from_node_id, valid_name
from federation.relaylink import parse_invite
from federation.signing import NodeKey, Rotation, b64d, b64e
from federation.wire import packb, unpackb

from . import accounts_cli, admin, logs, moves, nodekey
from .app import ROTATIONS_NAME, build, load_node_key, load_rotations
from .client_api import invite_hash
from .config import (
    CONFIG_NAME,
    KEY_NAME,
    MAX_TTL_MS,
    NodeConfig,
    validate_public_url,
    validate_store,
)
from .pg_store import prepare_database
from .relay import list_clients, mint_invite
from .relay_client import RelayInfo
from .store import PeerRecord

DAY_MS = 86_400_000


def make_invite(url: str, node_id: str, name: str, token: bytes, host: str) -> str:
    """The invite a device redeems: the URL to reach the node, its id (so the device pins it),
    the account name and the public host that forms the user's address."""
    body = {"url": url, "node": node_id, "name": name, "t": token, "host": host}
    return "haven:invite:" + b64e(packb(body))


def init_node(
    home: str,
    public_url: str,
    listen: str,
    ttl_ms: int,
    lan: bool,
    *,
    owner: str = "",
    client_url: str = "",
    interfaces: str = "",
    tls_cert: str = "",
    tls_key: str = "",
    key_file: str = "",
    key_secret_file: str = "",
    admin_listen: str = admin.DEFAULT_ADMIN_LISTEN,
    store: str = "",
    open_registration: bool = False,
    relay: bool = False,
) -> NodeConfig:
    """Create the node identity, config and store in ``home``.

    ``key_file`` puts the node key outside ``home``; ``key_secret_file`` stores it wrapped
    under that secret (:mod:`node.nodekey`); ``node.toml`` records both. ``admin_listen`` is
    the admin listener's ``HOST:PORT`` (:mod:`node.admin`). ``store``: a
    PostgreSQL DSN (connected to and migrated first, so a bad one fails before anything is
    written); "" = SQLite in ``home``.
    """
    admin.parse_listen(admin_listen)
    os.makedirs(home, mode=0o700, exist_ok=True)
    if os.path.exists(os.path.join(home, KEY_NAME)) or os.path.exists(
        os.path.join(home, CONFIG_NAME)
    ):
        raise LocalProtocolError(f"{home} already holds a node")
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit():
        raise LocalProtocolError("--listen must be HOST:PORT")
    if ttl_ms > MAX_TTL_MS:
        raise LocalProtocolError("--ttl may be at most 14d")
    if validate_store(store):
        asyncio.run(prepare_database(store))
    config = NodeConfig(
        public_url=validate_public_url(public_url),
        listen_host=host,
        listen_port=int(port),
        ttl_ms=ttl_ms,
        lan=lan,
        owner=owner,
        client_url=validate_public_url(client_url) if client_url else "",
        lan_interfaces=interfaces,
        tls_cert=os.path.abspath(tls_cert) if tls_cert else "",
        tls_key=os.path.abspath(tls_key) if tls_key else "",
        key_file=os.path.abspath(key_file) if key_file else "",
        key_secret_file=_secret_spec(key_secret_file),
        admin_listen=admin_listen,
        store=store,
        open_registration=open_registration,
        relay=relay,
    )
    if relay and store:
        raise LocalProtocolError("--relay needs the SQLite store (not --store)")
    if bool(tls_cert) != bool(tls_key):
        raise LocalProtocolError("--tls-cert and --tls-key go together")
    nodekey.create_key_file(home, config, NodeKey.generate())
    config.save(home)
    return config  # the store is created (and migrated) on first open


def _secret_spec(spec: str) -> str:
    """``credential:NAME`` as given; a path made absolute (``serve`` may run elsewhere)."""
    if not spec or spec.startswith(nodekey.CREDENTIAL_PREFIX):
        return spec
    return os.path.abspath(spec)


def invite_expiry(now: int, expires_ms: int) -> int:
    """A long-lived invite (a day or more) expires at the end of a UTC day, so the stored
    expiry does not tell when it was made; a shorter one keeps its exact expiry."""
    if expires_ms < DAY_MS:
        return now + expires_ms
    return -(-(now + expires_ms) // DAY_MS) * DAY_MS


async def create_invite(home: str, name: str, expires_ms: int, uses: int = 1) -> str:
    """Create account ``name`` if new and return an invite good for ``uses`` redemptions."""
    return (await issue_invite(home, name, expires_ms, uses))[0]


async def issue_invite(home: str, name: str, expires_ms: int, uses: int = 1) -> tuple[str, int]:
    """:func:`create_invite`, also returning the invite's stored expiry (ms)."""
    if uses < 1:
        raise LocalProtocolError("--uses must be 1 or more", code="bad_argument")
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
        expires = invite_expiry(now, expires_ms)
        await store.add_invite(invite_hash(token), name, expires, uses=uses)
    finally:
        await store.close()
    invite = make_invite(config.device_url, node.key.node_id, name, token, config.public_host)
    return invite, expires


async def node_status(home: str) -> dict[str, Any]:
    """Counts from the store, and ``metrics_url``: the running node's ``/metrics`` (from the
    runtime file it keeps in its home, :func:`node.admin.read_runtime`), None while stopped."""
    node = build(home)
    await node.store.open()
    try:
        counts = await node.store.counts()
    finally:
        await node.store.close()
    base = admin.read_runtime(home)
    return {
        "node_id": node.key.node_id,
        "public_url": node.config.public_url,
        **counts,
        "metrics_url": base + "/metrics" if base else None,
    }


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


async def serve(
    home: str,
    lan: bool | None = None,
    interfaces: str = "",
    clock_offset_ms: int = 0,
    admin_listen: str = "",
    log_json: bool = False,
    open_registration: bool | None = None,
    relay: bool | None = None,
) -> None:
    node = build(home, SystemClock(clock_offset_ms) if clock_offset_ms else None)
    # No addresses, ids or tracebacks from peer input; bounded lines (node/logs.py).
    json_lines = log_json or node.config.log_format == "json"
    logs.install(node.config.log_lines_per_minute, json_lines=json_lines)
    if admin_listen:
        admin.parse_listen(admin_listen)
        node.config = replace(node.config, admin_listen=admin_listen)
    asyncio.get_running_loop().set_exception_handler(logs.loop_exception_handler)
    if lan is not None:
        node.lan_enabled = lan
    if interfaces:
        node.config = replace(node.config, lan_interfaces=interfaces)
    if open_registration is not None:
        node.config = replace(node.config, open_registration=open_registration)
    if relay is not None and relay != node.config.relay:
        from .relay import RelayService

        node.config = replace(node.config, relay=relay)
        node.relay = RelayService(node) if relay else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.create_task(node.run(stop))
    ready = asyncio.create_task(node.ready.wait())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if node.ready.is_set():
        print(
            f"haven node {node.key.node_id} listening on "
            f"{node.config.listen_host}:{node.port} as {node.config.public_url}"
            + (f"; metrics on {node.admin.url}/metrics" if node.admin else ""),
            flush=True,
        )
    ready.cancel()
    await task


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rotate_key(home: str) -> tuple[str, str]:
    """Make a new node key and a rotation statement signed by the old one (run while stopped).

    Peers that pinned the old id accept the new one because the descriptor carries the chain;
    devices of this node follow it the same way.
    """
    config = NodeConfig.load(home)
    old = load_node_key(home, config)
    new = NodeKey.generate()
    rotations = (*load_rotations(home), Rotation.make(old, new.node_id, SystemClock().now_ms()))
    _write_atomic(os.path.join(home, ROTATIONS_NAME), packb([r.to_wire() for r in rotations]))
    nodekey.replace_key_file(home, config, new)  # same place, same wrapping
    return old.node_id, new.node_id


CARD_PREFIX = "haven:card:"


async def contact_card(home: str) -> str:
    """A contact card: node id, public URL and the owner's address, for pinning on the spot."""
    node = build(home)
    owner = f"{node.config.owner}@{node.config.public_host}" if node.config.owner else ""
    body = {"node": node.key.node_id, "url": node.config.public_url, "owner": owner}
    return CARD_PREFIX + b64e(packb(body))


def parse_card(card: str) -> tuple[str, str]:
    if not card.startswith(CARD_PREFIX):
        raise LocalProtocolError("not a Haven contact card")
    try:
        obj = unpackb(b64d(card[len(CARD_PREFIX) :].strip()), max_len=4096)
        node_id, url = str(obj["node"]), validate_public_url(str(obj["url"]))
        key_from_node_id(node_id)
    except (HavenError, KeyError, TypeError) as exc:
        raise LocalProtocolError("malformed contact card") from exc
    return node_id, url


async def pin_card(home: str, card: str) -> str:
    """Pin a peer node from its card. A host already pinned to another key is refused."""
    node_id, url = parse_card(card)
    host = urlsplit(url).netloc.lower()
    node = build(home)
    await node.store.open()
    try:
        existing = await node.store.peer_by_host(host)
        if existing is not None and existing.node_id != node_id:
            raise KeyChanged("that host is pinned to a different node key")
        # last_seen = now: a pin from a card counts as used today (personal nodes drop
        # pins unused for pin_ttl_days)
        await node.store.upsert_peer(PeerRecord(node_id, url, host, SystemClock().now_ms()))
    finally:
        await node.store.close()
    return node_id


async def list_peers(home: str) -> list[dict[str, Any]]:
    """Live view from the running node (loopback admin endpoint), else what the store knows."""
    live = await admin.loopback_view(NodeConfig.load(home), "/haven/v1/peers")
    if live is not None:
        return live
    node = build(home)
    await node.store.open()
    try:
        return [
            {
                "node_id": p.node_id,
                "host": p.host,
                "reachable": "unreachable",
                "lan": False,
                "last_seen": p.last_seen,
                "spoofed": 0,
                "key_changed": False,  # memory only: unknown while the node is stopped
            }
            for p in await node.store.all_peers()
        ]
    finally:
        await node.store.close()


def print_qr(text: str) -> None:
    try:
        import segno

        segno.make(text, error="l").terminal(compact=True)
    except Exception:  # noqa: BLE001 - the QR is a convenience; the text is printed anyway
        pass


NODE_HOME_HELP = "node home directory (default: $HAVEN_HOME/node, else ~/.haven/node)"
ADMIN_HELP = (
    "HOST:PORT of the admin listener (/metrics, /healthz, /readyz); default 127.0.0.1:0, "
    "a free loopback port; a non-loopback address needs a firewall or an authenticating proxy"
)


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "node", help="operate a node (init, serve, invite, accounts, invites, status, …)"
    )
    nsub = p.add_subparsers(dest="node_cmd", required=True)

    i = nsub.add_parser("init", help="create a node: identity key, config and store")
    i.add_argument("--home", help=NODE_HOME_HELP)
    i.add_argument(
        "--public-url",
        default="",
        help="URL peers and devices reach, e.g. https://haven.example.org (required unless "
        "--via-relay)",
    )
    i.add_argument(
        "--via-relay",
        default="",
        metavar="CODE",
        help="behind NAT: be reachable through the relay that printed this haven:relay: code",
    )
    i.add_argument(
        "--relay",
        action="store_true",
        help="offer relay service to nodes behind NAT (relay = true; docs/operations.md)",
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
        "--client-url",
        default="",
        help="URL this node's devices use to reach it (default: the public URL)",
    )
    i.add_argument("--interface", default="", help="interfaces for LAN discovery (default all)")
    i.add_argument("--tls-cert", default="", help="PEM certificate chain: serve HTTPS directly")
    i.add_argument("--tls-key", default="", help="PEM private key for --tls-cert")
    i.add_argument(
        "--key-file",
        default="",
        help="write the node key here instead of HOME/node.key (e.g. a removable volume); "
        "serve refuses to start while it is missing",
    )
    i.add_argument(
        "--store",
        default="",
        help="postgresql://USER@HOST/DB: keep the store in PostgreSQL (default: SQLite in the "
        "home); put the password in a libpq passfile (PGPASSFILE), not in the DSN",
    )
    i.add_argument(
        "--key-secret-file",
        default="",
        help="store the node key wrapped under the bytes of this file (Argon2id + "
        "XSalsa20-Poly1305); credential:NAME reads $CREDENTIALS_DIRECTORY/NAME (systemd)",
    )
    i.add_argument(
        "--lan",
        dest="lan",
        action="store_true",
        default=None,
        help="announce and discover peers on the LAN (default: on with --owner)",
    )
    i.add_argument("--no-lan", dest="lan", action="store_false")
    i.add_argument("--admin-listen", default=admin.DEFAULT_ADMIN_LISTEN, help=ADMIN_HELP)
    i.add_argument(
        "--open-registration",
        action="store_true",
        help="let devices create accounts without an invite (default: invite only)",
    )
    i.add_argument("--json", action="store_true")

    s = nsub.add_parser("serve", help="run the node until SIGINT/SIGTERM")
    s.add_argument("--home", help=NODE_HOME_HELP)
    s.add_argument(
        "--lan",
        dest="lan",
        action="store_true",
        default=None,
        help="announce and discover peers on the LAN (overrides the config)",
    )
    s.add_argument("--no-lan", dest="lan", action="store_false")
    s.add_argument(
        "--open-registration",
        dest="open_registration",
        action="store_true",
        default=None,
        help="let devices create accounts without an invite (overrides the config)",
    )
    s.add_argument("--invite-only", dest="open_registration", action="store_false")
    s.add_argument(
        "--interface",
        default="",
        help="comma-separated interfaces (names or IPv4 addresses) for LAN discovery",
    )
    s.add_argument("--admin-listen", default="", help=ADMIN_HELP + " (overrides the config)")
    s.add_argument(
        "--relay",
        action="store_true",
        default=None,
        help="offer relay service to nodes behind NAT (overrides the config)",
    )
    s.add_argument("--log-json", action="store_true", help="log one JSON object per line on stderr")
    s.add_argument(
        "--clock-offset", default="", help=argparse.SUPPRESS
    )  # tests only: refused unless HAVEN_TEST_CLOCK=1
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="serve with N processes on one address (PostgreSQL store only; docs/operations.md)",
    )
    s.add_argument(
        "--worker-ports",
        type=int,
        default=0,
        metavar="BASE",
        help="with --workers: worker i also listens on 127.0.0.1:BASE+i (for a reverse proxy)",
    )

    def cmd(name: str, help_: str) -> Any:
        """A subcommand taking ``--home`` and ``--json``, like every operator command."""
        c = nsub.add_parser(name, help=help_)
        c.add_argument("--home", help=NODE_HOME_HELP)
        c.add_argument("--json", action="store_true", help="machine-readable output")
        return c

    cmd("rotate-key", "replace the node key; peers and devices follow a signed rotation")
    cmd(
        "move-relay", "move this node to another relay; peers and contacts follow a signed change"
    ).add_argument("code", help="the new relay's invite (haven:relay:...)")
    cmd("peers", "list peer nodes and how each is reachable")
    cmd("lan-invite", "print a contact card (text and QR) for pinning")
    cmd("pin", "pin a peer node from its contact card").add_argument("card")
    v = cmd("invite", "create an account (if new) and print an invite")
    v.add_argument("name")
    v.add_argument("--expires", default="7d", help="invite lifetime (default 7d)")
    v.add_argument("--uses", type=int, default=1, help="redemptions allowed (default 1)")
    cmd("status", "counts read from the store (running or not), and the metrics URL")
    ri = cmd("relay-invite", "relay: print a code a node behind NAT uses with init --via-relay")
    ri.add_argument("--quota", type=int, default=None, help="held-envelope quota in bytes")
    cmd("relay-clients", "relay: the nodes using this relay (no ids of their peers)")
    cmd("remove-account", "delete an account and purge its mailboxes").add_argument("name")
    accounts_cli.add_commands(nsub, NODE_HOME_HELP)


def run_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("aiohttp.access").disabled = True
    # Library loggers may name peer addresses; keep only their errors (and no access log).
    for noisy in ("zeroconf", "aiohttp.server", "aiohttp.web", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return _run(args)
    except (HavenError, ValueError) as exc:
        code = getattr(exc, "code", "bad_argument")
        print(f"error: {_one_line(exc)} ({code})", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:  # one that escaped the store's translation
        print(f"error: store: {_one_line(exc)} (storage_error)", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the listen port is taken, or the disk is full
        print(f"error: {_one_line(exc.strerror or exc)} (os_error)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:  # noqa: BLE001 - last resort: an operator never sees a traceback
        print("error: internal error; please report it (internal)", file=sys.stderr)
        return 70


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())[:300]


def init_from_args(args: argparse.Namespace) -> NodeConfig:
    """``haven node init`` from parsed arguments (LAN defaults to on for personal nodes)."""
    if args.owner and not valid_name(args.owner):
        raise LocalProtocolError("--owner must be 1-32 of a-z 0-9 . _ -")
    info: RelayInfo | None = None
    public_url = args.public_url
    if args.via_relay:
        if args.public_url or args.relay:
            raise LocalProtocolError("--via-relay takes the public URL from the code")
        info = RelayInfo.from_invite(parse_invite(args.via_relay))
        public_url = info.public_url()
        if not args.client_url:  # the relay forwards federation only: devices come direct
            host, _, port = args.listen.rpartition(":")
            host = "127.0.0.1" if host in ("0.0.0.0", "") else host
            args.client_url = f"http://{host}:{port}"
    elif not public_url:
        raise LocalProtocolError("give --public-url URL (or --via-relay CODE)")
    config = init_node(
        args.home,
        public_url,
        args.listen,
        parse_duration(args.ttl),
        args.lan if args.lan is not None else bool(args.owner),
        owner=args.owner or "",
        client_url=args.client_url,
        interfaces=args.interface,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        key_file=args.key_file,
        key_secret_file=args.key_secret_file,
        admin_listen=args.admin_listen,
        store=args.store,
        open_registration=args.open_registration,
        relay=args.relay,
    )
    if info is not None:
        info.save(args.home)
    return config


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The node's event loop: asyncio's own unless ``HAVEN_EVENT_LOOP=uvloop`` asks for uvloop
    (and it is installed). Opt-in: uvloop costs ~15% less CPU per message on the device path,
    but under the connection flood of tests/integration/test_flood.py the node closes
    attackers' connections more slowly with it (measured), so it is not the default."""
    if os.environ.get("HAVEN_EVENT_LOOP", "") != "uvloop":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return cast(Callable[[], asyncio.AbstractEventLoop], uvloop.new_event_loop)


def _run(args: argparse.Namespace) -> int:
    cmd = args.node_cmd
    if not args.home:  # `haven` fills in the default home (client/homes.py) before this
        raise LocalProtocolError("give --home DIR (the node home)", code="bad_argument")
    if cmd == "init":
        config = init_from_args(args)
        node_id = load_node_key(args.home, config).node_id
        out = {"node_id": node_id, "public_url": config.public_url, "home": args.home}
        print(json.dumps(out) if args.json else f"created node {node_id} in {args.home}")
        return 0
    if cmd == "serve":
        offset = 0
        if args.clock_offset:
            if os.environ.get("HAVEN_TEST_CLOCK") != "1":
                raise LocalProtocolError("--clock-offset is a test-only switch")
            sign = -1 if args.clock_offset.startswith("-") else 1
            offset = sign * parse_duration(args.clock_offset.lstrip("+-"))
        if args.workers != 1 or args.worker_ports:
            from .workers import check_workers, supervise

            check_workers(NodeConfig.load(args.home), args.workers, args.worker_ports)
            with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
                runner.run(
                    supervise(
                        args.home,
                        args.workers,
                        worker_ports=args.worker_ports,
                        lan=args.lan,
                        interfaces=args.interface,
                        clock_offset_ms=offset,
                        admin_listen=args.admin_listen,
                        log_json=args.log_json,
                    )
                )
            return 0
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(
                serve(
                    args.home,
                    args.lan,
                    args.interface,
                    offset,
                    admin_listen=args.admin_listen,
                    log_json=args.log_json,
                    open_registration=args.open_registration,
                    relay=args.relay,
                )
            )
        return 0
    if cmd == "rotate-key":
        old_id, new_id = rotate_key(args.home)
        print(
            json.dumps({"old_node_id": old_id, "node_id": new_id})
            if args.json
            else f"node key rotated: {old_id} -> {new_id} (restart the node)"
        )
        return 0
    if cmd == "move-relay":
        change = moves.move_relay(
            args.home, load_node_key(args.home), args.code, SystemClock().now_ms()
        )
        print(
            json.dumps({"old_host": change.old_host, "host": change.new_host})
            if args.json
            else f"node moved: {change.old_host} -> {change.new_host} "
            "(restart the node; it tells its peers)"
        )
        return 0
    if cmd == "peers":
        peers = asyncio.run(list_peers(args.home))
        if args.json:
            print(json.dumps(peers))
        else:
            for p in peers:
                print(f"{p['node_id']}  {p['host']}  {p['reachable']}  spoofed={p['spoofed']}")
        return 0
    if cmd == "lan-invite":
        card = asyncio.run(contact_card(args.home))
        if args.json:
            print(json.dumps({"card": card}))
        else:
            if sys.stdout.isatty():
                print_qr(card)
            print(card)
        return 0
    if cmd == "pin":
        node_id = asyncio.run(pin_card(args.home, args.card))
        print(json.dumps({"pinned": node_id}) if args.json else f"pinned {node_id}")
        return 0
    if cmd == "accounts":
        return accounts_cli.run_accounts(args)
    if cmd == "invites":
        return accounts_cli.run_invites(args)
    if cmd == "invite":
        invite, expires = asyncio.run(
            issue_invite(args.home, args.name, parse_duration(args.expires), args.uses)
        )
        if args.json:
            out = {"invite": invite, "name": args.name, "uses": args.uses, "expires": expires}
            print(json.dumps(out))
        else:
            uses = "single use" if args.uses == 1 else f"{args.uses} uses"
            print(f"invite for {args.name} ({uses}); redeem with: haven join INVITE --home DIR")
            print(invite)
        return 0
    if cmd == "relay-invite":
        code, inv = asyncio.run(mint_invite(args.home, args.quota))
        if args.json:
            print(json.dumps({"code": code, "label": inv.label, "host": inv.host}))
        else:
            print(f"relay invite for {inv.host}; use with: haven node init --via-relay CODE")
            print(code)
        return 0
    if cmd == "relay-clients":
        rows = asyncio.run(list_clients(args.home))
        if args.json:
            print(json.dumps(rows))
        else:
            for r in rows:
                state = "connected" if r["connected"] else "offline"
                print(
                    f"{r['label']}  {r['client'] or '(invite unused)'}  {state}  "
                    f"in={r['bytes_in']} out={r['bytes_out']} held={r['held']} quota={r['quota']}"
                )
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
