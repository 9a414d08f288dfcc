"""Pure protocol core: codecs round-trip; random bytes raise only our typed errors."""

from __future__ import annotations

import os

import msgspec
import nacl.public
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import frames as F
from federation.devicelist import DeviceInfo, DeviceList, SignedDeviceList
from federation.errors import (
    MalformedEnvelope,
    MalformedFrame,
    RemoteProtocolError,
    TooLarge,
    UnknownFrame,
    UnsupportedVersion,
    UntrustedKey,
)
from federation.sealing import BUCKETS, SealedContent, pad, seal, unpad, unseal
from federation.wire import MAX_BODY, Batch, BatchResult, Envelope, ErrorBody, KeyQuery, packb

ids16 = st.binary(min_size=16, max_size=16)
envelopes = st.builds(
    Envelope,
    id=ids16,
    to=ids16,
    expires=st.integers(min_value=1, max_value=2**62),
    body=st.binary(max_size=2048),
)


@given(st.lists(envelopes, max_size=20))
def test_batch_round_trips(envs: list[Envelope]) -> None:
    assert Batch.decode(Batch(tuple(envs)).encode()).envelopes == tuple(envs)


@given(st.lists(ids16, max_size=10), st.lists(st.tuples(ids16, st.text(max_size=20)), max_size=5))
def test_batch_result_round_trips(acc: list[bytes], rej: list[tuple[bytes, str]]) -> None:
    r = BatchResult(tuple(acc), tuple(rej))
    assert BatchResult.decode(r.encode()) == r


@settings(max_examples=300)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_typed_errors(data: bytes) -> None:
    for decode in (Batch.decode, BatchResult.decode, F.decode_frame, SealedContent.decode):
        try:
            decode(data)
        except RemoteProtocolError:
            pass


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.sampled_from(["t", "rid", "ids", "items", "mailbox", "sig", "envs"]),
        st.one_of(
            st.integers(-(2**63), 2**64 - 1),
            st.binary(max_size=40),
            st.text(max_size=10),
            st.lists(st.binary(max_size=20), max_size=3),
        ),
        max_size=6,
    ),
    st.sampled_from(sorted(F.FRAME_TYPES)),
)
def test_random_frame_maps_raise_only_typed_errors(m: dict[str, object], t: str) -> None:
    try:
        F.decode_frame(packb(m | {"t": t}))
    except RemoteProtocolError:
        pass


def test_frames_round_trip() -> None:
    e = Envelope(os.urandom(16), os.urandom(16), 123, b"body")
    frames: list[F.Frame] = [
        F.Send(7, (("node", e),)),
        F.Accepted(7, (e.id,), ((os.urandom(16), "not_found"),)),
        F.Deliver((e,)),
        F.Ack((e.id,)),
        F.Auth(1, os.urandom(16), os.urandom(64)),
        F.QueryKeys(2, "bob@h:1", True),
        F.PublishKeys(3, (("a", "b"),), (), None),
        F.Error(4, "replay", "x"),
    ]
    for f in frames:
        assert F.decode_frame(f.encode()) == f


def test_unknown_frame_and_version_errors() -> None:
    with pytest.raises(UnknownFrame):
        F.decode_frame(packb({"t": "launch_missiles"}))
    with pytest.raises(UnsupportedVersion):
        Envelope.from_wire([2, os.urandom(16), os.urandom(16), 5, b""])
    with pytest.raises(TooLarge):
        Envelope.from_wire([1, os.urandom(16), os.urandom(16), 5, bytes(MAX_BODY + 1)])
    with pytest.raises(TooLarge):
        F.decode_frame(bytes(100), max_len=10)


@given(st.binary(max_size=60_000))
def test_padding_hides_length_to_a_bucket(data: bytes) -> None:
    padded = pad(data)
    assert len(padded) + 48 in BUCKETS
    assert unpad(padded) == data


def test_sealed_sender_round_trip_and_wrong_key() -> None:
    sk = nacl.public.PrivateKey.generate()
    content = SealedContent("alice@h:1", "curvekey", 0, b"olm")
    body = seal(bytes(sk.public_key), content)
    assert len(body) == BUCKETS[0]
    assert b"alice" not in body
    assert unseal(bytes(sk), body) == content
    with pytest.raises(MalformedEnvelope):
        unseal(bytes(nacl.public.PrivateKey.generate()), body)


def test_device_list_signature_and_tamper() -> None:
    ik = nacl.signing.SigningKey.generate()
    dev = DeviceInfo("curve", "ed", os.urandom(32), os.urandom(16), 0)  # a day start (v2)
    signed = DeviceList("bob@h", bytes(ik.verify_key), 1, (dev,)).sign(ik)
    assert signed.open(expected_address="bob@h").devices == (dev,)
    with pytest.raises(UntrustedKey):
        signed.open(expected_address="mallory@h")
    # a node adding a device without the identity key cannot produce a valid list
    extra = DeviceInfo("evil", "ed", os.urandom(32), os.urandom(16), 1)
    forged = DeviceList("bob@h", bytes(ik.verify_key), 2, (dev, extra))
    other = nacl.signing.SigningKey.generate()
    bad = SignedDeviceList(forged.payload(), forged.sign(other).signature)
    with pytest.raises(UntrustedKey):
        bad.open()


def test_encodings_are_the_v1_msgpack_maps_byte_for_byte() -> None:
    """Frames stay byte-compatible with v1 peers: a map, ``t`` first, fields in order."""
    e = Envelope(os.urandom(16), os.urandom(16), 1_800_000_000_000, b"body")
    wire_env = [1, e.id, e.to, e.expires, e.body]
    dl = SignedDeviceList(b"blob", bytes(64))
    cases = [
        (F.Send(7, (("n" * 52, e),)), {"t": "send", "rid": 7, "items": [["n" * 52, wire_env]]}),
        (F.Deliver((e,)), {"t": "deliver", "envs": [wire_env]}),
        (F.Ack((e.id,)), {"t": "ack", "ids": [e.id]}),
        (
            F.Accepted(1, (e.id,), ((e.id, "not_found"),)),
            {
                "t": "accepted",
                "rid": 1,
                "ids": [e.id],
                "rejected": [[e.id, "not_found"]],
                "warnings": [],
            },
        ),
        (
            F.Keys(2, "n" * 52, dl, {"dev": ("k", "KEY:SIG")}),
            {
                "t": "keys",
                "rid": 2,
                "node_id": "n" * 52,
                "device_list": [b"blob", bytes(64)],
                "claimed": {"dev": ["k", "KEY:SIG"]},
            },
        ),
        (F.Error(3, "replay", "x"), {"t": "error", "rid": 3, "code": "replay", "message": "x"}),
        (F.Ok(4), {"t": "ok", "rid": 4, "otk_count": 0}),
    ]
    for frame, expected in cases:
        assert frame.encode() == packb(expected), frame
        assert F.decode_frame(packb(expected)) == frame
    assert Batch((e,)).encode() == packb({"envs": [wire_env]})
    r = BatchResult((e.id,), ((e.id, "expired"),))
    assert r.encode() == packb({"accepted": [e.id], "rejected": [[e.id, "expired"]]})
    assert KeyQuery("bob", True).encode() == packb({"name": "bob", "claim": True})


def test_unknown_fields_are_ignored_and_unknown_types_carry_the_rid() -> None:
    f = F.decode_frame(packb({"t": "mint_link", "rid": 5, "future": [1, {"x": b"y"}]}))
    assert f == F.MintLink(5)
    assert Batch.decode(packb({"envs": [], "later": 1})) == Batch(())
    for m, rid in (
        ({"t": "subscribe", "rid": 9}, 9),
        ({"t": "subscribe"}, 0),
        ({"t": "subscribe", "rid": -1}, 0),
        ({"t": "subscribe", "rid": 2**53}, 0),
        ({"t": "subscribe", "rid": True}, 0),
    ):
        with pytest.raises(F.UnknownFrameType) as err:
            F.decode_frame(packb(m))
        assert err.value.rid == rid and err.value.code == "unknown_frame"
    for m in ({"t": "auth", "rid": 1}, {"rid": 1}, {"t": 7}, {"t": "ok", "rid": -1}):
        with pytest.raises(MalformedFrame):
            F.decode_frame(packb(m))


def test_envelope_rules_keep_their_codes() -> None:
    good = [1, os.urandom(16), os.urandom(16), 5, b""]
    assert Envelope.from_wire(good).to_wire() == good
    for bad in (
        [*good, b"extra"],  # exactly five elements
        good[:4],
        [True, *good[1:]],
        ["1", *good[1:]],
        [1, os.urandom(15), *good[2:]],
        [1, good[1], os.urandom(17), 5, b""],
        [1, good[1], good[2], 0, b""],
        [1, good[1], good[2], "soon", b""],
        [1, good[1], good[2], 5, "text"],
    ):
        with pytest.raises(MalformedEnvelope):
            Envelope.from_wire(bad)
        with pytest.raises(MalformedEnvelope):
            Batch.decode(packb({"envs": [good, bad]}))
    for version in (0, 2, -1, 2**40):
        with pytest.raises(UnsupportedVersion):
            Batch.decode(packb({"envs": [good, [version, *good[1:]]]}))
        with pytest.raises(UnsupportedVersion):
            F.decode_frame(packb({"t": "send", "rid": 1, "items": [["n", [version, *good[1:]]]]}))
    big = [1, good[1], good[2], 5, bytes(MAX_BODY + 1)]
    with pytest.raises(TooLarge):
        Batch.decode(packb({"envs": [big]}))
    with pytest.raises(TooLarge):
        F.decode_frame(packb({"t": "deliver", "envs": [big]}))
    with pytest.raises(TooLarge):
        F.decode_frame(packb({"t": "send", "rid": 1, "items": [["n", good]] * 257}))
    with pytest.raises(TooLarge):
        Batch.decode(packb({"envs": [good] * 257}))


def test_per_field_bounds() -> None:
    mb, sig = os.urandom(16), os.urandom(64)
    ok = {"t": "auth", "rid": 1, "mailbox": mb, "sig": sig}
    assert F.decode_frame(packb(ok)) == F.Auth(1, mb, sig)
    bad_maps = [
        ok | {"sig": sig[:63]},
        ok | {"mailbox": mb + b"x"},
        ok | {"rid": 2**53},
        {"t": "ack", "ids": [os.urandom(16)] * 4097},
        {"t": "ack", "ids": [os.urandom(15)]},
        {"t": "publish_keys", "rid": 1, "otks": [["k", "v"]] * 101},
        {"t": "publish_keys", "rid": 1, "fallback": [["k", "v"], ["k", "v"]]},
        {"t": "publish_keys", "rid": 1, "otks": [["k", "v" * 193]]},
        {"t": "query_keys", "rid": 1, "address": "a" * 301, "claim": True},
        {"t": "query_keys", "rid": 1, "address": "a@h", "claim": 1},
    ]
    for m in bad_maps:
        with pytest.raises(MalformedFrame):
            F.decode_frame(packb(m))
    assert F.decode_frame(packb({"t": "ack", "ids": [os.urandom(16)] * 4096}))


def test_deep_nesting_and_trailing_bytes_raise_typed_errors() -> None:
    deep = b"\x91" * 200_000 + b"\xc0"
    head = packb({"t": "mint_link", "rid": 1})
    for data in (head[:-1] + b"\x83" + head[1:] + b"\xa1z" + deep, deep, head + b"\x00"):
        with pytest.raises(RemoteProtocolError):
            F.decode_frame(data)
    with pytest.raises(RemoteProtocolError):
        Batch.decode(b"\x81\xa4envs" + deep)


def test_envelopes_are_frozen_and_replaced_with_msgspec() -> None:
    e = Envelope(os.urandom(16), os.urandom(16), 10, b"x")
    capped = msgspec.structs.replace(e, expires=5)
    assert (capped.id, capped.expires, capped.v) == (e.id, 5, 1)
    with pytest.raises(AttributeError):
        e.expires = 3  # type: ignore[misc]
    assert {e: 1}[Envelope(e.id, e.to, 10, b"x")] == 1  # hashable by value


@settings(max_examples=200)
@given(st.binary(max_size=256))
def test_federation_bodies_raise_only_typed_errors(data: bytes) -> None:
    for decode in (KeyQuery.decode, ErrorBody.decode):
        try:
            decode(data)
        except RemoteProtocolError:
            pass
