"""The device Python API: join a node, send and receive end-to-end encrypted messages.

Layers (docs/protocol.md §3): a :class:`client.payload.Payload` is encrypted with Olm (vodozemac)
per recipient device; the Olm message plus the sender's address and device key is sealed to the
recipient device's sealing key and padded (sealed sender); the result is the body of one envelope
per recipient device. A message is accepted as *from alice* only if the Olm sender key is in
alice's signed device list, under alice's pinned identity key.

Every message fans out to each device on the recipient's signed list **and** to this user's own
other devices, so they show what was sent. Receipts, edits, deletes, disappearing timers and
display names are payloads like any other: nodes cannot read or forge them.

Receiving opens a delivered batch in two phases (unseal and check senders, then one transaction
for the whole batch), so a backlog costs one fsync per batch, not per message. Sending can be
durable first: :meth:`Device.queue_text` stores a ``pending`` row and its outbox entry, and
:meth:`Device.flush_outbox` sends the queue when the home node is reachable (docs/protocol.md
§3.1); a group text is queued as its payload and Megolm-encrypted only when it is flushed
(:meth:`Device.queue_group_text`). A daemon lends the device its one connection with
:meth:`Device.use_connection`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import random
import sqlite3
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import nacl.public
import nacl.signing
import vodozemac as vz

from federation import frames as F
from federation.clock import Clock, SystemClock
from federation.devicelist import DeviceInfo, DeviceList, SignedDeviceList, coarse_day
from federation.errors import (
    HavenError,
    IdentityChanged,
    KeysExhausted,
    KeysUnavailable,
    LocalProtocolError,
    MalformedEnvelope,
    RateLimited,
    RemoteProtocolError,
    TransportError,
    UntrustedKey,
)
from federation.ids import Address, new_envelope_id, new_mailbox_id
from federation.multi import GroupInner, open_copy
from federation.sealing import SealedContent, opener, seal, unseal
from federation.signing import b64d, device_auth_message
from federation.wire import Envelope, unpackb

from . import group_state as gs
from . import pending_moves
from .applying import APPLIERS, SessionCache
from .applying import ReceivedMessage as ReceivedMessage  # re-exported: the public API
from .attachments import file_token
from .connection import NodeConnection, expect
from .group_state import GroupError
from .groups import GroupInfo, Groups, gid_of_ref, ref_of
from .payload import Payload, device_tag
from .state import (
    STATUS_PENDING,
    STATUS_SENT,
    Contact,
    DeviceState,
    HistoryRow,
    OutboxItem,
    clean_name,
)

log = logging.getLogger("haven.device")

OTK_TAG = b"haven-otk-v1\x00"
# The node always holds this many one-time keys per device after a top-up (on each connect and
# after each batch that used one up), so its count tells only "claims since the last top-up",
# not how many devices ever started a session with this one (docs/protocol.md §5.3).
OTK_TARGET = 50
OTK_BATCH = OTK_TARGET  # the older name
DEFAULT_TTL_MS = 7 * 86_400_000
REGISTER_ATTEMPTS = 8  # a rate-limited register is retried after 0.5-1.5 s


@dataclass(frozen=True, slots=True)
class SendWarning:
    """Something the sender should know although the send succeeded (docs/cli.md ``send``).

    ``code`` is stable: ``peer_key_changed`` (the recipient's node presented another key with
    no signed rotation; the envelopes wait in our node's outbox for the pinned key),
    ``untrusted_device_list`` (the node served a list that does not verify; the pinned one was
    used), ``no_keys_left`` (a device of the contact had no one-time or fallback key; skipped),
    ``device_list_stale`` (the contact's node could not be reached, so the last verified list
    was used; devices linked since get the message only if one of the contact's devices on
    that list forwards it, docs/protocol.md §3.2), ``members_unreachable`` (group sends: the
    keys of that many members could not be fetched or claimed now, e.g. still ``rate_limited``
    after the retries; a later send tries again; ``peer`` is the group's ref).
    ``peer`` is the address host (or node id) for ``peer_key_changed``, else the address.
    """

    code: str
    peer: str
    message: str

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "peer": self.peer, "message": self.message}


@dataclass(frozen=True, slots=True)
class SendResult:
    msg_id: bytes
    devices: dict[str, dict[str, int]]  # address -> {"total", "verified"} that can read it
    envelopes: int
    warnings: tuple[SendWarning, ...] = ()


@dataclass
class _Fanout:
    """Recipients of one payload: per address, the verified list and its routing node."""

    targets: list[tuple[str, DeviceList, str, dict[str, tuple[str, str]]]] = field(
        default_factory=list
    )
    warnings: list[SendWarning] = field(default_factory=list)

    def node_warning(self, code: str, node_id: str) -> SendWarning:
        """A warning the home node attached to ``accepted``, named by the address host."""
        hosts = [a.rsplit("@", 1)[-1] for a, _, n, _ in self.targets if n == node_id]
        peer = hosts[0] if hosts else node_id
        if code == "peer_key_changed":
            text = (
                f"the node of {peer} presented a different key with no signed rotation; "
                "the message waits on your node and is not delivered until that is resolved"
            )
        else:
            text = f"your node reports {code} for {peer}"
        return SendWarning(code, peer, text)


def parse_invite(text: str) -> dict[str, Any]:
    """Decode an invite (``haven:invite:``) or a device-link code (``haven:link:``)."""
    for prefix in ("haven:invite:", "haven:link:"):
        if text.startswith(prefix):
            break
    else:
        raise LocalProtocolError("not a Haven invite or link code")
    try:
        obj = unpackb(b64d(text[len(prefix) :].strip()), max_len=4096)
        url = str(obj["url"])
        out = {
            "url": url,
            "node": str(obj["node"]),
            "name": str(obj["name"]),
            "t": bytes(obj["t"]),
            "host": str(obj.get("host") or url.split("://", 1)[1]).lower(),
            "link": prefix == "haven:link:",
        }
        if out["link"]:
            out["k"], out["mb"] = bytes(obj["k"]), bytes(obj["mb"])
        return out
    except (HavenError, KeyError, TypeError, ValueError) as exc:
        raise LocalProtocolError("malformed invite") from exc


def verified_key(dev: DeviceInfo, signed_key: str) -> str | None:
    """The Curve25519 key from ``key:signature`` if the device's Ed25519 key signed it."""
    key, _, sig = signed_key.partition(":")
    try:
        vz.Ed25519PublicKey.from_base64(dev.ed25519).verify_signature(
            OTK_TAG + key.encode(), vz.Ed25519Signature.from_base64(sig)
        )
        vz.Curve25519PublicKey.from_base64(key)
    except Exception:  # noqa: BLE001 - vodozemac's error types aren't exported
        return None
    return key


def _raw(b64: str) -> bytes:
    return base64.b64decode(b64 + "=" * (-len(b64) % 4))


class Device:
    """One device's identity and state, stored in ``home``."""

    def __init__(
        self,
        home: str,
        clock: Clock | None = None,
        passphrase: str | None = None,
        *,
        create: bool = True,
    ) -> None:
        self.home = home
        self.clock = clock or SystemClock()
        if passphrase is None:
            passphrase = os.environ.get("HAVEN_PASSPHRASE") or None
        self.state = DeviceState(home, passphrase, create=create)
        self._account: vz.Account | None = None
        self._receipts: dict[str, list[bytes]] = {}  # delivered receipts not yet sent
        self._claims_used = 0  # inbound sessions made since the last top-up (one-time keys)
        self._provider: Callable[[], Awaitable[NodeConnection]] | None = None
        # connections the provider lent us: never closed here
        self._borrowed: weakref.WeakSet[NodeConnection] = weakref.WeakSet()
        self.groups_engine = Groups(self)  # groups: client/groups.py
        self.move_drops: Counter[str] = Counter()  # refused ``moved`` notices, by code
        # the standalone CLI: every command that connects sends what is queued first
        self.flush_on_connect = False
        self._moves_retry_at = 0  # kept notices: the next try after a batch (retry_moves)
        self.state.purge_expired(self.clock.now_ms())

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
        return self.state.get("identity_seed") is not None

    @property
    def address(self) -> str:
        return self._get_str("address")

    @property
    def former_addresses(self) -> tuple[str, ...]:
        """Our addresses before the home node moved (§12.5): still ours for messages sent to
        them by contacts that have not followed yet."""
        v = self.state.get("former_addresses")
        return tuple(v.decode().split("\n")) if v else ()

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

    def identity(self) -> nacl.signing.SigningKey:
        seed = self.state.get("identity_seed")
        if seed is None:
            raise LocalProtocolError("not joined")
        return nacl.signing.SigningKey(seed)

    def _sealing(self) -> bytes:
        v = self.state.get("sealing_key")
        if v is None:
            raise LocalProtocolError("not joined")
        return v

    def _save_account(self, db: sqlite3.Connection) -> None:
        self.state.put(db, "account", self.account.pickle(self.state.storage_key).encode())

    def _sign(self, message: bytes) -> bytes:
        return _raw(self.account.sign(message).to_base64())

    def setting(self, key: str, default: str) -> str:
        v = self.state.get("setting:" + key)
        return default if v is None else v.decode()

    def set_setting(self, key: str, value: str) -> None:
        with self.state.tx() as db:
            self.state.put(db, "setting:" + key, value.encode())

    # ---- joining -----------------------------------------------------------------------------

    def _new_device_keys(self) -> tuple[DeviceInfo, bytes]:
        """Create this device's Olm account, sealing key and mailbox (kept until registered)."""
        if self.state.get("mailbox") is not None:
            raise LocalProtocolError(f"{self.home} already holds a device")
        self._account = vz.Account()
        sealing = nacl.public.PrivateKey.generate()
        mailbox = new_mailbox_id()
        info = DeviceInfo(
            self.curve_key,
            str(self._account.ed25519_key.to_base64()),
            bytes(sealing.public_key),
            mailbox,
            coarse_day(self.clock.now_ms()),  # a signed list records only the day (§3.2)
        )
        return info, bytes(sealing)

    async def _register(
        self,
        conn: NodeConnection,
        inv: dict[str, Any],
        info: DeviceInfo,
        sealing: bytes,
        signed: SignedDeviceList | None,
    ) -> str:
        ch = conn.challenge
        if ch is None or ch.node_id != inv["node"]:
            raise UntrustedKey("the node does not hold the key named in the invite")
        sig = self._sign(device_auth_message(ch.node_id, ch.nonce, info.mailbox))
        for attempt in range(REGISTER_ATTEMPTS):
            frame = F.Register(
                conn.next_rid(),
                inv["t"],
                info.mailbox,
                _raw(info.ed25519),
                sig,
                signed,
                inv.get("register", ""),  # open registration: the name wanted (§5.2)
            )
            try:
                reg = expect(await conn.request(frame), F.Registered)
                break
            except RemoteProtocolError as exc:
                # The node-wide registration budget refills within seconds (protocol §5.2).
                if exc.code != RateLimited.code or attempt == REGISTER_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.5 + random.random())
        with self.state.tx() as db:
            self.state.put(db, "sealing_key", sealing)
            self.state.put(db, "mailbox", info.mailbox)
            self.state.put(db, "node_url", inv["url"].encode())
            self.state.put(db, "node_id", ch.node_id.encode())
            self.state.put(db, "address", reg.address.encode())
            self._save_account(db)
        return str(reg.address)

    async def join(self, invite: str, name: str = "") -> str:
        """Redeem an invite (new account) or a link code (another device of an account).

        Returns the address ``name@host``.
        """
        inv = parse_invite(invite)
        if inv["link"]:
            from .linking import join_link

            return await join_link(self, inv, name or "device")
        return await self.join_new(inv, name)

    async def join_new(self, inv: dict[str, Any], name: str = "") -> str:
        """Create a new account whose first device is this one: by invite, or by open
        registration when ``inv["register"]`` names the account (client/linking.py)."""
        identity = nacl.signing.SigningKey.generate()
        info, sealing = self._new_device_keys()
        address = f"{inv['name']}@{inv['host']}"
        signed = DeviceList(address, bytes(identity.verify_key), 1, (info,)).sign(identity)
        async with NodeConnection(inv["url"]) as conn:
            address = await self._register(conn, inv, info, sealing, signed)
            self.adopt_identity(
                bytes(identity),
                address,
                inv["node"],
                signed,
                {info.device_id: name or "this device"},
            )
            await self._top_up(conn, 0)
        return address

    def adopt_identity(
        self,
        seed: bytes,
        address: str,
        node_id: str,
        signed: SignedDeviceList,
        names: dict[str, str],
    ) -> None:
        """Store the user identity key and pin our own signed list (as a contact of ourselves)."""
        dl = signed.open(expected_address=address)
        with self.state.tx() as db:
            self.state.put(db, "identity_seed", seed)
            self.state.save_contact(
                db,
                Contact(
                    address, dl.identity_key, node_id, signed.blob, signed.signature, verified=True
                ),
            )
            for dev_id, dev_name in names.items():
                db.execute(
                    "INSERT OR REPLACE INTO device_names VALUES (?, ?)",
                    (dev_id, self.state.seal(dev_name.encode())),
                )

    async def _top_up(self, conn: NodeConnection, count: int) -> None:
        """Bring the node's one-time keys for this device back to exactly :data:`OTK_TARGET`
        (``count`` is what it holds now), and publish a fallback key once.

        A constant count means a seized node learns only how many keys were claimed since the
        last top-up, not how many devices ever started a session with this one.
        """
        acct: Any = self.account  # the type stubs lack the fallback-key methods
        need_fallback = self.state.get("fallback_published") is None
        need = max(0, OTK_TARGET - count)
        self._claims_used = 0
        if not need and not need_fallback:
            return
        unpublished = len(acct.one_time_keys)
        if unpublished < need:
            acct.generate_one_time_keys(need - unpublished)
        otks = tuple((k, self._signed_key(v.to_base64())) for k, v in acct.one_time_keys.items())[
            :need
        ]
        fb: tuple[tuple[str, str], ...] = ()
        if need_fallback:
            if not acct.fallback_key:
                acct.generate_fallback_key()
            fb = tuple((k, self._signed_key(v.to_base64())) for k, v in acct.fallback_key.items())[
                :1
            ]
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

    async def refill_keys(self, conn: NodeConnection) -> int:
        """Ask the node how many one-time keys it holds for us and top up to the target.

        Returns the count the node reported before the top-up.
        """
        ok = expect(await conn.request(F.PublishKeys(conn.next_rid(), (), (), None)), F.Ok)
        await self._top_up(conn, ok.otk_count)
        return int(ok.otk_count)

    def _signed_key(self, key: str) -> str:
        """``key:signature``: a one-time or fallback key signed by this device's Ed25519 key,
        so a node cannot substitute keys of its own (docs/protocol.md §3.4)."""
        return f"{key}:{self.account.sign(OTK_TAG + key.encode()).to_base64()}"

    async def connect(self) -> NodeConnection:
        """Open and authenticate a connection to the home node; the caller hands it back with
        :meth:`release`. In daemon mode (:meth:`use_connection`) the daemon's connection."""
        if self._provider is not None:
            lent = await self._provider()
            self._borrowed.add(lent)
            return lent
        conn = NodeConnection(self.node_url)
        await conn.__aenter__()
        try:
            ch = conn.challenge
            if ch is None:
                raise UntrustedKey("no challenge from the home node")
            if ch.node_id != self.node_id:
                await self._follow_rotation(ch.node_id)
            sig = self._sign(device_auth_message(ch.node_id, ch.nonce, self.mailbox))
            ok = expect(await conn.request(F.Auth(conn.next_rid(), self.mailbox, sig)), F.AuthOk)
            moved = ok.address != self.address
            if moved:
                await self._follow_move(conn, ok.address)
            await self._top_up(conn, ok.otk_count)
            # the ``moved`` notices to our contacts (queued by _follow_move), and in the
            # standalone CLI what an earlier command queued (docs/protocol.md §3.1)
            if moved or (self.flush_on_connect and self.state.has_queued()):
                try:
                    await self.flush_outbox(conn)
                except HavenError as exc:
                    log.info("queued payloads left for later (%s)", exc.code)
        except BaseException:
            await conn.__aexit__(None, None, None)
            raise
        return conn

    async def _follow_rotation(self, new_id: str) -> None:
        """Accept a new home-node key only with a rotation chain signed by the pinned key."""
        import aiohttp

        from federation.signing import Descriptor, b64e, rotation_chain_allows

        challenge = os.urandom(16)
        url = f"{self.node_url}/.well-known/haven/node?c={b64e(challenge)}"
        try:
            async with aiohttp.ClientSession() as s, s.get(url) as r:
                desc = Descriptor.verify_decode(await r.content.read(64 * 1024))
        except (aiohttp.ClientError, OSError, HavenError) as exc:
            raise UntrustedKey("home node key changed and its descriptor is unavailable") from exc
        if (
            desc.challenge != challenge
            or desc.node_id != new_id
            or not rotation_chain_allows(self.node_id, new_id, desc.rotations)
        ):
            raise UntrustedKey("home node key changed without a signed rotation; refusing")
        with self.state.tx() as db:
            self.state.put(db, "node_id", new_id.encode())
        log.warning("home node rotated its key (signed by the old key); following it")

    async def _follow_move(self, conn: NodeConnection, new_address: str) -> None:
        """The home node moved to another host (docs/protocol.md §12.5): same node id (checked
        by the challenge) and account, new host. Re-sign our device list for the new address
        (unless another of our devices already did), take the address as ours and queue a
        ``moved`` notice to each contact (sealed as from the old address, which they pinned)."""
        old, new = Address.parse(self.address), Address.parse(new_address)
        if old.name != new.name:
            raise UntrustedKey("the home node names another account for this device")
        own = self.state.contact(self.address)
        if own is None:
            raise UntrustedKey("this device has no signed list of its own to move")
        dl = SignedDeviceList(own.device_list, own.sig).open(expected_address=self.address)
        keys = expect(await conn.request(F.QueryKeys(conn.next_rid(), new_address, False)), F.Keys)
        signed = keys.device_list
        try:
            served = signed.open(expected_address=new_address)
        except HavenError:
            served = None
        if served is None or served.identity_key != dl.identity_key:
            version = max(dl.version, served.version if served else 0) + 1
            signed = DeviceList(new_address, dl.identity_key, version, dl.devices).sign(
                self.identity()
            )
            expect(await conn.request(F.PublishKeys(conn.next_rid(), (), (), signed)), F.Ok)
        moved = replace(own, address=new_address, device_list=signed.blob, sig=signed.signature)
        formers = "\n".join(dict.fromkeys((*self.former_addresses, self.address)))
        old_address, now = self.address, self.clock.now_ms()
        peers = [
            c.address for c in self.state.contacts() if c.address not in (old_address, new_address)
        ]
        with self.state.tx() as db:
            self.state.save_contact(db, moved)
            self.state.put(db, "address", new_address.encode())
            self.state.put(db, "former_addresses", formers.encode())
            for peer in peers:
                p = Payload(os.urandom(16), "moved", peer, now, text=new_address, old=old_address)
                self.state.queue(db, OutboxItem(p.id, peer, p.encode(), DEFAULT_TTL_MS, now))
        log.warning("home node moved to another host; this device follows it")

    # ---- contacts and keys -------------------------------------------------------------------

    async def fetch_contact(
        self, conn: NodeConnection, address: str, claim: bool, *, accept_new_key: bool = False
    ) -> tuple[Contact, DeviceList, dict[str, tuple[str, str]]]:
        """Query, verify and pin a contact's device list (TOFU on the identity key).

        Raises:
            KeysUnavailable: the node could not fetch the keys.
            IdentityChanged: the identity key differs from the pinned one.
            UntrustedKey: the list does not verify under its identity key.
        """
        try:
            keys = expect(await conn.request(F.QueryKeys(conn.next_rid(), address, claim)), F.Keys)
        except RemoteProtocolError as exc:
            if exc.code == "not_found" or "(not_found)" in str(exc):  # here, or relayed
                raise KeysUnavailable(
                    f"there is no account {address} (its node is reachable; check the name)",
                    code="no_such_account",
                ) from exc
            raise KeysUnavailable(f"keys for {address} unavailable ({exc.code})") from exc
        contact, dl = self.pin_list(
            address, keys.node_id, keys.device_list, accept_new_key=accept_new_key
        )
        return contact, dl, dict(keys.claimed)

    def pin_list(
        self,
        address: str,
        node_id: str,
        signed: SignedDeviceList,
        *,
        accept_new_key: bool = False,
        db: Any = None,
    ) -> tuple[Contact, DeviceList]:
        """Verify a served device list and pin it (TOFU on the identity key), as
        :meth:`fetch_contact` does for one address and groups do for many at once (inside
        their transaction ``db``, if given: one fsync for all).

        Raises:
            IdentityChanged: the identity key differs from the pinned one.
            UntrustedKey: the list does not verify under its identity key, or rolled back.
        """
        dl = signed.open(expected_address=address)
        pinned = self.state.contact(address)
        verified, timer = (pinned.verified, pinned.timer_ms) if pinned else (False, 0)
        if pinned is not None and pinned.identity_key != dl.identity_key:
            if not accept_new_key:
                raise IdentityChanged(
                    f"the identity key of {address} changed: check the safety number, then "
                    f"`haven verify {address} --accept-new-key`"
                )
            verified = False
        elif pinned is not None:
            old = SignedDeviceList(pinned.device_list, pinned.sig).open()
            if dl.version < old.version:
                raise UntrustedKey(f"device list of {address} rolled back")
        contact = Contact(
            address,
            dl.identity_key,
            node_id,
            signed.blob,
            signed.signature,
            verified,
            timer,
        )
        if pinned is not None:  # keep the profile fields (save_contact does not touch them)
            contact = replace(
                contact,
                display_name=pinned.display_name,
                nickname=pinned.nickname,
                timer_at=pinned.timer_at,
                profile_sent=pinned.profile_sent,
            )
        if contact != pinned and db is not None:
            self.state.save_contact(db, contact)
        elif contact != pinned:  # most sends see an unchanged list: skip the write (an fsync)
            with self.state.tx() as tx:
                self.state.save_contact(tx, contact)
        return contact, dl

    async def _list_for(
        self, conn: NodeConnection, address: str, fan: _Fanout
    ) -> tuple[Contact, DeviceList]:
        """The verified list to encrypt to; falls back to the pinned list when the node serves
        one that does not verify, or cannot be reached."""
        try:
            contact, dl, _ = await self.fetch_contact(conn, address, claim=False)
            return contact, dl
        except IdentityChanged:
            raise
        except (KeysUnavailable, UntrustedKey) as exc:
            known = self.state.contact(address)
            if known is None:
                raise
            dl = SignedDeviceList(known.device_list, known.sig).open(expected_address=address)
            if isinstance(exc, UntrustedKey):
                fan.warnings.append(
                    SendWarning(
                        "untrusted_device_list",
                        address,
                        f"the node served a device list for {address} that is not signed by "
                        "its identity key; refused it and used the last verified list",
                    )
                )
                log.warning("refused an unsigned device list for a contact")
            elif not all(
                self.state.has_session(d.device_id)
                for d in dl.devices
                if d.device_id != self.curve_key
            ):
                raise
            else:
                fan.warnings.append(
                    SendWarning(
                        "device_list_stale",
                        address,
                        f"the node of {address} could not be reached, so the message went to the "
                        f"{len(dl.devices)} device(s) on the last verified list; a device linked "
                        "since gets it when one of those forwards it",
                    )
                )
            return known, dl

    # ---- sending -----------------------------------------------------------------------------

    async def send(
        self,
        address: str,
        text: str,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        conn: NodeConnection | None = None,
        expires_in: int | None = None,
    ) -> SendResult:
        """Encrypt ``text`` to every device of ``address`` (and our other devices).

        Returns once the home node has durably accepted every envelope. ``expires_in`` (ms)
        makes it disappear; by default the conversation's timer applies. The first message to
        a contact since our display name changed is followed by our profile.

        Raises:
            KeysUnavailable: the contact's keys can't be fetched and aren't known.
            IdentityChanged: the contact's identity key changed (accept it first).
        """
        Address.parse(address)
        if conn is None:
            link = await self.connect()
            try:
                return await self.send(
                    address, text, ttl_ms=ttl_ms, conn=link, expires_in=expires_in
                )
            finally:
                await self.release(link)
        if expires_in is None:
            c = self.state.contact(address)
            expires_in = c.timer_ms if c else 0
        now = self.clock.now_ms()
        payload = Payload(os.urandom(16), "text", address, now, text=text, expires_in=expires_in)
        res = await self.send_payload(address, payload, ttl_ms=ttl_ms, conn=conn, record=text)
        await self._profile_after_send(conn, address)
        return res

    async def send_payload(
        self,
        address: str,
        payload: Payload,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        conn: NodeConnection | None = None,
        include_self: bool = True,
        record: str | None = None,
        only: frozenset[str] | None = None,
    ) -> SendResult:
        """Fan ``payload`` out to ``address``'s devices and our own other devices.

        ``only`` restricts the fan-out to these device ids (a forward to missed devices).
        """
        if conn is None:
            c = await self.connect()
            try:
                return await self.send_payload(
                    address,
                    payload,
                    ttl_ms=ttl_ms,
                    conn=c,
                    include_self=include_self,
                    record=record,
                    only=only,
                )
            finally:
                await self.release(c)
        fan = _Fanout()
        for addr in [address] + (
            [self.address] if include_self and address != self.address else []
        ):
            contact, dl = await self._list_for(conn, addr, fan)

            def wanted(d: DeviceInfo) -> bool:
                return d.device_id != self.curve_key and (only is None or d.device_id in only)

            devices = [d for d in dl.devices if wanted(d)]
            claimed: dict[str, tuple[str, str]] = {}
            if any(not self.state.has_session(d.device_id) for d in devices):
                try:
                    _, dl2, claimed = await self.fetch_contact(conn, addr, claim=True)
                    if dl2.identity_key == dl.identity_key and dl2.version == dl.version:
                        devices = [d for d in dl2.devices if wanted(d)]
                except (KeysUnavailable, UntrustedKey):
                    pass
            dl = DeviceList(dl.address, dl.identity_key, dl.version, tuple(devices))
            fan.targets.append((addr, dl, contact.node_id, claimed))
        return await self._encrypt_and_send(conn, payload, fan, ttl_ms, record)

    async def recipient_devices(self, conn: NodeConnection, address: str) -> list[str]:
        """The device ids a payload to ``address`` would reach now: theirs (on their signed
        list) and our own other devices. A file's fetch tokens are made for exactly these."""
        fan = _Fanout()
        ids: list[str] = []
        for addr in [address] + ([self.address] if address != self.address else []):
            _, dl = await self._list_for(conn, addr, fan)
            ids += [d.device_id for d in dl.devices if d.device_id != self.curve_key]
        return ids

    async def _encrypt_and_send(
        self,
        conn: NodeConnection,
        payload: Payload,
        fan: _Fanout,
        ttl_ms: int,
        record: str | None,
    ) -> SendResult:
        now = self.clock.now_ms()
        if payload.to != self.address and payload.kind != "sync":
            # Name the recipient's devices this payload reaches, so one of them can forward it
            # to devices linked since (a stale list, §3.2). Only the parties can read this.
            reach = tuple(
                device_tag(d.device_id)
                for addr, dl, _, claimed in fan.targets
                if addr == payload.to
                for d in dl.devices
                if self._can_encrypt(d, claimed.get(d.device_id))
            )
            payload = replace(payload, devs=reach)
        data = payload.encode()
        # a ``moved`` notice comes from the address the contact pinned (§12.5)
        sender = payload.old if payload.kind == "moved" else self.address
        file_secret = payload.file.token if payload.file is not None else b""

        def data_for(dev: DeviceInfo) -> bytes:
            # A file payload is built per device: each gets its own fetch token, derived from
            # the secret the queued payload holds (which itself never leaves, §3.1 "file").
            if payload.file is None:
                return data
            token = file_token(file_secret, dev.device_id)
            return replace(payload, file=replace(payload.file, token=token)).encode()

        items: list[tuple[str, Envelope]] = []
        counts: dict[str, dict[str, int]] = {}
        with self.state.tx() as db:
            for addr, dl, node_id, claimed in fan.targets:
                contact = self.state.contact(addr)
                reached = 0
                for dev in dl.devices:
                    olm = self._encrypt_for(db, dev, claimed.get(dev.device_id), data_for(dev), now)
                    if olm is None:
                        fan.warnings.append(
                            SendWarning(
                                "no_keys_left",
                                addr,
                                f"a device of {addr} has no keys left; skipped",
                            )
                        )
                        continue
                    body = seal(dev.sealing, SealedContent(sender, self.curve_key, *olm))
                    env = Envelope(new_envelope_id(), dev.mailbox, now + ttl_ms, body)
                    items.append((node_id, env))
                    reached += 1
                if addr != self.address:
                    verified = reached if contact is not None and contact.verified else 0
                    counts[addr] = {"total": reached, "verified": verified}
                else:
                    counts[addr] = {"total": reached, "verified": reached}
            peer_counts = counts.get(payload.to, {"total": 0, "verified": 0})
            if payload.to in counts and peer_counts["total"] == 0 and payload.to != self.address:
                raise KeysExhausted(
                    f"no device of {payload.to} has a one-time or fallback key left; "
                    "they need to come online"
                )
            if record is not None:
                self.state.add_history(
                    db,
                    HistoryRow(
                        payload.id,
                        payload.to,
                        True,
                        self.address,
                        record,
                        payload.sent_at,
                        now,
                        read=True,
                        expires_in=payload.expires_in,
                        expire_at=(
                            payload.sent_at + payload.expires_in if payload.expires_in else None
                        ),
                        devices_total=peer_counts["total"],
                        devices_verified=peer_counts["verified"],
                        ttl_at=now + ttl_ms,
                    ),
                )
        # Sessions were committed above, before any ciphertext leaves this device.
        try:
            for start in range(0, len(items), 200):
                chunk = tuple(items[start : start + 200])
                ans = expect(await conn.request(F.Send(conn.next_rid(), chunk)), F.Accepted)
                for code, node_id in ans.warnings:
                    w = fan.node_warning(code, node_id)
                    if w not in fan.warnings:
                        fan.warnings.append(w)
                if ans.rejected:
                    codes = sorted({c for _, c in ans.rejected})
                    raise RemoteProtocolError(
                        f"node refused envelopes: {', '.join(codes)}", code=codes[0]
                    )
        except HavenError:
            if record is not None:  # not (fully) accepted: don't show it as sent
                with self.state.tx() as db:
                    self.state.delete_history(db, payload.id)
            raise
        return SendResult(payload.id, counts, len(items), tuple(fan.warnings))

    def _can_encrypt(self, dev: DeviceInfo, otk: tuple[str, str] | None) -> bool:
        """Whether :meth:`_encrypt_for` will reach ``dev`` (a session, or a signed key)."""
        if self.state.has_session(dev.device_id):
            return True
        return otk is not None and verified_key(dev, otk[1]) is not None

    def _encrypt_for(
        self, db: Any, dev: DeviceInfo, otk: tuple[str, str] | None, payload: bytes, now: int
    ) -> tuple[int, bytes] | None:
        sessions = self.state.sessions(dev.device_id)
        if sessions:
            session = vz.Session.from_pickle(sessions[0][1], self.state.storage_key)
        elif otk is not None:
            key = verified_key(dev, otk[1])
            if key is None:
                log.warning("a one-time key is not signed by its device; refused")
                return None
            session = self.account.create_outbound_session(
                vz.Curve25519PublicKey.from_base64(dev.device_id),
                vz.Curve25519PublicKey.from_base64(key),
            )
        else:
            return None
        msg_type, body = session.encrypt(payload).to_parts()
        self.state.save_session(
            db, dev.device_id, session.session_id, session.pickle(self.state.storage_key), now
        )
        return int(msg_type), bytes(body)

    async def edit(self, address: str, msg_id: bytes, text: str) -> SendResult:
        """Edit one of our own earlier messages on every device that has it."""
        row = self.state.message(msg_id)
        if row is None or not row.outgoing or row.peer != address:
            raise LocalProtocolError("no such message of yours in that conversation")
        if row.status == STATUS_PENDING:  # nothing left this device yet: rewrite the queue
            queued = [i for i in self.state.outbox() if i.msg_id == msg_id]
            with self.state.tx() as db:
                self.state.edit_history(db, msg_id, text)
                for item in queued:
                    new = replace(Payload.decode(item.payload), text=text)
                    self.state.queue(db, replace(item, payload=new.encode()))
            return SendResult(msg_id, {}, 0)
        p = Payload(os.urandom(16), "edit", address, self.clock.now_ms(), text=text, target=msg_id)
        res = await self.send_payload(address, p)
        with self.state.tx() as db:
            self.state.edit_history(db, msg_id, text)
        return res

    async def delete(self, address: str, msg_id: bytes) -> SendResult:
        """Delete one of our own messages for everyone (every device applies it)."""
        row = self.state.message(msg_id)
        if row is None or not row.outgoing or row.peer != address:
            raise LocalProtocolError("no such message of yours in that conversation")
        if row.status == STATUS_PENDING:  # never sent: delete it here with its queued copy
            with self.state.tx() as db:
                self.state.delete_history(db, msg_id)
            self.state.scrub()
            return SendResult(msg_id, {}, 0)
        p = Payload(os.urandom(16), "delete", address, self.clock.now_ms(), target=msg_id)
        res = await self.send_payload(address, p)
        with self.state.tx() as db:
            self.state.delete_history(db, msg_id)
        self.state.scrub()
        return res

    # ---- receiving ---------------------------------------------------------------------------

    async def receive(
        self, wait_s: float = 2.0, on_message: Callable[[ReceivedMessage], None] | None = None
    ) -> list[ReceivedMessage]:
        """Receive until ``wait_s`` seconds pass with nothing new; return new messages."""
        out: list[ReceivedMessage] = []
        conn = await self.connect()
        try:
            new = await self.retry_moves(conn)  # notices kept from an earlier try
            while True:
                for m in new:
                    if on_message is not None:
                        on_message(m)
                out.extend(new)
                try:
                    async with asyncio.timeout(wait_s):
                        envs = await conn.deliveries.get()
                except TimeoutError:
                    break
                new = await self.process(conn, envs)
        finally:
            await self.release(conn)
        self.state.purge_expired(self.clock.now_ms())
        return out

    async def process(self, conn: NodeConnection, envs: list[Envelope]) -> list[ReceivedMessage]:
        """Open, verify, store and ack one delivered batch; send delivered receipts.

        Two phases: every envelope is unsealed and its sender's signed list resolved (which
        may ask the node), then ONE transaction decrypts them in order, applies them and saves
        each Olm session it used once, at the end (one fsync for the batch, not one per
        message). Bad envelopes (forgeries, replays, undecryptable, failing checks) are
        dropped with a warning, each in its own savepoint, without losing the others; every
        envelope is acked after the commit.
        """
        new: list[ReceivedMessage] = []
        forwards: list[tuple[str, Payload, bytes]] = []
        moves: list[Payload] = []
        opened = await self._unseal_batch(conn, envs)
        if opened:
            new = self._store_batch(opened, forwards, moves)
        if envs:
            new.extend(await self.retry_moves(conn, after_batch=True))
        for p in moves:  # best effort too: fetching the new address's list needs the network
            notice = await self._follow_contact_move(conn, p)
            if notice is not None:
                new.append(notice)
        if forwards:  # best effort, before the ack (a crash in between loses only the forward)
            await self._forward_missed(conn, forwards)
        await conn.ack([env.id for env in envs])
        await self.groups_engine.after_batch(conn)
        new.sort(key=lambda m: (m.sender, m.sent_at))
        await self._send_receipts(conn, new)
        if self._claims_used:  # sessions started with us used one-time keys: refill
            try:
                await self.refill_keys(conn)
            except HavenError as exc:
                log.warning("one-time keys not refilled (%s)", exc.code)
        return new

    async def _unseal_batch(
        self, conn: NodeConnection, envs: list[Envelope]
    ) -> list[SealedContent | GroupInner]:
        """Phase 1: unseal each envelope (a body that is not a sealed box for us is tried as
        a group copy) and check its sender device is on the sender's signed list (fetched
        once per sender and batch if the pinned one lacks it)."""
        sealing = self._sealing()
        box = opener(sealing)  # once per batch: it derives the public key
        sealing_pub = bytes(nacl.public.PrivateKey(sealing).public_key)
        lists: dict[str, DeviceList] = {}
        out: list[SealedContent | GroupInner] = []
        for env in envs:
            try:
                sc: SealedContent | GroupInner
                try:
                    sc = unseal(sealing, env.body, box=box)
                except MalformedEnvelope:
                    sc = open_copy(sealing, sealing_pub, env.body)
                    await self.groups_engine.prepare(conn, sc)
                Address.parse(sc.sender)
                dl = lists.get(sc.sender)
                if dl is None or not any(d.device_id == sc.sender_device for d in dl.devices):
                    dl = await self._sender_list(conn, sc.sender, sc.sender_device)
                    lists[sc.sender] = dl
                if not any(d.device_id == sc.sender_device for d in dl.devices):
                    raise UntrustedKey("sender key is not in the sender's signed device list")
                out.append(sc)
            except HavenError as exc:
                log.warning("dropped an envelope that failed checks (%s)", exc.code)
            except ValueError:
                log.warning("dropped an envelope that failed checks (malformed)")
        return out

    def _store_batch(
        self,
        opened: list[SealedContent | GroupInner],
        forwards: list[tuple[str, Payload, bytes]],
        moves: list[Payload] | None = None,
    ) -> list[ReceivedMessage]:
        """Phase 2: decrypt and apply in order, one transaction, one savepoint per envelope;
        each touched session (and the account, if a pre-key message used a one-time key) is
        pickled and saved once, at the end."""
        new: list[ReceivedMessage] = []
        now = self.clock.now_ms()
        me = self.address
        cache = SessionCache(self.state)
        self.groups_engine.begin_batch()
        try:
            with self.state.tx() as db:
                for sc in opened:
                    db.execute("SAVEPOINT envelope")
                    try:
                        if isinstance(sc, GroupInner):
                            msgs = self.groups_engine.apply_copy(db, sc, now)
                        else:
                            msgs = self._open_one(db, sc, me, now, cache, forwards, moves)
                    except HavenError as exc:
                        db.execute("ROLLBACK TO envelope")
                        self.groups_engine.forget()
                        if isinstance(sc, GroupInner):
                            self.groups_engine.drop(exc.code)
                        else:
                            log.warning("dropped an envelope that failed checks (%s)", exc.code)
                        msgs = []
                    db.execute("RELEASE envelope")
                    new.extend(msgs)
                cache.save(db, now)
                if cache.account_changed:
                    self._save_account(db)
        except BaseException:
            self._account = None  # reload it as stored: the one-time keys it used are back
            raise
        finally:
            self.groups_engine.end_batch()
        return new

    def _open_one(
        self,
        db: sqlite3.Connection,
        sc: SealedContent,
        me: str,
        now: int,
        cache: SessionCache,
        forwards: list[tuple[str, Payload, bytes]],
        moves: list[Payload] | None = None,
    ) -> list[ReceivedMessage]:
        """Decrypt and apply one envelope. A payload from someone else that names the devices
        it reached (``devs``) is appended to ``forwards`` for :meth:`_forward_missed`; a
        contact's ``moved`` notice to ``moves`` for :meth:`_follow_contact_move`."""
        payload_bytes = self._decrypt_cached(sc, cache)
        p = Payload.decode(payload_bytes)
        own = sc.sender == me
        if not own and p.to != me and p.to not in self.former_addresses:
            raise UntrustedKey("message was addressed to someone else")
        if p.kind == "sync":
            if not own:
                raise UntrustedKey("a sync payload is accepted only from our own devices")
            synced = self._apply_sync(db, p, now)
            return [] if synced is None else [synced]
        if p.kind in ("group_key", "group_join"):
            return self._apply_group_1to1(db, sc, p, now)
        if p.kind == "moved":
            if own:
                return []  # our own devices follow the move themselves
            if p.old != sc.sender:
                self.move_drops[UntrustedKey.code] += 1
                raise UntrustedKey("an address-change notice must come from the old address")
            if moves is not None:
                moves.append(p)
            return []
        msg = self._apply(db, sc.sender, own, p, now)
        if not own and p.devs:
            forwards.append((sc.sender, p, payload_bytes))
        return [] if msg is None else [msg]

    def _apply_group_1to1(
        self, db: sqlite3.Connection, sc: SealedContent, p: Payload, now: int
    ) -> list[ReceivedMessage]:
        """A group's 1:1 payload: a Megolm session key (bound to the Olm sender device) or a
        join request with an invite secret. A refusal is counted with the group drops."""
        g = self.groups_engine
        try:
            if p.kind == "group_key":
                return g.apply_key(db, sc.sender, sc.sender_device, p, now)
            g.apply_join(db, sc.sender, p, now)
            return []
        except HavenError as exc:
            g.drops[exc.code] += 1
            raise

    async def _forward_missed(
        self, conn: NodeConnection, forwards: list[tuple[str, Payload, bytes]]
    ) -> None:
        """Forward payloads to our own devices their senders did not encrypt for.

        A sender that could not reach our node encrypts to the last list it verified
        (``device_list_stale``); each payload names the devices it reached (``devs``). Every
        device that receives it compares that with our current signed list and relays it, as a
        ``sync`` payload over its own sessions, to the devices missing. Receivers dedupe by
        message id, so two forwarding devices store it once (docs/protocol.md §3.1).
        """
        try:
            _, own, _ = await self.fetch_contact(conn, self.address, claim=False)
        except HavenError as exc:
            log.warning("could not check our device list for forwarding (%s)", exc.code)
            return
        for sender, p, data in forwards:
            missed = frozenset(
                d.device_id
                for d in own.devices
                if d.device_id != self.curve_key and device_tag(d.device_id) not in p.devs
            )
            if not missed:
                continue
            sync = Payload(
                os.urandom(16), "sync", self.address, self.clock.now_ms(), origin=sender, inner=data
            )
            try:
                await self.send_payload(
                    self.address, sync, conn=conn, include_self=False, only=missed
                )
            except HavenError as exc:
                log.warning("a payload was not forwarded to our other devices (%s)", exc.code)

    async def _send_receipts(self, conn: NodeConnection, new: list[ReceivedMessage]) -> None:
        """Send delivered receipts, one per sender, coalesced while more deliveries wait."""
        if self.setting("delivery_receipts", "on") != "on":
            return
        me = self.address
        for m in new:
            if m.kind in ("text", "file") and m.sender != me and not m.forwarded and not m.chat:
                self._receipts.setdefault(m.sender, []).append(m.msg_id)
        if not conn.deliveries.empty() and sum(map(len, self._receipts.values())) < 500:
            return  # more is already queued: one receipt will cover it all
        by_sender, self._receipts = self._receipts, {}
        for sender, ids in by_sender.items():
            p = Payload(os.urandom(16), "delivered", sender, self.clock.now_ms(), ids=tuple(ids))
            try:
                await self.send_payload(sender, p, conn=conn, include_self=False)
            except HavenError as exc:
                log.warning("delivered receipt not sent (%s)", exc.code)

    async def _sender_list(self, conn: NodeConnection, sender: str, device_key: str) -> DeviceList:
        known = self.state.contact(sender)
        if known is not None:
            dl = SignedDeviceList(known.device_list, known.sig).open(expected_address=sender)
            if any(d.device_id == device_key for d in dl.devices):
                return dl
        _, dl, _ = await self.fetch_contact(conn, sender, claim=False)
        return dl

    async def _follow_contact_move(
        self, conn: NodeConnection, p: Payload, received_at: int | None = None
    ) -> ReceivedMessage | None:
        """A contact's home node moved (docs/protocol.md §12.5): ``p`` came, Olm-authenticated,
        from a device on the signed list of ``p.old``. Follow it only if the new address's
        signed list has the identity key pinned for the old one; then the contact and its
        conversation take the new address (verification and profile kept). A refusal is
        counted in :attr:`move_drops` and changes nothing; a failure that may pass (the new
        host unreachable) keeps the notice for :meth:`retry_moves` (client/pending_moves.py)."""
        old, new = p.old, p.text
        pinned = self.state.contact(old)
        if pinned is None or new == old:
            return None  # already followed (a notice delivered twice), or not a contact
        try:
            Address.parse(new)
            keys = expect(await conn.request(F.QueryKeys(conn.next_rid(), new, False)), F.Keys)
            if keys.device_list.open(expected_address=new).identity_key != pinned.identity_key:
                raise UntrustedKey("the new address has another identity key")
            with self.state.tx() as db:
                self.pin_list(new, keys.node_id, keys.device_list, db=db)
                self.state.rename_contact(db, old, new)
        except (HavenError, ValueError) as exc:
            code = exc.code if isinstance(exc, HavenError) else "malformed"
            if isinstance(exc, IdentityChanged):
                code = UntrustedKey.code  # a row for the new address with another key
            if code not in pending_moves.FINAL_CODES:
                self._keep_move(p, self.clock.now_ms() if received_at is None else received_at)
                log.info("a contact's address-change notice kept for another try (%s)", code)
                return None
            self.move_drops[code] += 1
            log.warning("refused a contact's address-change notice (%s)", code)
            return None
        return ReceivedMessage(old, f"{old} → {new}", p.sent_at, p.id, "moved", new)

    def _keep_move(self, p: Payload, received_at: int) -> None:
        """Keep ``p`` (a ``moved`` notice that came at ``received_at``, our clock) for
        :meth:`retry_moves`."""
        now = self.clock.now_ms()
        kept = pending_moves.live(pending_moves.decode(self.state.get(pending_moves.KV_KEY)), now)
        kept = pending_moves.add(kept, pending_moves.PendingMove(received_at, p))
        with self.state.tx() as db:
            self.state.put(db, pending_moves.KV_KEY, pending_moves.encode(kept))

    async def retry_moves(
        self, conn: NodeConnection, after_batch: bool = False
    ) -> list[ReceivedMessage]:
        """Try the kept ``moved`` notices again (docs/protocol.md §12.5.2): each is followed,
        refused or kept again (until a week old); returns the notices followed. After a
        batch (``after_batch``) at most once per :data:`pending_moves.RETRY_GAP_MS`, so a
        busy conversation does not spend the node's key-query budget on an unreachable host."""
        blob = self.state.get(pending_moves.KV_KEY)
        now = self.clock.now_ms()
        if not blob or (after_batch and now < self._moves_retry_at):
            return []
        self._moves_retry_at = now + pending_moves.RETRY_GAP_MS
        kept = pending_moves.live(pending_moves.decode(blob), now)
        with self.state.tx() as db:  # the week-old ones go; the rest stay until settled
            self.state.put(db, pending_moves.KV_KEY, pending_moves.encode(kept))
        out: list[ReceivedMessage] = []
        for item in kept:
            drops = self.move_drops.total()
            notice = await self._follow_contact_move(conn, item.payload, item.received_at)
            if notice is not None:
                out.append(notice)
            # followed, refused, or nothing left to follow: settled (a failure that may pass
            # left it kept); removed only now, so a crash mid-way loses no notice
            settled = notice is not None or self.move_drops.total() != drops
            if settled or self.state.contact(item.payload.old) is None:
                self._settle_move(item.payload.id)
        return out

    def _settle_move(self, notice_id: bytes) -> None:
        """Drop the kept notice ``notice_id`` (followed or refused)."""
        kept = pending_moves.decode(self.state.get(pending_moves.KV_KEY))
        rest = [m for m in kept if m.payload.id != notice_id]
        with self.state.tx() as db:
            self.state.put(db, pending_moves.KV_KEY, pending_moves.encode(rest))

    def _apply_sync(self, db: sqlite3.Connection, p: Payload, now: int) -> ReceivedMessage | None:
        """Apply a payload our own device forwarded: as if ``p.origin`` had sent it to us.

        The forwarding device checked the origin's signature chain when it received it; a
        signed device of our own account is trusted with that as with everything else.
        """
        try:
            Address.parse(p.origin)
            inner = Payload.decode(p.inner)
            if inner.kind == "sync" or inner.to != self.address or p.origin == self.address:
                raise UntrustedKey("a forwarded payload must be one sent to us by someone else")
            msg = self._apply(db, p.origin, False, inner, now)
        except (HavenError, ValueError) as exc:
            code = exc.code if isinstance(exc, HavenError) else "malformed"
            log.warning("dropped a forwarded payload that failed checks (%s)", code)
            return None
        return None if msg is None else replace(msg, forwarded=True)

    def _apply(
        self, db: sqlite3.Connection, sender: str, own: bool, p: Payload, now: int
    ) -> ReceivedMessage | None:
        """Apply one verified payload to local history (inside the batch's transaction).

        One applier per kind (docs/protocol.md §3.1); a kind this version does not know (a
        newer device's) is ignored: acked, never shown.
        """
        apply = APPLIERS.get(p.kind)
        if apply is None:
            log.debug("ignored a payload of a kind this version does not know")
            return None
        return apply(self.state, db, sender, own, p, now)

    def _decrypt_cached(self, sc: SealedContent, cache: SessionCache) -> bytes:
        """Decrypt with a session of the sender device (kept unpickled for the batch), or
        start an inbound session from a pre-key message."""
        try:
            msg = vz.AnyOlmMessage.from_parts(sc.olm_type, sc.olm_body)
            pre_key = msg.to_pre_key() if sc.olm_type == 0 else None
        except Exception as exc:  # vodozemac's exception types are not exported
            raise MalformedEnvelope("not a valid Olm message") from exc
        for session in cache.sessions(sc.sender_device):
            if pre_key is not None and not session.session_matches(pre_key):
                continue
            try:
                plain = session.decrypt(msg)
            except Exception:  # noqa: BLE001 - vodozemac's error types aren't exported; next one
                continue
            cache.touch(sc.sender_device, session)
            return bytes(plain)
        if pre_key is None:
            raise MalformedEnvelope("no session decrypts this message (replay or forgery)")
        try:
            session, plain = self.account.create_inbound_session(
                vz.Curve25519PublicKey.from_base64(sc.sender_device), pre_key
            )
        except Exception as exc:
            raise MalformedEnvelope("cannot open pre-key message (replay or forgery)") from exc
        self._claims_used += 1  # that used up one of our one-time keys (or the fallback)
        cache.touch(sc.sender_device, session)
        cache.account_changed = True
        return bytes(plain)

    # ---- history, read state, timers ---------------------------------------------------------

    def history(self, address: str) -> list[HistoryRow]:
        self.state.purge_expired(self.clock.now_ms())
        return self.state.history(address)

    def chats(self) -> list[dict[str, Any]]:
        self.state.purge_expired(self.clock.now_ms())
        return [
            {"address": p, "messages": n, "unread": int(u or 0), "last_at": last}
            for p, n, u, last in self.state.chats()
        ]

    async def mark_read(self, address: str) -> int:
        """Mark a conversation read here; tell the sender (unless read receipts are off) and
        our other devices. Returns how many messages became read."""
        unread = [r.msg_id for r in self.state.history(address) if not r.outgoing and not r.read]
        if not unread:
            return 0
        with self.state.tx() as db:
            db.executemany("UPDATE history SET read=1 WHERE msg_id=?", [(m,) for m in unread])
        p = Payload(os.urandom(16), "read", address, self.clock.now_ms(), ids=tuple(unread))
        if self.setting("read_receipts", "on") == "on":
            await self.send_payload(address, p)
        else:
            await self.send_payload(self.address, p, include_self=False)
        return len(unread)

    async def set_timer(self, address: str, ms: int, conn: NodeConnection | None = None) -> None:
        """Set a conversation's disappearing timer for new messages (0 = off) and share it.

        The setting applies here at once and is queued as a ``timer`` payload (to the peer and
        our other devices; the latest ``sent_at`` wins on every device). It is sent now when the
        home node is reachable, else by the next :meth:`flush_outbox`.
        """
        if ms < 0:
            raise LocalProtocolError("a timer cannot be negative")
        c = self.state.contact(address)
        if c is None:
            raise LocalProtocolError(f"{address} is not a contact yet")
        now = self.clock.now_ms()
        p = Payload(os.urandom(16), "timer", address, now, expires_in=ms)
        with self.state.tx() as db:
            self.state.update_contact(db, address, timer_ms=ms, timer_at=now)
            self.state.queue(db, OutboxItem(p.id, address, p.encode(), DEFAULT_TTL_MS, now))
        try:
            await self._flush_with(conn)
        except TransportError as exc:
            log.info("timer queued until the home node is reachable (%s)", exc.code)

    async def _flush_with(self, conn: NodeConnection | None) -> list[HistoryRow]:
        if conn is not None:
            return await self.flush_outbox(conn)
        c = await self.connect()
        try:
            return await self.flush_outbox(c)
        finally:
            await self.release(c)

    # ---- groups (client/groups.py) -----------------------------------------------------------

    async def group_create(
        self, name: str, members: list[str], *, conn: NodeConnection | None = None
    ) -> GroupInfo:
        """Create a group with us as its admin and ``members`` (addresses) in it."""
        return await self.groups_engine.create(name, members, conn=conn)

    async def group_add(
        self, gid: bytes, address: str, *, conn: NodeConnection | None = None
    ) -> GroupInfo:
        """Add a member (admins only). They do not get earlier messages."""
        return await self.groups_engine.change(gid, conn=conn, add=[address])

    async def group_remove(
        self, gid: bytes, address: str, *, conn: NodeConnection | None = None
    ) -> GroupInfo:
        """Remove a member (admins only); every sender starts a new session next time."""
        return await self.groups_engine.change(gid, conn=conn, remove=[address])

    async def group_set_admin(
        self, gid: bytes, address: str, on: bool, *, conn: NodeConnection | None = None
    ) -> GroupInfo:
        """Promote (``on``) or demote a member (admins only)."""
        return await self.groups_engine.change(gid, conn=conn, admin=(address, on))

    async def group_rename(
        self, gid: bytes, name: str, *, conn: NodeConnection | None = None
    ) -> GroupInfo:
        """Rename a group (admins only)."""
        return await self.groups_engine.change(gid, conn=conn, rename=name)

    async def group_leave(self, gid: bytes, *, conn: NodeConnection | None = None) -> GroupInfo:
        """Leave a group (we sign our own removal)."""
        return await self.groups_engine.change(gid, conn=conn, leave=self.address)

    async def group_invite(self, gid: bytes, *, uses: int = 1, ttl_ms: int = 7 * 86_400_000) -> str:
        """An invite code (``haven:group:…``) for ``uses`` joins until ``ttl_ms`` from now."""
        return self.groups_engine.invite(gid, uses=uses, ttl_ms=ttl_ms)

    async def group_join(self, code: str, *, conn: NodeConnection | None = None) -> dict[str, Any]:
        """Redeem an invite code: asks the inviting admin's devices to add us."""
        return await self.groups_engine.join(code, conn=conn)

    def groups(self) -> list[GroupInfo]:
        """Every group this device knows."""
        return self.groups_engine.all()

    def group(self, gid: bytes) -> GroupInfo | None:
        """One group (None if this device does not know it)."""
        return self.groups_engine.info(gid)

    def resolve_group(self, ref: str) -> bytes:
        """``group:<hex>``, an id prefix or a unique name → group id (GroupError
        ``unknown_group`` / ``ambiguous_group``)."""
        return self.groups_engine.resolve(ref)

    async def group_send(
        self,
        gid: bytes,
        text: str,
        *,
        conn: NodeConnection | None = None,
        ttl_ms: int = DEFAULT_TTL_MS,
    ) -> SendResult:
        """Send a text to every member device, one upload (docs/protocol.md §11.3)."""
        return await self.groups_engine.send_text(gid, text, conn=conn, ttl_ms=ttl_ms)

    def queue_group_text(
        self, gid: bytes, text: str, *, ttl_ms: int = DEFAULT_TTL_MS
    ) -> HistoryRow:
        """Queue a group text: a ``pending`` row and its outbox entry, as :meth:`queue_text`.

        Only the payload is queued: :meth:`flush_outbox` Megolm-encrypts it when it sends it,
        so the rotation and the membership of that moment apply (docs/protocol.md §3.1).

        Raises:
            GroupError: ``unknown_group`` or ``not_member`` (nothing is queued).
        """
        self.groups_engine.check_member(gid)
        p = Payload(os.urandom(16), "text", ref_of(gid), self.clock.now_ms(), text=text)
        return self._queue_payload(p, text, ttl_ms)

    async def group_send_or_queue(
        self,
        gid: bytes,
        text: str,
        *,
        conn: NodeConnection | None = None,
        ttl_ms: int = DEFAULT_TTL_MS,
    ) -> SendResult | HistoryRow:
        """Send a group text now, or keep it queued when the home node cannot take it.

        Returns the :class:`SendResult` when it was sent at once, else its history row:
        ``pending`` (queued: the node is unreachable, busy or rate limiting; the next flush
        sends it), ``sent`` (an earlier text of the group was still queued, so this one went
        through the queue behind it, keeping the group's order) or ``pending`` with ``error``
        (failed for good). A permanent failure of a direct send is raised as it is.
        """
        ref = ref_of(gid)
        if not self.state.has_queued(ref):
            self.groups_engine.check_member(gid)
            p = Payload(os.urandom(16), "text", ref, self.clock.now_ms(), text=text)
            try:
                return await self.groups_engine.send_payload(
                    gid, p, conn=conn, ttl_ms=ttl_ms, record=text
                )
            except HavenError as exc:
                if isinstance(exc, GroupError) or _send_failure(exc) == "drop":
                    raise
                log.info("group text queued until the home node takes it (%s)", exc.code)
            # the same payload id: members that got a partial submission store it once
            return self._queue_payload(p, text, ttl_ms)
        row = self.queue_group_text(gid, text, ttl_ms=ttl_ms)
        try:
            await self._flush_with(conn)
        except HavenError as exc:
            log.info("group text queued until the home node takes it (%s)", exc.code)
        return self.state.message(row.msg_id) or row

    def group_history(self, gid: bytes) -> list[HistoryRow]:
        """A group's messages (``peer`` = ``group:<hex>``)."""
        self.state.purge_expired(self.clock.now_ms())
        return self.groups_engine.history(gid)

    def group_counts(self, gid: bytes) -> dict[bytes, tuple[tuple[str, ...], int]]:
        """Per message of the group: ``(unread_members, receipts_hidden)``."""
        return self.groups_engine.counts(gid)

    async def group_mark_read(self, gid: bytes, *, conn: NodeConnection | None = None) -> int:
        """Mark a group read and send one watermark upload; returns rows newly read."""
        return await self.groups_engine.mark_read(gid, conn=conn)

    async def group_readers(
        self, gid: bytes, *, conn: NodeConnection | None = None
    ) -> list[dict[str, Any]]:
        """Who can read this group: ``[{"address", "device_id", "verified", "changed"}]``."""
        return await self.groups_engine.readers(gid, conn=conn)

    # ---- profile and nicknames ---------------------------------------------------------------

    @property
    def display_name(self) -> str:
        """Our display name ("" if unset); sent end to end to contacts, never to nodes."""
        v = self.state.get("display_name")
        return "" if v is None else v.decode()

    def _profile_version(self) -> int:
        v = self.state.get("profile_version")
        return 0 if v is None else int(v.decode())

    def set_display_name(self, name: str) -> None:
        """Set our display name (any Unicode, at most 64 characters); contacts get it with our
        next message to them, or at once with :meth:`share_profile`."""
        clean = clean_name(name)
        with self.state.tx() as db:
            self.state.put(db, "display_name", clean.encode())
            self.state.put(db, "profile_version", str(self._profile_version() + 1).encode())

    def set_nickname(self, address: str, nickname: str) -> None:
        """Our own name for a contact; it stays on this device."""
        with self.state.tx() as db:
            if not self.state.update_contact(db, address, nickname=clean_name(nickname)):
                raise LocalProtocolError(f"{address} is not a contact yet")

    async def share_profile(self, conn: NodeConnection, address: str | None = None) -> None:
        """Send our display name to ``address`` (or every contact) and our other devices."""
        version = self._profile_version()
        me = self.address
        if address is None:
            peers = [c.address for c in self.state.contacts() if c.address != me]
        else:
            peers = [address]
        if address is None or address == me:
            await self._send_profile(conn, me, version)
        for peer in peers:
            if peer != me:
                await self._send_profile(conn, peer, version)

    async def _send_profile(self, conn: NodeConnection, peer: str, version: int) -> None:
        p = Payload(os.urandom(16), "profile", peer, self.clock.now_ms(), name=self.display_name)
        await self.send_payload(peer, p, conn=conn, include_self=False)
        if peer != self.address:
            with self.state.tx() as db:
                self.state.update_contact(db, peer, profile_sent=version)

    async def _profile_after_send(self, conn: NodeConnection, peer: str) -> None:
        """After a message reached ``peer``'s node: our profile too, once per version."""
        version = self._profile_version()
        c = self.state.contact(peer)
        if version == 0 or c is None or c.profile_sent >= version or peer == self.address:
            return
        try:
            await self._send_profile(conn, peer, version)
        except (KeysExhausted, KeysUnavailable, UntrustedKey, RemoteProtocolError) as exc:
            log.info("profile not sent (%s)", exc.code)

    # ---- the outbox (docs/app.md: queued while the home node is unreachable) ------------------

    def queue_text(
        self,
        address: str,
        text: str,
        *,
        ttl_ms: int = DEFAULT_TTL_MS,
        expires_in: int | None = None,
    ) -> HistoryRow:
        """Queue a message: a ``pending`` history row and its outbox entry, one transaction.

        :meth:`flush_outbox` sends it. The queued payload is sealed under the row's own key,
        so deleting, editing or expiring the message shreds the queued copy too.
        """
        Address.parse(address)
        c = self.state.contact(address)
        if expires_in is None:
            expires_in = c.timer_ms if c else 0
        now = self.clock.now_ms()
        p = Payload(os.urandom(16), "text", address, now, text=text, expires_in=expires_in)
        return self._queue_payload(p, text, ttl_ms)

    def _queue_payload(self, p: Payload, text: str, ttl_ms: int) -> HistoryRow:
        """The ``pending`` row of ``p`` (to ``p.to``: a contact or a group ref) and its
        outbox entry, one transaction; the stored row."""
        now = self.clock.now_ms()
        row = HistoryRow(
            p.id,
            p.to,
            True,
            self.address,
            text,
            p.sent_at,
            now,
            status=STATUS_PENDING,
            read=True,
            expires_in=p.expires_in,
            expire_at=now + p.expires_in if p.expires_in else None,
        )
        with self.state.tx() as db:
            self.state.add_history(db, row)
            self.state.queue(db, OutboxItem(p.id, p.to, p.encode(), ttl_ms, now))
        stored = self.state.message(p.id)
        return row if stored is None else stored

    async def flush_outbox(
        self, conn: NodeConnection, on_row: Callable[[HistoryRow], None] | None = None
    ) -> list[HistoryRow]:
        """Send every queued payload, oldest first; return the history rows that changed.

        An accepted item becomes ``sent`` (its TTL recorded) and leaves the queue in one
        transaction. A lost link, a rate limit or a busy node stops the flush: the rest stays
        queued and the error is re-raised (``on_row``, if given, has seen each row changed
        before that). A permanent failure for one item (no such account, no keys left, a
        changed identity key) records its code on the row, drops it from the queue and goes
        on; a contact whose node cannot be reached keeps its items, in order, for the next
        flush. A retried item keeps its payload id, so a receiver that got it before stores
        it once.
        """
        changed: list[HistoryRow] = []

        def note(msg_id: bytes) -> None:
            row = self.state.message(msg_id)
            if row is not None:
                changed.append(row)
                if on_row is not None:
                    on_row(row)

        held: set[str] = set()  # contacts whose node is unreachable: keep their order
        for item in self.state.outbox():
            if item.peer in held:
                continue
            try:
                p = Payload.decode(item.payload)
            except HavenError:
                with self.state.tx() as db:
                    self.state.unqueue(db, item.msg_id)
                continue
            gid = gid_of_ref(item.peer)
            try:
                if gid is not None:  # Megolm-encrypted now: today's members and session
                    res = await self.groups_engine.send_payload(
                        gid, p, conn=conn, ttl_ms=item.ttl_ms
                    )
                else:
                    res = await self.send_payload(
                        item.peer, p, ttl_ms=item.ttl_ms, conn=conn, include_self=p.kind != "moved"
                    )
            except HavenError as exc:
                verdict = _send_failure(exc)
                if verdict == "stop":
                    raise
                if verdict == "later":
                    held.add(item.peer)
                    continue
                with self.state.tx() as db:
                    self.state.set_status(db, item.msg_id, STATUS_PENDING, error=exc.code)
                    self.state.unqueue(db, item.msg_id)
                log.warning("a queued message failed for good (%s)", exc.code)
                note(item.msg_id)
                continue
            ttl_at = self.clock.now_ms() + item.ttl_ms
            counts = self._readable_by(item.peer, res)
            with self.state.tx() as db:
                db.execute(
                    "UPDATE history SET status=max(status, ?), ttl_at=?, devices_total=?, "
                    "devices_verified=? WHERE msg_id=? AND outgoing=1",
                    (STATUS_SENT, ttl_at, counts["total"], counts["verified"], item.msg_id),
                )
                self.state.unqueue(db, item.msg_id)
            note(item.msg_id)
            if gid is None:
                await self._profile_after_send(conn, item.peer)
        return changed

    def _readable_by(self, peer: str, res: SendResult) -> dict[str, int]:
        """The devices a sent item is readable by: the contact's, or (a group) every other
        member's."""
        if gid_of_ref(peer) is None:
            return res.devices.get(peer, {"total": 0, "verified": 0})
        others = [v for a, v in res.devices.items() if a != self.address]
        return {
            "total": sum(v["total"] for v in others),
            "verified": sum(v["verified"] for v in others),
        }

    # ---- daemon mode -------------------------------------------------------------------------

    def use_connection(self, provider: Callable[[], Awaitable[NodeConnection]] | None) -> None:
        """Daemon mode: :meth:`connect` returns ``await provider()`` (the daemon's one
        connection), which this device then never closes. ``None``: open our own again."""
        self._provider = provider

    async def release(self, conn: NodeConnection) -> None:
        """Close a connection :meth:`connect` returned, unless it is the daemon's."""
        if conn not in self._borrowed:
            await conn.__aexit__(None, None, None)


# Send failures a retry will not cure: the row gets the code and leaves the queue.
_PERMANENT = frozenset(
    {
        "no_such_account",
        KeysExhausted.code,
        IdentityChanged.code,
        UntrustedKey.code,
        "unknown_destination",
        "too_large",
        "malformed",
        # a queued group text whose group changed meanwhile (docs/protocol.md §3.1)
        gs.UNKNOWN_GROUP,
        gs.NOT_MEMBER,
        gs.TOO_MANY,
        gs.TOO_LARGE,
    }
)
# Failures of one contact's node or quota: that contact's items wait, the others go on.
_LATER = frozenset({KeysUnavailable.code, "quota_exceeded", "peer_key_changed"})


def _send_failure(exc: HavenError) -> str:
    """``"drop"`` (permanent: record it), ``"later"`` (this contact only) or ``"stop"``
    (the link or our node: rate limited, busy, unreachable; stop the flush)."""
    if isinstance(exc, TransportError):
        return "stop"
    if exc.code in _PERMANENT:
        return "drop"
    if exc.code in _LATER:
        return "later"
    return "stop"
