"""Signed device lists (ARCHITECTURE §2, docs/protocol.md §3.2).

A user's identity key (Ed25519, only on devices) signs the list of their devices: per device its
vodozemac identity keys, its X25519 sealing key and its mailbox id. Senders encrypt to exactly
the signed list; a node that adds a device cannot make a sender encrypt to it.

Two formats verify and parse. **v2** (written by this code) starts the blob with the format
number, signs under its own tag and records when a device was added as a *day* number, so a
stored list does not say to the millisecond when a device was linked. **v1** (older devices)
has no format number and exact millisecond times; it still opens, and the next re-signing
(a link or removal) writes v2.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from .errors import MalformedFrame, UntrustedKey
from .ids import MAILBOX_ID_LEN
from .signing import verify_detached
from .wire import packb, unpackb

LIST_TAG_V1 = b"haven-device-list-v1\x00"
LIST_TAG_V2 = b"haven-device-list-v2\x00"
LIST_TAG = LIST_TAG_V1  # the v1 name, kept for older callers
FORMAT_V1 = 1
FORMAT_V2 = 2
MAX_DEVICES = 16
DAY_MS = 86_400_000
MAX_LIST_BYTES = 64 * 1024


def coarse_day(ms: int) -> int:
    """``ms`` rounded down to the start of its UTC day (what a v2 list can record)."""
    return ms - ms % DAY_MS


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    device_id: str  # = the device's Curve25519 identity key (base64), stable and unique
    ed25519: str  # vodozemac Ed25519 identity key (base64)
    sealing: bytes  # X25519 public sealing key (32 bytes)
    mailbox: bytes  # 16-byte mailbox id on the user's home node
    added_at: int  # epoch ms; day-granular (a UTC midnight) in v2 lists

    def to_wire(self) -> list[Any]:
        """The v1 entry shape (also the link-message shape, docs/protocol.md §3.5)."""
        return [self.device_id, self.ed25519, self.sealing, self.mailbox, self.added_at]

    def to_wire_v2(self) -> list[Any]:
        return [self.device_id, self.ed25519, self.sealing, self.mailbox, self.added_at // DAY_MS]

    @classmethod
    def from_wire(cls, obj: Any, fmt: int = FORMAT_V1) -> DeviceInfo:
        if (
            not isinstance(obj, list)
            or len(obj) != 5
            or not isinstance(obj[0], str)
            or not isinstance(obj[1], str)
            or not isinstance(obj[2], bytes)
            or len(obj[2]) != 32
            or not isinstance(obj[3], bytes)
            or len(obj[3]) != MAILBOX_ID_LEN
            or not isinstance(obj[4], int)
            or isinstance(obj[4], bool)
            or obj[4] < 0
        ):
            raise MalformedFrame("bad device entry")
        added = obj[4] * DAY_MS if fmt == FORMAT_V2 else obj[4]
        return cls(obj[0], obj[1], obj[2], obj[3], added)


@dataclass(frozen=True, slots=True)
class DeviceList:
    """The signed statement "these devices are mine", with a version that only grows.

    ``fmt`` is the blob format: new lists are v2; :meth:`SignedDeviceList.open` reports the
    format it read.
    """

    address: str
    identity_key: bytes
    version: int
    devices: tuple[DeviceInfo, ...]
    fmt: int = FORMAT_V2

    def payload(self) -> bytes:
        if self.fmt == FORMAT_V1:
            return packb(
                [self.address, self.identity_key, self.version, [d.to_wire() for d in self.devices]]
            )
        if self.fmt != FORMAT_V2:
            raise ValueError(f"unknown device list format {self.fmt}")
        return packb(
            [
                FORMAT_V2,
                self.address,
                self.identity_key,
                self.version,
                [d.to_wire_v2() for d in self.devices],
            ]
        )

    def sign(self, signer: Any) -> SignedDeviceList:
        """``signer`` is a ``nacl.signing.SigningKey`` holding the identity key."""
        blob = self.payload()
        tag = LIST_TAG_V1 if self.fmt == FORMAT_V1 else LIST_TAG_V2
        return SignedDeviceList(blob, signer.sign(tag + blob).signature)


class SignedDeviceList(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """``[blob, signature]`` on the wire; a msgspec struct so frames can embed it (frames.py)."""

    blob: Annotated[bytes, msgspec.Meta(max_length=MAX_LIST_BYTES)]
    signature: Annotated[bytes, msgspec.Meta(max_length=1024)]

    def to_wire(self) -> list[bytes]:
        return [self.blob, self.signature]

    @classmethod
    def from_wire(cls, obj: Any) -> SignedDeviceList:
        if (
            not isinstance(obj, list)
            or len(obj) != 2
            or not isinstance(obj[0], bytes)
            or not isinstance(obj[1], bytes)
        ):
            raise MalformedFrame("bad signed device list")
        return cls(obj[0], obj[1])

    def open(self, expected_address: str | None = None) -> DeviceList:
        """Verify the self-signature and decode (v1 or v2). Raises UntrustedKey / MalformedFrame.

        The caller must still compare ``identity_key`` with the pinned key for the address.
        """
        obj = unpackb(self.blob, max_len=MAX_LIST_BYTES)
        if isinstance(obj, list) and len(obj) == 4:
            fmt, tag, body = FORMAT_V1, LIST_TAG_V1, obj
        elif isinstance(obj, list) and len(obj) == 5 and obj[0] == FORMAT_V2:
            fmt, tag, body = FORMAT_V2, LIST_TAG_V2, obj[1:]
        else:
            raise MalformedFrame("bad device list (unknown format)")
        if (
            not isinstance(body[0], str)
            or not isinstance(body[1], bytes)
            or len(body[1]) != 32
            or not isinstance(body[2], int)
            or isinstance(body[2], bool)
            or not isinstance(body[3], list)
            or len(body[3]) > MAX_DEVICES
        ):
            raise MalformedFrame("bad device list")
        dl = DeviceList(
            body[0],
            body[1],
            body[2],
            tuple(DeviceInfo.from_wire(d, fmt) for d in body[3]),
            fmt,
        )
        try:
            verify_detached(dl.identity_key, tag + self.blob, self.signature)
        except Exception as exc:
            raise UntrustedKey("device list signature does not verify") from exc
        if expected_address is not None and dl.address != expected_address:
            raise UntrustedKey("device list is for a different address")
        return dl
