"""Request signatures, descriptors, rotations, replay windows, rate buckets and backoff."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.backoff import CAP_MS, Backoff
from federation.errors import BadSignature, ClockSkew, MalformedFrame, Replay, UnsupportedVersion
from federation.ids import Address, key_from_node_id, node_id_from_key
from federation.replay import NonceWindow, TokenBucket
from federation.signing import (
    Descriptor,
    NodeKey,
    Rotation,
    SignedRequest,
    rotation_chain_allows,
    sign_request,
    sign_response,
    verify_request,
    verify_response,
)


def test_node_id_is_base32_of_key() -> None:
    k = NodeKey.generate()
    assert k.node_id == k.node_id.lower() and "=" not in k.node_id and len(k.node_id) == 52
    assert key_from_node_id(k.node_id) == k.public_key
    assert node_id_from_key(k.public_key) == k.node_id
    with pytest.raises(MalformedFrame):
        key_from_node_id("not-a-node-id")


def test_request_signature_binds_every_field() -> None:
    a, b = NodeKey.generate(), NodeKey.generate()
    body = b"batch"
    req = sign_request(a, "POST", "/haven/v1/federation/batch", b.node_id, body, 1000)
    parsed = SignedRequest.from_headers(req.to_headers())
    verify_request(parsed, "POST", "/haven/v1/federation/batch", body)
    for method, path, data in (
        ("GET", "/haven/v1/federation/batch", body),
        ("POST", "/haven/v1/federation/keys", body),
        ("POST", "/haven/v1/federation/batch", b"other"),
    ):
        with pytest.raises(BadSignature):
            verify_request(parsed, method, path, data)
    for field, value in (
        ("destination", a.node_id),
        ("created", 1001),
        ("origin", b.node_id),
        ("nonce", bytes(16)),
    ):
        forged = SignedRequest(
            **{**{f: getattr(parsed, f) for f in parsed.__slots__}, field: value}
        )
        with pytest.raises(BadSignature):
            verify_request(forged, "POST", "/haven/v1/federation/batch", body)


def test_bad_headers() -> None:
    with pytest.raises(MalformedFrame):
        SignedRequest.from_headers({})
    k = NodeKey.generate()
    h = sign_request(k, "POST", "/p", k.node_id, b"", 1).to_headers()
    with pytest.raises(UnsupportedVersion):
        SignedRequest.from_headers(h | {"Haven-Version": "2"})


def test_response_signature() -> None:
    a, b = NodeKey.generate(), NodeKey.generate()
    sig = sign_response(b, a.node_id, b"n" * 16, b"ok")
    verify_response(b.node_id, a.node_id, b"n" * 16, b"ok", sig)
    with pytest.raises(BadSignature):
        verify_response(b.node_id, a.node_id, b"m" * 16, b"ok", sig)


def test_descriptor_and_rotation_chain() -> None:
    old, mid, new = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    rots = (Rotation.make(old, mid.node_id, 1), Rotation.make(mid, new.node_id, 2))
    d = Descriptor(new.node_id, "http://h", 1, 5, {"x": 1}, rots)
    got = Descriptor.verify_decode(d.sign(new))
    assert got == d
    assert rotation_chain_allows(old.node_id, new.node_id, got.rotations)
    assert not rotation_chain_allows(NodeKey.generate().node_id, new.node_id, got.rotations)
    forged = (Rotation(old.node_id, new.node_id, 3, bytes(64)),)
    assert not rotation_chain_allows(old.node_id, new.node_id, forged)
    with pytest.raises(BadSignature):
        Descriptor.verify_decode(d.sign(old))  # signed by a key other than its id


def test_nonce_window() -> None:
    w = NonceWindow(skew_ms=60_000)
    w.check_fresh(1000, 60_000)
    with pytest.raises(ClockSkew):
        w.check_fresh(0, 61_000)
    with pytest.raises(ClockSkew):
        w.check_fresh(200_000, 100_000)
    w.check_and_remember("a", b"n1", 1000, 1000)
    with pytest.raises(Replay):
        w.check_and_remember("a", b"n1", 1000, 2000)
    w.check_and_remember("b", b"n1", 1000, 2000)  # nonces are per origin
    w.check_and_remember("c", b"n2", 500_000, 500_000)  # expiry drops old entries
    assert len(w) == 1


def test_token_bucket() -> None:
    tb = TokenBucket(rate=10, burst=5)
    assert all(tb.take("k", 0) for _ in range(5))
    assert not tb.take("k", 0)
    assert tb.take("k", 100)  # 100 ms refill one token
    assert tb.take("other", 0)


@given(st.integers(min_value=1, max_value=60))
def test_backoff_capped_and_reset(failures: int) -> None:
    b = Backoff(rng=random.Random(1))
    delays = [b.failed(0) for _ in range(failures)]
    assert all(0 < d <= CAP_MS for d in delays)
    if failures > 15:
        assert delays[-1] >= CAP_MS // 2
    b.reset()
    assert b.due(0) and b.failures == 0


def test_address_parse() -> None:
    a = Address.parse("alice@Example.org:8443")
    assert (a.name, a.host, str(a)) == ("alice", "example.org:8443", "alice@example.org:8443")
    for bad in ("alice", "@host", "Al ice@h", "a@"):
        with pytest.raises(ValueError):
            Address.parse(bad)
