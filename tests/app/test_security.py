"""The local web server's defences, against a real ``haven app`` subprocess on 127.0.0.1.

Another local web page (a foreign Origin, or a DNS-rebinding name as Host), another local
process without the per-launch secret, and hostile message content must not read or send
anything; the secret never reaches the logs. The browser-side rendering of hostile content
(textContent, never HTML) is tested by the UI's browser tests.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import aiohttp
import pytest

from tests.integration.forkcli import run
from tests.integration.harness import NodeProc, wait_until

from .daemon import DaemonProc, EventSocket

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self' ws://127.0.0.1:{port}; font-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
HOSTILE = ["<img src=x onerror=alert(1)>", "<script>alert('x')</script>", "\"'><svg onload=1>"]


def test_requests_without_the_key_host_or_origin_are_refused(
    app_node: NodeProc, new_user: Callable[..., DaemonProc]
) -> None:
    alice = new_user(app_node, "alice")
    bob = new_user(app_node, "bob")
    alice.open_chat(bob.address)
    seen: list[dict[str, str]] = []

    def call(method: str, path: str, body: object = None, **headers: str) -> tuple[int, dict]:  # type: ignore[type-arg]
        data = None if body is None else json.dumps(body).encode()
        hdrs = {k.replace("_", "-"): v for k, v in headers.items()}
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        status, h, raw = alice.request(method, path, data, hdrs)
        seen.append(h)
        assert h["content-type"] == "application/json; charset=utf-8"
        return status, json.loads(raw)

    send = f"/api/chats/{bob.address}/messages"
    key = alice.secret
    # no key / a wrong key: nothing is read or sent
    assert call("GET", "/api/state") == (
        401,
        {"error": "unauthorized", "message": "missing or wrong key"},
    )
    assert call("GET", "/api/chats", X_Haven_Key="x" * len(key))[0] == 401
    assert call("GET", "/api/chats", X_Haven_Key=key[:-1])[0] == 401
    status, err = call("POST", send, {"text": "no key"}, Origin=alice.origin)
    assert status == 401 and err["error"] == "unauthorized"
    # DNS rebinding: the right key but another name for 127.0.0.1
    status, err = call("GET", "/api/state", X_Haven_Key=key, Host=f"evil.example:{alice.port}")
    assert status == 421 and err["error"] == "bad_host"
    assert call("GET", "/api/state", X_Haven_Key=key, Host="127.0.0.1:1")[0] == 421
    status, h, _ = alice.request("GET", "/", headers={"Host": f"evil.example:{alice.port}"})
    assert status == 421
    # another local site's page, even holding the key, cannot make a state-changing request
    for origin in ("http://evil.example", f"http://127.0.0.1:{alice.port + 1}", "null"):
        status, err = call("POST", send, {"text": "forged"}, X_Haven_Key=key, Origin=origin)
        assert status == 403 and err["error"] == "bad_origin", origin
    status, _ = call(
        "PUT",
        "/api/settings",
        {"read_receipts": "off"},
        X_Haven_Key=key,
        Origin="http://evil.example",
    )
    assert status == 403
    assert alice.messages(bob.address) == []  # nothing was sent
    assert alice.state()["settings"]["read_receipts"] == "on"
    # the daemon's own origin (and localhost) with the key works
    status, msg = call("POST", send, {"text": "real"}, X_Haven_Key=key, Origin=alice.origin)
    assert status == 200 and msg["text"] == "real"
    status, _ = call("GET", "/api/state", X_Haven_Key=key, Host=f"localhost:{alice.port}")
    assert status == 200
    # no CORS grant: a foreign page cannot read an answer even if it guessed everything
    status, h, _ = alice.request(
        "OPTIONS",
        "/api/state",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "GET"},
    )
    seen.append(h)
    assert status in (401, 403, 405)
    assert not any("access-control-allow-origin" in hh for hh in seen)
    assert not any("set-cookie" in hh for hh in seen)
    assert all(hh["cache-control"] == "no-store" for hh in seen if "cache-control" in hh)


def test_page_headers_csp_and_no_cookies(
    app_node: NodeProc, new_user: Callable[..., DaemonProc]
) -> None:
    d = new_user(app_node, "dana")
    status, h, body = d.request("GET", "/", headers={})
    assert status == 200 and h["content-type"].startswith("text/html")
    assert h["content-security-policy"] == CSP.format(port=d.port)
    assert h["x-content-type-options"] == "nosniff"
    assert h["referrer-policy"] == "no-referrer"
    assert h["cross-origin-opener-policy"] == "same-origin"
    assert h["cross-origin-resource-policy"] == "same-origin"
    assert "set-cookie" not in h
    assert b"http://" not in body and b"https://" not in body  # no third-party assets
    for path in ("/api/state", "/static/app.js", "/nope", "/api/nope"):
        status, h, _ = d.request("GET", path, headers={"X-Haven-Key": d.secret})
        assert "content-security-policy" in h and "set-cookie" not in h, path
    status, h, raw = d.request("GET", "/api/nope", headers={"X-Haven-Key": d.secret})
    assert status == 404 and json.loads(raw)["error"] == "not_found"
    assert h["content-type"] == "application/json; charset=utf-8"


async def test_event_socket_needs_our_origin_and_the_auth_frame(
    app_node: NodeProc, new_user: Callable[..., DaemonProc]
) -> None:
    d = new_user(app_node, "erin")
    async with aiohttp.ClientSession() as s:
        # opened first, so that the 5 s grace for its auth frame runs while the rest is checked
        silent = await s.ws_connect(d.ws_url(), headers={"Origin": d.origin})
        for headers in ({"Origin": "http://evil.example"}, {}):
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await s.ws_connect(d.ws_url(), headers=headers)
            assert exc.value.status == 403
        # a wrong key (or not an auth frame) first: closed 4401, no event ever
        for first in ({"type": "auth", "key": "wrong"}, ["auth", d.secret], {"key": d.secret}):
            async with s.ws_connect(d.ws_url(), headers={"Origin": d.origin}) as ws:
                await ws.send_json(first)
                msg = await ws.receive()
                assert msg.type == aiohttp.WSMsgType.CLOSE and ws.close_code == 4401, first
        async with EventSocket(d) as ws:  # the right key: hello with the state
            assert ws.hello is not None and ws.hello["state"]["me"]["address"] == d.address
        # no auth frame at all: closed 4401 after the 5 s grace
        async with silent:
            msg = await silent.receive(timeout=15)
            assert msg.type == aiohttp.WSMsgType.CLOSE and silent.close_code == 4401


def test_hostile_content_round_trips_as_plain_json_strings(
    app_node: NodeProc, new_user: Callable[..., DaemonProc]
) -> None:
    alice = new_user(app_node, "amy")
    bob = new_user(app_node, "ben")
    alice.open_chat(bob.address)
    for text in HOSTILE:
        alice.send(bob.address, text)

    def all_arrived() -> list[dict] | None:  # type: ignore[type-arg]
        got = bob.messages(alice.address)
        return got if len(got) == len(HOSTILE) else None

    got = wait_until(all_arrived, what="bob to receive the hostile texts")
    assert [m["text"] for m in got] == HOSTILE
    _, h, raw = bob.request(
        "GET", f"/api/chats/{alice.address}/messages", headers={"X-Haven-Key": bob.secret}
    )
    assert h["content-type"] == "application/json; charset=utf-8"
    assert [m["text"] for m in json.loads(raw)] == HOSTILE
    # hostile names: a display name and a nickname are returned as exactly that string
    alice.api("PUT", "/api/profile", {"display_name": HOSTILE[1]})
    assert alice.state()["me"]["display_name"] == HOSTILE[1]
    _, c = bob.api("PUT", f"/api/contacts/{alice.address}/nickname", {"nickname": HOSTILE[0]})
    assert c["nickname"] == HOSTILE[0]
    wait_until(
        lambda: any(
            c["address"] == alice.address and c["display_name"] == HOSTILE[1]
            for c in bob.api("GET", "/api/contacts")[1]
        ),
        what="alice's hostile display name at bob, as a plain string",
    )


def test_the_secret_never_reaches_the_logs_and_stdout_is_only_the_url(
    app_node: NodeProc, new_user: Callable[..., DaemonProc]
) -> None:
    d = new_user(app_node, "frank")
    d.api("GET", "/api/chats")
    d.api("GET", "/api/state", key="wrong", expect=401)
    d.api("POST", "/api/chats", {"address": f"nobody@{app_node.host}"}, expect=None)
    d.api("PATCH", "/api/messages/00000000", {"text": "x"}, expect=404)
    d.request("POST", "/api/unlock", b"not json", {"X-Haven-Key": d.secret})
    d.request("GET", "/api/state", headers={"X-Haven-Key": d.secret, "Host": "evil:1"})
    d.request("POST", "/api/join", b"{", {"X-Haven-Key": d.secret, "Origin": d.origin})
    assert d.stop() == 0
    log = d.stderr_text()
    assert log  # it does log (the link, the shutdown) ...
    assert d.secret not in log and d.secret[:12] not in log  # ... never the secret
    assert "Traceback" not in log
    assert d.extra_stdout == []  # the URL was the only line on stdout


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "192.0.2.1:0", "[::]:0", "example.com:0"])
def test_a_non_loopback_listen_address_is_refused(tmp_path, listen: str) -> None:  # type: ignore[no-untyped-def]
    proc = run(["app", "--home", str(tmp_path / "d"), "--listen", listen], timeout=30)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "error: the app listens on loopback only" in proc.stderr
    assert proc.stderr.rstrip().endswith("(bad_argument)")
    assert not (tmp_path / "d").exists()
