"""Identifiers: node ids, mailbox ids, addresses (ARCHITECTURE §2)."""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass

from .errors import MalformedFrame

MAILBOX_ID_LEN = 16  # 128 random bits, never derived from names
ENVELOPE_ID_LEN = 16
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
_NODE_ID_RE = re.compile(r"[a-z2-7]{52}")
_HOST_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,255}$")


def node_id_from_key(public_key: bytes) -> str:
    """Unpadded lowercase base32 of the 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("node public key must be 32 bytes")
    return base64.b32encode(public_key).decode("ascii").rstrip("=").lower()


def key_from_node_id(node_id: str) -> bytes:
    """Inverse of :func:`node_id_from_key`. Raises MalformedFrame on a bad id.

    Only the canonical spelling is accepted (docs/protocol.md §4.2): exactly 52 characters of
    lower-case base32 (``a-z``, ``2-7``), no padding, and re-encoding the key must give the same
    text (the unused low bits of the last character are zero). One key has exactly one id, so
    rate buckets, nonce windows and pins keyed by id cannot be dodged by re-spelling it.
    """
    if not isinstance(node_id, str) or not _NODE_ID_RE.fullmatch(node_id):
        raise MalformedFrame("bad node id")
    try:
        key = base64.b32decode(node_id.upper() + "====")
    except (ValueError, TypeError) as exc:
        raise MalformedFrame("bad node id") from exc
    if len(key) != 32 or node_id_from_key(key) != node_id:
        raise MalformedFrame("bad node id")
    return key


def is_node_id(text: str) -> bool:
    """True when ``text`` is a canonical node id (see :func:`key_from_node_id`)."""
    try:
        key_from_node_id(text)
    except MalformedFrame:
        return False
    return True


def new_mailbox_id() -> bytes:
    return os.urandom(MAILBOX_ID_LEN)


def new_envelope_id() -> bytes:
    return os.urandom(ENVELOPE_ID_LEN)


def valid_name(name: str) -> bool:
    """Account names: lowercase letters, digits, ``.``, ``_``, ``-``; at most 32 characters."""
    return bool(_NAME_RE.match(name))


@dataclass(frozen=True, slots=True)
class Address:
    """A user address ``name@host[:port]``; ``host`` is the node's public host[:port]."""

    name: str
    host: str

    @classmethod
    def parse(cls, text: str) -> Address:
        name, sep, host = text.strip().partition("@")
        if not sep or not valid_name(name) or not _HOST_RE.match(host):
            raise ValueError(f"not an address: {text!r} (expected name@host[:port])")
        return cls(name, host.lower())

    def __str__(self) -> str:
        return f"{self.name}@{self.host}"
