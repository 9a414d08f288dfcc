"""Held mode: the relay authorisation statement and the peer-side check (docs/protocol.md §12.4).

A personal node behind NAT (the *client*) signs ``msgpack([client id, relay id, until, sig])``
with ``sig = Ed25519(client key, "haven-relay-auth-v1\\0" || msgpack([client id, relay id,
until]))``: "relay R may accept batches for me until ``until``". While the client is offline its
relay answers ``/batch`` and ``/multi`` for it, signs the answer with its *own* key and sends the
statement in the ``Haven-Relay`` header. A peer accepts such an answer only if the statement is
signed by the node it addressed (the node id is the key), names the responder as relay and has
not expired. Pure: bytes and ``now`` in, values or :class:`BadSignature` out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import BadSignature, HavenError, MalformedFrame
from .ids import key_from_node_id
from .signing import DESC_RELAY_MAX, NodeKey, b64d_exact, b64e, verify_detached, verify_response
from .wire import packb, unpackb

RELAY_AUTH_TAG = b"haven-relay-auth-v1\x00"
H_RELAY = "Haven-Relay"
AUTH_VALID_MS = 7 * 86_400_000  # ``until`` = now + 7 days, renewed on each link (§12.4)
STATEMENT_MAX = DESC_RELAY_MAX  # two 52-char ids, an int, 64 bytes of signature, framing


def _message(client_id: str, relay_id: str, until: int) -> bytes:
    return RELAY_AUTH_TAG + packb([client_id, relay_id, until])


@dataclass(frozen=True, slots=True)
class RelayAuth:
    """A client's signed statement that ``relay_id`` may accept batches for it until ``until``
    (ms since the epoch, in the client's clock)."""

    client_id: str
    relay_id: str
    until: int
    signature: bytes

    @classmethod
    def make(cls, client: NodeKey, relay_id: str, until: int) -> RelayAuth:
        """Sign a statement with the client's node key."""
        key_from_node_id(relay_id)  # a canonical node id, or MalformedFrame
        sig = client.sign(_message(client.node_id, relay_id, until))
        return cls(client.node_id, relay_id, until, sig)

    def encode(self) -> bytes:
        """The statement as sent in ``hello``, the descriptor key ``relay`` and ``Haven-Relay``."""
        return packb([self.client_id, self.relay_id, self.until, self.signature])

    @classmethod
    def decode(cls, data: bytes) -> RelayAuth:
        """Decode (shape only, no signature check).

        Raises:
            MalformedFrame: on anything but the four typed fields with canonical node ids.
        """
        if not isinstance(data, bytes) or len(data) > STATEMENT_MAX:
            raise MalformedFrame("bad relay statement")
        try:
            obj: Any = unpackb(data, max_len=STATEMENT_MAX)
        except HavenError as exc:
            raise MalformedFrame("bad relay statement") from exc
        if (
            not isinstance(obj, list)
            or len(obj) != 4
            or not isinstance(obj[0], str)
            or not isinstance(obj[1], str)
            or type(obj[2]) is not int
            or not isinstance(obj[3], bytes)
            or len(obj[3]) != 64
        ):
            raise MalformedFrame("bad relay statement")
        key_from_node_id(obj[0])
        key_from_node_id(obj[1])
        return cls(obj[0], obj[1], obj[2], obj[3])

    def verify(self) -> None:
        """Raise BadSignature unless the client's own key signed this statement."""
        verify_detached(
            key_from_node_id(self.client_id),
            _message(self.client_id, self.relay_id, self.until),
            self.signature,
        )

    def check(self, client_id: str, relay_id: str | None, now_ms: int) -> None:
        """Raise BadSignature unless this is a valid, unexpired statement by ``client_id``
        (and, when given, for ``relay_id``)."""
        if self.client_id != client_id:
            raise BadSignature("relay statement is for another node")
        if relay_id is not None and self.relay_id != relay_id:
            raise BadSignature("relay statement names another relay")
        if self.until < now_ms:
            raise BadSignature("relay statement expired")
        self.verify()


def header_value(auth: RelayAuth) -> str:
    """The ``Haven-Relay`` header value: unpadded base64url of the encoded statement."""
    return b64e(auth.encode())


def parse_header(value: str) -> RelayAuth:
    """Decode a ``Haven-Relay`` header value. Raises MalformedFrame."""
    return RelayAuth.decode(b64d_exact(value, 1, STATEMENT_MAX))


def verify_answer(
    dest: str,
    requester: str,
    nonce: bytes,
    body: bytes,
    sig: str,
    relay_header: str | None,
    now_ms: int,
) -> None:
    """Check a signed answer to a ``/batch`` or ``/multi`` request addressed to ``dest``.

    Signed by ``dest`` itself: accepted. Otherwise only with a ``Haven-Relay`` statement signed
    by ``dest``'s key, unexpired at ``now_ms``, naming the relay whose key signed the answer.

    Raises:
        BadSignature: for everything else (a bad header is ``bad_signature`` too, never a
            different code an attacker in the path could use to tell cases apart).
    """
    try:
        verify_response(dest, requester, nonce, body, sig)
        return
    except BadSignature:
        if relay_header is None:
            raise
    try:
        auth = parse_header(relay_header)
    except HavenError as exc:
        raise BadSignature("bad relay statement") from exc
    auth.check(dest, None, now_ms)
    verify_response(auth.relay_id, requester, nonce, body, sig)
