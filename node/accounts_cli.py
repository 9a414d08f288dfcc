"""``haven node accounts …`` and ``haven node invites …``: the operator's view of accounts
and invites (docs/cli.md "Accounts and invites").

Counts only: names, creation day, state, quota, device and pending counts. Nothing here reads
an envelope, a device list's contents or anything naming a correspondent. The commands work
on the store directly, whether or not the node runs; a running node is told to re-read its
accounts over its loopback port (``POST /haven/v1/accounts-changed``), and picks the change
up at its next cache refresh (within about 5 s) if that call does not reach it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from federation.errors import LocalProtocolError

from .app import Node, build
from .config import NodeConfig
from .store import AccountInfo, InviteInfo, revoke_prefix

T = TypeVar("T")
NOTIFY_TIMEOUT_S = 20.0  # the node confirms within ACCOUNTS_CONFIRM_S (or answers 202)


def not_found(name: str) -> LocalProtocolError:
    """The stable error for an unknown account name."""
    return LocalProtocolError(f"no account {name!r}", code="not_found")


async def _with_store(home: str, fn: Callable[[Node], Awaitable[T]]) -> T:
    node = build(home)
    await node.store.open()
    try:
        return await fn(node)
    finally:
        await node.store.close()


async def notify_running_node(config: NodeConfig) -> bool:
    """Ask a running node (loopback) to re-read accounts now; True once it has (204),
    False if no node answered or it did not confirm in time."""
    import aiohttp

    scheme = "https" if config.tls_cert else "http"
    url = f"{scheme}://127.0.0.1:{config.listen_port}/haven/v1/accounts-changed"
    try:
        # Loopback to our own node: its certificate names the public host, not 127.0.0.1.
        async with (
            aiohttp.ClientSession() as s,
            s.post(url, timeout=aiohttp.ClientTimeout(NOTIFY_TIMEOUT_S), ssl=False) as r,
        ):
            return r.status == 204
    except (aiohttp.ClientError, OSError, TimeoutError):
        return False


def account_json(a: AccountInfo) -> dict[str, Any]:
    """One account as ``accounts list --json`` prints it."""
    return {
        "name": a.name,
        "created": a.created,
        "created_day": _day(a.created),
        "disabled": a.disabled,
        "quota": a.quota,
        "devices": a.devices,
        "pending": a.pending,
    }


def invite_json(i: InviteInfo) -> dict[str, Any]:
    """One invite as ``invites list --json`` prints it."""
    return {
        "ref": i.ref,
        "name": i.name,
        "kind": i.kind,
        "expires": i.expires,
        "uses_left": i.uses_left,
    }


async def list_accounts(home: str) -> list[AccountInfo]:
    """Every account with its counts."""

    async def run(node: Node) -> list[AccountInfo]:
        return await node.store.list_accounts()

    return await _with_store(home, run)


async def set_disabled(home: str, name: str, disabled: bool) -> bool:
    """Disable or enable ``name``; True if a running node was told at once."""

    async def run(node: Node) -> None:
        if not await node.store.set_account_disabled(name, disabled):
            raise not_found(name)

    await _with_store(home, run)
    return await notify_running_node(NodeConfig.load(home))


async def set_quota(home: str, name: str, quota: int) -> bool:
    """Set ``name``'s per-mailbox quota (0: the node's default); True if a running node was
    told at once."""
    if quota < 0:
        raise LocalProtocolError("the quota is a count, 0 or more", code="bad_argument")

    async def run(node: Node) -> None:
        if not await node.store.set_account_quota(name, quota):
            raise not_found(name)

    await _with_store(home, run)
    return await notify_running_node(NodeConfig.load(home))


async def list_invites(home: str) -> list[InviteInfo]:
    """Unexpired invites, soonest expiry first."""

    async def run(node: Node) -> list[InviteInfo]:
        return await node.store.list_invites(int(time.time() * 1000))

    return await _with_store(home, run)


async def revoke_invite(home: str, ref: str) -> int:
    """Delete the invites ``ref`` names; ``not_found`` if none."""
    if revoke_prefix(ref) is None:
        raise LocalProtocolError(
            "give at least 8 hex digits of the ref from `haven node invites list`",
            code="bad_argument",
        )

    async def run(node: Node) -> int:
        return await node.store.revoke_invite(ref)

    n = await _with_store(home, run)
    if n == 0:
        raise LocalProtocolError(f"no invite {ref!r}", code="not_found")
    return n


def add_commands(nsub: Any, home_help: str) -> None:
    """Register ``accounts`` and ``invites`` under ``haven node``."""

    def leaf(sub: Any, name: str, help_: str) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = sub.add_parser(name, help=help_)
        c.add_argument("--home", help=home_help)
        c.add_argument("--json", action="store_true", help="machine-readable output")
        return c

    a = nsub.add_parser("accounts", help="list accounts; disable, enable, set quotas")
    asub = a.add_subparsers(dest="accounts_cmd", required=True)
    leaf(asub, "list", "names, creation day, state, quota, device and pending counts")
    leaf(asub, "disable", "refuse the account's devices; peers get not_found").add_argument("name")
    leaf(asub, "enable", "undo disable").add_argument("name")
    q = leaf(asub, "quota", "max pending envelopes per mailbox of the account (0 = default)")
    q.add_argument("name")
    q.add_argument("n", type=int)

    i = nsub.add_parser("invites", help="list or revoke unredeemed invites")
    isub = i.add_subparsers(dest="invites_cmd", required=True)
    leaf(isub, "list", "unexpired invites: ref, account, kind, expiry, uses left")
    leaf(isub, "revoke", "delete an invite by its ref").add_argument("ref")


def _day(ms: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ms / 1000))


def _when(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ms / 1000))


def _told(running: bool) -> str:
    return "" if running else " (a running node picks it up within 5 s)"


def run_accounts(args: argparse.Namespace) -> int:
    """``haven node accounts …``."""
    sub = args.accounts_cmd
    if sub == "list":
        accounts = asyncio.run(list_accounts(args.home))
        if args.json:
            print(json.dumps([account_json(a) for a in accounts]))
            return 0
        print(f"{'name':<32} {'created':<10} {'state':<8} {'quota':>7} {'devices':>7} pending")
        for a in accounts:
            state = "disabled" if a.disabled else "active"
            quota = str(a.quota) if a.quota else "default"
            print(
                f"{a.name:<32} {_day(a.created):<10} {state:<8} {quota:>7} {a.devices:>7} "
                f"{a.pending}"
            )
        return 0
    if sub in ("disable", "enable"):
        disabled = sub == "disable"
        running = asyncio.run(set_disabled(args.home, args.name, disabled))
        if args.json:
            print(json.dumps({"name": args.name, "disabled": disabled, "node_notified": running}))
        else:
            print(f"{sub}d {args.name}{_told(running)}")
        return 0
    if sub == "quota":
        running = asyncio.run(set_quota(args.home, args.name, args.n))
        if args.json:
            print(json.dumps({"name": args.name, "quota": args.n, "node_notified": running}))
        else:
            what = f"{args.n} pending per mailbox" if args.n else "the node's default"
            print(f"quota of {args.name}: {what}{_told(running)}")
        return 0
    raise LocalProtocolError(f"unknown command accounts {sub}")


def run_invites(args: argparse.Namespace) -> int:
    """``haven node invites …``."""
    sub = args.invites_cmd
    if sub == "list":
        invites = asyncio.run(list_invites(args.home))
        if args.json:
            print(json.dumps([invite_json(i) for i in invites]))
            return 0
        print(f"{'ref':<12} {'name':<32} {'kind':<6} {'expires':<20} uses_left")
        for i in invites:
            print(f"{i.ref:<12} {i.name:<32} {i.kind:<6} {_when(i.expires):<20} {i.uses_left}")
        return 0
    if sub == "revoke":
        n = asyncio.run(revoke_invite(args.home, args.ref))
        print(
            json.dumps({"ref": args.ref, "revoked": n}) if args.json else f"revoked {n} invite(s)"
        )
        return 0
    raise LocalProtocolError(f"unknown command invites {sub}")
