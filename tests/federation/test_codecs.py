"""Pure protocol core: codecs round-trip; random bytes raise only our typed errors."""

from __future__ import annotations

import os

import nacl.public
import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation import frames as F
from federation.devicelist import DeviceInfo, DeviceList, SignedDeviceList
from federation.errors import (
    MalformedEnvelope,
    RemoteProtocolError,
    TooLarge,
    UnknownFrame,
    UnsupportedVersion,
    UntrustedKey,
)
from federation.sealing import BUCKETS, SealedContent, pad, seal, unpad, unseal
from federation.wire import MAX_BODY, Batch, BatchResult, Envelope, packb

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
    dev = DeviceInfo("curve", "ed", os.urandom(32), os.urandom(16), 1)
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
