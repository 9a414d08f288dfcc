"""The relay's side of the link on loopback (docs/protocol.md §12.1-12.3): a real relay node and
a hand-written link client in the test, requests routed by an explicit ``Host`` header.

Checks the hello (signature, token, binding, one link per label), what a ``req`` frame carries
(method, raw target, only ``Content-Type``/``Haven-*`` headers, body), that the client's answer
goes back unchanged, the routing rules (with and without the port, unknown labels, non-federation
paths) and ``503 unavailable`` once the client has no link.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import aiohttp
import msgpack
from yarl import URL

from federation.relayauth import RelayAuth
from federation.relaylink import (
    LINK_PATH,
    Challenge,
    Error,
    Hello,
    Ok,
    Req,
    Res,
    decode_link_frame,
    parse_invite,
    sign_hello,
)
from federation.signing import NodeKey

from .harness import NodeProc, haven


async def _hello(
    s: aiohttp.ClientSession, url: str, key: NodeKey, label: str, token: bytes, *, bad: bool = False
) -> tuple[aiohttp.ClientWebSocketResponse, object]:
    ws = await s.ws_connect(url + LINK_PATH)
    ch = decode_link_frame((await ws.receive()).data)
    assert isinstance(ch, Challenge) and len(ch.nonce) == 32
    auth = RelayAuth.make(key, ch.node, 2**42).encode()
    hello = sign_hello(key, ch.node, ch.nonce, label, token, auth)
    if bad:
        hello = Hello(node=hello.node, label=label, token=token, auth=auth, sig=bytes(64))
    await ws.send_bytes(hello.encode())
    return ws, decode_link_frame((await ws.receive()).data)


async def _scenario(relay: NodeProc, code: str) -> None:
    inv = parse_invite(code)
    label, token = inv.label, inv.t
    host = inv.host
    assert host == f"{label}.relay.test:{relay.port}"
    a, b = NodeKey.generate(), NodeKey.generate()
    target = "/haven/v1/federation/batch?q=%2F"
    async with aiohttp.ClientSession() as s:

        async def call(h: str, path: str = target) -> tuple[int, bytes, dict[str, str]]:
            headers = {
                "Host": h,
                "Content-Type": "application/msgpack",
                "Haven-Nonce": "n1",
                "Cookie": "secret",
            }
            url = URL(relay.url + path, encoded=True)  # sent exactly as written
            async with s.post(url, data=b"body", headers=headers) as r:
                return r.status, await r.read(), dict(r.headers)

        # before any link: the label is not bound yet
        assert (await call(host))[0] == 404
        ws, got = await _hello(s, relay.url, a, label, token, bad=True)
        assert isinstance(got, Error) and got.code == "unauthorized"
        ws, got = await _hello(s, relay.url, a, label, os.urandom(24))
        assert isinstance(got, Error) and got.code == "invalid_invite"
        ws, got = await _hello(s, relay.url, a, "aaaaaaaaaa", token)
        assert isinstance(got, Error) and got.code == "invalid_invite"
        ws, got = await _hello(s, relay.url, a, label, token)
        assert isinstance(got, Ok)
        _ws_b, got = await _hello(s, relay.url, b, label, token)  # token consumed; not a's key
        assert isinstance(got, Error) and got.code == "unauthorized"

        async def serve_one(link: aiohttp.ClientWebSocketResponse, status: int) -> Req:
            req = decode_link_frame((await link.receive()).data)
            assert isinstance(req, Req)
            res = Res(id=req.id, s=status, h=(("Haven-Signature", "sig"),), b=b"answer")
            await link.send_bytes(res.encode())
            return req

        for h in (host, host.split(":")[0], host.upper()):
            served = asyncio.create_task(serve_one(ws, 200))
            status, body, headers = await call(h)
            req = await served
            assert (status, body, headers["Haven-Signature"]) == (200, b"answer", "sig")
            assert (req.m, req.p, req.b) == ("POST", target, b"body")
            assert dict(req.h) == {"Content-Type": "application/msgpack", "Haven-Nonce": "n1"}

        # not forwarded: other paths, other labels, the relay's own host
        assert (await call(host, "/haven/v1/stats"))[0] == 404
        assert (await call(f"bbbbbbbbbb.relay.test:{relay.port}"))[0] == 404
        assert (await call(f"127.0.0.1:{relay.port}"))[0] != 200

        # a newer link for the label replaces the older one
        ws2, got = await _hello(s, relay.url, a, label, b"")
        assert isinstance(got, Ok)
        closed = await ws.receive()
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        served = asyncio.create_task(serve_one(ws2, 409))
        assert (await call(host))[0] == 409
        await served

        rows = json.loads(
            haven("node", "relay-clients", "--home", str(relay.home), "--json").stdout
        )
        assert [(r["label"], r["client"], r["connected"]) for r in rows] == [
            (label, a.node_id, True)
        ]
        assert rows[0]["bytes_in"] > 0 and rows[0]["bytes_out"] > 0

        await ws2.close()
        for _ in range(200):  # the relay notices the close; poll with a deadline
            status, body, _h = await call(host)
            if status == 503:
                break
            await asyncio.sleep(0.05)
        assert status == 503 and msgpack.unpackb(body)["code"] == "unavailable"


def test_relay_link_and_routing(tmp_path: Path) -> None:
    relay = NodeProc.create(tmp_path, "relay", "--relay", "--no-lan")
    cfg = relay.home / "node.toml"
    cfg.write_text(cfg.read_text().replace('relay_domain = ""', 'relay_domain = "relay.test"'))
    code = json.loads(haven("node", "relay-invite", "--home", str(relay.home), "--json").stdout)
    relay.start()
    try:
        asyncio.run(_scenario(relay, code["code"]))
    finally:
        relay.stop()
    log = relay.log.read_text()
    assert "Traceback" not in log
    after_start = log.split("/metrics", 1)[-1]  # the startup line names the listen address
    assert "127.0.0.1" not in after_start and "relay client linked" in after_start
