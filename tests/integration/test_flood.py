"""A connection flood against a node with a low cap: legitimate devices keep working.

The node allows 300 connections, 200 of them unauthenticated, 64 / 16 per source, with 2 s read
grace and 5 s to authenticate. An attacker process (flood_attacker.py) uses twelve sources
(``127.0.2.1`` .. ``127.0.2.12``; each loopback address is its own source because the node sets
``exempt_loopback = false``): a burst of 2,000 idle TCP connections, then for 8 s 240 tasks that
keep reconnecting -- idle TCP, idle WebSockets (aiohttp clients, which answer pings), slowloris
headers, half-sent bodies, one-byte-trickle WebSocket frames, garbage senders that never read.
Meanwhile alice and bob (real devices on ``127.0.0.1``) exchange messages the whole time: alice
connects afresh for every send and receive; bob stays on one connection opened before the flood
(a device has one live connection at a time).

Asserted bounds (measured on a shared 2-core box: ~3,000 attacker connections, RSS 49 -> 76 MB,
2 log lines, every message delivered):
  * every legitimate message is delivered;
  * node RSS grows by less than 100 MB over its pre-flood value (before the limits, 19,900
    idle WebSockets took 448 MB and one non-reading garbage sender 300 MB);
  * fewer than 60 log lines in all, none naming ``127.0.0.`` or holding a traceback;
  * the refusals and cuts are counted in ``/haven/v1/stats``.
``HAVEN_LONG=1`` runs a bigger flood (600 tasks, 5,000 in the burst, 60 s). Both keep
sources x ``max_unauthenticated_per_source`` below ``max_unauthenticated``: an attacker with more
addresses than that can fill the pre-auth pool (docs/threat-model.md, denial of service).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator

import aiohttp
import pytest

from tests.conftest import LONG

from .conn_world import Pair, clean_log, errors, limited_node, make_pair, messaging, rss_kb
from .harness import ROOT
from .rawpeer import stats

SOURCES = 12  # 12 x 16 pre-auth slots per source < the pool of 200
TASKS_PER_KIND = 100 if LONG else 40
FLOOD_S = 60.0 if LONG else 8.0
BURST = 5000 if LONG else 2000
RSS_GROWTH_KB = 100_000
MAX_LOG_LINES = 60

LIMITS: dict[str, int | bool] = {
    "max_connections": 300,
    "max_unauthenticated": 200,
    "max_connections_per_source": 64,
    "max_unauthenticated_per_source": 16,
    "read_grace_ms": 2000,
    "auth_timeout_ms": 5000,
}

FAILURES = (
    OSError,
    ConnectionError,
    asyncio.IncompleteReadError,
    TimeoutError,
    aiohttp.ClientError,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    base = tmp_path_factory.mktemp("flood")
    node = limited_node(base, **LIMITS)
    p = make_pair(node, base)
    try:
        yield p
    finally:
        p.close()
        node.stop()


async def test_flood_of_strangers_leaves_devices_working(pair: Pair) -> None:
    node = pair.node
    async with aiohttp.ClientSession() as http:
        before = await errors(http, node)
        rss_before = rss_kb(node)
        bob_conn = await pair.bob.connect()  # signed in before the flood
        attacker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.integration.flood_attacker",
            *map(str, (node.port, SOURCES, TASKS_PER_KIND, FLOOD_S, BURST)),
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
        peak, n, delivered = rss_before, 0, 0
        try:
            while attacker.returncode is None or n < 3:  # legitimate traffic all along
                n += 1
                # alice connects afresh each time; bob stays on his connection from before
                delivered += await messaging(pair, bob_conn)
                delivered += await messaging(pair, reverse=True, send_conn=bob_conn)
                peak = max(peak, rss_kb(node))
            out, _ = await asyncio.wait_for(attacker.communicate(), 60)
        except Exception as exc:  # say what the node counted when legitimate traffic failed
            counters = await errors(http, node)
            raise AssertionError(f"legitimate traffic failed in round {n}: {counters}") from exc
        finally:
            if attacker.returncode is None:
                attacker.kill()
                await attacker.wait()
            await bob_conn.__aexit__(None, None, None)
        after = await errors(http, node)
        conns = (await stats(http, node.url))["connections"]
    attempts: dict[str, int] = json.loads(out)
    got = Counter(after)
    got.subtract(Counter(before))
    assert delivered == 2 * n
    total = sum(attempts.values())
    assert total >= BURST + 500, attempts
    for code in ("source_over_capacity", "read_timeout", "auth_timeout", "preauth_frames"):
        assert got[f"conn.{code}"] > 0, (code, dict(got))
    assert peak - rss_before < RSS_GROWTH_KB, (rss_before, peak)
    lines = clean_log(node)
    assert len(lines) < MAX_LOG_LINES, lines[-40:]
    print(
        f"flood: {total} attacker connections {attempts}; {delivered} messages delivered; "
        f"RSS {rss_before} -> peak {peak} kB; {len(lines)} log lines; connections now {conns}; "
        f"counted {{{', '.join(f'{k}: {v}' for k, v in sorted(got.items()) if v)}}}"
    )
