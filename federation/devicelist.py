"""Signed device lists (ARCHITECTURE §2, docs/protocol.md §3.2).

A user's identity key (Ed25519, only on devices) signs the list of their devices: per device its
vodozemac identity keys, its X25519 sealing key and its mailbox id. Senders encrypt to exactly
the signed list; a node that adds a device cannot make a sender encrypt to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

from .errors import MalformedFrame, UntrustedKey
from .ids import MAILBOX_ID_LEN
from .signing import verify_detached
from .wire import packb, unpackb

LIST_TAG = b"haven-device-list-v1\x00"
MAX_DEVICES = 16


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    device_id: str  # = the device's Curve25519 identity key (base64), stable and unique
    ed25519: str  # vodozemac Ed25519 identity key (base64)
    sealing: bytes  # X25519 public sealing key (32 bytes)
    mailbox: bytes  # 16-byte mailbox id on the user's home node
    added_at: int  # epoch ms

    def to_wire(self) -> list[Any]:
        return [self.device_id, self.ed25519, self.sealing, self.mailbox, self.added_at]

    @classmethod
    def from_wire(cls, obj: Any) -> DeviceInfo:
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
        ):
            raise MalformedFrame("bad device entry")
        return cls(obj[0], obj[1], obj[2], obj[3], obj[4])


@dataclass(frozen=True, slots=True)
class DeviceList:
    """The signed statement "these devices are mine", with a version that only grows."""

    address: str
    identity_key: bytes
    version: int
    devices: tuple[DeviceInfo, ...]

    def payload(self) -> bytes:
        return packb(
            [self.address, self.identity_key, self.version, [d.to_wire() for d in self.devices]]
        )

    def sign(self, signer: Any) -> SignedDeviceList:
        """``signer`` is a ``nacl.signing.SigningKey`` holding the identity key."""
        blob = self.payload()
        return SignedDeviceList(blob, signer.sign(LIST_TAG + blob).signature)


class SignedDeviceList(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """``[blob, signature]`` on the wire; a msgspec struct so frames can embed it (frames.py)."""

    blob: Annotated[bytes, msgspec.Meta(max_length=64 * 1024)]
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
        """Verify the self-signature and decode. Raises UntrustedKey / MalformedFrame.

        The caller must still compare ``identity_key`` with the pinned key for the address.
        """
        obj = unpackb(self.blob, max_len=64 * 1024)
        if (
            not isinstance(obj, list)
            or len(obj) != 4
            or not isinstance(obj[0], str)
            or not isinstance(obj[1], bytes)
            or len(obj[1]) != 32
            or not isinstance(obj[2], int)
            or not isinstance(obj[3], list)
            or len(obj[3]) > MAX_DEVICES
        ):
            raise MalformedFrame("bad device list")
        dl = DeviceList(obj[0], obj[1], obj[2], tuple(DeviceInfo.from_wire(d) for d in obj[3]))
        try:
            verify_detached(dl.identity_key, LIST_TAG + self.blob, self.signature)
        except Exception as exc:
            raise UntrustedKey("device list signature does not verify") from exc
        if expected_address is not None and dl.address != expected_address:
            raise UntrustedKey("device list is for a different address")
        return dl
