"""``scripts/bench`` section ``group`` (issue 10): one sender to groups over 3 nodes.

Three real ``haven node serve`` processes (A, B, C). The sender is a real
:class:`client.device.Device` on A. A group of ``n`` members is the sender and ``n - 1``
**light members** spread round robin over A, B and C (``--group-sizes``, default 10,100,1000;
``--quick``: 10,100; each size gets members of its own, so no Olm session is reused across
sizes). A light member is what a device is to the node and what a recipient has to do, no more:
a vodozemac ``Account``, an X25519 sealing key and a one-device list signed by a fresh identity
key, registered with a real ``register`` frame (an invite made on the stopped node, as
``haven node invite``; the node-wide registration rate is raised in the bench's node.toml), one
one-time key and a fallback key published (signed like a real device's), one WebSocket each on
ONE shared aiohttp session. Every member decrypts what it gets: the 1:1 ``group_key`` (sealed
sender, Olm, payload) into a vodozemac ``InboundGroupSession``, each group copy
(``federation.multi.open_copy``, then Megolm) and acks it. Registration is outside the figures.

Per size (JSON ``group.size_N``):

* ``setup_s``: group creation plus the first send with its key distribution (batched key
  queries, Olm sessions, ``group_key`` envelopes), until every member decrypted that first
  message; ``setup_parts`` splits it where the sender path allows.
* ``upload_bytes_per_msg``: WebSocket payload bytes the sender's device put on its socket for
  one (later) group message, and ``per_recipient_bytes`` = (upload - group body) / recipient
  devices (goal <= 128).
* ``envelopes_handled``: per node, envelopes accepted (from devices and from peers) for one
  message, from each node's ``/metrics``; ``fed_requests``: federation requests the nodes made
  for it.
* ``deliver_s``: p50 and max over members of send start -> that member decrypted it, per
  message (``--group-msgs`` messages after the first), and their median message.
* ``receipts``: one round of reading: each reader sends ONE watermark (a group message to every
  other member device and the sender) as one upload. Every reader for sizes <= 100; a sample of
  ``--receipt-sample`` readers above, with the full round **extrapolated** (labelled so). The
  readers' Megolm keys are handed to the members out of band (in this process): their key
  distribution is not part of the receipt figures.

``multi = false`` comparison (``group.fallback``): a fourth node D with ``multi = false`` and a
second real Device on it sends to the same members of size 100 (and of 1,000 with
``--fallback-1000``); the device then submits per-device envelopes, D forwards them per envelope.
Two runs per size: through the Device API (``device_api.size_N``; a run that does not reach
every member is reported with the sender's warnings, its largest frame and D's refusals) and
through the bench-driven path (``bench_stand_in.size_N``). ``*.ratios_N`` compare each with the
same sender path through A (``size_N`` for the Device, ``group.stand_in_multi.size_N`` for the
bench-driven one, which separates the Device's own costs from the wire's).

The sender path is the Device API (``group_create`` / ``group_send``) when ``client.device``
has it; the bench-driven path (also the whole sender before that API existed) works over the
Device's own Olm account, sessions and connection (``sender_path`` says which): per-address
``query_keys`` (retried while rate-limited) or ``query_keys_multi`` when the home node
advertises ``multi``, ``group_key`` over Olm, one ``send_multi`` (or per-device ``send`` frames
of the same group copies when the node lacks ``multi``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import nacl.public
import nacl.signing
import vodozemac as vz
from bench_node import NodeProc, log
from bench_raw import make_invites

from client.connection import CLIENT_PATH, NodeConnection
from client.device import OTK_TAG, Device
from federation import frames as F
from federation import multi as M
from federation.devicelist import DeviceInfo, DeviceList, SignedDeviceList, coarse_day
from federation.errors import HavenError, KeysUnavailable, MalformedEnvelope
from federation.ids import new_envelope_id, new_mailbox_id
from federation.sealing import SealedContent, opener, seal, unseal
from federation.signing import device_auth_message
from federation.wire import Envelope, packb, unpackb

DAY_MS = 86_400_000
NODE_CONFIG: dict[str, Any] = {"registrations_per_minute": 1_000_000}
DELIVER_WAIT_S = 120.0


def _raw(b64: str) -> bytes:
    import base64

    return base64.b64decode(b64 + "=" * (-len(b64) % 4))


def node_config(multi: bool) -> dict[str, Any]:
    """The bench's node.toml overrides; ``multi`` only where this version has the option."""
    from node.config import NodeConfig

    names = {f.name for f in dataclasses.fields(NodeConfig)}
    return NODE_CONFIG | ({"multi": multi} if "multi" in names else {})


def has_multi_option() -> bool:
    from node.config import NodeConfig

    return "multi" in {f.name for f in dataclasses.fields(NodeConfig)}


# ---- light members ----------------------------------------------------------------------------


class Member:
    """A light group member: keys, one WebSocket, decrypts and acks what it receives."""

    def __init__(self, name: str, token: bytes, node: NodeProc) -> None:
        self.account = vz.Account()
        self.sealing = nacl.public.PrivateKey.generate()
        self.sealing_raw = bytes(self.sealing)
        self.sealing_pub = bytes(self.sealing.public_key)
        self.box = opener(self.sealing_raw)
        self.identity = nacl.signing.SigningKey.generate()
        self.mailbox = new_mailbox_id()
        self.token = token
        self.node = node
        self.address = f"{name}@{node.host}"
        self.device_id = str(self.account.curve25519_key.to_base64())
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.features: tuple[str, ...] = ()
        self.waiters: dict[int, asyncio.Future[F.Frame]] = {}
        self.rid = 0
        self.olm: dict[str, list[vz.Session]] = {}
        self.inbound: dict[tuple[str, str], vz.InboundGroupSession] = {}
        self.held: list[M.GroupInner] = []  # group copies that came before their key
        self.got: dict[str, float] = {}  # message text -> perf_counter() when decrypted
        self.kinds: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.copies = 0  # group copies received (receipt round)
        self.outbound: vz.GroupSession | None = None  # this member's own (receipts)

    def info(self) -> DeviceInfo:
        return DeviceInfo(
            self.device_id,
            str(self.account.ed25519_key.to_base64()),
            self.sealing_pub,
            self.mailbox,
            coarse_day(int(time.time() * 1000)),
        )

    def _sign(self, msg: bytes) -> bytes:
        return _raw(str(self.account.sign(msg).to_base64()))

    def next_rid(self) -> int:
        self.rid += 1
        return self.rid

    async def request(self, frame: F.Frame) -> F.Frame:
        assert self.ws is not None
        rid: int = getattr(frame, "rid")  # noqa: B009
        fut: asyncio.Future[F.Frame] = asyncio.get_running_loop().create_future()
        self.waiters[rid] = fut
        await self.ws.send_bytes(frame.encode())
        async with asyncio.timeout(60):
            ans = await fut
        if isinstance(ans, F.Error):
            raise RuntimeError(f"node answered {ans.code}")
        return ans

    async def register(self, session: aiohttp.ClientSession) -> None:
        """Redeem the invite over a real ``register`` frame and publish one one-time key and a
        fallback key, both signed by the device's Ed25519 key as a real device does."""
        ws = await session.ws_connect(self.node.url + CLIENT_PATH, max_msg_size=F.MAX_FRAME)
        ch = F.decode_frame((await ws.receive()).data)
        assert isinstance(ch, F.Challenge)
        self.features = tuple(getattr(ch, "features", ()))
        dl = DeviceList(self.address, bytes(self.identity.verify_key), 1, (self.info(),))
        sig = self._sign(device_auth_message(ch.node_id, ch.nonce, self.mailbox))
        reg = F.Register(
            1,
            self.token,
            self.mailbox,
            _raw(str(self.account.ed25519_key.to_base64())),
            sig,
            dl.sign(self.identity),
        )
        await ws.send_bytes(reg.encode())
        ans = F.decode_frame((await ws.receive()).data)
        if not isinstance(ans, F.Registered):
            raise RuntimeError(f"register answered {getattr(ans, 'code', ans.T)}")
        self.ws, self.rid = ws, 1
        acct: Any = self.account
        acct.generate_one_time_keys(1)
        acct.generate_fallback_key()

        def signed(items: Any) -> tuple[tuple[str, str], ...]:
            out = []
            for k, v in items:
                key = v.to_base64()
                out.append((k, f"{key}:{self.account.sign(OTK_TAG + key.encode()).to_base64()}"))
            return tuple(out)

        frame = F.PublishKeys(
            2, signed(acct.one_time_keys.items()), signed(acct.fallback_key.items())[:1], None
        )
        await ws.send_bytes(frame.encode())
        ok = F.decode_frame((await ws.receive()).data)
        if not isinstance(ok, F.Ok):
            raise RuntimeError(f"publish_keys answered {getattr(ok, 'code', ok.T)}")
        acct.mark_keys_as_published()
        self.rid = 2

    async def run(self, world: World) -> None:
        """Read frames: decrypt and ack deliveries, complete request futures."""
        assert self.ws is not None
        with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.CancelledError):
            async for msg in self.ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                try:
                    frame = F.decode_frame(msg.data)
                except HavenError:
                    self.errors["frame"] += 1
                    continue
                if isinstance(frame, F.Deliver):
                    for env in frame.envs:
                        self.handle(world, env.body)
                    await self.ws.send_bytes(F.Ack(tuple(e.id for e in frame.envs)).encode())
                    world.changed.set()
                    continue
                fut = self.waiters.pop(getattr(frame, "rid", 0), None)
                if fut is not None and not fut.done():
                    fut.set_result(frame)

    # -- decrypting --

    def handle(self, world: World, body: bytes) -> None:
        try:
            inner = M.open_copy(self.sealing_raw, self.sealing_pub, body)
        except MalformedEnvelope:
            inner = None
        if inner is not None:
            self.copies += 1
            if inner.kind == M.INNER_MEGOLM:
                self.open_megolm(world, inner)
            else:
                self.kinds[f"inner_{inner.kind}"] += 1
            return
        try:
            sc = unseal(self.sealing_raw, body, box=self.box)
            plain = self.open_olm(sc)
            p = unpackb(plain, max_len=len(plain))
        except (HavenError, ValueError) as exc:
            self.errors[getattr(exc, "code", "malformed")] += 1
            return
        kind = str(p.get("kind", ""))
        self.kinds[kind] += 1
        if kind == "group_key":
            gk = unpackb(p["gkey"], max_len=len(p["gkey"]))
            try:
                sess = vz.InboundGroupSession(vz.SessionKey(gk["k"]))
            except Exception:  # noqa: BLE001 - an exported key (vodozemac's errors unexported)
                sess = vz.InboundGroupSession.import_session(vz.ExportedSessionKey(gk["k"]))
            self.inbound[(sc.sender_device, str(gk["s"]))] = sess
            held, self.held = self.held, []
            for inner in held:
                self.open_megolm(world, inner)

    def open_olm(self, sc: SealedContent) -> bytes:
        try:
            msg = vz.AnyOlmMessage.from_parts(sc.olm_type, sc.olm_body)
        except Exception as exc:
            raise MalformedEnvelope("bad olm") from exc
        for s in self.olm.get(sc.sender_device, []):
            with contextlib.suppress(Exception):
                return bytes(s.decrypt(msg))
        if sc.olm_type != 0:
            raise MalformedEnvelope("no olm session")
        session, plain = self.account.create_inbound_session(
            vz.Curve25519PublicKey.from_base64(sc.sender_device), msg.to_pre_key()
        )
        self.olm.setdefault(sc.sender_device, []).insert(0, session)
        return bytes(plain)

    def open_megolm(self, world: World, inner: M.GroupInner) -> None:
        sid, mm = unpackb(inner.data, max_len=len(inner.data))
        sess = self.inbound.get((inner.sender_device, sid)) or world.shared.get(sid)
        if sess is None:
            self.held.append(inner)
            return
        try:
            dec = sess.decrypt(vz.MegolmMessage.from_bytes(mm))
        except Exception:  # noqa: BLE001 - vodozemac's errors are not exported
            self.errors["megolm"] += 1
            return
        p = unpackb(dec.plaintext, max_len=len(dec.plaintext))
        kind = str(p.get("kind", ""))
        self.kinds["group_" + kind] += 1
        if kind == "text":
            self.got.setdefault(str(p.get("text", "")), time.perf_counter())


class World:
    """The nodes, the light members and their shared aiohttp session."""

    def __init__(self, nodes: list[NodeProc]) -> None:
        self.nodes = nodes
        self.members: list[Member] = []
        self.session: aiohttp.ClientSession | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.changed = asyncio.Event()
        self.shared: dict[str, vz.InboundGroupSession] = {}  # readers' sessions (out of band)

    async def add_members(self, prefix: str, n: int) -> list[Member]:
        """``n`` accounts, round robin over the first three nodes (which must be stopped)."""
        made: list[Member] = []
        for j, node in enumerate(self.nodes[:3]):
            names = [f"{prefix}{i}" for i in range(j, n, 3)]
            if names:
                toks = await make_invites(str(node.home), names)
                made += [Member(nm, t, node) for nm, t in zip(names, toks, strict=True)]
        made.sort(key=lambda m: int(m.address.split("@")[0][len(prefix) :]))
        self.members += made
        return made

    async def connect(self, members: Sequence[Member], conc: int = 64) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        sem = asyncio.Semaphore(conc)

        async def one(m: Member) -> None:
            async with sem:
                await m.register(self.session)  # type: ignore[arg-type]
            self.tasks.append(asyncio.create_task(m.run(self)))

        await asyncio.gather(*(one(m) for m in members))

    async def introduce(self) -> None:
        """Let every node resolve and pin every other one (a key query from a member on each
        node for a member on each other node), as readers' own key queries would."""
        first: dict[str, Member] = {}
        for m in self.members:
            first.setdefault(m.node.node_id, m)
        for a in first.values():
            for b in first.values():
                if a is not b:
                    ans = await a.request(F.QueryKeys(a.next_rid(), b.address, False))
                    if not isinstance(ans, F.Keys):
                        raise RuntimeError("a node could not resolve another")

    async def wait(self, done: Any, deadline_s: float) -> bool:
        """Poll ``done()`` whenever a member handled a delivery, until ``deadline_s``."""
        end = time.perf_counter() + deadline_s
        while not done():
            left = end - time.perf_counter()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await self.changed.wait()
        return True

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for m in self.members:
            if m.ws is not None:
                with contextlib.suppress(Exception):
                    await m.ws.close()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()


# ---- node metrics -----------------------------------------------------------------------------


def scrape(node: NodeProc) -> dict[str, float]:
    """The node's counters from its admin listener's ``/metrics`` (no ids, no addresses)."""
    import json

    url = json.loads((node.home / "admin.json").read_text())["url"]
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        if name.startswith(
            ("haven_envelopes", "haven_federation", "haven_deliver", "haven_refused")
        ):
            out[name] = float(value)
    return out


def refused_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    """``haven_refused_total`` growth by label set (surface and stable code)."""
    out = {}
    for k, v in after.items():
        if k.startswith("haven_refused_total") and v - before.get(k, 0.0) > 0:
            out[k.removeprefix("haven_refused_total")] = int(v - before.get(k, 0.0))
    return out


def counters(nodes: Sequence[NodeProc]) -> list[dict[str, float]]:
    return [scrape(n) for n in nodes]


def node_delta(before: list[dict[str, float]], after: list[dict[str, float]]) -> dict[str, Any]:
    """Per node: envelopes accepted (from devices + from peers), delivered, federation
    requests out; and the federation requests of all nodes together."""
    per: list[dict[str, int]] = []
    fed = 0
    for b, a in zip(before, after, strict=True):

        def d(prefix: str, a: dict[str, float] = a, b: dict[str, float] = b) -> int:
            return int(sum(v - b.get(k, 0.0) for k, v in a.items() if k.startswith(prefix)))

        out_req = d('haven_federation_requests_total{direction="out"')
        fed += out_req
        per.append(
            {
                "accepted_from_devices": d('haven_envelopes_accepted_total{surface="client"'),
                "accepted_from_peers": d('haven_envelopes_accepted_total{surface="federation"'),
                "delivered": d("haven_envelopes_delivered_total"),
                "fed_requests_out": out_req,
                "fed_envelopes_out": d("haven_federation_envelopes_out_total"),
            }
        )
    handled = [p["accepted_from_devices"] + p["accepted_from_peers"] for p in per]
    return {"envelopes_handled": handled, "fed_requests": fed, "per_node": per}


# ---- the sender -------------------------------------------------------------------------------


class ByteCounter:
    """Counts the WebSocket payload bytes a connection sends (wraps ``send_bytes``)."""

    def __init__(self, conn: NodeConnection) -> None:
        ws: Any = conn._ws
        self.sent = 0
        self.frames: Counter[str] = Counter()
        self.body = 0  # group body bytes of send_multi frames
        self.recipients = 0
        self.largest = 0  # the largest frame sent since reset (bytes)
        self.t0 = time.perf_counter()
        self.times: dict[str, list[float]] = {}  # frame type -> [first, last] sent, since reset
        orig = ws.send_bytes

        async def send_bytes(data: bytes, *a: Any, **k: Any) -> None:
            self.sent += len(data)
            self.largest = max(self.largest, len(data))
            with contextlib.suppress(HavenError, ValueError):
                fr = F.decode_frame(data)
                self.frames[fr.T] += 1
                now = time.perf_counter() - self.t0
                self.times.setdefault(fr.T, [now, now])[1] = now
                if isinstance(fr, F.SendMulti):
                    self.body += len(fr.body)
                    self.recipients += sum(len(r) for _, r in fr.dests)
                elif isinstance(fr, F.Send):
                    self.recipients += len(fr.items)
            await orig(data, *a, **k)

        ws.send_bytes = send_bytes

    def reset(self) -> None:
        self.sent, self.body, self.recipients, self.largest = 0, 0, 0, 0
        self.frames.clear()
        self.times.clear()
        self.t0 = time.perf_counter()

    def timeline(self) -> dict[str, list[float]]:
        """When each frame type first and last went out since :meth:`reset` (s)."""
        return {k: [round(v[0], 3), round(v[1], 3)] for k, v in self.times.items()}


class StandIn:
    """The group sender path driven here over a real Device (no Device group API yet)."""

    def __init__(self, dev: Device, conn: NodeConnection) -> None:
        self.dev, self.conn = dev, conn
        ch = conn.challenge
        self.multi = ch is not None and M.FEATURE in tuple(getattr(ch, "features", ()))
        self.gid = os.urandom(16)
        self.gs = vz.GroupSession()
        self.targets: list[tuple[str, DeviceInfo]] = []  # (node id, device)
        self.parts: dict[str, float] = {}

    async def setup(self, addresses: list[str]) -> None:
        """Key queries (claiming), Olm sessions and the ``group_key`` envelopes."""
        t = time.perf_counter()
        found: list[tuple[str, DeviceList, dict[str, tuple[str, str]], str]] = []
        if self.multi:
            for i in range(0, len(addresses), F.MAX_KEY_QUERY):
                chunk = tuple(addresses[i : i + F.MAX_KEY_QUERY])
                ans = await self.conn.request(
                    F.QueryKeysMulti(self.conn.next_rid(), chunk, True)  # type: ignore[call-arg]
                )
                for addr, node_id, signed, claimed, code in ans.results:  # type: ignore[attr-defined]
                    if code or signed is None:
                        raise RuntimeError(f"key query failed ({code})")
                    dl = SignedDeviceList(signed.blob, signed.signature).open(expected_address=addr)
                    found.append((addr, dl, dict(claimed), node_id))
        else:
            waits = 0
            for addr in addresses:
                while True:
                    try:
                        contact, dl, claimed = await self.dev.fetch_contact(
                            self.conn, addr, claim=True
                        )
                        break
                    except KeysUnavailable as exc:  # the remote key-query rate (20/s)
                        if "rate_limited" not in str(exc):
                            raise
                        waits += 1
                        await asyncio.sleep(0.05)  # a rate limit's refill, not synchronisation
                found.append((addr, dl, claimed, contact.node_id))
            self.parts["key_query_rate_limited_retries"] = waits
        self.parts["key_queries_s"] = time.perf_counter() - t
        t = time.perf_counter()
        now = int(time.time() * 1000)
        gkey = packb({"g": self.gid, "s": self.gs.session_id, "k": self.gs.session_key.to_base64()})
        items: list[tuple[str, Envelope]] = []
        st: Any = self.dev.state
        with st.tx() as db:
            for addr, dl, claimed, node_id in found:
                payload = packb(
                    {
                        "v": 1,
                        "id": os.urandom(16),
                        "kind": "group_key",
                        "to": addr,
                        "sent_at": now,
                        "gkey": gkey,
                    }
                )
                for d in dl.devices:
                    olm = self.dev._encrypt_for(db, d, claimed.get(d.device_id), payload, now)
                    if olm is None:
                        raise RuntimeError("no key to start an Olm session")
                    sc = SealedContent(self.dev.address, self.dev.curve_key, *olm)
                    items.append((node_id, Envelope(new_envelope_id(), d.mailbox, now + DAY_MS,
                                                    seal(d.sealing, sc))))  # fmt: skip
                    self.targets.append((node_id, d))
        self.parts["olm_encrypt_s"] = time.perf_counter() - t
        t = time.perf_counter()
        await self._send_items(items)
        self.parts["group_key_upload_s"] = time.perf_counter() - t

    async def _send_items(self, items: list[tuple[str, Envelope]]) -> None:
        reqs = []
        for i in range(0, len(items), 200):
            reqs.append(self.conn.request(F.Send(self.conn.next_rid(), tuple(items[i : i + 200]))))
        for ans in await asyncio.gather(*reqs):
            if not isinstance(ans, F.Accepted) or ans.rejected:
                raise RuntimeError(f"send refused: {getattr(ans, 'rejected', ans)}")

    async def send(self, text: str) -> None:
        """One group message: Megolm, sealed once; one ``send_multi`` or per-device envelopes."""
        now = int(time.time() * 1000)
        payload = packb(
            {"v": 1, "id": os.urandom(16), "kind": "text", "to": "group:" + self.gid.hex(),
             "sent_at": now, "text": text}
        )  # fmt: skip
        data = packb([self.gs.session_id, self.gs.encrypt(payload).to_bytes()])
        inner = M.GroupInner(M.INNER_MEGOLM, self.dev.address, self.dev.curve_key, data)
        sealed = M.seal_multi(inner, [d.sealing for _, d in self.targets])
        expires = now + DAY_MS
        if self.multi:
            by: dict[str, list[tuple[bytes, bytes, bytes]]] = {}
            for i, (node_id, d) in enumerate(self.targets):
                by.setdefault(node_id, []).append((new_envelope_id(), d.mailbox, sealed.headers[i]))
            frame = F.SendMulti(  # type: ignore[call-arg]
                self.conn.next_rid(),
                sealed.eph,
                expires,
                sealed.gbody,
                tuple((n, tuple(r)) for n, r in by.items()),
            )
            ans = await self.conn.request(frame)
            if not isinstance(ans, F.Accepted) or ans.rejected:
                raise RuntimeError(f"send_multi refused: {getattr(ans, 'rejected', ans)}")
            return
        items = [
            (node_id, Envelope(new_envelope_id(), d.mailbox, expires, sealed.copy_for(i)))
            for i, (node_id, d) in enumerate(self.targets)
        ]
        await self._send_items(items)


class Sender:
    """One real Device and its connection; the Device group API or :class:`StandIn`."""

    def __init__(self, dev: Device, conn: NodeConnection, stand_in: bool = False) -> None:
        self.dev, self.conn = dev, conn
        counter: Any = getattr(conn, "_bench_bytes", None)
        if counter is None:  # one counter per connection, however many senders use it
            counter = ByteCounter(conn)
            conn._bench_bytes = counter  # type: ignore[attr-defined]
        self.bytes: ByteCounter = counter
        self.api = not stand_in and hasattr(dev, "group_send") and hasattr(dev, "group_create")
        self.warnings: Counter[str] = Counter()  # the Device's send warnings, by code
        self.path = "device_api" if self.api else "bench_stand_in"
        self.gid = b""
        self.standin: StandIn | None = None

    async def create(self, name: str, addresses: list[str]) -> dict[str, float]:
        t = time.perf_counter()
        if self.api:
            info = await self.dev.group_create(name, addresses, conn=self.conn)  # type: ignore[attr-defined]
            self.gid = info.gid
            return {"group_create_s": time.perf_counter() - t}
        self.standin = StandIn(self.dev, self.conn)
        await self.standin.setup(addresses)
        self.gid = self.standin.gid
        return {"group_create_s": 0.0, **self.standin.parts}

    async def send(self, text: str) -> None:
        if self.api:
            res = await self.dev.group_send(self.gid, text, conn=self.conn)  # type: ignore[attr-defined]
            for w in res.warnings:
                self.warnings[w.code] += 1
        else:
            assert self.standin is not None
            await self.standin.send(text)


# ---- one size ---------------------------------------------------------------------------------


class Incomplete(RuntimeError):
    """A message did not reach every member within the deadline."""


def _lat(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"p50": round(s[len(s) // 2], 4), "max": round(s[-1], 4)} if s else {}


async def one_size(
    args: argparse.Namespace,
    world: World,
    sender: Sender,
    members: list[Member],
    label: str,
    receipts: bool = True,
) -> dict[str, Any]:
    """Create the group, send ``--group-msgs + 1`` messages, then one round of reading."""
    n = len(members) + 1
    addrs = [m.address for m in members]
    nodes = world.nodes
    log(f"group {label}: {n} members, sender path {sender.path}")
    sender.bytes.reset()
    c_setup = counters(nodes)
    t0 = time.perf_counter()
    parts = await sender.create(f"bench {label}", addrs)
    first = f"{label}-0"
    t1 = time.perf_counter()
    await sender.send(first)
    t_acc = time.perf_counter()
    # members the sender warned it skipped will not get it: do not wait the full deadline
    wait_s = DELIVER_WAIT_S if not sender.warnings else 10.0
    ok = await world.wait(lambda: all(first in m.got for m in members), wait_s)
    t2 = time.perf_counter()
    if not ok:
        missing = sum(1 for m in members if first not in m.got)
        errs = sum((m.errors for m in members), Counter())
        raise Incomplete(
            f"{missing}/{len(members)} members lack the first message "
            f"(sender warnings {dict(sender.warnings)}, member errors {dict(errs)})"
        )
    setup = {
        **{k: round(v, 3) for k, v in parts.items()},
        "frames": dict(sender.bytes.frames),
        "frame_timeline_s": sender.bytes.timeline(),
        "upload_bytes": sender.bytes.sent,
        "fed_requests": node_delta(c_setup, counters(nodes))["fed_requests"],
        "first_send_accepted_s": round(t_acc - t1, 3),
        "first_message_all_decrypted_s": round(t2 - t1, 3),
    }
    log(f"group {label}: setup {t2 - t0:.2f}s")
    msgs: list[dict[str, Any]] = []
    for i in range(1, args.group_msgs + 1):
        text = f"{label}-{i}"
        sender.bytes.reset()
        c0 = counters(nodes)
        t = time.perf_counter()
        await sender.send(text)
        ta = time.perf_counter()
        ok = await world.wait(lambda text=text: all(text in m.got for m in members), DELIVER_WAIT_S)
        if not ok:
            missing = sum(1 for m in members if text not in m.got)
            raise Incomplete(f"message {i}: {missing}/{len(members)} members lack it")
        # the nodes count acks as they commit them: poll until the counters settle
        c1 = await settled(nodes, lambda c: sum(x["delivered"] for x in c["per_node"]), n - 1, c0)
        lat = [m.got[text] - t for m in members]
        up = sender.bytes
        msgs.append(
            {
                "upload_bytes": up.sent,
                "body_bytes": up.body,
                "recipient_devices": up.recipients,
                "frames": dict(up.frames),
                "frame_timeline_s": up.timeline(),
                "accepted_s": round(ta - t, 4),
                "deliver_s": _lat(lat),
                **c1,
            }
        )
    mid = sorted(msgs, key=lambda m: m["deliver_s"]["max"])[len(msgs) // 2]
    rec = mid["recipient_devices"] or (n - 1)
    out: dict[str, Any] = {
        "members": n,
        "recipient_devices": rec,
        "sender_path": sender.path,
        "setup_s": round(t2 - t0, 3),
        "setup_parts": setup,
        "upload_bytes_per_msg": mid["upload_bytes"],
        "body_bytes": mid["body_bytes"],
        "per_recipient_bytes": round((mid["upload_bytes"] - mid["body_bytes"]) / rec, 1),
        "envelopes_handled": mid["envelopes_handled"],
        "fed_requests": mid["fed_requests"],
        "deliver_s": mid["deliver_s"],
        "deliver_s_per_msg": [m["deliver_s"] for m in msgs],
        "sender_warnings": dict(sender.warnings),
        "messages": msgs,
    }
    if receipts:
        out["receipts"] = await receipt_round(args, world, sender, members, label)
    return out


async def settled(
    nodes: Sequence[NodeProc], value: Any, target: int, c0: list[dict[str, float]]
) -> dict[str, Any]:
    """Node counter deltas once ``value(delta) >= target`` and two scrapes 0.1 s apart agree
    (a node counts a federation request when its answer is in, which can be after the
    recipients acked), or after 10 s of polling."""
    end = time.perf_counter() + 10
    last: dict[str, Any] | None = None
    while True:
        d = node_delta(c0, counters(nodes))
        if (value(d) >= target and d == last) or time.perf_counter() > end:
            return d
        last = d
        await asyncio.sleep(0.1)  # polling counters with a deadline, not synchronisation


# ---- receipts ---------------------------------------------------------------------------------


async def receipt_round(
    args: argparse.Namespace, world: World, sender: Sender, members: list[Member], label: str
) -> dict[str, Any]:
    """Each reader sends one watermark to every other member device and the sender."""
    n = len(members)
    readers = (
        members if n <= 100 else members[:: max(1, n // args.receipt_sample)][: args.receipt_sample]
    )
    sdev = sender.dev
    s_info = _own_info(sdev)
    for m in members:
        m.copies = 0
    for r in readers:
        if r.outbound is None:
            r.outbound = vz.GroupSession()
        world.shared[r.outbound.session_id] = vz.InboundGroupSession(r.outbound.session_key)
    c0 = counters(world.nodes)
    sent_bytes = 0
    t = time.perf_counter()

    async def read(r: Member) -> int:
        assert r.outbound is not None and r.ws is not None
        now = int(time.time() * 1000)
        payload = packb(
            {"v": 1, "id": os.urandom(16), "kind": "read", "to": "group:" + sender.gid.hex(),
             "sent_at": now, "wm": {sdev.address: now}}
        )  # fmt: skip
        data = packb([r.outbound.session_id, r.outbound.encrypt(payload).to_bytes()])
        inner = M.GroupInner(M.INNER_MEGOLM, r.address, r.device_id, data)
        to = [(m.node.node_id, m.mailbox, m.sealing_pub) for m in members if m is not r]
        to.append((sdev.node_id, sdev.mailbox, s_info))
        sealed = M.seal_multi(inner, [pk for _, _, pk in to])
        expires = now + DAY_MS
        if M.FEATURE in r.features:
            by: dict[str, list[tuple[bytes, bytes, bytes]]] = {}
            for i, (node_id, mb, _) in enumerate(to):
                by.setdefault(node_id, []).append((new_envelope_id(), mb, sealed.headers[i]))
            frames: list[F.Frame] = [
                F.SendMulti(  # type: ignore[call-arg]
                    r.next_rid(), sealed.eph, expires, sealed.gbody,
                    tuple((k, tuple(v)) for k, v in by.items()),
                )
            ]  # fmt: skip
        else:
            envs = [
                (node_id, Envelope(new_envelope_id(), mb, expires, sealed.copy_for(i)))
                for i, (node_id, mb, _) in enumerate(to)
            ]
            frames = [
                F.Send(r.next_rid(), tuple(envs[i : i + 200])) for i in range(0, len(envs), 200)
            ]
        size = 0
        for fr in frames:
            raw = fr.encode()
            size += len(raw)
            ans = await r.request(fr)
            if not isinstance(ans, F.Accepted) or ans.rejected:
                codes = sorted({c for _, c in getattr(ans, "rejected", ())})
                raise RuntimeError(f"a watermark was refused ({', '.join(codes) or ans.T})")
        return size

    sem = asyncio.Semaphore(32)

    async def bounded(r: Member) -> int:
        async with sem:
            return await read(r)

    sizes = await asyncio.gather(*(bounded(r) for r in readers))
    sent_bytes = sum(sizes)
    want = {id(m): len(readers) - (1 if m in readers else 0) for m in members}
    ok = await world.wait(lambda: all(m.copies >= want[id(m)] for m in members), DELIVER_WAIT_S)
    wall = time.perf_counter() - t
    expected = sum(want.values())
    c1 = await settled(
        world.nodes, lambda c: sum(x["delivered"] for x in c["per_node"]), expected, c0
    )
    got = sum(m.copies for m in members)
    decrypted = sum(m.kinds["group_read"] for m in members)
    envelopes = got + len(readers)  # + one copy each for the sender's device (left pending)
    out: dict[str, Any] = {
        "readers": len(readers),
        "complete": ok,
        "receipt_bytes": sent_bytes,
        "receipt_envelopes": envelopes,
        "receipt_bytes_per_reader": round(sent_bytes / len(readers), 1),
        "copies_decrypted_by_members": decrypted,
        "wall_s": round(wall, 3),
        "envelopes_handled": c1["envelopes_handled"],
        "fed_requests": c1["fed_requests"],
        "note": "readers' Megolm keys handed over out of band (not measured)",
    }
    if len(readers) < n:
        scale = n / len(readers)
        out["extrapolated_full_round"] = {
            "label": f"EXTRAPOLATED linearly from {len(readers)} of {n} readers, not measured",
            "readers": n,
            "receipt_bytes": round(sent_bytes * scale),
            "receipt_envelopes": n * n,  # each reader's copy to n - 1 members + the sender
        }
    return out


def _own_info(dev: Device) -> bytes:
    """The sender device's public sealing key."""
    return bytes(nacl.public.PrivateKey(dev._sealing()).public_key)


# ---- the section ------------------------------------------------------------------------------


async def group(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """The ``group`` section (module docstring)."""
    from bench_sections import raise_fd_limit

    sizes = [int(s) for s in str(args.group_sizes).split(",") if s.strip()]
    cmp_sizes = [s for s in sizes if s == 100 or (s == 1000 and args.fallback_1000)]
    if not cmp_sizes and sizes:
        cmp_sizes = [sizes[-1]] if args.quick or max(sizes) < 100 else []
    raise_fd_limit()
    logging.getLogger("haven").setLevel(logging.ERROR)  # skipped members are counted instead
    with_d = has_multi_option() and bool(cmp_sizes)
    nodes = [NodeProc.create(base, f"group-{x}", **node_config(True)) for x in "abc"]
    if with_d:
        nodes.append(NodeProc.create(base, "group-d", **node_config(False)))
    world = World(nodes)
    per_size: dict[int, list[Member]] = {}
    t = time.perf_counter()
    for s in sizes:
        per_size[s] = await world.add_members(f"m{s}x", s - 1)
    inv = [n.invite(f"sender{i}") for i, n in enumerate(nodes[:1] + nodes[3:])]
    for nd in nodes:
        nd.start()
    out: dict[str, Any] = {}
    devs: list[Device] = []
    conns: list[NodeConnection] = []
    try:
        await world.connect(world.members)
        await world.introduce()
        reg_s = time.perf_counter() - t
        log(f"group: {len(world.members)} light members registered in {reg_s:.1f}s")
        dev = Device(str(base / "dev-sender-a"))
        await dev.join(inv[0])
        devs.append(dev)
        conns.append(await dev.connect())
        sender = Sender(dev, conns[0])
        from bench_sections import _BENCH_PARTIAL

        _BENCH_PARTIAL["group"] = out  # the sizes done are kept if a later one fails
        out["sender_path"] = sender.path
        out["home_node_multi"] = M.FEATURE in tuple(getattr(conns[0].challenge, "features", ()))
        for s in sizes:
            out[f"size_{s}"] = await one_size(args, world, sender, per_size[s], f"g{s}")
        if sender.api:  # the bench-driven path through A too: Device costs vs wire costs
            out["stand_in_multi"] = sm = {"home_node_multi": out["home_node_multi"]}
            for s in cmp_sizes:
                conns.append(await dev.connect())
                devs.insert(0, dev)  # keeps conns[i] paired with the device that opened it
                si = Sender(dev, conns[-1], stand_in=True)
                try:
                    sm[f"size_{s}"] = await one_size(
                        args, world, si, per_size[s], f"sm{s}", receipts=False
                    )
                except (Incomplete, HavenError) as exc:
                    sm[f"size_{s}"] = {"error": str(exc)}
        if with_d:
            d = Device(str(base / "dev-sender-d"))
            devs.append(d)  # closed below even if joining fails
            await d.join(inv[1])
            out["fallback"] = fo = {"home_node_multi": False}
            # the Device's own per-device path, then the bench-driven one (like for like)
            for stand_in in (False, True) if sender.api else (True,):
                for s in cmp_sizes:
                    conns.append(await d.connect())  # a connection per run: a failure ends one
                    fb = Sender(d, conns[-1], stand_in=stand_in)
                    r0 = scrape(nodes[3])
                    key = f"{fb.path}.size_{s}"
                    try:
                        fo[key] = await one_size(
                            args, world, fb, per_size[s], f"fb{s}{fb.path[:3]}", receipts=False
                        )
                    except (Incomplete, HavenError) as exc:
                        log(f"group fallback {key}: {exc}")
                        fo[key] = {
                            "error": str(exc),
                            "sender_warnings": dict(fb.warnings),
                            "largest_frame_bytes": fb.bytes.largest,
                            "frame_limit_bytes": F.MAX_FRAME,
                            "frames": dict(fb.bytes.frames),
                            "node_d_refused": refused_delta(r0, scrape(nodes[3])),
                        }
                        continue
                    base_run = out[f"size_{s}"]  # like for like: the same sender path on A
                    if stand_in and "error" not in out.get("stand_in_multi", {}).get(
                        f"size_{s}", {"error": ""}
                    ):
                        base_run = out["stand_in_multi"][f"size_{s}"]
                    fo[f"{fb.path}.ratios_{s}"] = ratios(base_run, fo[key])
        else:
            out["fallback"] = {"skipped": "this node has no multi option (no multi feature yet)"}
        out["registration_s"] = round(reg_s, 1)
        out["light_members"] = len(world.members)
        head = out[f"size_{sizes[-1]}"]
        # the figures the smoke test checks: those of the largest size
        for k in ("setup_s", "upload_bytes_per_msg", "per_recipient_bytes", "fed_requests"):
            out[k] = head[k]
        out["deliver_s_p50"] = head["deliver_s"]["p50"]
        out["deliver_s_max"] = head["deliver_s"]["max"]
        out["receipt_bytes"] = head["receipts"]["receipt_bytes"]
        out["receipt_envelopes"] = head["receipts"]["receipt_envelopes"]
        return out
    finally:
        for i, c in enumerate(conns):  # A's connections first, then D's
            with contextlib.suppress(Exception):
                await devs[min(i, len(devs) - 1)].release(c)
        for dv in {id(x): x for x in devs}.values():
            dv.close()
        await world.close()
        for nd in nodes:
            nd.stop()


def ratios(multi: dict[str, Any], fallback: dict[str, Any]) -> dict[str, Any]:
    """fallback / multi for the per-message figures."""

    def r(a: float, b: float) -> float | None:
        return round(b / a, 2) if a else None

    return {
        "upload_bytes_fallback_over_multi": r(
            multi["upload_bytes_per_msg"], fallback["upload_bytes_per_msg"]
        ),
        "envelopes_handled_fallback_over_multi": r(
            sum(multi["envelopes_handled"]), sum(fallback["envelopes_handled"])
        ),
        "fed_requests_fallback_over_multi": r(multi["fed_requests"], fallback["fed_requests"]),
        "deliver_max_fallback_over_multi": r(
            multi["deliver_s"]["max"], fallback["deliver_s"]["max"]
        ),
    }


__all__ = ["group"]
