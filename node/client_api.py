"""Device API: WebSocket ``/haven/v1/client`` with msgpack frames (docs/protocol.md §5).

The node sends a challenge; the device answers with ``auth`` (a signature over the challenge by
the Ed25519 key listed for its mailbox) or ``register`` (an invite plus the same proof, or on a
node with open registration the account name wanted). A missing mailbox, a bad signature and a
disabled account get the same ``unauthorized`` answer. Afterwards the device may
publish keys, query keys (remote ones are fetched by this node over federation), send envelopes
(answered ``accepted`` once durable) and ack pushed envelopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING

from aiohttp import WebSocketError, WSCloseCode, WSMsgType, web

from federation import frames as F
from federation.devicelist import MAX_DEVICES, DeviceList, SignedDeviceList
from federation.errors import (
    Expired,
    HavenError,
    InvalidInvite,
    KeysUnavailable,
    MalformedFrame,
    NotFound,
    QuotaExceeded,
    RateLimited,
    RemoteProtocolError,
    TooLarge,
    Unauthorized,
)
from federation.fanout import check_unique
from federation.ids import Address, valid_name
from federation.multi import compose
from federation.signing import device_auth_message, verify_detached
from federation.wire import PROTOCOL_VERSION, Envelope

from .admission import PREAUTH_FRAMES, Conn
from .blob_api import BlobRequests
from .delivery import DeliveryWindow
from .guard import WriteQueue, conn_of, send_frames
from .outbox import MultiSub

if TYPE_CHECKING:
    from .app import Node

log = logging.getLogger("haven.client_api")

OTK_LOW_WATER = 10
LINK_TTL_MS = 5 * 60_000
# Stored rows read per backlog page: ≤ 4 MiB of bodies in memory at once (64 x 64 KiB).
REFILL_PAGE = 64


def invite_hash(token: bytes) -> bytes:
    return hashlib.blake2b(token, digest_size=32, person=b"haven-invite").digest()


def ed25519_from_b64(text: str) -> bytes:
    import base64

    try:
        raw = base64.b64decode(text + "=" * (-len(text) % 4))
    except ValueError as exc:
        raise MalformedFrame("bad key encoding") from exc
    if len(raw) != 32:
        raise MalformedFrame("bad key length")
    return raw


class ClientSession:
    """One device connection: authentication state, delivery window, frame dispatch."""

    def __init__(self, node: Node, ws: web.WebSocketResponse, conn: Conn | None = None) -> None:
        self.node = node
        self.ws = ws
        self.conn = conn
        self.mailbox = b""
        self.account = ""
        self.challenge = os.urandom(32)
        cfg = node.config
        self.window = DeliveryWindow(
            cfg.max_deliver_bytes,
            cfg.max_deliver_envelopes,
            cfg.deliver_window_bytes,
            cfg.deliver_window_envelopes,
        )
        self.backlog = False  # stored envelopes wait that did not fit the window
        self._cursor = 0  # store seq of the last backlog row consumed (docs/protocol.md §5.5)
        # Bounded: a device that does not read is disconnected (operations.md "Limits").
        self.out = WriteQueue(self._queue_limit, self._overflow)
        self._answers: set[_SendAnswer] = set()  # Send frames waiting for their commit
        self._all_answered: asyncio.Future[None] | None = None
        self._closed = False
        self._held: list[Envelope] | None = None
        self._to_push: list[Envelope] = []  # pushed during this loop pass (see push())
        # several workers (node/worker_role.py): envelopes another worker stored for us
        self._refilling = asyncio.Lock()
        self._elsewhere = False
        self._restream: asyncio.Task[None] | None = None
        self._tail = 0  # seq of the last row the last store read returned (see _read_elsewhere)
        self.blobs: BlobRequests | None = None  # attachment frames (node/blob_api.py)

    # ---- DeviceLink --------------------------------------------------------------------------

    def push(self, envs: list[Envelope]) -> None:
        """Queue envelopes for this device; they go out together at the end of this loop pass.

        Every Send frame read in one pass (they arrive many per socket read) then shares one
        ``deliver`` frame instead of one each, and the device answers it with one ``ack``.
        """
        if self._closed:
            return
        if not self._to_push:
            asyncio.get_running_loop().call_soon(self._flush_push)
        self._to_push.extend(envs)

    def _flush_push(self) -> None:
        envs, self._to_push = self._to_push, []
        if self._closed or not envs:
            return
        if self._held is not None:  # a refill is reading the store: keep arrival order
            self._held.extend(envs)
            return
        self._push(envs)

    def _push(self, envs: list[Envelope]) -> None:
        """Send what fits the window now, in bounded frames (docs/protocol.md §5.5).

        While older stored envelopes wait (``backlog``), new ones wait behind them in the store
        (every pushed envelope is also committed, or acked first), so order is kept.
        """
        if self.backlog:
            return
        frames, consumed = self.window.take(envs)
        self._deliver(frames)
        if consumed < len(envs):
            self.backlog = True

    def _deliver(self, frames: list[tuple[Envelope, ...]]) -> None:
        for envs in frames:
            self.out.put_nowait(F.Deliver(envs).encode())
        if frames:
            self.node.metrics.event("deliver.frames", len(frames))

    async def refill(self) -> None:
        """Stream the stored backlog page by page until the window is full; once the store
        has nothing more, push what is not yet committed. Envelopes pushed by new arrivals
        while the store is read are held and sent after, so order is kept."""
        async with self._refilling:  # one at a time (another worker's rows: stored_elsewhere)
            self._held = []
            try:
                complete = await self._stream_stored()
                rest = self.node.mailboxes.uncommitted_for(self.mailbox) if complete else []
            finally:
                held, self._held = self._held, None
            if complete:  # else the held ones are in (or will reach) the store behind the cursor
                self.backlog = False
                self._push(rest + held)
        if complete and self._elsewhere:  # notified during a backlog: one more pass from 0
            self.stored_elsewhere()

    def stored_elsewhere(self) -> None:
        """Another worker committed envelopes for this mailbox (node/worker_role.py): read
        them from the store as for a backlog. While a backlog is streamed (acks drive that),
        one more full pass follows it: the rows may sort before its cursor."""
        if self._closed or not self.mailbox:
            return
        self._elsewhere = True
        if self.backlog or (self._restream is not None and not self._restream.done()):
            return
        self._restream = asyncio.create_task(self._read_elsewhere())

    async def _read_elsewhere(self) -> None:
        """Read from after the last row read before, not from 0: the rows pushed and not yet
        acked would be read again for every notification. On PostgreSQL a row written later
        sorts after every row still stored for its mailbox (node/pg_store.py), so only when
        nothing comes after that row (the mailbox may have emptied, and a new row start
        lower) is a pass from 0 needed."""
        while self._elsewhere and not self._closed and not self.backlog:
            self._elsewhere = False
            try:
                tail = self._cursor = self._tail
                await self.refill()
                if tail and self._tail == tail and not self.backlog:  # nothing after it
                    self._cursor = 0
                    await self.refill()
            except HavenError as exc:  # the device gets them on its next pass or connection
                log.info("reading envelopes stored by another worker failed (%s)", exc.code)
                return

    async def replaced(self) -> None:
        """A newer connection of this device attached to another worker."""
        await self.ws.close()

    async def _stream_stored(self) -> bool:
        """Push stored envelopes after the cursor; False when the window filled first."""
        while True:
            limit = min(REFILL_PAGE, self.window.room_envs())
            if limit == 0:
                self.backlog = True
                return False
            raw = await self.node.store.pending_page(self.mailbox, self._cursor, limit)
            deleting = self.node.mailboxes.deleting  # acked, delete not committed: skip
            page = [(seq, e) for seq, e in raw if e.id not in deleting]
            frames, consumed = self.window.take([e for _, e in page])
            self._deliver(frames)
            if consumed < len(page):
                if consumed:
                    self._cursor = page[consumed - 1][0]
                self.backlog = True
                return False
            if raw:
                self._cursor = self._tail = raw[-1][0]
            if len(raw) < limit:
                # End of the pass. A seq can be reused once every row above it is deleted,
                # so the next pass starts over (rows already pushed are skipped).
                self._cursor = 0
                return True

    # ---- loop --------------------------------------------------------------------------------

    def _queue_limit(self) -> int:
        cfg = self.node.config
        return cfg.max_write_queue_bytes if self.mailbox else cfg.preauth_max_frame

    def _overflow(self) -> None:
        self.node.metrics.error("conn", "write_queue_full")
        if self.conn is not None:
            self.conn.abort()

    async def writer(self) -> None:
        """Send queued frames; whatever is queued when the writer wakes goes in one write."""
        out = self.out
        while (data := await out.get()) is not None:
            if out.empty():
                await self.ws.send_bytes(data)
                continue
            batch, end = [data], False
            while not out.empty():
                nxt = out.get_nowait()
                if nxt is None:
                    end = True
                    break
                batch.append(nxt)
            await send_frames(self.ws, batch)
            if end:
                return

    def send(self, frame: F.Frame) -> None:
        self.out.put_nowait(frame.encode())

    def error(self, rid: int, exc: HavenError) -> None:
        self.node.metrics.error("client", exc.code)
        self.send(F.Error(rid, exc.code, str(exc)[:200]))

    async def serve(self) -> None:
        self.send(
            F.Challenge(
                self.node.key.node_id,
                self.challenge,
                PROTOCOL_VERSION,
                self.node.clock.now_ms(),
                self.node.features,
            )
        )
        writer = asyncio.create_task(self.writer())
        preauth = 0
        try:
            async for msg in self.ws:
                if not self.mailbox:
                    preauth += 1
                    if preauth > PREAUTH_FRAMES:  # bounded work for a stranger's garbage
                        self.node.metrics.error("conn", "preauth_frames")
                        break
                if msg.type != WSMsgType.BINARY:
                    if msg.type == WSMsgType.ERROR:
                        # aiohttp refuses a frame over max_msg_size itself (close 1009).
                        exc = msg.data
                        if (
                            isinstance(exc, WebSocketError)
                            and exc.code == WSCloseCode.MESSAGE_TOO_BIG
                        ):
                            self.node.metrics.error("client", TooLarge.code)
                        break
                    self.error(0, MalformedFrame("frames must be binary msgpack"))
                    continue
                if self.conn is not None:  # the sign-in deadline waits for our answer
                    self.conn.handling = True
                try:
                    if not await self.handle(msg.data):
                        break
                finally:
                    if self.conn is not None:
                        self.conn.handling = False
                if self.mailbox and self.conn is not None and not self.conn.authenticated:
                    self.node.admission.authenticated(self.conn)
        finally:
            if self.blobs is not None:
                await self.blobs.close()
            if self.mailbox and self.node.mailboxes.links.get(self.mailbox) is self:
                del self.node.mailboxes.links[self.mailbox]
            if self.mailbox and self.node.role is not None:
                self.node.role.detached(self)
            if self._restream is not None:
                self._restream.cancel()
            if self._answers:  # accepted answers still waiting for their commit
                self._all_answered = asyncio.get_running_loop().create_future()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._all_answered), 5)
            self._closed = True
            self._answers.clear()
            self.out.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 5)
            writer.cancel()

    async def handle(self, data: bytes) -> bool:
        """Handle one frame; False when the connection must end (after the error is sent)."""
        rid = 0
        try:
            frame = F.decode_frame(data, self.node.limits.max_frame)
            rid = int(getattr(frame, "rid", 0))
            if not self.mailbox and not isinstance(frame, (F.Auth, F.Register)):
                raise Unauthorized("authenticate first")
            await self.dispatch(frame)
        except F.UnknownFrameType as exc:
            # A frame type from a newer client: answered harmlessly, with its rid (§5.6).
            self.error(exc.rid, exc)
        except HavenError as exc:
            self.error(rid, exc)
            return not isinstance(exc, Unauthorized)
        return True

    async def dispatch(self, frame: F.Frame) -> None:
        match frame:
            case F.Auth():
                await self.on_auth(frame)
            case F.Register():
                await self.on_register(frame)
            case F.Send():
                await self.on_send(frame)
            case F.Ack():
                await self.on_ack(frame)
            case F.MintLink():
                await self.on_mint_link(frame)
            case F.PublishKeys():
                await self.on_publish(frame)
            case F.QueryKeys():
                await self.on_query(frame)
            case F.SendMulti():
                await self.on_send_multi(frame)
            case F.QueryKeysMulti():
                await self.on_query_multi(frame)
            case F.BlobNew() | F.BlobPut() | F.BlobGet() | F.BlobDone():
                await self._blob_requests().submit(frame)  # node/blob_api.py
            case _:
                raise MalformedFrame("frame not allowed from a device")

    def _blob_requests(self) -> BlobRequests:
        if self.blobs is None:
            self.blobs = BlobRequests(self.node.blob_api, self)
        return self.blobs

    # ---- handlers ----------------------------------------------------------------------------

    def _check_proof(self, key: bytes, mailbox: bytes, sig: bytes) -> None:
        msg = device_auth_message(self.node.key.node_id, self.challenge, mailbox)
        try:
            verify_detached(key, msg, sig)
        except HavenError as exc:
            raise Unauthorized("unauthorized") from exc

    def _admit(self) -> None:
        """Lift the pre-auth caps (frame size, pool) before the sign-in answer goes out."""
        if self.conn is not None:
            self.node.admission.authenticated(self.conn)

    async def _attach(self, account: str, mailbox: bytes) -> None:
        self.mailbox, self.account = mailbox, account
        old = self.node.mailboxes.links.get(mailbox)
        self.node.mailboxes.links[mailbox] = self
        if old is not None and isinstance(old, ClientSession):
            await old.ws.close()
        if self.node.role is not None:  # several workers: older connections elsewhere close
            await self.node.role.attached(self)
        await self.refill()

    async def on_auth(self, f: F.Auth) -> None:
        if self.mailbox:
            raise MalformedFrame("already authenticated")
        dev = await self.node.store.get_device(f.mailbox)
        # Same answer for a missing mailbox and a bad signature: no oracle.
        key = dev.auth_key if dev else os.urandom(32)
        self._check_proof(key, f.mailbox, f.sig)
        if dev is None:
            raise Unauthorized("unauthorized")
        # A disabled account's device gets the same answer as a bad credential (no oracle).
        if await self.node.store.account_status(dev.account) != "active":
            raise Unauthorized("unauthorized")
        count = await self.node.store.count_otks(f.mailbox)
        self._admit()  # before the answer: the device may send a full-size frame right after it
        self.send(F.AuthOk(f.rid, f"{dev.account}@{self.node.config.public_host}", count))
        await self._attach(dev.account, f.mailbox)

    async def on_register(self, f: F.Register) -> None:
        """Redeem an invite (new account, with its first signed list) or a link token
        (another device of an existing account; the list is re-signed by the linking device)."""
        if self.mailbox:
            raise MalformedFrame("already authenticated")
        # Node-wide, before the proof and any store access: guessing tokens costs the guesser.
        if not self.node.rates.take("register:*", self.node.clock.now_ms()):
            raise RateLimited("too many registrations; try again shortly")
        self._check_proof(f.auth_key, f.mailbox, f.sig)
        store, now = self.node.store, self.node.clock.now_ms()
        if not f.invite and f.name:
            await self._register_open(f)
            return
        token = invite_hash(f.invite)
        if self.node.role is None:
            linked = self.node.link_tokens.redeem(token, now)  # in memory only
        else:  # several workers: minted through any of them (node/pg_bus.py)
            linked = await self.node.role.bus.redeem_link(token, now)
        if linked is not None:
            redeemed: tuple[str, str] | None = (linked, "link")
        else:
            redeemed = await store.redeem_invite(token, now)
        # removed or disabled meanwhile: as invalid as a wrong token
        if redeemed is not None and await store.account_status(redeemed[0]) != "active":
            redeemed = None
        if redeemed is None or (redeemed[1] == "link") != (f.device_list is None):
            raise InvalidInvite("invite is invalid, expired or already used")
        await self._add_device(f, redeemed[0])
        await self._signed_in(f, redeemed[0])

    async def _register_open(self, f: F.Register) -> None:
        """Open registration (docs/protocol.md §5.2): create the account ``f.name`` with this
        device as its first, if the node allows it, the name is valid and free, and this
        source has registrations left this hour (memory only)."""
        node = self.node
        if not node.config.open_registration:
            raise InvalidInvite("this node registers by invite only", code="registration_closed")
        if f.device_list is None:
            raise MalformedFrame("a new account needs its signed device list")
        if not valid_name(f.name):
            raise MalformedFrame(
                "names are 1-32 of a-z 0-9 . _ - and start with a letter or digit",
                code="invalid_name",
            )
        source = self.conn.source if self.conn is not None else ""
        if not node.admission.is_exempt(source) and not node.rates.take(
            "regip:" + source, node.clock.now_ms()
        ):
            raise RateLimited(
                "too many new accounts from this address; try again later",
                code="too_many_registrations",
            )
        address = f"{f.name}@{node.config.public_host}"
        self._check_list(f.device_list, address, must_have=(f.mailbox, f.auth_key))
        if not await node.store.create_account(f.name, node.clock.now_ms()):
            raise InvalidInvite("that name is taken", code="name_taken")
        try:
            await self._add_device(f, f.name)
        except HavenError:
            await node.store.remove_account(f.name)  # the name stays free for another try
            raise
        node.metrics.event("accounts.registered_open")
        await self._signed_in(f, f.name)

    async def _add_device(self, f: F.Register, account: str) -> None:
        """Add the registering device to ``account`` (its signed list stored first when it
        brings one)."""
        store = self.node.store
        address = f"{account}@{self.node.config.public_host}"
        if f.device_list is not None:
            dl = self._check_list(f.device_list, address, must_have=(f.mailbox, f.auth_key))
            current = await store.get_device_list(account)
            if current is not None and SignedDeviceList(*current).open().identity_key != (
                dl.identity_key
            ):
                raise InvalidInvite("account already belongs to another identity")
            await store.set_device_list(
                account, dl.version, f.device_list.blob, f.device_list.signature
            )
        elif len(await store.devices_of(account)) >= MAX_DEVICES:
            raise QuotaExceeded("too many devices on this account")
        await store.add_device(account, f.mailbox, f.auth_key)
        self.node.known_mailboxes.add(f.mailbox)

    async def _signed_in(self, f: F.Register, account: str) -> None:
        address = f"{account}@{self.node.config.public_host}"
        self._admit()
        self.send(F.Registered(f.rid, address))
        await self._attach(account, f.mailbox)

    async def on_mint_link(self, f: F.MintLink) -> None:
        """A signed-in device asks for a single-use token to link another device (5 minutes)."""
        now = self.node.clock.now_ms()
        if not self.node.rates.take("link:" + self.account, now):
            raise RateLimited("too many link tokens for this account; try again later")
        token = os.urandom(24)
        # Memory only: a stored row would date the link to the millisecond (node/linktokens.py).
        if self.node.role is None:
            expires = self.node.link_tokens.mint(invite_hash(token), self.account, now)
        else:  # several workers: redeemable through every one of them (node/pg_bus.py)
            expires = now + self.node.link_tokens.ttl_ms
            await self.node.role.bus.share_link(invite_hash(token), self.account, expires)
        self.send(F.LinkToken(f.rid, token, expires))

    def _check_list(
        self, signed: SignedDeviceList, address: str, must_have: tuple[bytes, bytes]
    ) -> DeviceList:
        dl = signed.open(expected_address=address)
        mailbox, auth_key = must_have
        if not any(
            d.mailbox == mailbox and ed25519_from_b64(d.ed25519) == auth_key for d in dl.devices
        ):
            raise MalformedFrame("device list does not list this device")
        return dl

    async def on_publish(self, f: F.PublishKeys) -> None:
        store = self.node.store
        if f.device_list is not None:
            address = f"{self.account}@{self.node.config.public_host}"
            dev = await store.get_device(self.mailbox)
            if dev is None:
                raise Unauthorized("unauthorized")
            current = await store.get_device_list(self.account)
            dl = self._check_list(f.device_list, address, must_have=(self.mailbox, dev.auth_key))
            if current is not None:
                old = SignedDeviceList(*current).open()
                if old.identity_key != dl.identity_key:
                    raise Unauthorized("device list signed by a different identity key")
            if not await store.set_device_list(
                self.account, dl.version, f.device_list.blob, f.device_list.signature
            ):
                raise MalformedFrame("device list version must not go backwards")
            if current is not None:
                await self._purge_removed(SignedDeviceList(*current).open(), dl)
        count = await store.count_otks(self.mailbox)
        if f.otks:
            if count + len(f.otks) > 200:
                raise QuotaExceeded("too many one-time keys")
            count = await store.add_otks(self.mailbox, list(f.otks))
        if f.fallback:
            await store.set_fallback(self.mailbox, *f.fallback[0])
        self.send(F.Ok(f.rid, count))

    async def _purge_removed(self, old: DeviceList, new: DeviceList) -> None:
        """Devices dropped from the signed list lose their mailbox (and its envelopes) at once."""
        kept = {d.mailbox for d in new.devices}
        mine = set(await self.node.store.devices_of(self.account))
        for d in old.devices:
            if d.mailbox not in kept and d.mailbox in mine and d.mailbox != self.mailbox:
                await self.node.store.remove_device(d.mailbox)
                self.node.known_mailboxes.discard(d.mailbox)
                link = self.node.mailboxes.links.pop(d.mailbox, None)
                if isinstance(link, ClientSession):
                    await link.ws.close()

    async def on_query(self, f: F.QueryKeys) -> None:
        try:
            address = Address.parse(f.address)
        except ValueError as exc:
            raise MalformedFrame("bad address") from exc
        if not self.node.rates.take("keys:" + self.account, self.node.clock.now_ms()):
            from federation.errors import RateLimited

            raise RateLimited("too many key queries")
        if address.host == self.node.config.public_host:
            node_id = self.node.key.node_id
            dl_wire, claimed = await self.node.local_keys(address.name, f.claim)
        else:
            if not self.node.rates.take("remotekeys:" + self.account, self.node.clock.now_ms()):
                from federation.errors import RateLimited

                raise RateLimited("too many remote key queries")
            try:
                node_id, dl_wire, claimed = await self.node.remote_keys(address, f.claim)
            except (NotFound, KeysUnavailable) as exc:
                raise KeysUnavailable(str(exc)) from exc
            except HavenError as exc:
                raise KeysUnavailable(f"keys unavailable ({exc.code})") from exc
        self.send(F.Keys(f.rid, node_id, dl_wire, claimed))

    async def on_send(self, f: F.Send) -> None:
        node = self.node
        if not node.rates.take("send:" + self.account, node.clock.now_ms(), cost=len(f.items)):
            raise RateLimited("sending too fast")
        await self._submit(f.rid, f.items)

    async def on_send_multi(self, f: F.SendMulti) -> None:
        """One upload for many recipient devices (docs/protocol.md §11.3): each recipient's
        envelope is composed here and handled exactly like a ``send`` item (rates charged per
        recipient); the composed envelopes for one peer node that lists ``"multi"`` leave
        as one ``/federation/multi`` request (node/outbox.py)."""
        node = self.node
        if not node.config.multi:  # served as a node without the feature
            raise F.UnknownFrameType("unknown frame type", f.rid)
        check_unique(r for _, recips in f.dests for r in recips)
        n = sum(len(recips) for _, recips in f.dests)
        if not node.rates.take("send:" + self.account, node.clock.now_ms(), cost=n):
            raise RateLimited("sending too fast")
        items = [
            (dest, Envelope(eid, mailbox, f.expires, compose(f.eph, hdr, f.body)))
            for dest, recips in f.dests
            for eid, mailbox, hdr in recips
        ]
        node.metrics.event("multi.submissions")
        node.metrics.event("multi.recipients", n)
        await self._submit(f.rid, items, MultiSub(f.eph, f.body))

    async def on_query_multi(self, f: F.QueryKeysMulti) -> None:
        """Keys of many addresses at once: one federation call per remote node (node/fanout.py)."""
        if not self.node.config.multi:  # served as a node without the feature
            raise F.UnknownFrameType("unknown frame type", f.rid)
        results = await self.node.keys_fanout.query(self.account, f.addresses, f.claim)
        self.send(F.KeysMulti(f.rid, tuple(results)))

    async def _submit(
        self,
        rid: int,
        items: Iterable[tuple[str, Envelope]],
        sub: MultiSub | None = None,
    ) -> None:
        """Admit, store or queue, and answer ``accepted`` once each envelope is durable."""
        node = self.node
        now = node.clock.now_ms()
        local: list[Envelope] = []
        remote: list[tuple[str, Envelope]] = []
        rejected: list[tuple[bytes, str]] = []
        if node.role is not None:  # registered or pinned through another worker: ask the store
            items = list(items)
            await node.learn(items)
        for dest, env in items:
            env, code = node.admit(env, now)
            if code is None and dest == node.key.node_id:
                code = node.admit_local(env)
                if code is None:
                    local.append(env)
            elif code is None:
                if dest in node.known_peers:
                    code = node.quotas.admit(self.account, dest, env, now)  # outbox quotas
                    if code is None:
                        remote.append((dest, env))
                else:
                    code = "unknown_destination"
            if code is not None:
                node.metrics.error("client", code)
                rejected.append((env.id, code))
        local_futs = node.mailboxes.submit_local(local)
        if sub is not None and remote:  # the sender may post these as one request per node
            for dest in {d for d, _ in remote}:
                node.outbox.ensure(dest)
            with node.outbox.multi_submission(sub):
                remote_futs = node.mailboxes.submit_outbox(remote)
        else:
            remote_futs = node.mailboxes.submit_outbox(remote)
        node.metrics.event("client.envelopes_in", len(local) + len(remote))
        node.quotas.watch(remote, remote_futs)  # a failed commit frees its quota
        futs = local_futs + remote_futs
        ids = [e.id for e in local] + [e.id for _, e in remote]
        # Answer once durable, but do not hold up this connection's next frame meanwhile:
        # frames pipeline into the same group commit instead of one commit each.
        warnings = node.peers.key_warnings(dest for dest, _ in remote)  # queued anyway (§5.4)
        if not futs:
            self.send(F.Accepted(rid, (), tuple(rejected), warnings))
            return
        # One done callback per envelope instead of a task and a gather per frame: the frames
        # of one group commit are all answered in the same loop pass, so the writer sends
        # their ``accepted`` answers in one write.
        answer = _SendAnswer(self, rid, futs, ids, rejected, warnings)
        self._answers.add(answer)
        for fut in futs:
            fut.add_done_callback(answer.one_done)

    def answered(self, answer: _SendAnswer, frame: F.Accepted) -> None:
        self._answers.discard(answer)
        if not self._closed:
            self.send(frame)
        if not self._answers and self._all_answered is not None:
            if not self._all_answered.done():
                self._all_answered.set_result(None)

    async def on_ack(self, f: F.Ack) -> None:
        mine = self.window.ack(f.ids)  # only ids pushed on this connection count
        self.node.mailboxes.acked(mine)
        self.node.metrics.event("envelopes.delivered", len(mine))
        self.node.released(self.mailbox, len(mine))
        if self.backlog and self.window.half_free():
            await self.refill()


class _SendAnswer:
    """The ``accepted`` answer of one Send frame, sent once every envelope's commit resolved."""

    __slots__ = ("futs", "ids", "left", "rejected", "rid", "session", "warnings")

    def __init__(
        self,
        session: ClientSession,
        rid: int,
        futs: list[asyncio.Future[None]],
        ids: list[bytes],
        rejected: list[tuple[bytes, str]],
        warnings: tuple[tuple[str, str], ...],
    ) -> None:
        self.session = session
        self.rid = rid
        self.futs = futs
        self.ids = ids
        self.rejected = rejected
        self.warnings = warnings
        self.left = len(futs)

    def one_done(self, _fut: asyncio.Future[None]) -> None:
        self.left -= 1
        if self.left:
            return
        accepted: list[bytes] = []
        rejected = self.rejected
        for eid, fut in zip(self.ids, self.futs, strict=True):
            exc: BaseException | None = (
                asyncio.CancelledError() if fut.cancelled() else fut.exception()
            )
            if exc is None:
                accepted.append(eid)
            else:
                rejected.append((eid, exc.code if isinstance(exc, HavenError) else "internal"))
        frame = F.Accepted(self.rid, tuple(accepted), tuple(rejected), self.warnings)
        self.session.answered(self, frame)


async def client_ws(node: Node, request: web.Request) -> web.WebSocketResponse:
    # Frames before authentication are held to preauth_max_frame below aiohttp, by the
    # admission layer's frame tracker (node/admission.py); aiohttp enforces max_frame.
    ws = web.WebSocketResponse(max_msg_size=node.limits.max_frame, heartbeat=30)
    conn = conn_of(node.admission, request)
    await ws.prepare(request)
    if conn is not None:
        node.admission.upgraded(conn)
    session = ClientSession(node, ws, conn)
    try:
        await session.serve()
    except (ConnectionError, RemoteProtocolError, TooLarge, Expired) as exc:
        log.debug("device connection closed: %s", type(exc).__name__)
    return ws
