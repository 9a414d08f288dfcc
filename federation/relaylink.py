"""Relay link frames, the hello signature and relay-invite codes (docs/protocol.md §12).

A relayed node (the *client*) keeps one outbound WebSocket to its relay; both sides exchange
msgpack maps tagged by ``t``, declared once below as frozen msgspec structs (as in
:mod:`federation.frames`). The relay forwards each federation request for the client as a
:class:`Req` and gets the client's answer back as a :class:`Res`; neither side parses the
forwarded request: signatures stay end to end between the federating nodes.

Also here: the ``haven:relay:`` invite code (§12.2). The authorisation statement a hello
carries (§12.4) is :class:`federation.relayauth.RelayAuth`.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, ClassVar, Final, Union

import msgspec

from .errors import MalformedFrame, TooLarge
from .ids import key_from_node_id
from .relayauth import STATEMENT_MAX
from .signing import NodeKey, b64d, b64e, verify_detached
from .wire import packb, translate

LINK_PATH = "/haven/v1/relay/link"
HELLO_TAG = b"haven-relay-link-v1\x00"
INVITE_PREFIX = "haven:relay:"
TOKEN_LEN = 24
NONCE_LEN = 32
LABEL_LEN = 10
LABEL_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
MAX_BODY = 4 * 1024 * 1024  # a forwarded body (the client's max federation body)
MAX_LINK_FRAME = MAX_BODY + 64 * 1024  # a req/res frame: body plus target and headers
MAX_HEADERS = 32
MAX_IN_FLIGHT = 64  # forwarded requests in flight per link

NodeIdText = Annotated[str, msgspec.Meta(max_length=64)]
Label = Annotated[str, msgspec.Meta(min_length=LABEL_LEN, max_length=LABEL_LEN)]
Short = Annotated[str, msgspec.Meta(max_length=1024)]
HeaderName = Annotated[str, msgspec.Meta(max_length=64)]
HeaderValue = Annotated[str, msgspec.Meta(max_length=4096)]
Header = tuple[HeaderName, HeaderValue]
Headers = Annotated[tuple[Header, ...], msgspec.Meta(max_length=MAX_HEADERS)]
ReqId = Annotated[int, msgspec.Meta(ge=0, lt=2**53)]


class LinkFrame(msgspec.Struct, frozen=True, tag_field="t"):
    """Base of the link frames; ``T`` is the wire type string."""

    T: ClassVar[str] = ""

    def encode(self) -> bytes:
        """The frame as one msgpack map."""
        return _ENCODER.encode(self)


class Challenge(LinkFrame, frozen=True, tag="challenge"):
    node: NodeIdText  # the relay's node id
    nonce: Annotated[bytes, msgspec.Meta(min_length=NONCE_LEN, max_length=NONCE_LEN)]


class Hello(LinkFrame, frozen=True, tag="hello"):
    node: NodeIdText  # the client's node id
    label: Label
    token: Annotated[bytes, msgspec.Meta(max_length=TOKEN_LEN)]  # b"" once bound
    auth: Annotated[bytes, msgspec.Meta(max_length=STATEMENT_MAX)]  # §12.4 (RelayAuth)
    sig: Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]


class Ok(LinkFrame, frozen=True, tag="ok"):
    pass


class Error(LinkFrame, frozen=True, tag="error"):
    code: Short
    message: Short = ""


class Req(LinkFrame, frozen=True, tag="req"):
    id: ReqId
    m: Annotated[str, msgspec.Meta(max_length=16)]
    p: Annotated[str, msgspec.Meta(max_length=8192)]
    h: Headers
    b: Annotated[bytes, msgspec.Meta(max_length=MAX_BODY)]


class Res(LinkFrame, frozen=True, tag="res"):
    id: ReqId
    s: Annotated[int, msgspec.Meta(ge=100, le=599)]
    h: Headers
    b: Annotated[bytes, msgspec.Meta(max_length=MAX_BODY)]


_ALL = (Challenge, Hello, Ok, Error, Req, Res)
for _c in _ALL:
    _c.T = str(_c.__struct_config__.tag)

_ENCODER: Final = msgspec.msgpack.Encoder()
_DECODER: Final[msgspec.msgpack.Decoder[LinkFrame]] = msgspec.msgpack.Decoder(
    Union[_ALL]  # noqa: UP007 - a runtime Union of the tagged structs
)


def decode_link_frame(data: bytes, max_len: int = MAX_LINK_FRAME) -> LinkFrame:
    """Decode one link frame. Raises TooLarge or MalformedFrame (RemoteProtocolError)."""
    if len(data) > max_len:
        raise TooLarge(f"{len(data)} bytes exceeds limit {max_len}")
    try:
        return _DECODER.decode(data)
    except (msgspec.MsgspecError, RecursionError) as exc:
        raise translate(exc, MalformedFrame) from exc


def forwarded_headers(items: Any) -> tuple[tuple[str, str], ...]:
    """The headers a link carries, in order: ``Content-Type`` and ``Haven-*`` only."""
    out = []
    for name, value in items:
        lower = str(name).lower()
        if lower == "content-type" or lower.startswith("haven-"):
            out.append((str(name), str(value)))
    return tuple(out[:MAX_HEADERS])


def hello_message(relay_id: str, nonce: bytes, client_id: str, label: str) -> bytes:
    """What a client signs in its hello: tag || msgpack([relay id, nonce, client id, label])."""
    return HELLO_TAG + packb([relay_id, nonce, client_id, label])


def sign_hello(
    key: NodeKey, relay_id: str, nonce: bytes, label: str, token: bytes, auth: bytes
) -> Hello:
    """The client's hello answering a relay's challenge."""
    sig = key.sign(hello_message(relay_id, nonce, key.node_id, label))
    return Hello(node=key.node_id, label=label, token=token, auth=auth, sig=sig)


def verify_hello(hello: Hello, relay_id: str, nonce: bytes) -> None:
    """Raise BadSignature/MalformedFrame unless the hello is signed by its node id's key."""
    msg = hello_message(relay_id, nonce, hello.node, hello.label)
    verify_detached(key_from_node_id(hello.node), msg, hello.sig)


# ---- relay invites (§12.2) --------------------------------------------------------------------


def new_label() -> str:
    """10 random characters of lowercase base32."""
    return "".join(secrets.choice(LABEL_ALPHABET) for _ in range(LABEL_LEN))


def valid_label(label: str) -> bool:
    return len(label) == LABEL_LEN and all(c in LABEL_ALPHABET for c in label)


class RelayInvite(msgspec.Struct, frozen=True):
    url: Short  # the relay's public URL (where the link goes)
    node: NodeIdText  # the relay's node id
    t: Annotated[bytes, msgspec.Meta(min_length=TOKEN_LEN, max_length=TOKEN_LEN)]
    label: Label
    host: Short  # the client's host: label.relay_domain[:port]


_INVITE: Final = msgspec.msgpack.Decoder(RelayInvite)


def encode_invite(invite: RelayInvite) -> str:
    """``haven:relay:`` + b64url(msgpack map)."""
    return INVITE_PREFIX + b64e(_ENCODER.encode(invite))


def parse_invite(code: str) -> RelayInvite:
    """Parse a relay-invite code; raises MalformedFrame with one clear line."""
    code = code.strip()
    if not code.startswith(INVITE_PREFIX):
        raise MalformedFrame("not a relay invite (it starts with haven:relay:)")
    try:
        inv = _INVITE.decode(b64d(code[len(INVITE_PREFIX) :]))
        key_from_node_id(inv.node)
    except (msgspec.MsgspecError, MalformedFrame, ValueError) as exc:
        raise MalformedFrame("malformed relay invite") from exc
    if not valid_label(inv.label) or not inv.host.startswith(inv.label + "."):
        raise MalformedFrame("malformed relay invite")
    return inv
