"""A LAN spoofer for tests: announces a *known* node's blinded id, but holds its own key.

It serves a descriptor signed by its own key (so it cannot answer a challenge for the victim's
key) and counts every federation request it receives; it prints ``{"posts": n}`` on stdin EOF.
Run inside a test network namespace only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from aiohttp import web
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from federation.clock import SystemClock
from federation.ids import key_from_node_id
from federation.lan import SERVICE_TYPE
from federation.lanid import txt_record
from federation.signing import Descriptor, NodeKey, b64d


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--victim", required=True, help="node id whose blinded id to announce")
    ap.add_argument("--addr", required=True)
    ap.add_argument("--port", type=int, default=8765)
    args = ap.parse_args()
    key, clock = NodeKey.generate(), SystemClock()
    posts = 0

    async def descriptor(request: web.Request) -> web.Response:
        challenge = b64d(request.query.get("c", ""))
        d = Descriptor(key.node_id, "http://spoof.invalid", 1, clock.now_ms(), {}, (), challenge)
        return web.Response(body=d.sign(key), content_type="application/msgpack")

    async def federation(request: web.Request) -> web.Response:
        nonlocal posts
        posts += 1
        return web.Response(status=500)

    app = web.Application()
    app.router.add_get("/.well-known/haven/node", descriptor)
    app.router.add_post("/haven/v1/federation/{tail:.*}", federation)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", args.port).start()

    txt = txt_record(key_from_node_id(args.victim), clock.now_ms(), args.port)
    zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"spoof.{SERVICE_TYPE}",
        port=args.port,
        properties=txt,
        server="spoof.local.",
        parsed_addresses=[args.addr],
        host_ttl=30,
        other_ttl=30,
    )
    await (await zc.async_register_service(info))
    print(json.dumps({"announced": txt["id"]}), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)  # until the test closes stdin
    await zc.async_close()
    await runner.cleanup()
    print(json.dumps({"posts": posts}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
