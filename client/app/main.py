"""``haven app``: argument parsing and the process entry point (the daemon's composition root).

``run`` resolves the device home, refuses a non-loopback ``--listen``, builds the
:class:`~client.app.core.AppCore`, the web application and (if present) the Unix-socket IPC
server, prints the UI's URL as the first and only line on stdout, and serves until SIGINT or
SIGTERM. Logs go to stderr and never contain the secret.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import ipaddress
import logging
import os
import secrets
import signal
import sys
from typing import Any

from aiohttp import web

from federation.errors import HavenError

DEFAULT_PORT = 8766
SOCKET_NAME = "app.sock"

log = logging.getLogger("haven.app")


def add_parser(sub: Any) -> None:
    """Register ``haven app`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "app", help="run the Haven app: a device daemon with a local web UI"
    )
    p.add_argument("--home", help="device home (default: $HAVEN_HOME/device or ~/.haven/device)")
    p.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        help=f"loopback host:port for the UI (default 127.0.0.1:{DEFAULT_PORT})",
    )
    p.add_argument("--url", action="store_true", help="print the URL of the running app and exit")
    p.add_argument("--open", action="store_true", help="open the UI in a browser")
    p.add_argument("--save-dir", help="where received files are saved (default ~/Downloads/Haven)")
    p.add_argument(
        "--auto-download",
        type=float,
        default=25.0,
        metavar="MB",
        help="received files up to this size are downloaded at once (default 25)",
    )


class UsageError(Exception):
    """A bad argument: exit 2 with ``error: TEXT (bad_argument)``."""


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:port`` for IPv6) on a loopback address, else :class:`UsageError`."""
    host, sep, port_s = text.rpartition(":")
    if not sep:
        host, port_s = text, str(DEFAULT_PORT)
    host = host.strip("[]") or "127.0.0.1"
    try:
        port = int(port_s)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise UsageError(f"bad port in --listen {text!r}") from None
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise UsageError(f"the app listens on loopback only ({host} is not a loopback address)")
    return host, port


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGINT/SIGTERM (or answer ``--url``)."""
    from client.homes import device_home

    home = os.path.abspath(device_home(args.home))
    if args.url:
        return _print_url(home)
    try:
        host, port = parse_listen(args.listen)
    except UsageError as exc:
        print(f"error: {exc} (bad_argument)", file=sys.stderr)
        return 2
    logging.getLogger("haven.app").setLevel(logging.INFO)
    try:
        return asyncio.run(_serve(home, host, port, args.open, args.save_dir, args.auto_download))
    except HavenError as exc:
        print(f"error: {exc} ({exc.code})", file=sys.stderr)
        return 1
    except OSError as exc:
        print(
            f"error: cannot listen on {args.listen}: {exc.strerror or exc} (os_error)",
            file=sys.stderr,
        )
        return 1


def _print_url(home: str) -> int:
    ipc = _ipc()
    if ipc is None:
        print(f"error: no app running for {home} (no_app)", file=sys.stderr)
        return 1
    return int(ipc.print_url(home))


def _ipc() -> Any:
    """``client.app.ipc`` (the Unix-socket server for CLI commands), if this build has it."""
    import importlib

    try:
        return importlib.import_module("client.app.ipc")
    except ModuleNotFoundError:
        return None


async def _already_running(path: str) -> bool:
    """Whether a daemon answers on the home's socket (a stale socket file does not count)."""
    if not await asyncio.to_thread(os.path.exists, path):
        return False
    try:
        async with asyncio.timeout(1):
            _r, w = await asyncio.open_unix_connection(path)
    except (OSError, TimeoutError):
        return False
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
    return True


async def _ask_passphrase(core: Any) -> None:
    """On a terminal, with a protected home and no HAVEN_PASSPHRASE: ask once."""
    if not core.locked or os.environ.get("HAVEN_PASSPHRASE") or not sys.stdin.isatty():
        return
    pp = await asyncio.to_thread(getpass.getpass, "passphrase (or unlock in the app): ")
    if pp:
        try:
            await core.unlock(pp)
        except HavenError as exc:
            print(f"error: {exc} ({exc.code}); unlock in the app", file=sys.stderr)


async def _serve(
    home: str,
    host: str,
    port: int,
    open_browser: bool,
    save_dir: str | None = None,
    auto_download_mb: float = 25.0,
) -> int:
    from .core import AppCore
    from .web import make_app, set_address

    sock_path = os.path.join(home, SOCKET_NAME)
    if await _already_running(sock_path):
        print(
            f"error: the app is already running for {home}; its URL: haven app --url (app_running)",
            file=sys.stderr,
        )
        return 1
    core = AppCore(home, save_dir=save_dir, auto_download_mb=auto_download_mb)
    await core.start()
    await _ask_passphrase(core)
    secret = secrets.token_urlsafe(32)
    app = make_app(core, secret)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    ipc_server: Any = None
    try:
        site = web.TCPSite(runner, host, port, reuse_address=False)
        await site.start()
        server: Any = site._server
        real_port = int(server.sockets[0].getsockname()[1])
        set_address(app, host, real_port)
        core.url = f"http://{_url_host(host)}:{real_port}/#k={secret}"
        ipc_server = await _start_ipc(core, home, sock_path)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        sys.stdout.write(core.url + "\n")
        sys.stdout.flush()
        _stdout_to_stderr()
        log.info("serving the app on %s port %d", _url_host(host), real_port)
        if open_browser:
            import webbrowser

            await asyncio.to_thread(webbrowser.open, core.url)
        await stop.wait()
        log.info("shutting down")
    finally:
        if ipc_server is not None:
            with contextlib.suppress(Exception):
                await ipc_server.close()
        await runner.cleanup()
        await core.close()
    return 0


def _stdout_to_stderr() -> None:
    """After the URL line nothing else may reach stdout (not even a browser's chatter with
    ``--open``), and a reader that closed it after the first line must not break us."""
    try:
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # no usable stderr: leave stdout as it is


async def _start_ipc(core: Any, home: str, path: str) -> Any:
    """D's Unix-socket server for CLI commands, if this build has it (and a device home)."""
    ipc = _ipc()
    if ipc is None:
        return None
    await asyncio.to_thread(os.makedirs, home, mode=0o700, exist_ok=True)
    return await ipc.serve(core, path)
