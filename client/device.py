"""The device Python API: join a node, send and receive end-to-end encrypted messages.

Layers (docs/protocol.md §3): a payload (message id, kind, text, sent time, recipient) is
encrypted with Olm (vodozemac) per recipient device; the Olm message plus the sender's address
and device key is sealed to the recipient device's sealing key and padded (sealed sender); the
result is the body of one envelope per recipient device. A message is accepted as *from alice*
only if the Olm sender key is in alice's signed device list, under alice's pinned identity key.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nacl.public
import nacl.signing
import vodozemac as vz

from federation import frames as F
from federation.clock import Clock, SystemClock
from federation.devicelist import DeviceInfo, DeviceList, SignedDeviceList
from federation.errors import (
    HavenError,
    KeysUnavailable,
    LocalProtocolError,
    MalformedEnvelope,
    RemoteProtocolError,
    UntrustedKey,
)
from federation.ids import Address, new_envelope_id, new_mailbox_id
from federation.sealing import SealedContent, seal, unseal
from federation.signing import b64d, device_auth_message
from federation.wire import Envelope, packb, unpackb

from .connection import NodeConnection, expect
from .state import Contact, DeviceState, HistoryRow

log = logging.getLogger("haven.device")

OTK_BATCH = 50
OTK_LOW = 20
DEFAULT_TTL_MS = 7 * 86_400_000
PAYLOAD_VERSION = 1


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    sender: str
    text: str
    sent_at: int
    msg_id: bytes


@dataclass(frozen=True, slots=True)
class SendResult:
    msg_id: bytes
    devices: int
    envelopes: int


def parse_invite(text: str) -> dict[str, Any]:
    prefix = "haven:invite:"
    if not text.startswith(prefix):
        raise LocalProtocolError("not a Haven invite")
    try:
        obj = unpackb(b64d(text[len(prefix) :].strip()), max_len=4096)
        url = str(obj["url"])
        return {
            "url": url,
            "node": str(obj["node"]),
            "name": str(obj["name"]),
            "t": bytes(obj["t"]),
            "host": str(obj.get("host") or url.split("://", 1)[1]).lower(),
        }
    except (HavenError, KeyError, TypeError) as exc:
        raise LocalProtocolError("malformed invite") from exc


def _raw(b64: str) -> bytes:
    return base64.b64decode(b64 + "=" * (-len(b64) % 4))


class Device:
    """One device's identity and state, stored in ``home``."""

    def __init__(self, home: str, clock: Clock | None = None) -> None:
        self.home = home
        self.clock = clock or SystemClock()
        self.state = DeviceState(home)
        self._account: vz.Account | None = None

    def close(self) -> None:
        self.state.close()

    # ---- stored identity ---------------------------------------------------------------------

    def _get_str(self, k: str) -> str:
        v = self.state.get(k)
        if v is None:
            raise LocalProtocolError(f"this device has not joined a node yet ({self.home})")
        return v.decode()

    @property
    def joined(self) -> bool:
        return self.state.get("address") is not None

    @property
    def address(self) -> str:
        return self._get_str("address")

    @property
    def node_url(self) -> str:
        return self._get_str("node_url")

    @property
    def node_id(self) -> str:
        return self._get_str("node_id")

    @property
    def mailbox(self) -> bytes:
        v = self.state.get("mailbox")
        if v is None:
            raise LocalProtocolError("not joined")
        return v

    @property
    def account(self) -> vz.Account:
        if self._account is None:
            self._account = vz.Account.from_pickle(self._get_str("account"), self.state.storage_key)
        return self._account

    @property
    def curve_key(self) -> str:
        return str(self.account.curve25519_key.to_base64())

    def _identity(self) -> nacl.signing.SigningKey:
        seed = self.state.get("identity_seed")
        if seed is None:
            raise LocalProtocolError("not joined")
        return nacl.signing.SigningKey(seed)

    def _sealing(self) -> bytes:
        v = self.state.get("sealing_key")
        if v is None:
            raise LocalProtocolError("not joined")
        return v

    def _save_account(self, db: Any) -> None:
        self.state.put(db, "account", self.account.pickle(self.state.storage_key).encode())

    def _sign(self, message: bytes) -> bytes:
        return _raw(self.account.sign(message).to_base64())

    # ---- joining -----------------------------------------------------------------------------

    async def join(self, invite: str) -> str:
        """Redeem an invite: create keys, register, publish keys. Returns the address."""
        if self.joined:
            raise LocalProtocolError(f"{self.home} already holds a joined device")
        inv = parse_invite(invite)
        identity = nacl.signing.SigningKey.generate()
        account = vz.Account()
        sealing = nacl.public.PrivateKey.generate()
        mailbox = new_mailbox_id()
        self._account = account
        async with NodeConnection(inv["url"]) as conn:
            ch = conn.challenge
            assert ch is not None
            if ch.node_id != inv["node"]:
                raise UntrustedKey("the node does not hold the key named in the invite")
            address = f"{inv['name']}@{inv['host']}"
            dev = DeviceInfo(
                self.curve_key,
                str(account.ed25519_key.to_base64()),
                bytes(sealing.public_key),
                mailbox,
                self.clock.now_ms(),
            )
            signed = DeviceList(address, bytes(identity.verify_key), 1, (dev,)).sign(identity)
            auth_key = _raw(dev.ed25519)
            sig = self._sign(device_auth_message(ch.node_id, ch.nonce, mailbox))
            reg = expect(
                await conn.request(
                    F.Register(conn.next_rid(), inv["t"], mailbox, auth_key, sig, signed)
                ),
                F.Registered,
            )
            address = reg.address
            with self.state.tx() as db:
                self.state.put(db, "identity_seed", bytes(identity))
                self.state.put(db, "sealing_key", bytes(sealing))
                self.state.put(db, "mailbox", mailbox)
                self.state.put(db, "node_url", inv["url"].encode())
                self.state.put(db, "node_id", ch.node_id.encode())
                self.state.put(db, "address", address.encode())
                self.state.put(db, "list_version", b"1")
                self._save_account(db)
            await self._top_up(conn, 0)
        return str(address)

    async def _top_up(self, conn: NodeConnection, count: int) -> None:
        """Publish one-time keys when the node holds fewer than :data:`OTK_LOW`, and a fallback."""
        acct: Any = self.account  # the type stubs lack the fallback-key methods
        need_fallback = self.state.get("fallback_published") is None
        if count >= OTK_LOW and not need_fallback:
            return
        if count < OTK_LOW:
            acct.generate_one_time_keys(OTK_BATCH)
        otks = tuple((k, v.to_base64()) for k, v in acct.one_time_keys.items())
        fb: tuple[tuple[str, str], ...] = ()
        if need_fallback:
            if not acct.fallback_key:
                acct.generate_fallback_key()
            fb = tuple((k, v.to_base64()) for k, v in acct.fallback_key.items())[:1]
        # Persist the account (with the new private keys) before the public halves leave.
        with self.state.tx() as db:
            self._save_account(db)
        for i in range(0, max(len(otks), 1), F.MAX_OTKS_PER_FRAME):
            batch = otks[i : i + F.MAX_OTKS_PER_FRAME]
            expect(await conn.request(F.PublishKeys(conn.next_rid(), batch, fb, None)), F.Ok)
        acct.mark_keys_as_published()
        with self.state.tx() as db:
            self._save_account(db)
            self.state.put(db, "fallback_published", b"1")

    async def connect(self) -> NodeConnection:
        """Open and authenticate a connection to the home node (caller closes it)."""
        conn = NodeConnection(self.node_url)
        await conn.__aenter__()
        try:
            ch = conn.challenge
            assert ch is not None
            if ch.node_id != self.node_id:
                raise UntrustedKey("home node key changed; refusing to talk to it")
            sig = self._sign(device_auth_message(ch.node_id, ch.nonce, self.mailbox))
            ok = expect(await conn.request(F.Auth(conn.next_rid(), self.mailbox, sig)), F.AuthOk)
            await self._top_up(conn, ok.otk_count)
        except BaseException:
            await conn.__aexit__(None, None, None)
            raise
        return conn

    # ---- contacts and keys -------------------------------------------------------------------

    async def _fetch_contact(
        self, conn: NodeConnection, address: str, claim: bool
    ) -> tuple[Contact, DeviceList, dict[str, tuple[str, str]]]:
        """Query, verify and pin a contact's device list (TOFU on the identity key)."""
        try:
            keys = expect(await conn.request(F.QueryKeys(conn.next_rid(), address, claim)), F.Keys)
        except RemoteProtocolError as exc:
            raise KeysUnavailable(f"keys for {address} unavailable ({exc.code})") from exc
        dl = keys.device_list.open(expected_address=address)
        pinned = self.state.contact(address)
        if pinned is not None and pinned.identity_key != dl.identity_key:
            raise UntrustedKey(f"identity key of {address} changed; not trusting the new one")
        if pinned is not None:
            old = SignedDeviceList(pinned.device_list, pinned.sig).open()
            if dl.version < old.version:
                raise UntrustedKey(f"device list of {address} rolled back")
        contact = Contact(
            address,
            dl.identity_key,
            keys.node_id,
            keys.device_list.blob,
            keys.device_list.signature,
        )
        with self.state.tx() as db:
            self.state.save_contact(db, contact)
        return contact, dl, dict(keys.claimed)

    # ---- sending -----------------------------------------------------------------------------

    async def send(
        self,
        address: str,
        text: str,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        conn: NodeConnection | None = None,
    ) -> SendResult:
        """Encrypt ``text`` to every device of ``address`` and hand it to the home node.

        Returns once the home node has durably accepted every envelope.

        Raises:
            KeysUnavailable: the contact's keys can't be fetched and aren't known.
            UntrustedKey: the contact's identity key changed or the list doesn't verify.
        """
        Address.parse(address)
        if conn is None:
            c = await self.connect()
            try:
                return await self.send(address, text, ttl_ms=ttl_ms, conn=c)
            finally:
                await c.__aexit__(None, None, None)
        contact, dl = await self._contact_for_send(conn, address)
        need = [d for d in dl.devices if not self.state.sessions(d.device_id)]
        claimed: dict[str, tuple[str, str]] = {}
        if need:
            _, dl2, claimed = await self._fetch_contact(conn, address, claim=True)
            if dl2.version >= dl.version:
                dl = dl2
        now = self.clock.now_ms()
        msg_id = os.urandom(16)
        payload = packb(
            {
                "v": PAYLOAD_VERSION,
                "id": msg_id,
                "kind": "text",
                "text": text,
                "sent_at": now,
                "to": address,
            }
        )
        items: list[tuple[str, Envelope]] = []
        with self.state.tx() as db:
            for dev in dl.devices:
                olm = self._encrypt_for(db, dev, claimed.get(dev.device_id), payload, now)
                if olm is None:
                    log.warning("no session and no one-time key for a device of the contact")
                    continue
                body = seal(dev.sealing, SealedContent(self.address, self.curve_key, *olm))
                items.append(
                    (contact.node_id, Envelope(new_envelope_id(), dev.mailbox, now + ttl_ms, body))
                )
            if not items:
                raise KeysUnavailable(f"no device of {address} can be reached")
            self.state.add_history(
                db, HistoryRow(msg_id, address, True, self.address, text, now, now)
            )
        # Sessions were committed above, before any ciphertext leaves this device.
        ans = expect(await conn.request(F.Send(conn.next_rid(), tuple(items))), F.Accepted)
        if ans.rejected:
            codes = sorted({c for _, c in ans.rejected})
            raise RemoteProtocolError(f"node refused envelopes: {', '.join(codes)}", code=codes[0])
        return SendResult(msg_id, len(dl.devices), len(items))

    async def _contact_for_send(
        self, conn: NodeConnection, address: str
    ) -> tuple[Contact, DeviceList]:
        try:
            contact, dl, _ = await self._fetch_contact(conn, address, claim=False)
            return contact, dl
        except KeysUnavailable:
            known = self.state.contact(address)
            if known is None:
                raise
            # A known contact whose node is unreachable: our node queues the envelopes.
            dl = SignedDeviceList(known.device_list, known.sig).open(expected_address=address)
            if all(self.state.sessions(d.device_id) for d in dl.devices):
                return known, dl
            raise

    def _encrypt_for(
        self, db: Any, dev: DeviceInfo, otk: tuple[str, str] | None, payload: bytes, now: int
    ) -> tuple[int, bytes] | None:
        sessions = self.state.sessions(dev.device_id)
        if sessions:
            session = vz.Session.from_pickle(sessions[0][1], self.state.storage_key)
        elif otk is not None:
            session = self.account.create_outbound_session(
                vz.Curve25519PublicKey.from_base64(dev.device_id),
                vz.Curve25519PublicKey.from_base64(otk[1]),
            )
        else:
            return None
        msg_type, body = session.encrypt(payload).to_parts()
        self.state.save_session(
            db, dev.device_id, session.session_id, session.pickle(self.state.storage_key), now
        )
        return int(msg_type), bytes(body)

    # ---- receiving ---------------------------------------------------------------------------

    async def receive(
        self, wait_s: float = 2.0, on_message: Callable[[ReceivedMessage], None] | None = None
    ) -> list[ReceivedMessage]:
        """Receive until ``wait_s`` seconds pass with nothing new; return new messages."""
        import asyncio

        out: list[ReceivedMessage] = []
        conn = await self.connect()
        try:
            while True:
                try:
                    async with asyncio.timeout(wait_s):
                        envs = await conn.deliveries.get()
                except TimeoutError:
                    break
                new = await self.process(conn, envs)
                for m in new:
                    if on_message is not None:
                        on_message(m)
                out.extend(new)
        finally:
            await conn.__aexit__(None, None, None)
        return out

    async def process(self, conn: NodeConnection, envs: list[Envelope]) -> list[ReceivedMessage]:
        """Open, verify, store and ack one delivered batch. Bad envelopes are dropped (acked)."""
        new: list[ReceivedMessage] = []
        ack: list[bytes] = []
        for env in envs:
            try:
                msg = await self._open(conn, env)
                if msg is not None:
                    new.append(msg)
            except HavenError as exc:
                log.warning("dropped an envelope that failed checks (%s)", exc.code)
            ack.append(env.id)
        await conn.ack(ack)
        new.sort(key=lambda m: (m.sender, m.sent_at))
        return new

    async def _sender_list(self, conn: NodeConnection, sender: str, device_key: str) -> DeviceList:
        known = self.state.contact(sender)
        if known is not None:
            dl = SignedDeviceList(known.device_list, known.sig).open(expected_address=sender)
            if any(d.device_id == device_key for d in dl.devices):
                return dl
        _, dl, _ = await self._fetch_contact(conn, sender, claim=False)
        return dl

    async def _open(self, conn: NodeConnection, env: Envelope) -> ReceivedMessage | None:
        sc = unseal(self._sealing(), env.body)
        Address.parse(sc.sender)
        dl = await self._sender_list(conn, sc.sender, sc.sender_device)
        if not any(d.device_id == sc.sender_device for d in dl.devices):
            raise UntrustedKey("sender key is not in the sender's signed device list")
        now = self.clock.now_ms()
        payload_bytes, save = self._decrypt(sc)
        payload = unpackb(payload_bytes, max_len=len(payload_bytes))
        try:
            msg_id, text, sent_at, to = (
                bytes(payload["id"]),
                str(payload["text"]),
                int(payload["sent_at"]),
                str(payload["to"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEnvelope("bad payload") from exc
        if to != self.address:
            raise UntrustedKey("message was addressed to someone else")
        with self.state.tx() as db:
            save(db, now)
            fresh = self.state.add_history(
                db, HistoryRow(msg_id, sc.sender, False, sc.sender, text, sent_at, now)
            )
        return ReceivedMessage(sc.sender, text, sent_at, msg_id) if fresh else None

    def _decrypt(self, sc: SealedContent) -> tuple[bytes, Callable[[Any, int], None]]:
        key = self.state.storage_key
        msg = vz.AnyOlmMessage.from_parts(sc.olm_type, sc.olm_body)
        pre_key = msg.to_pre_key() if sc.olm_type == 0 else None
        for _sid, pickle in self.state.sessions(sc.sender_device):
            session = vz.Session.from_pickle(pickle, key)
            if pre_key is not None and not session.session_matches(pre_key):
                continue
            try:
                plain = session.decrypt(msg)
            except Exception:
                continue
            return bytes(plain), self._saver(sc.sender_device, session, False)
        if pre_key is None:
            raise MalformedEnvelope("no session decrypts this message (replay or forgery)")
        try:
            session, plain = self.account.create_inbound_session(
                vz.Curve25519PublicKey.from_base64(sc.sender_device), pre_key
            )
        except Exception as exc:
            raise MalformedEnvelope("cannot open pre-key message (replay or forgery)") from exc
        return bytes(plain), self._saver(sc.sender_device, session, True)

    def _saver(
        self, peer: str, session: vz.Session, account_changed: bool
    ) -> Callable[[Any, int], None]:
        def save(db: Any, now: int) -> None:
            self.state.save_session(
                db, peer, session.session_id, session.pickle(self.state.storage_key), now
            )
            if account_changed:
                self._save_account(db)

        return save

    # ---- history -----------------------------------------------------------------------------

    def history(self, address: str) -> list[HistoryRow]:
        return self.state.history(address)
