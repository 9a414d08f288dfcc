"""A small LAN-discovery process for tests: announce with LanAnnouncer, browse with LanBrowser.

Run inside a network namespace (``ip netns exec NS python lan_probe.py ...``). It writes one JSON
object per line on stdout:

    {"event": "announced", "blinded": ...}                    after start and after each "advance"
    {"event": "candidate", "blinded", "addresses", "port", "version"}
    {"event": "removed", "blinded": ...}
    {"event": "log", "level": ..., "msg": ...}                records of the federation.lan logger
    {"event": "closed"}                                       after a clean shutdown

and reads commands on stdin, one per line:

    advance MS    move this probe's clock MS milliseconds forward, then LanAnnouncer.refresh()
    quit          close cleanly (goodbyes) and exit; end of stdin does the same

``--garbage`` additionally registers a ``_haven._tcp`` service whose TXT record is not a valid
announcement, to check that browsers ignore it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from federation.clock import SystemClock
from federation.lan import SERVICE_TYPE, LanAnnouncer, LanBrowser
from federation.lanid import LanCandidate


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


class _JsonLogHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        emit("log", level=record.levelname, msg=record.getMessage())


def _parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--key", help="hex node public key (32 bytes); omit to only browse")
    p.add_argument("--port", type=int, default=7777)
    p.add_argument("--ttl", type=int, default=120, help="announced record TTL, seconds")
    p.add_argument("--recheck", type=float, default=30.0, help="browser recheck interval, s")
    p.add_argument("--resolve-timeout", type=float, default=3.0)
    p.add_argument("--iface", action="append", help="restrict to this interface (repeatable)")
    p.add_argument("--garbage", action="store_true", help="also announce a malformed service")
    return p.parse_args(argv)


async def _register_garbage() -> AsyncZeroconf:
    zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"garbage.{SERVICE_TYPE}",
        port=9,
        properties={b"id": b"not-hex-\xff\x00", b"p": b"99999", b"v": b"\xd9\xa1", b"\xff": None},
        server="garbage.local.",
        parsed_addresses=["169.254.42.250"],
    )
    await (await zc.async_register_service(info))
    return zc


async def _commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def main(argv: list[str]) -> int:
    args = _parse_args(argv)
    lan_log = logging.getLogger("federation.lan")
    lan_log.setLevel(logging.DEBUG)
    lan_log.addHandler(_JsonLogHandler())
    clock = SystemClock()

    def on_candidate(c: LanCandidate) -> None:
        emit("candidate", blinded=c.blinded, addresses=list(c.addresses), port=c.port,
             version=c.version)  # fmt: skip

    browser = LanBrowser(
        on_candidate=on_candidate,
        on_removed=lambda blinded: emit("removed", blinded=blinded),
        recheck_interval_s=args.recheck,
        resolve_timeout_s=args.resolve_timeout,
        interfaces=args.iface,
    )
    announcer = None
    if args.key:
        announcer = LanAnnouncer(
            public_key=bytes.fromhex(args.key),
            port=args.port,
            clock=clock,
            ttl_s=args.ttl,
            interfaces=args.iface,
        )
    garbage = await _register_garbage() if args.garbage else None
    commands = await _commands()
    try:
        await browser.start()
        if announcer is not None:
            await announcer.start()
            emit("announced", blinded=announcer.blinded)
        while line := (await commands.readline()).decode().strip():
            cmd, _, arg = line.partition(" ")
            if cmd == "advance" and announcer is not None:
                clock.offset_ms += int(arg)
                await announcer.refresh()
                emit("announced", blinded=announcer.blinded)
            elif cmd == "quit":
                break
    finally:
        if announcer is not None:
            await announcer.close()
        await browser.close()
        if garbage is not None:
            await garbage.async_close()
    emit("closed")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
