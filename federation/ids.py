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
_HOST_RE = re.compile(r"^[A-Za-z0-9.\-\[\]:]{1,255}$")


def node_id_from_key(public_key: bytes) -> str:
    """Unpadded lowercase base32 of the 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise ValueError("node public key must be 32 bytes")
    return base64.b32encode(public_key).decode("ascii").rstrip("=").lower()


def key_from_node_id(node_id: str) -> bytes:
    """Inverse of :func:`node_id_from_key`. Raises MalformedFrame on a bad id."""
    if not isinstance(node_id, str) or len(node_id) != 52:
        raise MalformedFrame("bad node id")
    try:
        key = base64.b32decode(node_id.upper() + "====")
    except (ValueError, TypeError) as exc:
        raise MalformedFrame("bad node id") from exc
    if len(key) != 32:
        raise MalformedFrame("bad node id")
    return key


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
