"""Signed device list formats: v2 (day-granular times) is written, v1 still opens."""

from __future__ import annotations

import os

import msgpack
import nacl.signing
import pytest

from federation.devicelist import (
    DAY_MS,
    FORMAT_V1,
    FORMAT_V2,
    LIST_TAG_V1,
    LIST_TAG_V2,
    DeviceInfo,
    DeviceList,
    SignedDeviceList,
    coarse_day,
)
from federation.errors import MalformedFrame, UntrustedKey

EXACT = 1_795_376_891_016  # a link time to the millisecond


def _dev(added_at: int = EXACT) -> DeviceInfo:
    return DeviceInfo("curve", "ed", os.urandom(32), os.urandom(16), added_at)


def test_new_lists_are_v2_and_record_only_the_day() -> None:
    ik = nacl.signing.SigningKey.generate()
    dev = _dev()
    signed = DeviceList("bob@h", bytes(ik.verify_key), 3, (dev,)).sign(ik)
    raw = msgpack.unpackb(signed.blob)
    assert raw[0] == FORMAT_V2 and len(raw) == 5
    assert raw[4][0][4] == EXACT // DAY_MS  # a day number, not milliseconds
    assert str(EXACT).encode() not in signed.blob
    dl = signed.open(expected_address="bob@h")
    assert dl.fmt == FORMAT_V2 and dl.version == 3
    (got,) = dl.devices
    assert got.added_at == coarse_day(EXACT) == EXACT - EXACT % DAY_MS
    assert got.added_at % DAY_MS == 0 and EXACT - got.added_at < DAY_MS
    assert (got.device_id, got.sealing, got.mailbox) == (dev.device_id, dev.sealing, dev.mailbox)
    # re-signing what was read is stable
    again = DeviceList(dl.address, dl.identity_key, dl.version, dl.devices).sign(ik)
    assert again.blob == signed.blob


def test_v1_lists_still_verify_with_their_exact_times() -> None:
    ik = nacl.signing.SigningKey.generate()
    dev = _dev()
    v1 = DeviceList("bob@h", bytes(ik.verify_key), 1, (dev,), fmt=FORMAT_V1).sign(ik)
    # exactly the v1 bytes an older device wrote
    blob = msgpack.packb(["bob@h", bytes(ik.verify_key), 1, [dev.to_wire()]], use_bin_type=True)
    assert v1.blob == blob
    assert v1.signature == ik.sign(LIST_TAG_V1 + blob).signature
    dl = v1.open(expected_address="bob@h")
    assert dl.fmt == FORMAT_V1 and dl.devices == (dev,) and dl.devices[0].added_at == EXACT
    # the next re-signing (a link or a removal) writes v2
    up = DeviceList(dl.address, dl.identity_key, dl.version + 1, dl.devices).sign(ik).open()
    assert up.fmt == FORMAT_V2 and up.devices[0].added_at == coarse_day(EXACT)


def test_formats_do_not_verify_under_each_others_tag() -> None:
    ik = nacl.signing.SigningKey.generate()
    for fmt, wrong_tag in ((FORMAT_V2, LIST_TAG_V1), (FORMAT_V1, LIST_TAG_V2)):
        dl = DeviceList("bob@h", bytes(ik.verify_key), 1, (_dev(),), fmt=fmt)
        blob = dl.payload()
        crossed = SignedDeviceList(blob, ik.sign(wrong_tag + blob).signature)
        with pytest.raises(UntrustedKey):
            crossed.open()


def test_unknown_and_malformed_formats_are_refused() -> None:
    ik = nacl.signing.SigningKey.generate()
    key = bytes(ik.verify_key)
    entry = ["curve", "ed", os.urandom(32), os.urandom(16), 20_000]
    for obj in (
        [3, "bob@h", key, 1, [entry]],  # a future format this code cannot read
        ["bob@h", key, 1, [entry], "extra"],  # five fields but no format number
        [2, "bob@h", key, 1],  # v2 with a field missing
        [2, "bob@h", key, True, [entry]],  # a bool is not a version
        [2, "bob@h", key, 1, [[*entry[:4], -1]]],  # a negative day
        [2, "bob@h", key, 1, [[*entry[:4], "today"]]],
    ):
        blob = msgpack.packb(obj, use_bin_type=True)
        with pytest.raises(MalformedFrame):
            SignedDeviceList(blob, ik.sign(LIST_TAG_V2 + blob).signature).open()
    with pytest.raises(ValueError):
        DeviceList("bob@h", key, 1, (), fmt=7).payload()
