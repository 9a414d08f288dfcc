"""Request signatures, descriptors, rotations, replay windows, rate buckets and backoff."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.backoff import CAP_MS, Backoff
from federation.errors import BadSignature, ClockSkew, MalformedFrame, Replay, UnsupportedVersion
from federation.ids import Address, is_node_id, key_from_node_id, node_id_from_key
from federation.replay import NonceWindow, TokenBucket
from federation.signing import (
    Descriptor,
    NodeKey,
    Rotation,
    SignedRequest,
    b64d_exact,
    b64e,
    descriptor_challenge,
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


def _headers() -> tuple[NodeKey, dict[str, str]]:
    a, b = NodeKey.generate(), NodeKey.generate()
    return a, sign_request(a, "POST", "/p", b.node_id, b"", 1_700_000_000_000).to_headers()


@pytest.mark.parametrize(
    "name,spell",
    [
        ("Haven-Version", lambda v: "0" + v),
        ("Haven-Version", lambda v: "+" + v),
        ("Haven-Version", lambda v: " " + v),
        ("Haven-Created", lambda v: "0" + v),
        ("Haven-Created", lambda v: "+" + v),
        ("Haven-Created", lambda v: "-" + v),
        ("Haven-Created", lambda v: v[:3] + "_" + v[3:]),
        ("Haven-Created", lambda v: "1" * 17),
        ("Haven-Created", lambda v: "\u0661"),  # an Arabic-Indic digit: int() takes it
        ("Haven-Origin", str.upper),
        ("Haven-Origin", lambda v: v + "===="),
        ("Haven-Destination", str.upper),
        ("Haven-Nonce", lambda v: v + "=="),
        ("Haven-Nonce", lambda v: v[:-1]),
        ("Haven-Signature", lambda v: v + "=="),
        ("Haven-Signature", lambda v: v.replace("-", "+").replace("_", "/") + "+"),
    ],
)
def test_signature_headers_have_one_canonical_spelling(name: str, spell: Any) -> None:
    _, h = _headers()
    SignedRequest.from_headers(h)
    with pytest.raises(MalformedFrame):
        SignedRequest.from_headers(h | {name: spell(h[name])})


def test_malformed_is_checked_before_the_version_value() -> None:
    _, h = _headers()
    with pytest.raises(MalformedFrame):
        SignedRequest.from_headers(h | {"Haven-Version": "2", "Haven-Nonce": "x"})
    assert SignedRequest.from_headers(h | {"Haven-Created": "0"}).created == 0


@given(st.binary(min_size=32, max_size=32))
def test_node_id_round_trips_and_every_other_spelling_is_refused(key: bytes) -> None:
    nid = node_id_from_key(key)
    assert key_from_node_id(nid) == key and is_node_id(nid)
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    loose = nid[:-1] + alphabet[alphabet.index(nid[-1]) | 1]  # same key, unused bits set
    for other in {nid.upper(), nid + "====", loose} - {nid}:
        with pytest.raises(MalformedFrame):
            key_from_node_id(other)


@given(st.binary(min_size=16, max_size=32))
def test_exact_base64url_accepts_only_the_canonical_form(data: bytes) -> None:
    text = b64e(data)
    assert b64d_exact(text, 16, 32) == data
    for other in (text + "=", text + "==", text.replace("-", "+"), text.replace("_", "/")):
        if other != text:
            with pytest.raises(MalformedFrame):
                b64d_exact(other, 16, 32)
    with pytest.raises(MalformedFrame):
        b64d_exact(text, len(data) + 1, 64)


def test_nonce_window_refuses_requests_from_before_the_process_start() -> None:
    w = NonceWindow(skew_ms=60_000, not_before=100_000)
    with pytest.raises(ClockSkew):
        w.check_fresh(99_999, 100_500)  # inside the skew, but before the start: a replay?
    w.check_fresh(100_000, 100_500)  # re-stamped with the receiver's clock: fresh
    w.check_fresh(130_000, 100_500)


def test_descriptor_challenge_is_strict() -> None:
    c16, c32 = bytes(range(16)), bytes(range(32))
    assert descriptor_challenge("") == b"" and descriptor_challenge("x=1") == b""
    assert descriptor_challenge("c=" + b64e(c16)) == c16
    assert descriptor_challenge("v=2&c=" + b64e(c32)) == c32
    for raw in (
        "c=%%%",
        "c=+/+/",
        "c=",
        "c=" + b64e(c16) + "==",
        "c=" + b64e(c32 + b"x"),
        "c=" + b64e(c16[:15]),
        f"c={b64e(c16)}&c={b64e(c16)}",
        "c=" + b64e(c16).upper(),
    ):
        with pytest.raises(MalformedFrame):
            descriptor_challenge(raw)
