"""Relay link frames, hello signatures, statements and relay-invite codes (federation/relaylink)."""

from __future__ import annotations

import os

import msgpack
import pytest

from federation.errors import BadSignature, MalformedFrame, TooLarge
from federation.relaylink import (
    HELLO_TAG,
    MAX_BODY,
    Challenge,
    Error,
    Hello,
    Ok,
    RelayInvite,
    Req,
    Res,
    decode_link_frame,
    encode_invite,
    forwarded_headers,
    hello_message,
    new_label,
    parse_invite,
    sign_hello,
    valid_label,
    verify_hello,
)
from federation.signing import NodeKey, b64e, verify_detached


def test_frames_round_trip_as_tagged_maps() -> None:
    relay = NodeKey.generate()
    frames = [
        Challenge(node=relay.node_id, nonce=os.urandom(32)),
        Ok(),
        Error(code="unauthorized", message="no"),
        Req(
            id=7, m="POST", p="/haven/v1/federation/batch?x=%41", h=(("Haven-Nonce", "n"),), b=b"x"
        ),
        Res(id=7, s=200, h=(("Content-Type", "application/msgpack"),), b=b"y"),
    ]
    for f in frames:
        data = f.encode()
        assert msgpack.unpackb(data)["t"] == f.T
        assert decode_link_frame(data) == f
    raw = msgpack.unpackb(frames[3].encode())
    assert raw == {
        "t": "req",
        "id": 7,
        "m": "POST",
        "p": "/haven/v1/federation/batch?x=%41",
        "h": [["Haven-Nonce", "n"]],
        "b": b"x",
    }


def test_decode_refuses_malformed_and_oversized() -> None:
    with pytest.raises(MalformedFrame):
        decode_link_frame(msgpack.packb({"t": "nope"}))
    with pytest.raises(MalformedFrame):
        decode_link_frame(msgpack.packb({"t": "challenge", "node": "x", "nonce": b"short"}))
    with pytest.raises(MalformedFrame):
        decode_link_frame(os.urandom(40))
    with pytest.raises(MalformedFrame):  # a body over the client's max federation body
        decode_link_frame(
            msgpack.packb({"t": "res", "id": 1, "s": 200, "h": [], "b": b"\0" * (MAX_BODY + 1)}),
            max_len=MAX_BODY * 2,
        )
    with pytest.raises(TooLarge):
        decode_link_frame(b"\0" * 100, max_len=99)


def test_hello_is_bound_to_relay_nonce_client_and_label() -> None:
    relay, client, other = NodeKey.generate(), NodeKey.generate(), NodeKey.generate()
    nonce, label = os.urandom(32), new_label()
    hello = sign_hello(client, relay.node_id, nonce, label, b"t" * 24, b"")
    verify_hello(hello, relay.node_id, nonce)
    assert hello.node == client.node_id and hello.token == b"t" * 24
    msg = HELLO_TAG + msgpack.packb([relay.node_id, nonce, client.node_id, label])
    assert hello_message(relay.node_id, nonce, client.node_id, label) == msg
    verify_detached(client.public_key, msg, hello.sig)
    for bad in (
        Hello(node=hello.node, label=new_label(), token=b"", auth=b"", sig=hello.sig),
        Hello(node=other.node_id, label=label, token=b"", auth=b"", sig=hello.sig),
    ):
        with pytest.raises(BadSignature):
            verify_hello(bad, relay.node_id, nonce)
    with pytest.raises(BadSignature):
        verify_hello(hello, relay.node_id, os.urandom(32))  # another challenge: no replay
    with pytest.raises(BadSignature):
        verify_hello(hello, other.node_id, nonce)  # signed for another relay


def test_invite_codes_round_trip_and_refuse_garbage() -> None:
    relay = NodeKey.generate()
    label = new_label()
    assert valid_label(label) and len(label) == 10 and label == label.lower()
    inv = RelayInvite(
        url="https://relay.example",
        node=relay.node_id,
        t=os.urandom(24),
        label=label,
        host=f"{label}.relay.example",
    )
    code = encode_invite(inv)
    assert code.startswith("haven:relay:")
    assert parse_invite(code + "\n") == inv
    assert set(msgpack.unpackb(inv_bytes(code))) == {"url", "node", "t", "label", "host"}
    for bad in (
        "haven:invite:" + code[12:],
        "haven:relay:!!!",
        "haven:relay:" + b64e(msgpack.packb({"url": "x"})),
        encode_invite(RelayInvite(url="u", node=relay.node_id, t=inv.t, label=label, host="x.y")),
    ):
        with pytest.raises(MalformedFrame):
            parse_invite(bad)


def inv_bytes(code: str) -> bytes:
    import base64

    body = code[len("haven:relay:") :]
    return base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))


def test_only_content_type_and_haven_headers_are_forwarded() -> None:
    got = forwarded_headers(
        [
            ("Host", "x"),
            ("Content-Type", "application/msgpack"),
            ("Haven-Origin", "o"),
            ("Cookie", "c"),
            ("haven-nonce", "n"),
            ("X-Forwarded-For", "192.0.2.1"),
        ]
    )
    assert got == (
        ("Content-Type", "application/msgpack"),
        ("Haven-Origin", "o"),
        ("haven-nonce", "n"),
    )
