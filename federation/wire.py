"""Envelopes and federation bodies: frozen wire types, declared once, validated once when decoded.

An envelope (docs/protocol.md §3) is ``[v, id, to, expires, body]`` as a msgpack array:
``id`` 16 random bytes, ``to`` a 16-byte mailbox id, ``expires`` epoch ms, ``body`` the sealed,
padded E2E ciphertext. The types are msgspec ``Struct``\\ s: msgspec decodes and validates msgpack
in one step (types, lengths, bounds), so no hand-written per-field checks are repeated here. The
envelope version is the struct's array tag (its first element), so a decoded envelope always has
``v == 1``; any other integer there is :class:`UnsupportedVersion`, anything else malformed.

Sizes are checked before parsing; decoding random bytes raises only
:class:`federation.errors.RemoteProtocolError` subclasses (:func:`decode_as`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, TypeVar

import msgpack
import msgspec

from .errors import MalformedEnvelope, RemoteProtocolError, TooLarge, UnsupportedVersion
from .ids import ENVELOPE_ID_LEN, MAILBOX_ID_LEN

PROTOCOL_VERSION = 1
MAX_BODY = 64 * 1024  # largest padding bucket (federation/sealing.py) with headroom
MAX_BATCH_ENVELOPES = 256
MAX_BATCH_BYTES = MAX_BATCH_ENVELOPES * (MAX_BODY // 16) + 1024 * 1024  # ~2 MiB
MAX_TTL_MS = 14 * 86_400_000
MAX_CODE_LEN = 64  # stable error codes on the wire ("not_found", ...)

EnvelopeId = Annotated[bytes, msgspec.Meta(min_length=ENVELOPE_ID_LEN, max_length=ENVELOPE_ID_LEN)]
MailboxId = Annotated[bytes, msgspec.Meta(min_length=MAILBOX_ID_LEN, max_length=MAILBOX_ID_LEN)]
Code = Annotated[str, msgspec.Meta(max_length=MAX_CODE_LEN)]
EpochMs = Annotated[int, msgspec.Meta(gt=0)]

# ---- attachments (blobs, docs/protocol.md §10) ----------------------------------------------
CHUNK_SIZE = 1024 * 1024  # every chunk but the last of a blob is exactly this long
MAX_CHUNKS = 128  # 128 MiB of padded ciphertext at most (the operator's max_file_mb is lower)
MAX_BLOB_SIZE = MAX_CHUNKS * CHUNK_SIZE
MAX_TOKENS = 1024  # recipient devices of one file
BLOB_ID_LEN = 16
BlobId = Annotated[bytes, msgspec.Meta(min_length=BLOB_ID_LEN, max_length=BLOB_ID_LEN)]
Hash32 = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Token = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
ChunkIndex = Annotated[int, msgspec.Meta(ge=0, lt=MAX_CHUNKS)]
BLOB_BODY_MAX = 4096  # federation blob request bodies
BLOB_ANSWER_MAX = CHUNK_SIZE + 4096


class Envelope(
    msgspec.Struct,
    frozen=True,
    array_like=True,
    tag=PROTOCOL_VERSION,
    forbid_unknown_fields=True,
):
    """One sealed message for one recipient device mailbox: ``[v, id, to, expires, body]``.

    ``v`` is the array tag. The body's size limit is checked by :func:`check_envelopes` (a
    body over :data:`MAX_BODY` is ``too_large``, not ``malformed``), so a test can still build an
    oversized envelope to send.
    """

    id: EnvelopeId
    to: MailboxId
    expires: EpochMs
    body: bytes

    @property
    def v(self) -> int:
        return PROTOCOL_VERSION

    def to_wire(self) -> list[Any]:
        return [self.v, self.id, self.to, self.expires, self.body]

    @classmethod
    def from_wire(cls, obj: Any) -> Envelope:
        """Validate an already decoded msgpack value. Raises MalformedEnvelope / TooLarge /
        UnsupportedVersion."""
        env = convert(obj, cls)
        check_envelopes((env,))
        return env


def check_envelopes(envs: tuple[Envelope, ...] | list[Envelope]) -> None:
    """The size rules msgspec cannot phrase with our codes: a body over MAX_BODY is too_large."""
    for env in envs:
        if len(env.body) > MAX_BODY:
            raise TooLarge("envelope body too large")


# msgspec names a tag that does not match as "Invalid value <tag>"; the only integer-tagged
# struct on the wire is the envelope, so this is an envelope of another version (§3).
_OTHER_VERSION = re.compile(r"^Invalid value (-?\d+) - at `")
_ENCODER: Final = msgspec.msgpack.Encoder()
T = TypeVar("T")


def translate(
    exc: msgspec.MsgspecError | RecursionError, error: type[RemoteProtocolError]
) -> Exception:
    """Map a msgspec failure to our typed errors (``error`` for anything malformed)."""
    if isinstance(exc, msgspec.ValidationError):
        m = _OTHER_VERSION.match(str(exc))
        if m is not None:
            return UnsupportedVersion(f"envelope version {m.group(1)}")
        return error(f"bad field: {exc}"[:200])
    return error("malformed msgpack")


def decode_as(decoder: msgspec.msgpack.Decoder[T], data: bytes, max_len: int) -> T:
    """Decode ``data`` with a typed decoder after a size check. Raises only
    RemoteProtocolError subclasses (TooLarge, MalformedEnvelope, UnsupportedVersion)."""
    if len(data) > max_len:
        raise TooLarge(f"{len(data)} bytes exceeds limit {max_len}")
    try:
        return decoder.decode(data)
    except (msgspec.MsgspecError, RecursionError) as exc:  # RecursionError: deep nesting
        raise translate(exc, MalformedEnvelope) from exc


def convert(obj: Any, typ: type[T]) -> T:
    """Validate an already decoded value against a wire type (same errors as decode_as)."""
    try:
        # builtin_types: bytes must be bytes (convert would otherwise base64-decode a str)
        return msgspec.convert(obj, typ, strict=True, builtin_types=(bytes,))
    except (msgspec.MsgspecError, RecursionError) as exc:
        raise translate(exc, MalformedEnvelope) from exc


def encode(obj: Any) -> bytes:
    """Encode a wire struct (or plain msgpack value) as msgpack."""
    return _ENCODER.encode(obj)


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def unpackb(data: bytes, *, max_len: int) -> Any:
    """Decode untyped msgpack after a size check; translate every failure to MalformedEnvelope."""
    if len(data) > max_len:
        raise TooLarge(f"{len(data)} bytes exceeds limit {max_len}")
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_bin_len=max_len,
            max_str_len=max_len,
            max_array_len=65_536,
            max_map_len=4096,
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise MalformedEnvelope("malformed msgpack") from e
    except Exception as e:  # msgpack raises assorted internal errors on hostile input
        raise MalformedEnvelope("malformed msgpack") from e


class Batch(msgspec.Struct, frozen=True):
    """The body of ``POST /haven/v1/federation/batch``: ``{"envs": [envelope, ...]}``."""

    envelopes: tuple[Envelope, ...] = msgspec.field(name="envs")

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> Batch:
        batch = decode_as(_BATCH, data, MAX_BATCH_BYTES)
        if len(batch.envelopes) > MAX_BATCH_ENVELOPES:
            n = len(batch.envelopes)
            raise TooLarge(f"batch of {n} envelopes exceeds {MAX_BATCH_ENVELOPES}")
        check_envelopes(batch.envelopes)
        return batch


class BatchResult(msgspec.Struct, frozen=True):
    """Answer to a batch: ids durably accepted, and ``(id, code)`` for each refused envelope."""

    accepted: tuple[bytes, ...] = ()
    rejected: tuple[tuple[bytes, Code], ...] = ()

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> BatchResult:
        return decode_as(_BATCH_RESULT, data, MAX_BATCH_BYTES)


class KeyQuery(msgspec.Struct, frozen=True):
    """The body of ``POST /haven/v1/federation/keys`` (§4.6): a user name, claim or not."""

    name: Annotated[str, msgspec.Meta(max_length=64)]
    claim: bool

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> KeyQuery:
        return decode_as(_KEY_QUERY, data, 4096)


class ErrorBody(msgspec.Struct, frozen=True):
    """Body of every federation refusal (§7): stable code, text, the receiver's clock."""

    code: Code
    message: Annotated[str, msgspec.Meta(max_length=1024)] = ""
    now: int | None = None

    @classmethod
    def decode(cls, data: bytes) -> ErrorBody:
        return decode_as(_ERROR_BODY, data, 64 * 1024)


class BlobFetch(msgspec.Struct, frozen=True):
    """Body of ``POST /haven/v1/federation/blob``: one chunk, proven by a recipient's token."""

    blob: BlobId
    token: Token
    index: ChunkIndex

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> BlobFetch:
        return decode_as(_BLOB_FETCH, data, BLOB_BODY_MAX)


class BlobFetched(msgspec.Struct, frozen=True):
    """Answer to a blob fetch: the chunk, the blob's chunk count and size, and ``ttl``, the
    milliseconds left before the origin deletes it (relative: the two clocks may differ)."""

    index: ChunkIndex
    data: Annotated[bytes, msgspec.Meta(max_length=CHUNK_SIZE)]
    chunks: Annotated[int, msgspec.Meta(ge=1, le=MAX_CHUNKS)]
    size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BLOB_SIZE)]
    ttl: Annotated[int, msgspec.Meta(ge=0)] = 0

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> BlobFetched:
        return decode_as(_BLOB_FETCHED, data, BLOB_ANSWER_MAX)


class BlobRelease(msgspec.Struct, frozen=True):
    """Body of ``POST /haven/v1/federation/blob_done``: this token's device has the file."""

    blob: BlobId
    token: Token

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> BlobRelease:
        return decode_as(_BLOB_RELEASE, data, BLOB_BODY_MAX)


_BLOB_FETCH: Final = msgspec.msgpack.Decoder(BlobFetch)
_BLOB_FETCHED: Final = msgspec.msgpack.Decoder(BlobFetched)
_BLOB_RELEASE: Final = msgspec.msgpack.Decoder(BlobRelease)
_BATCH: Final = msgspec.msgpack.Decoder(Batch)
_BATCH_RESULT: Final = msgspec.msgpack.Decoder(BatchResult)
_KEY_QUERY: Final = msgspec.msgpack.Decoder(KeyQuery)
_ERROR_BODY: Final = msgspec.msgpack.Decoder(ErrorBody)
