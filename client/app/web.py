"""The daemon's local web server: the UI's static files and the JSON/WebSocket API.

Security (docs/app.md "Security model"): it listens on loopback only; the ``Host`` header must
name that loopback ``host:port`` (DNS rebinding: a hostile page's own name resolving to
127.0.0.1 is refused, 421 ``bad_host``); a state-changing request carrying a foreign ``Origin``
is refused (403 ``bad_origin``) and the WebSocket upgrade must carry ours; every ``/api/``
request needs ``X-Haven-Key`` (the per-launch secret, compared in constant time), and the
WebSocket its first frame. No cookie is ever set. Every response carries a strict CSP and the
other headers below; API answers are always JSON, never HTML, and never carry a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

from aiohttp import WSMsgType, web

from federation.errors import HavenError, RemoteProtocolError, TransportError

from .core import AppCore
from .events import event
from .files import FILE_CSP, PREVIEW_MIMES
from .groups import group_id

log = logging.getLogger("haven.app.web")

STATIC = Path(__file__).resolve().parent / "static"
KEY_HEADER = "X-Haven-Key"
WS_AUTH_TIMEOUT_S = 5.0
WS_UNAUTHORIZED = 4401
WS_TOO_SLOW = 4408
WS_INTERNAL = 1011
MAX_BODY = 256 * 1024
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

CORE: web.AppKey[AppCore] = web.AppKey("core", AppCore)
SECRET: web.AppKey[str] = web.AppKey("secret", str)
HOSTS: web.AppKey[set[str]] = web.AppKey("hosts", set)

# HTTP status per error code; anything else: 400 for our own errors, 502 for the node's.
STATUS = {
    "unauthorized": 401,
    "bad_host": 421,
    "bad_origin": 403,
    "bad_request": 400,
    "bad_argument": 400,
    "not_found": 404,
    "locked": 423,
    "not_joined": 409,
    "already_joined": 409,
    "wrong_passphrase": 403,
    "too_many_attempts": 429,
    "no_such_account": 404,
    "node_unreachable": 503,
    "unreachable": 503,
    "not_a_haven_node": 502,
    "identity_changed": 409,
    "ambiguous_id": 400,
    "link_busy": 409,
    "keys_unavailable": 502,
    "rate_limited": 429,
    "too_large": 413,
    "not_downloaded": 409,
    "unknown_group": 404,
    "not_admin": 403,
    "not_member": 403,
    "ambiguous_group": 400,
    "too_many_members": 400,
    "group_too_large": 400,
    "invalid_group_invite": 400,
    "internal": 500,
}
FILE_RESPONSE = "haven.file_response"  # request key: this answer is a file (its own CSP)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error(code: str, message: str = "", status: int | None = None) -> web.Response:
    """The API's error answer: ``{"error": code, "message": text}``."""
    return web.json_response(
        {"error": code, "message": message or code.replace("_", " ")},
        status=status or STATUS.get(code, 400),
    )


def disposition(name: str) -> str:
    """``Content-Disposition: attachment`` with the (already sanitised) name: an ASCII
    fallback (letters, digits and ``._- ()`` only) and the UTF-8 form (RFC 6266 / 8187), so
    no name can inject a header or a parameter."""
    ascii_name = "".join(
        ch if ch.isascii() and (ch.isalnum() or ch in "._- ()") else "_" for ch in name
    )
    return (
        f"attachment; filename=\"{ascii_name or 'file'}\"; filename*=UTF-8''{quote(name, safe='')}"
    )


def csp(host: str) -> str:
    """The Content-Security-Policy for pages served as ``host`` (a checked ``host:port``)."""
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        f"connect-src 'self' ws://{host}; font-src 'self'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    )


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """On every response (errors, static files, the WebSocket handshake too)."""
    h = response.headers
    hosts = request.app[HOSTS]
    host = request.headers.get("Host", "")
    if request.get(FILE_RESPONSE):  # a file's bytes: never a document of this origin
        h["Content-Security-Policy"] = FILE_CSP
        h.setdefault("Content-Disposition", "attachment")
    else:
        h["Content-Security-Policy"] = csp(host if host in hosts else sorted(hosts)[0])
    h["X-Content-Type-Options"] = "nosniff"
    h["Referrer-Policy"] = "no-referrer"
    h["Cross-Origin-Opener-Policy"] = "same-origin"
    h["Cross-Origin-Resource-Policy"] = "same-origin"
    h["X-Frame-Options"] = "DENY"
    if request.path.startswith("/api"):
        h["Cache-Control"] = "no-store"
    h["Server"] = "haven"  # not the framework and its version
    h.popall("Set-Cookie", None)


@web.middleware
async def _check_host(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.headers.get("Host", "") not in request.app[HOSTS]:
        return error("bad_host", "this app answers only on its loopback address")
    return await handler(request)


def _our_origins(app: web.Application) -> set[str]:
    return {f"http://{h}" for h in app[HOSTS]}


@web.middleware
async def _check_origin(request: web.Request, handler: Handler) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if request.method in WRITE_METHODS and origin is not None:
        if origin not in _our_origins(request.app):
            return error("bad_origin", "request from another site refused")
    return await handler(request)


@web.middleware
async def _check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith("/api/") and request.path != "/api/ws":
        given = request.headers.get(KEY_HEADER, "").encode()
        if not hmac.compare_digest(given, request.app[SECRET].encode()):
            return error("unauthorized", "missing or wrong key")
    return await handler(request)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Our errors → their code; aiohttp's → JSON on /api; anything else → 500, no details."""
    try:
        return await handler(request)
    except HavenError as exc:
        status = STATUS.get(exc.code)
        if status is None:
            status = 502 if isinstance(exc, (RemoteProtocolError, TransportError)) else 400
        return error(exc.code, str(exc), status)
    except web.HTTPException as exc:
        if not request.path.startswith("/api"):
            raise
        code = {404: "not_found", 405: "bad_request", 413: "too_large"}.get(
            exc.status, "bad_request"
        )
        return error(code, exc.reason, exc.status)
    except (asyncio.CancelledError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the last boundary: no traceback to the page
        log.error("internal error (%s)", type(exc).__name__)
        return error("internal", "internal error", 500)


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        obj = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise HavenError("the body is not JSON", code="bad_request") from None
    if not isinstance(obj, dict):
        raise HavenError("the body must be a JSON object", code="bad_request")
    return obj


def _ok(obj: Any) -> web.Response:
    return web.json_response(obj)


# ---- static UI -------------------------------------------------------------------------------


async def index(request: web.Request) -> web.StreamResponse:
    """``GET /``: the UI's page (its scripts and styles are under ``/static/``)."""
    page = STATIC / "index.html"
    if not page.is_file():
        return web.Response(status=503, text="the UI files are missing\n")
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


# ---- API -------------------------------------------------------------------------------------


class Api:
    """The handlers of docs/app.md "Local API", each a thin call into :class:`AppCore` named
    after its endpoint (see :meth:`routes`)."""

    def __init__(self, core: AppCore) -> None:
        self.core = core

    def routes(self) -> list[web.RouteDef]:
        """Every endpoint but the WebSocket, as in docs/app.md's table."""
        c = "/api/chats/{address}"
        g = "/api/groups/{ref}"
        return [
            web.get("/api/state", self.state),
            web.post("/api/unlock", self.unlock),
            web.post("/api/join", self.join),
            web.put("/api/profile", self.profile),
            web.get("/api/chats", self.chats),
            web.post("/api/chats", self.open_chat),
            web.get(c + "/messages", self.messages),
            web.post(c + "/messages", self.send),
            web.post(c + "/read", self.read),
            web.put(c + "/timer", self.timer),
            web.patch("/api/messages/{id}", self.edit),
            web.delete("/api/messages/{id}", self.delete),
            web.get("/api/messages/{id}/readers", self.readers),
            web.get("/api/contacts", self.contacts),
            web.put("/api/contacts/{address}/nickname", self.nickname),
            web.get("/api/contacts/{address}/verify", self.verify),
            web.post("/api/contacts/{address}/verify", self.verify),
            web.get("/api/devices", self.devices),
            web.post("/api/devices/link", self.link),
            web.delete("/api/devices/{id}", self.remove_device),
            web.post(c + "/files", self.send_file),
            web.post("/api/messages/{id}/download", self.download),
            web.get("/api/messages/{id}/file", self.file),
            web.get("/api/messages/{id}/thumb", self.thumb),
            web.post("/api/groups", self.group_create),
            web.post("/api/groups/join", self.group_join),
            web.get(g, self.group),
            web.get(g + "/readers", self.group_readers),
            web.post(g + "/members", self.group_add),
            web.delete(g + "/members/{address}", self.group_remove),
            web.put(g + "/admins/{address}", self.group_admin),
            web.put(g + "/name", self.group_rename),
            web.post(g + "/leave", self.group_leave),
            web.post(g + "/invite", self.group_invite),
            web.put("/api/settings", self.settings),
            web.post("/api/passphrase", self.passphrase),
        ]

    async def state(self, r: web.Request) -> web.Response:
        return _ok(self.core.state())

    async def unlock(self, r: web.Request) -> web.Response:
        return _ok(await self.core.unlock((await _body(r)).get("passphrase")))

    async def join(self, r: web.Request) -> web.Response:
        return _ok(await self.core.join(await _body(r)))

    async def profile(self, r: web.Request) -> web.Response:
        return _ok(await self.core.set_profile((await _body(r)).get("display_name")))

    async def chats(self, r: web.Request) -> web.Response:
        return _ok(self.core.chats())

    async def open_chat(self, r: web.Request) -> web.Response:
        return _ok(await self.core.open_chat((await _body(r)).get("address")))

    async def messages(self, r: web.Request) -> web.Response:
        return _ok(self.core.messages(r.match_info["address"]))

    async def send(self, r: web.Request) -> web.Response:
        body = await _body(r)
        return _ok(await self.core.send_text(r.match_info["address"], body.get("text")))

    async def read(self, r: web.Request) -> web.Response:
        return _ok({"count": await self.core.mark_read(r.match_info["address"])})

    async def timer(self, r: web.Request) -> web.Response:
        body = await _body(r)
        return _ok(await self.core.set_timer(r.match_info["address"], body.get("timer_ms")))

    async def edit(self, r: web.Request) -> web.Response:
        body = await _body(r)
        return _ok(await self.core.edit(self.core.message_id(r.match_info["id"]), body.get("text")))

    async def delete(self, r: web.Request) -> web.Response:
        msg_id = self.core.message_id(r.match_info["id"])
        await self.core.delete(msg_id)
        return _ok({"deleted": msg_id.hex()})

    async def readers(self, r: web.Request) -> web.Response:
        msg_id = self.core.message_id(r.match_info["id"])
        return _ok({"devices": await self.core.message_readers(msg_id)})

    # ---- groups (docs/app.md "Groups") -----------------------------------------------------

    async def group_create(self, r: web.Request) -> web.Response:
        body = await _body(r)
        return _ok(await self.core.group_create(body.get("name"), body.get("members", [])))

    async def group_join(self, r: web.Request) -> web.Response:
        return _ok(await self.core.group_join((await _body(r)).get("code")))

    async def group(self, r: web.Request) -> web.Response:
        return _ok(self.core.group_obj(group_id(r.match_info["ref"])))

    async def group_readers(self, r: web.Request) -> web.Response:
        return _ok({"devices": await self.core.group_readers(r.match_info["ref"])})

    async def group_add(self, r: web.Request) -> web.Response:
        return _ok(await self.core.group_change(r.match_info["ref"], "add", await _body(r)))

    async def group_remove(self, r: web.Request) -> web.Response:
        body = {"address": r.match_info["address"]}
        return _ok(await self.core.group_change(r.match_info["ref"], "remove", body))

    async def group_admin(self, r: web.Request) -> web.Response:
        body = {"address": r.match_info["address"], "on": (await _body(r)).get("on")}
        return _ok(await self.core.group_change(r.match_info["ref"], "admin", body))

    async def group_rename(self, r: web.Request) -> web.Response:
        return _ok(await self.core.group_change(r.match_info["ref"], "rename", await _body(r)))

    async def group_leave(self, r: web.Request) -> web.Response:
        return _ok(await self.core.group_change(r.match_info["ref"], "leave", {}))

    async def group_invite(self, r: web.Request) -> web.Response:
        body = await _body(r)
        return _ok(await self.core.group_invite(r.match_info["ref"], body.get("uses", 1)))

    async def send_file(self, r: web.Request) -> web.Response:
        """The raw body is the file; ``?name=`` its name, ``?text=`` a caption, the
        ``Content-Type`` its type, ``?upload=`` the page's handle in ``progress`` events."""
        q = r.query

        async def body() -> AsyncIterator[bytes]:
            async for data in r.content.iter_chunked(1 << 20):
                yield data

        msg = await self.core.send_file(
            r.match_info["address"],
            q.get("name", ""),
            r.headers.get("Content-Type", ""),
            q.get("text", ""),
            body(),
            q.get("upload", ""),
        )
        return _ok(msg)

    async def download(self, r: web.Request) -> web.Response:
        return _ok(await self.core.download(self.core.message_id(r.match_info["id"])))

    async def file(self, r: web.Request) -> web.StreamResponse:
        """A file's bytes: always ``attachment``, ``nosniff``, a sandboxing CSP (set on every
        file answer by :func:`_security_headers`); a type the page may preview keeps its
        image type, anything else (HTML, SVG, …) is ``application/octet-stream``."""
        r[FILE_RESPONSE] = True
        path, att = self.core.file_path(self.core.message_id(r.match_info["id"]))
        mime = att.ref.mime if att.ref.mime in PREVIEW_MIMES else "application/octet-stream"
        headers = {"Content-Type": mime, "Content-Disposition": disposition(att.ref.name)}
        return web.FileResponse(path, headers=headers)

    async def thumb(self, r: web.Request) -> web.Response:
        """An image's thumbnail (made by the sender, inside the E2E payload): a JPEG."""
        r[FILE_RESPONSE] = True
        data = self.core.thumb(self.core.message_id(r.match_info["id"]))
        return web.Response(
            body=data,
            content_type="image/jpeg",
            headers={"Content-Disposition": disposition("thumbnail.jpg")},
        )

    async def contacts(self, r: web.Request) -> web.Response:
        return _ok(self.core.contacts())

    async def nickname(self, r: web.Request) -> web.Response:
        body = await _body(r)
        return _ok(self.core.set_nickname(r.match_info["address"], body.get("nickname", "")))

    async def verify(self, r: web.Request) -> web.Response:
        body = await _body(r) if r.method == "POST" else {}
        return _ok(
            await self.core.verify(
                r.match_info["address"],
                confirm=body.get("confirm") is True,
                accept_new_key=body.get("accept_new_key") is True,
            )
        )

    async def devices(self, r: web.Request) -> web.Response:
        return _ok(await self.core.devices())

    async def link(self, r: web.Request) -> web.Response:
        return _ok(await self.core.link_device())

    async def remove_device(self, r: web.Request) -> web.Response:
        return _ok({"removed": await self.core.remove_device(r.match_info["id"])})

    async def settings(self, r: web.Request) -> web.Response:
        return _ok(self.core.set_settings(await _body(r)))

    async def passphrase(self, r: web.Request) -> web.Response:
        return _ok(self.core.set_passphrase((await _body(r)).get("new")))

    async def ws(self, r: web.Request) -> web.StreamResponse:
        """The event feed: auth frame first (5 s), then ``hello`` and every event."""
        origin = r.headers.get("Origin")
        if origin is None or origin not in _our_origins(r.app):
            return error("bad_origin", "the event socket needs this app's Origin")
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
        await ws.prepare(r)
        if not await _ws_auth(ws, r.app[SECRET]):
            await ws.close(code=WS_UNAUTHORIZED, message=b"unauthorized")
            return ws
        q = self.core.subscribe()
        reader = asyncio.ensure_future(_drain(ws))
        try:
            await ws.send_json(event("hello", state=self.core.state()))
            while not reader.done():
                get = asyncio.ensure_future(q.get())
                await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not get.done():
                    get.cancel()
                    break
                ev = get.result()
                if ev is None:
                    await ws.close(code=WS_TOO_SLOW, message=b"too slow")
                    break
                await ws.send_json(ev)
        except (ConnectionError, RuntimeError):
            pass  # the page went away mid-send
        except Exception as exc:  # noqa: BLE001 - the socket's boundary: close it, no details
            log.error("event socket failed (%s)", type(exc).__name__)
            await ws.close(code=WS_INTERNAL, message=b"internal error")
        finally:
            self.core.unsubscribe(q)
            reader.cancel()
            if not ws.closed:
                await ws.close()
        return ws


async def _ws_auth(ws: web.WebSocketResponse, secret: str) -> bool:
    try:
        async with asyncio.timeout(WS_AUTH_TIMEOUT_S):
            msg = await ws.receive()
    except TimeoutError:
        return False
    if msg.type != WSMsgType.TEXT:
        return False
    try:
        obj = json.loads(msg.data)
    except ValueError:
        return False
    if not isinstance(obj, dict) or obj.get("type") != "auth":
        return False
    key = obj.get("key")
    return isinstance(key, str) and hmac.compare_digest(key.encode(), secret.encode())


async def _drain(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the page sends after auth, until it closes."""
    async for _msg in ws:
        pass


def make_app(core: AppCore, secret: str) -> web.Application:
    """The aiohttp application. Call :func:`set_address` once the real port is known."""
    app = web.Application(
        middlewares=[_check_host, _check_origin, _check_key, _errors], client_max_size=MAX_BODY
    )
    app[CORE] = core
    app[SECRET] = secret
    app[HOSTS] = set()
    app.on_response_prepare.append(_security_headers)
    api = Api(core)
    app.add_routes(api.routes())
    app.add_routes([web.get("/api/ws", api.ws), web.get("/", index)])
    if STATIC.is_dir():
        app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    return app


def set_address(app: web.Application, host: str, port: int) -> None:
    """Accept ``Host`` (and ``Origin``) only for the loopback name and port we listen on."""
    names = {"127.0.0.1", "localhost"} if host.startswith("127.") or host == "localhost" else set()
    names.add(f"[{host}]" if ":" in host else host)
    app[HOSTS].clear()
    app[HOSTS].update(f"{n}:{port}" for n in names)
