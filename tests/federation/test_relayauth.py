"""Held mode: the relay authorisation statement and the peer's check of relay-signed answers
(docs/protocol.md §12.4), with real keys; the transport path over a real local HTTP server."""

from __future__ import annotations

import dataclasses

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from federation.clock import FakeClock
from federation.errors import BadSignature, HavenError, MalformedFrame
from federation.relayauth import (
    H_RELAY,
    RelayAuth,
    header_value,
    parse_header,
    verify_answer,
)
from federation.signing import (
    DESC_TAG,
    H_SIG,
    Descriptor,
    NodeKey,
    SignedRequest,
    sign_response,
)
from federation.transport import PeerTransport
from federation.wire import Batch, BatchResult, packb, unpackb

NOW = 1_700_000_000_000
client, relay, peer, other = (NodeKey.generate() for _ in range(4))


def test_statement_round_trips_and_verifies() -> None:
    auth = RelayAuth.make(client, relay.node_id, NOW + 1000)
    back = RelayAuth.decode(auth.encode())
    assert back == auth
    back.check(client.node_id, relay.node_id, NOW)
    assert parse_header(header_value(auth)) == auth


def test_statement_refusals() -> None:
    auth = RelayAuth.make(client, relay.node_id, NOW)
    with pytest.raises(BadSignature, match="expired"):
        auth.check(client.node_id, relay.node_id, NOW + 1)
    with pytest.raises(BadSignature, match="another node"):
        auth.check(other.node_id, relay.node_id, NOW)
    with pytest.raises(BadSignature, match="another relay"):
        auth.check(client.node_id, other.node_id, NOW)
    # a statement with a changed field no longer verifies
    forged = RelayAuth(client.node_id, other.node_id, auth.until, auth.signature)
    with pytest.raises(BadSignature):
        forged.check(client.node_id, None, NOW)
    # signed by someone else for the client
    by_relay = RelayAuth.make(relay, relay.node_id, NOW)
    spoof = RelayAuth(client.node_id, relay.node_id, NOW, by_relay.signature)
    with pytest.raises(BadSignature):
        spoof.verify()


@given(st.binary(max_size=300))
def test_decoding_random_bytes_raises_only_typed_errors(data: bytes) -> None:
    try:
        RelayAuth.decode(data)
    except HavenError:
        pass


def _answer(signer: NodeKey, nonce: bytes, body: bytes) -> str:
    return sign_response(signer, peer.node_id, nonce, body)


def test_verify_answer() -> None:
    nonce, body = b"n" * 16, b"result"
    auth = header_value(RelayAuth.make(client, relay.node_id, NOW + 10))
    # signed by the destination itself: accepted, header or not
    verify_answer(
        client.node_id, peer.node_id, nonce, body, _answer(client, nonce, body), None, NOW
    )
    # signed by its authorised relay, with the statement: accepted
    by_relay = _answer(relay, nonce, body)
    verify_answer(client.node_id, peer.node_id, nonce, body, by_relay, auth, NOW)
    refused = [
        (by_relay, None, NOW),  # no statement
        (by_relay, auth, NOW + 11),  # expired
        (by_relay, "not base64!", NOW),  # garbled header
        (by_relay, header_value(RelayAuth.make(other, relay.node_id, NOW + 10)), NOW),
        (_answer(other, nonce, body), auth, NOW),  # signed by a node the statement does not name
        (by_relay, header_value(RelayAuth.make(client, other.node_id, NOW + 10)), NOW),
    ]
    for sig, header, now in refused:
        with pytest.raises(BadSignature):
            verify_answer(client.node_id, peer.node_id, nonce, body, sig, header, now)
    # the relay's signature covers the body and the request nonce
    with pytest.raises(BadSignature):
        verify_answer(client.node_id, peer.node_id, nonce, b"other", by_relay, auth, NOW)
    with pytest.raises(BadSignature):
        verify_answer(client.node_id, peer.node_id, b"m" * 16, body, by_relay, auth, NOW)


async def test_transport_accepts_relay_answers_only_for_batches() -> None:
    """A real HTTP answer signed by the relay: a batch is accepted with a valid statement and
    refused without one or once expired; a key query signed by the relay is always refused."""
    mode = {"header": header_value(RelayAuth.make(client, relay.node_id, NOW + 10))}

    async def handler(request: web.Request) -> web.Response:
        req = SignedRequest.from_headers(request.headers)
        body = BatchResult((b"i" * 16,), ()).encode()
        headers = {H_SIG: sign_response(relay, req.origin, req.nonce, body)}
        if mode["header"]:
            headers[H_RELAY] = mode["header"]
        return web.Response(body=body, content_type="application/msgpack", headers=headers)

    app = web.Application()
    app.router.add_post("/haven/v1/federation/{op}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    clock = FakeClock(NOW)
    try:
        async with aiohttp.ClientSession() as session:
            t = PeerTransport(peer, session, now_ms=clock.now_ms)
            got = await t.post_batch(base, client.node_id, NOW, Batch(()))
            assert got.accepted == (b"i" * 16,)
            got = await t.post_multi(base, client.node_id, NOW, b"")
            assert got.accepted == (b"i" * 16,)
            with pytest.raises(BadSignature):  # /keys is never answered by a relay
                await t.query_keys(base, client.node_id, NOW, "alice", False)
            clock.advance(11)
            with pytest.raises(BadSignature):
                await t.post_batch(base, client.node_id, NOW, Batch(()))
            mode["header"] = ""
            with pytest.raises(BadSignature):
                await t.post_batch(base, client.node_id, NOW, Batch(()))
    finally:
        await runner.cleanup()


def test_header_with_wrong_shape_is_malformed() -> None:
    with pytest.raises(MalformedFrame):
        parse_header("AAAA")


def test_descriptor_publishes_the_statement_under_relay_only_when_there_is_one() -> None:
    auth = RelayAuth.make(client, relay.node_id, NOW + 1000).encode()
    base = Descriptor(client.node_id, "https://l.relay.example", 1, NOW, {})
    got = Descriptor.verify_decode(dataclasses.replace(base, relay=auth).sign(client))
    assert RelayAuth.decode(got.relay) == RelayAuth.decode(auth)
    plain = base.sign(client)  # a node without a relay: as descriptors were before
    assert "relay" not in unpackb(unpackb(plain, max_len=1 << 16)["d"], max_len=1 << 16)
    assert Descriptor.verify_decode(plain).relay == b""


@pytest.mark.parametrize("bad", ["text", 5, b"x" * 257])
def test_descriptor_with_a_malformed_relay_is_refused(bad: object) -> None:
    inner = packb(
        {
            "node_id": client.node_id,
            "public_url": "https://l.relay.example",
            "version": 1,
            "now": NOW,
            "limits": {},
            "rotations": [],
            "challenge": b"",
            "features": [],
            "relay": bad,
        }
    )
    signed = packb({"d": inner, "sig": client.sign(DESC_TAG + inner)})
    with pytest.raises(MalformedFrame):
        Descriptor.verify_decode(signed)
