"""Linking a new device to an account, end to end encrypted (no readable copy on any node).

1. The linking device (signed in) asks its node for a single-use link token and prints a code:
   node URL and id, the account, the token, its own mailbox and a fresh 32-byte secret ``k``.
2. The new device redeems the token (the node creates its mailbox; it is not yet on the signed
   list) and sends its public device entry to the linking device, sealed with ``k``.
3. The linking device re-signs the device list with the new entry, publishes it, and sends the
   identity key material back, sealed with ``k``, then (on request) the history and always
   the account's groups (:mod:`client.group_link`) in further link messages. Only holders of
   the code can read them; the node relays opaque envelopes. The account's groups are then
   told of the new device with a ``devices`` notice, as they are after a device is removed.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import nacl.exceptions
import nacl.secret

from federation import frames as F
from federation.devicelist import DeviceInfo, DeviceList, SignedDeviceList, coarse_day
from federation.errors import HavenError, LocalProtocolError, MalformedEnvelope, TransportError
from federation.ids import new_envelope_id
from federation.sealing import SEAL_OVERHEAD, pad, unpad
from federation.signing import b64e
from federation.wire import Envelope, packb, unpackb

from . import group_link
from .connection import NodeConnection, expect
from .device import Device
from .groups import send_chunks
from .state import STATUS_PENDING, HistoryRow

_FILL = SEAL_OVERHEAD - 40  # sealed box overhead minus SecretBox nonce+MAC
LINK_TTL_MS = 10 * 60_000


def _seal(k: bytes, obj: Any) -> bytes:
    """Seal with the code's secret. 8 random bytes + SecretBox(pad(...)) is exactly one padding
    bucket, like a sealed-sender body, so the node can't tell a link message from any other."""
    return os.urandom(_FILL) + bytes(nacl.secret.SecretBox(k).encrypt(pad(packb(obj))))


def _open(k: bytes, body: bytes) -> Any:
    try:
        data = unpad(nacl.secret.SecretBox(k).decrypt(body[_FILL:]))
    except nacl.exceptions.CryptoError as exc:
        raise MalformedEnvelope("link message not sealed with this code") from exc
    return unpackb(data, max_len=len(data))


async def _await_link_message(
    dev: Device,
    conn: NodeConnection,
    k: bytes,
    timeout_s: float,
    deferred: list[Envelope] | None = None,
) -> tuple[Envelope, Any]:
    """Wait for the next envelope sealed with ``k``; process everything else normally (or,
    with ``deferred``, keep it there for the caller to process once the hand-over is stored:
    a new device gets group keys and notices right behind it, §11.6).

    Link messages that arrive together are kept (on the connection) for the next call.
    """
    held = conn.link_held
    deadline = time.monotonic() + timeout_s
    while not held:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise LocalProtocolError("no device used the link code in time")
        try:
            async with asyncio.timeout(remaining):
                envs = await conn.deliveries.get()
        except TimeoutError as exc:
            raise LocalProtocolError("no device used the link code in time") from exc
        others = []
        for env in envs:
            try:
                held.append((env, _open(k, env.body)))
            except HavenError:
                others.append(env)
        if others and deferred is not None:
            deferred.extend(others)
        elif others:
            await dev.process(conn, others)
        if held:
            await conn.ack([env.id for env, _ in held])
    return held.pop(0)


async def link_device(
    dev: Device,
    on_code: Callable[[str], None],
    timeout_s: float = 300,
    with_history: bool = False,
) -> dict[str, Any]:
    """Run the linking side: print a code, wait for the new device, re-sign, hand over keys.

    With ``with_history``, local history follows in further messages sealed with the code's
    secret (end to end: the node relays opaque, bucket-sized envelopes).
    """
    conn = await dev.connect()
    try:
        tok = expect(await conn.request(F.MintLink(conn.next_rid())), F.LinkToken)
        k = os.urandom(32)
        name, host = dev.address.split("@", 1)
        code = "haven:link:" + b64e(
            packb(
                {
                    "url": dev.node_url,
                    "node": dev.node_id,
                    "name": name,
                    "host": host,
                    "t": tok.token,
                    "k": k,
                    "mb": dev.mailbox,
                }
            )
        )
        on_code(code)
        _env, msg = await _await_link_message(dev, conn, k, timeout_s)
        try:
            new = DeviceInfo.from_wire(msg["device"])
            new_name = str(msg.get("name", "device"))[:64]
        except (KeyError, TypeError) as exc:
            raise MalformedEnvelope("bad link request") from exc
        # The list records only the day a device was added (format v2, protocol §3.2), also
        # when an older device sent its exact time.
        new = DeviceInfo(
            new.device_id, new.ed25519, new.sealing, new.mailbox, coarse_day(new.added_at)
        )
        _, own, _ = await dev.fetch_contact(conn, dev.address, claim=False)
        if any(d.device_id == new.device_id for d in own.devices):
            raise LocalProtocolError("that device is already linked")
        signed = DeviceList(
            own.address, own.identity_key, own.version + 1, (*own.devices, new)
        ).sign(dev.identity())
        expect(await conn.request(F.PublishKeys(conn.next_rid(), (), (), signed)), F.Ok)
        names = dict(_names(dev))
        names[new.device_id] = new_name
        dev.adopt_identity(bytes(dev.identity()), dev.address, dev.node_id, signed, names)
        chunks = _history_chunks(dev) if with_history else []
        group_items = group_link.handover_items(dev)
        gchunks = group_link.group_chunks(group_items)
        handover = {
            "seed": bytes(dev.identity()),
            "address": dev.address,
            "list": signed.to_wire(),
            "names": names,
            "history_chunks": len(chunks),
            "group_chunks": len(gchunks),
        }
        expires = dev.clock.now_ms() + LINK_TTL_MS
        msgs = [
            handover,
            *({"chunk": i, "rows": c} for i, c in enumerate(chunks)),
            *({"gchunk": i, "items": c} for i, c in enumerate(gchunks)),
        ]
        items = [
            (dev.node_id, Envelope(new_envelope_id(), new.mailbox, expires, _seal(k, m)))
            for m in msgs
        ]
        for frame in send_chunks(items):
            ans = expect(await conn.request(F.Send(conn.next_rid(), frame)), F.Accepted)
            if ans.rejected:
                raise LocalProtocolError("the node refused the key hand-over")
        # the account's groups learn of the new device now, not within LIST_TTL_S (§11.6)
        await group_link.announce_devices(dev, conn)
        return {
            "id": new.device_id,
            "name": new_name,
            "added_at": new.added_at,
            "history_messages": sum(len(c) for c in chunks),
            "groups": len({bytes(i[1]) for i in group_items}),
        }
    finally:
        await dev.release(conn)


async def join_link(dev: Device, inv: dict[str, Any], name: str, timeout_s: float = 300) -> str:
    """Run the new-device side of a link code. Returns the account's address."""
    info, sealing = dev._new_device_keys()
    k: bytes = inv["k"]
    async with NodeConnection(inv["url"]) as conn:
        address = await dev._register(conn, inv, info, sealing, None)
        await dev._top_up(conn, 0)
        body = _seal(k, {"device": info.to_wire(), "name": name})
        env = Envelope(new_envelope_id(), inv["mb"], dev.clock.now_ms() + LINK_TTL_MS, body)
        expect(await conn.request(F.Send(conn.next_rid(), ((inv["node"], env),))), F.Accepted)
        deferred: list[Envelope] = []
        _env, msg = await _await_link_message(dev, conn, k, timeout_s, deferred)
        try:
            signed = SignedDeviceList.from_wire(msg["list"])
            seed, addr = bytes(msg["seed"]), str(msg["address"])
            names = {str(a): str(b) for a, b in dict(msg.get("names", {})).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEnvelope("bad key hand-over") from exc
        dl = signed.open(expected_address=address)
        if addr != address or not any(d.device_id == info.device_id for d in dl.devices):
            raise MalformedEnvelope("the hand-over does not list this device")
        dev.adopt_identity(seed, address, inv["node"], signed, names)
        want = {
            "chunk": int(msg.get("history_chunks", 0)),
            "gchunk": int(msg.get("group_chunks", 0)),
        }
        got = await _receive_chunks(dev, conn, k, want, timeout_s, deferred)
        _store_history(dev, got["chunk"])
        items = [it for i in sorted(got["gchunk"]) for it in got["gchunk"][i]]
        await group_link.import_groups(dev, conn, items)
        if deferred:  # what came with the hand-over, now that we hold the identity and groups
            await dev.process(conn, deferred)
    return address


async def register_open(dev: Device, url: str, account: str, name: str = "") -> str:
    """Create ``account`` on a node with open registration (no invite), this device first.

    The node is trusted on first use: its id and public host come from its signed descriptor,
    fetched with a fresh challenge from ``url``. Returns the new address.
    """
    import aiohttp

    from federation.ids import valid_name
    from federation.signing import Descriptor

    if not valid_name(account):
        raise LocalProtocolError(
            "names are 1-32 of a-z 0-9 . _ - and start with a letter or digit",
            code="invalid_name",
        )
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LocalProtocolError(f"not a node URL: {url!r}", code="bad_argument")
    base = f"{parts.scheme}://{parts.netloc}"
    challenge = os.urandom(16)
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"{base}/.well-known/haven/node?c={b64e(challenge)}") as r,
        ):
            desc = Descriptor.verify_decode(await r.content.read(64 * 1024))
    except (aiohttp.ClientError, OSError) as exc:
        raise TransportError(f"cannot reach the node at {base}", code="node_unreachable") from exc
    except HavenError as exc:
        raise LocalProtocolError(f"{base} is not a Haven node", code="not_a_haven_node") from exc
    if desc.challenge != challenge:
        raise LocalProtocolError(f"{base} is not a Haven node", code="not_a_haven_node")
    inv = {
        "url": base,
        "node": desc.node_id,
        "name": account,
        "t": b"",
        "host": urlsplit(desc.public_url).netloc.lower(),
        "link": False,
        "register": account,
    }
    return await dev.join_new(inv, name)


HISTORY_CHUNK_BYTES = 40_000


def _history_chunks(dev: Device) -> list[list[list[Any]]]:
    """Local history as rows that fit in one 64 KiB link message each."""
    rows = [
        [
            r.msg_id,
            r.peer,
            r.outgoing,
            r.sender,
            r.text,
            r.sent_at,
            r.received_at,
            r.status,
            r.read,
            r.edited,
            r.expires_in,
            r.expire_at,
        ]
        for r in dev.state.all_history()
        if r.status != STATUS_PENDING  # not sent yet: the new device gets it with the send
    ]
    return group_link.cut_by_size(rows, _row_cost, HISTORY_CHUNK_BYTES)


def _row_cost(row: list[Any]) -> int:
    """About what a history row adds to a link message: its text, peer and sender, and 80."""
    return len(str(row[4]).encode()) + len(str(row[1])) + len(str(row[3])) + 80


MAX_CHUNKS = 100_000  # link messages of one kind a hand-over may announce


async def _receive_chunks(
    dev: Device,
    conn: NodeConnection,
    k: bytes,
    want: dict[str, int],
    timeout_s: float,
    deferred: list[Envelope],
) -> dict[str, dict[int, list[Any]]]:
    """The hand-over's follow-up link messages, ``{kind: {index: list}}``: ``want[kind]`` of
    each kind (``chunk``: history rows, ``gchunk``: group items), in any order."""
    if any(not 0 <= n <= MAX_CHUNKS for n in want.values()):
        raise MalformedEnvelope("bad key hand-over")
    got: dict[str, dict[int, list[Any]]] = {kind: {} for kind in want}
    field = {"chunk": "rows", "gchunk": "items"}
    while any(len(got[kind]) < n for kind, n in want.items()):
        _env, msg = await _await_link_message(dev, conn, k, timeout_s, deferred)
        if not isinstance(msg, dict):
            continue
        for kind in want:
            i = msg.get(kind)
            if isinstance(i, int) and 0 <= i < want[kind]:
                got[kind][i] = list(msg.get(field[kind], []))
    return got


def _store_history(dev: Device, got: dict[int, list[Any]]) -> None:
    with dev.state.tx() as db:
        for i in sorted(got):
            for row in got[i]:
                try:
                    dev.state.add_history(
                        db,
                        HistoryRow(
                            bytes(row[0]),
                            str(row[1]),
                            bool(row[2]),
                            str(row[3]),
                            str(row[4]),
                            int(row[5]),
                            int(row[6]),
                            int(row[7]),
                            bool(row[8]),
                            bool(row[9]),
                            int(row[10]),
                            None if row[11] is None else int(row[11]),
                        ),
                    )
                except (IndexError, TypeError, ValueError) as exc:
                    raise MalformedEnvelope("bad history row") from exc


def _names(dev: Device) -> list[tuple[str, str]]:
    rows = dev.state.db.execute("SELECT device_id, name FROM device_names").fetchall()
    return [(r[0], dev.state.open(r[1]).decode()) for r in rows]


async def list_devices(dev: Device) -> list[dict[str, Any]]:
    """Our signed device list (fetched and verified), with names known on this device."""
    conn = await dev.connect()
    try:
        _, own, _ = await dev.fetch_contact(conn, dev.address, claim=False)
    finally:
        await dev.release(conn)
    names = dict(_names(dev))
    return [
        {
            "id": d.device_id,
            "name": names.get(d.device_id, d.device_id[:8]),
            "this_device": d.device_id == dev.curve_key,
            "added_at": d.added_at,
        }
        for d in own.devices
    ]


async def remove_device(dev: Device, device_id: str) -> None:
    """Re-sign the list without ``device_id``; the node purges its mailbox at once."""
    if device_id == dev.curve_key:
        raise LocalProtocolError("remove this device from another one")
    conn = await dev.connect()
    try:
        _, own, _ = await dev.fetch_contact(conn, dev.address, claim=False)
        kept = tuple(d for d in own.devices if d.device_id != device_id)
        if len(kept) == len(own.devices):
            raise LocalProtocolError("no such device on this account")
        signed = DeviceList(own.address, own.identity_key, own.version + 1, kept).sign(
            dev.identity()
        )
        expect(await conn.request(F.PublishKeys(conn.next_rid(), (), (), signed)), F.Ok)
        names = {k: v for k, v in _names(dev) if k != device_id}
        dev.adopt_identity(bytes(dev.identity()), dev.address, dev.node_id, signed, names)
        with dev.state.tx() as db:
            db.execute("DELETE FROM device_names WHERE device_id=?", (device_id,))
        # members drop their reused lists of us now and rotate on their next send (§11.6); our
        # own session rotates with this notice (the removed device is off our list)
        await group_link.announce_devices(dev, conn)
    finally:
        await dev.release(conn)
