"""Lean bench devices: many accounts, raw signed-in connections, bulk sends (``scripts/bench``).

The sections that need hundreds or thousands of devices cannot afford :class:`client.device.Device`
(an Olm account and a SQLite home each). A :class:`RawDevice` is only what the node checks: an
Ed25519 auth key, a mailbox id and a one-device list signed by a fresh identity key. Accounts and
their single-use invites are created with the node stopped, through the store calls that
``haven node invite`` makes (:func:`make_invites`; one store open for all, not one process each).
Devices then redeem them with real ``register`` frames and sign in with real ``auth`` frames,
so admission, registration and sign-in all run the node's own code.

:class:`IdleHolder` keeps thousands of signed-in WebSockets on one shared aiohttp session (one
reader task each, so the node's pings are answered); :func:`send_accept` sends pre-built
``send`` frames with a window of frames in flight and times each frame's ``accepted`` answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import nacl.signing

from client.connection import CLIENT_PATH, NodeConnection
from federation import frames as F
from federation.devicelist import DeviceInfo, DeviceList, coarse_day
from federation.errors import HavenError
from federation.ids import new_mailbox_id
from federation.signing import device_auth_message
from federation.wire import Envelope, packb

DAY_MS = 86_400_000


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode().rstrip("=")


async def make_invites(home: str, names: list[str]) -> list[bytes]:
    """Accounts ``names`` and one invite token each, on a stopped node (as ``node invite``)."""
    from node.app import build
    from node.cli import invite_expiry
    from node.client_api import invite_hash

    node = build(home)
    store = node.store
    await store.open()
    tokens = []
    try:
        now = int(time.time() * 1000)
        for name in names:
            await store.create_account(name, now)
            token = os.urandom(24)
            await store.add_invite(invite_hash(token), name, invite_expiry(now, DAY_MS))
            tokens.append(token)
    finally:
        await store.close()
    return tokens


@dataclass
class RawDevice:
    name: str
    token: bytes
    host: str  # the node's public host (the account address is name@host)
    key: nacl.signing.SigningKey = field(default_factory=nacl.signing.SigningKey.generate)
    mailbox: bytes = field(default_factory=new_mailbox_id)

    def register(self, rid: int, ch: F.Challenge) -> F.Register:
        identity = nacl.signing.SigningKey.generate()
        info = DeviceInfo(
            _b64(os.urandom(32)),  # a device id (its Curve25519 key in the real client)
            _b64(bytes(self.key.verify_key)),
            os.urandom(32),
            self.mailbox,
            coarse_day(int(time.time() * 1000)),
        )
        signed = DeviceList(f"{self.name}@{self.host}", bytes(identity.verify_key), 1, (info,))
        sig = self._sig(ch)
        return F.Register(
            rid, self.token, self.mailbox, bytes(self.key.verify_key), sig, signed.sign(identity)
        )

    def auth(self, rid: int, ch: F.Challenge) -> F.Auth:
        return F.Auth(rid, self.mailbox, self._sig(ch))

    def _sig(self, ch: F.Challenge) -> bytes:
        msg = device_auth_message(ch.node_id, ch.nonce, self.mailbox)
        return bytes(self.key.sign(msg).signature)

    async def connect(self, url: str, first: bool = False) -> NodeConnection:
        """A signed-in :class:`NodeConnection` (``first``: redeem the invite)."""
        conn = NodeConnection(url)
        await conn.__aenter__()
        try:
            ch = conn.challenge
            assert ch is not None
            frame = self.register(conn.next_rid(), ch) if first else self.auth(conn.next_rid(), ch)
            ans = await conn.request(frame)
            if not isinstance(ans, F.Registered | F.AuthOk):
                raise RuntimeError(f"sign-in answered {ans.T}")
        except BaseException:
            await conn.__aexit__(None, None, None)
            raise
        return conn


async def raw_devices(home: Path, host: str, prefix: str, n: int) -> list[RawDevice]:
    """``n`` devices with fresh accounts ``prefix0``... (the node must be stopped)."""
    names = [f"{prefix}{i}" for i in range(n)]
    tokens = await make_invites(str(home), names)
    return [RawDevice(nm, tok, host) for nm, tok in zip(names, tokens, strict=True)]


async def connect_all(
    devs: Sequence[RawDevice], url: str, first: bool, conc: int = 64
) -> list[NodeConnection]:
    sem = asyncio.Semaphore(conc)

    async def one(d: RawDevice) -> NodeConnection:
        async with sem:
            return await d.connect(url, first)

    return list(await asyncio.gather(*(one(d) for d in devs)))


async def close_all(conns: Sequence[NodeConnection]) -> None:
    for c in conns:
        await c.__aexit__(None, None, None)


class IdleHolder:
    """Signed-in WebSockets that only answer pings (``connections`` section)."""

    def __init__(self, url: str) -> None:
        self.url = url + CLIENT_PATH
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.ws: list[aiohttp.ClientWebSocketResponse] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.failed: Counter[str] = Counter()

    async def open(self, dev: RawDevice) -> None:
        try:
            ws = await self.session.ws_connect(self.url, max_msg_size=F.MAX_FRAME)
            ch = F.decode_frame((await ws.receive()).data)
            assert isinstance(ch, F.Challenge)
            await ws.send_bytes(dev.register(1, ch).encode())
            ans = F.decode_frame((await ws.receive()).data)
            if not isinstance(ans, F.Registered):
                self.failed[getattr(ans, "code", ans.T)] += 1
                await ws.close()
                return
        except (aiohttp.ClientError, OSError, HavenError, TypeError) as exc:
            self.failed[type(exc).__name__] += 1
            return
        self.ws.append(ws)
        self.tasks.append(asyncio.create_task(self._idle(ws)))

    async def _idle(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async for _ in ws:  # pings are answered inside receive()
                pass

    async def open_all(self, devs: Sequence[RawDevice], conc: int = 200) -> None:
        sem = asyncio.Semaphore(conc)

        async def one(d: RawDevice) -> None:
            async with sem:
                await self.open(d)

        await asyncio.gather(*(one(d) for d in devs))

    @property
    def open_count(self) -> int:
        return sum(1 for ws in self.ws if not ws.closed)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for ws in self.ws:
            with contextlib.suppress(Exception):
                await ws.close()
        await self.session.close()


# ---- bulk sends -------------------------------------------------------------------------------


def send_frames(
    dest: str, mailboxes: Sequence[bytes], n: int, batch: int, rid0: int, body: int = 1024
) -> list[tuple[int, list[bytes], bytes]]:
    """``(rid, ids, frame bytes)`` for ``n`` envelopes, ``batch`` a frame, mailboxes in turn."""
    expires = int(time.time() * 1000) + DAY_MS
    out: list[tuple[int, list[bytes], bytes]] = []
    m = len(mailboxes)
    for start in range(0, n, batch):
        envs = [
            Envelope(os.urandom(16), mailboxes[(start + j) % m], expires, os.urandom(body))
            for j in range(min(batch, n - start))
        ]
        rid = rid0 + len(out)
        data = packb({"t": "send", "rid": rid, "items": [[dest, e.to_wire()] for e in envs]})
        out.append((rid, [e.id for e in envs], data))
    return out


class _Raw:
    __slots__ = ("data", "rid")

    def __init__(self, rid: int, data: bytes) -> None:
        self.rid, self.data = rid, data

    def encode(self) -> bytes:
        return self.data


async def send_accept(
    conns: Sequence[NodeConnection],
    dest: str,
    mailboxes: Sequence[bytes],
    n: int,
    batch: int,
    inflight: int,
    rate: float = 0.0,
) -> dict[str, Any]:
    """Send ``n`` envelopes (frames round robin over ``conns``, at most ``inflight`` frames
    outstanding in all; ``rate`` > 0 paces frames); count ``accepted`` and time each answer."""
    plans = []
    per = -(-n // len(conns))
    for i, c in enumerate(conns):
        k = min(per, n - i * per)
        if k > 0:
            rid0 = c.next_rid()
            frames = send_frames(dest, mailboxes, k, batch, rid0)
            for _ in frames[1:]:
                c.next_rid()  # keep the connection's rid counter past the pre-built rids
            plans.append((c, frames))
    order: list[tuple[NodeConnection, tuple[int, list[bytes], bytes]]] = []
    longest = max(len(f) for _, f in plans)
    for j in range(longest):
        order.extend((c, f[j]) for c, f in plans if j < len(f))
    sem = asyncio.Semaphore(inflight)
    lat_ms: list[float] = []
    accepted = 0
    rejected: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()

    async def one(conn: NodeConnection, rid: int, n_env: int, data: bytes) -> None:
        nonlocal accepted
        t = time.perf_counter()
        try:
            ans = await conn.request(_Raw(rid, data))  # type: ignore[arg-type]
            if isinstance(ans, F.Accepted):
                accepted += len(ans.ids)
                for _, code in ans.rejected:
                    rejected[code] += 1
            lat_ms.append((time.perf_counter() - t) * 1000.0)
        except HavenError as exc:
            rejected[exc.code] += n_env
        finally:
            sem.release()

    t0 = time.perf_counter()
    for i, (conn, (rid, ids, data)) in enumerate(order):
        if rate > 0:
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
        await sem.acquire()
        task = asyncio.create_task(one(conn, rid, len(ids), data))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(list(tasks), timeout=120)
    wall = time.perf_counter() - t0
    return {
        "n": n,
        "accepted": accepted,
        "rejected": dict(rejected),
        "frames": len(order),
        "envelopes_per_frame": batch,
        "inflight_frames": inflight,
        "offered_frames_per_s": rate or None,
        "wall_s": round(wall, 3),
        "msgs_per_s": round(accepted / wall, 1) if wall > 0 else None,
        "lat_ms": lat_ms,
    }
