"""Federation bodies of group fan-out (docs/protocol.md §11.4): ``POST /haven/v1/federation/multi``
(one submission's recipients on one node) and ``POST /haven/v1/federation/keys_multi`` (one key
query for many names on one node). Pure: no I/O.

A ``/multi`` request carries the shared parts once and a 48-byte header per recipient; the
receiving node composes each recipient's envelope (:func:`federation.multi.compose`) and takes
it like a ``/batch`` envelope. The answer is a :class:`federation.wire.BatchResult`.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

from .devicelist import MAX_DEVICES, SignedDeviceList
from .errors import MalformedEnvelope, TooLarge
from .multi import EPH_LEN, HEADER_LEN, MAX_GBODY, MAX_RECIPIENTS, compose
from .wire import Code, Envelope, EnvelopeId, EpochMs, MailboxId, decode_as

MULTI_PATH = "/haven/v1/federation/multi"
KEYS_MULTI_PATH = "/haven/v1/federation/keys_multi"
MAX_KEY_NAMES = 1000  # names per /keys_multi (a 1,000-member group on one node)
# id (16) + mailbox (16) + header (48) + msgpack framing (~8) per recipient, the largest group
# body, and headroom for the map keys
MULTI_BODY_MAX = MAX_RECIPIENTS * 96 + MAX_GBODY + 4096
KEYS_MULTI_QUERY_MAX = MAX_KEY_NAMES * 72 + 1024
KEYS_MULTI_ANSWER_MAX = 4 * 1024 * 1024  # read limit for a /keys_multi answer (§11.4)

Header = Annotated[bytes, msgspec.Meta(min_length=HEADER_LEN, max_length=HEADER_LEN)]


class MultiBatch(msgspec.Struct, frozen=True):
    """``{"eph", "expires", "body", "recips": [[id, mailbox, header], ...]}``: no id and no
    mailbox twice (``malformed``), at most :data:`MAX_RECIPIENTS` (``too_large``)."""

    eph: Annotated[bytes, msgspec.Meta(min_length=EPH_LEN, max_length=EPH_LEN)]
    expires: EpochMs
    body: Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_GBODY)]
    recips: Annotated[tuple[tuple[EnvelopeId, MailboxId, Header], ...], msgspec.Meta(min_length=1)]

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> MultiBatch:
        got = decode_as(_MULTI, data, MULTI_BODY_MAX)
        if len(got.recips) > MAX_RECIPIENTS:
            raise TooLarge(f"more than {MAX_RECIPIENTS} recipients in one request")
        check_unique(got.recips)
        return got

    def envelopes(self) -> list[Envelope]:
        """Each recipient's composed envelope, in request order."""
        return [
            Envelope(eid, mailbox, self.expires, compose(self.eph, hdr, self.body))
            for eid, mailbox, hdr in self.recips
        ]


def check_unique(recips: Any) -> None:
    """``malformed`` if an envelope id or a mailbox comes twice (``(id, mailbox, ...)`` rows)."""
    ids: set[bytes] = set()
    mailboxes: set[bytes] = set()
    for row in recips:
        eid, mailbox = row[0], row[1]
        if eid in ids or mailbox in mailboxes:
            raise MalformedEnvelope("an envelope id or mailbox comes twice in one submission")
        ids.add(eid)
        mailboxes.add(mailbox)


class KeysMultiQuery(msgspec.Struct, frozen=True):
    """``{"names": [name, ...], "claim": bool}``: user names on the receiving node."""

    names: Annotated[
        tuple[Annotated[str, msgspec.Meta(max_length=64)], ...],
        msgspec.Meta(min_length=1, max_length=MAX_KEY_NAMES),
    ]
    claim: bool

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> KeysMultiQuery:
        return decode_as(_KEYS_QUERY, data, KEYS_MULTI_QUERY_MAX)


KeyValue = Annotated[str, msgspec.Meta(max_length=192)]
# [name, [blob, sig] or nil, {device_id: [key_id, "KEY:SIG"]}, code ("" when found)]
KeysMultiRow = tuple[
    Annotated[str, msgspec.Meta(max_length=64)],
    SignedDeviceList | None,
    Annotated[
        dict[Annotated[str, msgspec.Meta(max_length=64)], tuple[KeyValue, KeyValue]],
        msgspec.Meta(max_length=MAX_DEVICES),
    ],
    Code,
]


class KeysMultiAnswer(msgspec.Struct, frozen=True):
    """``{"results": [row, ...]}``, one row per name asked, in the order asked."""

    results: Annotated[tuple[KeysMultiRow, ...], msgspec.Meta(max_length=MAX_KEY_NAMES)]

    def encode(self) -> bytes:
        return _ENCODER.encode(self)

    @classmethod
    def decode(cls, data: bytes) -> KeysMultiAnswer:
        return decode_as(_KEYS_ANSWER, data, KEYS_MULTI_ANSWER_MAX)


_ENCODER: Final = msgspec.msgpack.Encoder()
_MULTI: Final = msgspec.msgpack.Decoder(MultiBatch)
_KEYS_QUERY: Final = msgspec.msgpack.Decoder(KeysMultiQuery)
_KEYS_ANSWER: Final = msgspec.msgpack.Decoder(KeysMultiAnswer)

__all__ = [
    "KEYS_MULTI_PATH",
    "MULTI_BODY_MAX",
    "MULTI_PATH",
    "KeysMultiAnswer",
    "KeysMultiQuery",
    "MultiBatch",
    "check_unique",
]
