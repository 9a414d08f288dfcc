"""Client API frames: device <-> node over WebSocket, msgpack maps (docs/protocol.md §5).

Every frame is a map with a ``t`` (type) key. Requests carry an integer ``rid`` that the answer
echoes. Each frame type is declared once below as a frozen msgspec ``Struct`` tagged with its
``t``; the tagged union of all of them is decoded and validated in one step (field types,
lengths, list bounds), so adding a frame is adding a class. Unknown *fields* of a known frame are
ignored (forward compatible); an unknown *type* raises :class:`UnknownFrameType`, which carries
the request's ``rid`` so the answer fails only that request (§5.6). Sizes are checked before
parsing; random bytes raise only :class:`RemoteProtocolError` subclasses.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final, Union

import msgspec

from .devicelist import MAX_DEVICES, SignedDeviceList
from .errors import MalformedFrame, TooLarge, UnknownFrame
from .multi import EPH_LEN, HEADER_LEN, MAX_GBODY, MAX_RECIPIENTS
from .wire import (
    CHUNK_SIZE,
    MAX_BATCH_ENVELOPES,
    MAX_BLOB_SIZE,
    MAX_CHUNKS,
    MAX_TOKENS,
    BlobId,
    ChunkIndex,
    Code,
    Envelope,
    EnvelopeId,
    Hash32,
    MailboxId,
    Token,
    check_envelopes,
    translate,
)

MAX_FRAME = 4 * 1024 * 1024
MAX_OTKS_PER_FRAME = 100
MAX_ACK_IDS = 4096
MAX_ADDRESS = 300
RID_LIMIT = 2**53  # rids fit a JavaScript number
MAX_KEY_QUERY = 1000  # addresses per query_keys_multi (a 1,000-member group in one frame)

Rid = Annotated[int, msgspec.Meta(ge=0, lt=RID_LIMIT)]
Sig = Annotated[bytes, msgspec.Meta(min_length=64, max_length=64)]
KeyId = Annotated[str, msgspec.Meta(max_length=64)]
KeyValue = Annotated[str, msgspec.Meta(max_length=192)]  # "curve25519 key:ed25519 signature"
KeyPair = tuple[KeyId, KeyValue]
NodeIdText = Annotated[str, msgspec.Meta(max_length=64)]
Short = Annotated[str, msgspec.Meta(max_length=1024)]


class UnknownFrameType(UnknownFrame):
    """A frame type this node does not know; ``rid`` is the request's (0 if it had none)."""

    def __init__(self, message: str, rid: int = 0) -> None:
        super().__init__(message)
        self.rid = rid


class Frame(msgspec.Struct, frozen=True, tag_field="t"):
    """Base of all frames. ``T`` is the wire type string (the struct's tag)."""

    T: ClassVar[str] = ""

    def encode(self) -> bytes:
        return _ENCODER.encode(self)


# ---- node -> device -------------------------------------------------------------------------


class Challenge(Frame, frozen=True, tag="challenge"):
    node_id: NodeIdText
    nonce: Annotated[bytes, msgspec.Meta(max_length=64)]
    v: int
    now: int
    # optional protocol parts this node serves (as its descriptor's, §4.1), e.g. "multi"
    features: Annotated[tuple[Short, ...], msgspec.Meta(max_length=64)] = ()


class AuthOk(Frame, frozen=True, tag="auth_ok"):
    rid: Rid
    address: Short
    otk_count: int


class Registered(Frame, frozen=True, tag="registered"):
    rid: Rid
    address: Short


class Ok(Frame, frozen=True, tag="ok"):
    rid: Rid
    otk_count: int = 0


class Keys(Frame, frozen=True, tag="keys"):
    """Answer to a key query: the signed list and, if claimed, one key per device id.

    ``claimed`` maps a device id to ``(key_id, "KEY:SIG")``: the one-time (or fallback)
    Curve25519 key, a colon, and the device's Ed25519 signature over it (§4.6).
    """

    rid: Rid
    node_id: NodeIdText
    device_list: SignedDeviceList
    claimed: Annotated[dict[KeyId, KeyPair], msgspec.Meta(max_length=MAX_DEVICES)]


class Accepted(Frame, frozen=True, tag="accepted"):
    rid: Rid
    ids: tuple[bytes, ...]
    rejected: tuple[tuple[bytes, Code], ...] = ()
    # advisory, e.g. ("peer_key_changed", node_id): the envelopes were queued, but the
    # destination presented a different key with no signed rotation (docs/protocol.md §5.4)
    warnings: tuple[tuple[Short, Short], ...] = ()


class Deliver(Frame, frozen=True, tag="deliver"):
    envs: tuple[Envelope, ...]


# One result of a batched key query: (address, node id or "", signed list or None, claimed,
# code). ``code`` is "" on success, else the stable error for that address alone (§11.4).
KeyResult = tuple[
    Annotated[str, msgspec.Meta(max_length=MAX_ADDRESS)],
    NodeIdText,
    SignedDeviceList | None,
    Annotated[dict[KeyId, KeyPair], msgspec.Meta(max_length=MAX_DEVICES)],
    Code,
]


class KeysMulti(Frame, frozen=True, tag="keys_multi"):
    """Answer to :class:`QueryKeysMulti`: one result per address asked, in the order asked."""

    rid: Rid
    results: Annotated[tuple[KeyResult, ...], msgspec.Meta(max_length=MAX_KEY_QUERY)]


class Error(Frame, frozen=True, tag="error"):
    """``rid`` is the failed request's, or 0 when the frame that failed had no readable rid."""

    rid: Rid
    code: Code
    message: Short


# ---- device -> node -------------------------------------------------------------------------


class Auth(Frame, frozen=True, tag="auth"):
    """Prove ownership of ``mailbox`` by signing the challenge with the device's Ed25519 key."""

    rid: Rid
    mailbox: MailboxId
    sig: Sig


class Register(Frame, frozen=True, tag="register"):
    """Redeem an invite: create this device's mailbox and publish the signed device list.
    Or, on a node with open registration, create the account ``name`` (``invite`` empty).

    ``sig`` signs the challenge like :class:`Auth`, proving the device holds ``auth_key``.
    """

    rid: Rid
    invite: Annotated[bytes, msgspec.Meta(max_length=64)]
    mailbox: MailboxId
    auth_key: Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
    sig: Sig
    device_list: SignedDeviceList | None = None  # None when redeeming a device-link token
    # Open registration (§5.2): ``invite`` empty, the account name wanted here.
    name: Annotated[str, msgspec.Meta(max_length=32)] = ""


class MintLink(Frame, frozen=True, tag="mint_link"):
    """Ask the node for a single-use token that registers another device on this account."""

    rid: Rid


class LinkToken(Frame, frozen=True, tag="link_token"):
    rid: Rid
    token: Annotated[bytes, msgspec.Meta(max_length=64)]
    expires: int


class PublishKeys(Frame, frozen=True, tag="publish_keys"):
    """Top up one-time keys, set the fallback key and/or replace the signed device list."""

    rid: Rid
    otks: Annotated[tuple[KeyPair, ...], msgspec.Meta(max_length=MAX_OTKS_PER_FRAME)] = ()
    fallback: Annotated[tuple[KeyPair, ...], msgspec.Meta(max_length=1)] = ()  # (key_id, key)
    device_list: SignedDeviceList | None = None


class QueryKeys(Frame, frozen=True, tag="query_keys"):
    """Fetch a user's signed device list; with ``claim``, also claim one key per device."""

    rid: Rid
    address: Annotated[str, msgspec.Meta(max_length=MAX_ADDRESS)]
    claim: bool


class QueryKeysMulti(Frame, frozen=True, tag="query_keys_multi"):
    """Batched key query (§11.4): the home node asks each remote node once for all its names."""

    rid: Rid
    addresses: Annotated[
        tuple[Annotated[str, msgspec.Meta(max_length=MAX_ADDRESS)], ...],
        msgspec.Meta(min_length=1, max_length=MAX_KEY_QUERY),
    ]
    claim: bool


# One recipient of a multi-recipient submission: (envelope id, mailbox id, header).
MultiRecipient = tuple[
    EnvelopeId,
    MailboxId,
    Annotated[bytes, msgspec.Meta(min_length=HEADER_LEN, max_length=HEADER_LEN)],
]


class SendMulti(Frame, frozen=True, tag="send_multi"):
    """One upload for many recipient devices (§11.3): the node composes each recipient's
    envelope ``[1, id, mailbox, expires, eph || header || body]`` and handles it like a
    ``send`` item for ``dests[i][0]``. Answered with ``accepted`` (envelope ids)."""

    rid: Rid
    eph: Annotated[bytes, msgspec.Meta(min_length=EPH_LEN, max_length=EPH_LEN)]
    expires: Annotated[int, msgspec.Meta(ge=1)]
    body: Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_GBODY)]
    # at most MAX_RECIPIENTS in all: checked by decode_frame (too_large), so one node's list
    # over it is too_large as well, not malformed (the frame size bounds the decoding)
    dests: Annotated[
        tuple[
            tuple[NodeIdText, Annotated[tuple[MultiRecipient, ...], msgspec.Meta(min_length=1)]],
            ...,
        ],
        msgspec.Meta(min_length=1),
    ]


class Send(Frame, frozen=True, tag="send"):
    """Envelopes to store or forward: ``items`` are ``(destination node id, envelope)``."""

    rid: Rid
    items: tuple[tuple[NodeIdText, Envelope], ...]


class Ack(Frame, frozen=True, tag="ack"):
    """The device has durably stored these envelopes; the node deletes them."""

    ids: Annotated[tuple[EnvelopeId, ...], msgspec.Meta(max_length=MAX_ACK_IDS)]


# ---- attachments (blobs, docs/protocol.md §10) ----------------------------------------------


class BlobNew(Frame, frozen=True, tag="blob_new"):
    """Announce (or resume) an upload: padded ciphertext size, chunk hashes, token hashes."""

    rid: Rid
    blob: BlobId
    size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOB_SIZE)]
    hashes: Annotated[tuple[Hash32, ...], msgspec.Meta(min_length=1, max_length=MAX_CHUNKS)]
    tokens: Annotated[tuple[Hash32, ...], msgspec.Meta(min_length=1, max_length=MAX_TOKENS)]
    ttl: Annotated[int, msgspec.Meta(ge=1)]


class BlobOk(Frame, frozen=True, tag="blob_ok"):
    """Answer to ``blob_new``: the chunk indexes the node already holds."""

    rid: Rid
    blob: BlobId
    have: Annotated[tuple[ChunkIndex, ...], msgspec.Meta(max_length=MAX_CHUNKS)]


class BlobPut(Frame, frozen=True, tag="blob_put"):
    """One ciphertext chunk of an announced upload (answered ``ok`` once durable)."""

    rid: Rid
    blob: BlobId
    index: ChunkIndex
    # Not bounded here: a chunk over CHUNK_SIZE is ``too_large`` (the node checks it), and
    # the frame itself is bounded by MAX_FRAME before decoding.
    data: bytes


class BlobGet(Frame, frozen=True, tag="blob_get"):
    """Fetch chunk ``index`` of a blob held by node ``node`` (this one or, through it, another)."""

    rid: Rid
    blob: BlobId
    node: NodeIdText
    token: Token
    index: ChunkIndex
    # the uploader's home host (from the sender's address): lets this node find a node it has
    # not pinned yet; a host that answers with another node id is refused (§10.3)
    host: Annotated[str, msgspec.Meta(max_length=MAX_ADDRESS)] = ""


class BlobChunk(Frame, frozen=True, tag="blob_chunk"):
    """Answer to ``blob_get``. ``chunks`` and ``size`` describe the whole blob."""

    rid: Rid
    index: ChunkIndex
    data: Annotated[bytes, msgspec.Meta(max_length=CHUNK_SIZE)]
    chunks: Annotated[int, msgspec.Meta(ge=0, le=MAX_CHUNKS)] = 0
    size: Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOB_SIZE)] = 0


class BlobDone(Frame, frozen=True, tag="blob_done"):
    """This device has the whole file and checked its SHA-256: the copies can go."""

    rid: Rid
    blob: BlobId
    node: NodeIdText
    token: Token
    host: Annotated[str, msgspec.Meta(max_length=MAX_ADDRESS)] = ""


_ALL = (
    Challenge,
    AuthOk,
    Registered,
    Ok,
    Keys,
    Accepted,
    Deliver,
    Error,
    Auth,
    Register,
    MintLink,
    LinkToken,
    PublishKeys,
    QueryKeys,
    Send,
    QueryKeysMulti,
    KeysMulti,
    SendMulti,
    Ack,
    BlobNew,
    BlobOk,
    BlobPut,
    BlobGet,
    BlobChunk,
    BlobDone,
)
for _c in _ALL:
    _c.T = str(_c.__struct_config__.tag)
FRAME_TYPES: dict[str, type[Frame]] = {c.T: c for c in _ALL}


class _Head(msgspec.Struct, frozen=True):
    """What every frame starts with; read only when the full decode failed (error path)."""

    t: Any = None
    rid: Any = None


_ENCODER: Final = msgspec.msgpack.Encoder()
# Decodes the tagged union of every frame type in one step; a new frame is a new class in _ALL.
_DECODER: Final[msgspec.msgpack.Decoder[Frame]] = msgspec.msgpack.Decoder(
    Union[_ALL]  # noqa: UP007 - a runtime Union of the tagged structs
)
_HEAD: Final = msgspec.msgpack.Decoder(_Head)


def _unknown_or_malformed(data: bytes, exc: msgspec.MsgspecError | RecursionError) -> Exception:
    """Tell an unknown frame type (answered with its rid) from a malformed known one."""
    try:
        head = _HEAD.decode(data)
    except (msgspec.MsgspecError, RecursionError):
        return translate(exc, MalformedFrame)
    if isinstance(head.t, str) and head.t not in FRAME_TYPES:
        rid = head.rid
        ok = isinstance(rid, int) and not isinstance(rid, bool) and 0 <= rid < RID_LIMIT
        return UnknownFrameType("unknown frame type", rid if ok else 0)
    return translate(exc, MalformedFrame)


def decode_frame(data: bytes, max_len: int = MAX_FRAME) -> Frame:
    """Decode one frame. Raises TooLarge, MalformedFrame/MalformedEnvelope, UnsupportedVersion
    or UnknownFrameType (all RemoteProtocolError)."""
    if len(data) > max_len:
        raise TooLarge(f"{len(data)} bytes exceeds limit {max_len}")
    try:
        frame: Frame = _DECODER.decode(data)
    except (msgspec.MsgspecError, RecursionError) as exc:
        raise _unknown_or_malformed(data, exc) from exc
    if isinstance(frame, Send):
        if len(frame.items) > MAX_BATCH_ENVELOPES:
            raise TooLarge("too many envelopes in one send")
        check_envelopes([e for _, e in frame.items])
    elif isinstance(frame, SendMulti):
        if sum(len(r) for _, r in frame.dests) > MAX_RECIPIENTS:
            raise TooLarge(f"more than {MAX_RECIPIENTS} recipients in one send_multi")
    elif isinstance(frame, Deliver):
        check_envelopes(frame.envs)
    return frame
