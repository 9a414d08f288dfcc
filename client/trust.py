"""Verification: safety numbers, confirming a contact, accepting a changed identity key."""

from __future__ import annotations

from typing import Any

from federation.devicelist import SignedDeviceList
from federation.errors import LocalProtocolError

from .device import Device
from .safety import safety_number
from .state import Contact


async def _contact(dev: Device, address: str) -> Contact:
    c = dev.state.contact(address)
    if c is None:
        conn = await dev.connect()
        try:
            c, _, _ = await dev.fetch_contact(conn, address, claim=False)
        finally:
            await dev.release(conn)
    return c


async def verify(
    dev: Device, address: str, *, confirm: bool = False, accept_new_key: bool = False
) -> dict[str, Any]:
    """The safety number for a contact; optionally mark verified or accept a new key."""
    if accept_new_key:
        conn = await dev.connect()
        try:
            await dev.fetch_contact(conn, address, claim=False, accept_new_key=True)
        finally:
            await dev.release(conn)
    c = await _contact(dev, address)
    own = dev.state.contact(dev.address)
    if own is None:
        raise LocalProtocolError("this device holds no identity key")
    number = safety_number(dev.address, own.identity_key, address, c.identity_key)
    if confirm and not c.verified:
        c = Contact(c.address, c.identity_key, c.node_id, c.device_list, c.sig, True, c.timer_ms)
        version = SignedDeviceList(c.device_list, c.sig).open().version
        with dev.state.tx() as db:
            dev.state.save_contact(db, c)
            # what was verified: "who can read this" warns when either changes (client/groups.py)
            dev.state.put(db, "verified_list:" + address, c.identity_key + str(version).encode())
    return {"address": address, "safety_number": number, "verified": c.verified}
