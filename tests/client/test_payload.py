"""Payload fields for forwarding (``devs``, ``sync``): encoding and the receiver's checks."""

from __future__ import annotations

import os

import msgpack
import pytest

from client.payload import DEVICE_TAG_LEN, Payload, device_tag
from federation.errors import MalformedEnvelope


def test_device_tags_are_short_stable_and_distinct() -> None:
    ids = [f"device-{i}" for i in range(64)]
    tags = [device_tag(i) for i in ids]
    assert all(len(t) == DEVICE_TAG_LEN for t in tags)
    assert len(set(tags)) == len(ids)
    assert device_tag("device-0") == tags[0]
    assert b"device" not in b"".join(tags)


def test_devs_and_sync_round_trip() -> None:
    inner = Payload(os.urandom(16), "text", "bob@b", 5, text="hi", devs=(device_tag("d1"),))
    assert Payload.decode(inner.encode()) == inner
    sync = Payload(os.urandom(16), "sync", "bob@b", 6, origin="alice@a", inner=inner.encode())
    back = Payload.decode(sync.encode())
    assert back == sync and Payload.decode(back.inner) == inner


def test_a_v1_payload_without_the_new_keys_still_decodes() -> None:
    old = {"v": 1, "id": os.urandom(16), "kind": "text", "to": "bob@b", "sent_at": 1, "text": "x"}
    p = Payload.decode(msgpack.packb(old, use_bin_type=True))
    assert p.devs == () and p.origin == "" and p.inner == b""


@pytest.mark.parametrize(
    "change",
    [
        {"devs": [b"short"]},
        {"devs": [bytes(8)] * 17},
        {"kind": "sync"},  # sync without origin/inner
        {"kind": "sync", "origin": "alice@a"},
        {"origin": "alice@a", "inner": b"x"},  # only sync carries them
    ],
)
def test_bad_forwarding_fields_are_refused(change: dict[str, object]) -> None:
    base = Payload(os.urandom(16), "text", "bob@b", 1, text="x").encode()
    obj = msgpack.unpackb(base) | change
    with pytest.raises(MalformedEnvelope):
        Payload.decode(msgpack.packb(obj, use_bin_type=True))


def test_moved_round_trips_and_only_it_carries_old() -> None:
    moved = Payload(os.urandom(16), "moved", "bob@b", 7, text="alice@new", old="alice@old")
    assert Payload.decode(moved.encode()) == moved
    for bad in (
        Payload(os.urandom(16), "moved", "bob@b", 7, text="alice@new"),  # no old
        Payload(os.urandom(16), "moved", "bob@b", 7, old="alice@old"),  # no new address
        Payload(os.urandom(16), "text", "bob@b", 7, text="hi", old="alice@old"),
    ):
        with pytest.raises(MalformedEnvelope):
            Payload.decode(bad.encode())
