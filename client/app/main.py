"""``haven app``: argument parsing and the process entry point (the daemon's composition root)."""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_PORT = 8766


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


def run(args: argparse.Namespace) -> int:
    """Run the daemon until SIGINT/SIGTERM (filled in by the app work)."""
    raise NotImplementedError
