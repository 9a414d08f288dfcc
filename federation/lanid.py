"""Blinded, rotating LAN identifiers and the TXT record that carries them (ARCHITECTURE §4).

A node announces itself on the LAN over mDNS (``_haven._tcp.local.``, see :mod:`federation.lan`).
Announcing the node id itself would let anyone on a café Wi-Fi follow a laptop from LAN to LAN, so
the TXT record carries a *blinded id* instead: a BLAKE2b of a fixed label and the current hour,
keyed with the node's public key::

    blinded = hex(BLAKE2b(key=node_public_key, data=b"haven-lan-v1" || hour_be64, digest_size=16))

Only a peer that already knows (has pinned) the node key can compute the same value, so only such a
peer can *recognise* the announcement; to everyone else it is 128 random-looking bits that change
every hour. Recognition tries the previous, current and next hour, so clocks on an offline LAN may
drift by up to an hour without breaking discovery.

A recognised announcement yields only a *candidate* (:class:`LanCandidate`): addresses are
unauthenticated, and the peer is used once it proves the expected node key in the handshake. Nothing
here ever changes a pinned key.

TXT record (all values ASCII)::

    v   protocol version of the announcement, decimal (currently 1)
    id  blinded id, 32 lowercase hex characters
    p   federation port, decimal 1..65535

This module is pure: it takes bytes and ``now_ms`` and returns values. :func:`parse_txt` reads bytes
received from anyone on the LAN, so it checks sizes first and never raises.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

LAN_ID_LABEL = b"haven-lan-v1"
LAN_VERSION = 1
HOUR_MS = 3_600_000
BLINDED_ID_BYTES = 16
NODE_KEY_BYTES = 32

# Size limits, checked before anything is decoded (a TXT record is at most ~9 kB on the wire).
_MAX_TXT_ENTRIES = 16
_MAX_TXT_KEY = 16
_MAX_TXT_VALUE = 64
_MAX_VERSION = 999
_HEX = frozenset(b"0123456789abcdef")


@dataclass(frozen=True, slots=True)
class LanCandidate:
    """A node announced on the LAN: unauthenticated addresses to try, keyed by its blinded id."""

    blinded: str
    addresses: tuple[str, ...]
    port: int
    version: int


def hour_of(now_ms: int) -> int:
    """The rotation period (hours since the epoch) that contains ``now_ms``."""
    return now_ms // HOUR_MS


def ms_until_rotation(now_ms: int) -> int:
    """Milliseconds from ``now_ms`` until the blinded id next changes (always 1..HOUR_MS)."""
    return HOUR_MS - now_ms % HOUR_MS


def blinded_id(node_public_key: bytes, hour: int) -> str:
    """The blinded id of a node for one hour: 32 lowercase hex characters.

    Args:
        node_public_key: the node's 32-byte Ed25519 public key (the BLAKE2b key).
        hour: from :func:`hour_of`.

    Raises:
        ValueError: if the key is not 32 bytes.
    """
    if len(node_public_key) != NODE_KEY_BYTES:
        raise ValueError("node public key must be 32 bytes")
    # signed=True encodes every non-negative hour exactly like unsigned does, and stays defined for
    # hour - 1 at the epoch instead of raising OverflowError.
    message = LAN_ID_LABEL + hour.to_bytes(8, "big", signed=True)
    digest = hashlib.blake2b(message, key=node_public_key, digest_size=BLINDED_ID_BYTES)
    return digest.hexdigest()


def recognise(blinded: str, known_keys: Mapping[str, bytes], now_ms: int) -> str | None:
    """Find which known node announced ``blinded``, allowing ±1 hour of clock drift.

    Args:
        blinded: the id from a received TXT record (untrusted).
        known_keys: node id -> 32-byte node public key, for every node we have pinned.
        now_ms: our clock.

    Returns:
        The matching node id, or None. Keys of the wrong length are skipped, never raised on.
    """
    if not isinstance(blinded, str) or len(blinded) != 2 * BLINDED_ID_BYTES:
        return None
    wanted = blinded.encode("ascii", "replace")
    hour = hour_of(now_ms)
    for node_id, key in known_keys.items():
        if len(key) != NODE_KEY_BYTES:
            continue
        for h in (hour, hour - 1, hour + 1):
            if hmac.compare_digest(blinded_id(key, h).encode("ascii"), wanted):
                return node_id
    return None


def txt_record(
    node_public_key: bytes, now_ms: int, port: int, version: int = LAN_VERSION
) -> dict[str, str]:
    """The TXT properties a node announces for the hour containing ``now_ms``.

    Raises:
        ValueError: on a bad key, a port outside 1..65535 or a version outside 1..999.
    """
    if not 1 <= port <= 65535:
        raise ValueError("port must be 1..65535")
    if not 1 <= version <= _MAX_VERSION:
        raise ValueError("version must be 1..999")
    return {
        "v": str(version),
        "id": blinded_id(node_public_key, hour_of(now_ms)),
        "p": str(port),
    }


def parse_txt(props: object) -> tuple[str, int, int] | None:
    """Read ``(blinded, port, version)`` from received TXT properties.

    Args:
        props: what zeroconf gives as ``ServiceInfo.properties`` (``dict[bytes, bytes | None]``);
            typed ``object`` because it comes off the network and anything else is tolerated.

    Returns:
        The parsed triple, or None if the record is not a well-formed Haven announcement. Never
        raises. Unknown extra keys are ignored (forward compatibility); the caller decides which
        versions it speaks.
    """
    if not isinstance(props, dict) or len(props) > _MAX_TXT_ENTRIES:
        return None
    fields: dict[bytes, bytes] = {}
    for key, value in props.items():
        if not isinstance(key, bytes) or len(key) > _MAX_TXT_KEY:
            return None
        if value is None:
            continue
        if not isinstance(value, bytes) or len(value) > _MAX_TXT_VALUE:
            return None
        fields[key] = value
    blinded = fields.get(b"id")
    port = _small_decimal(fields.get(b"p"), 5)
    version = _small_decimal(fields.get(b"v"), 3)
    if blinded is None or len(blinded) != 2 * BLINDED_ID_BYTES or not set(blinded) <= _HEX:
        return None
    if port is None or not 1 <= port <= 65535 or version is None or version < 1:
        return None
    return blinded.decode("ascii"), port, version


def _small_decimal(raw: bytes | None, max_digits: int) -> int | None:
    """ASCII decimal digits (``bytes.isdigit`` is ASCII-only) of bounded length, else None."""
    if raw is None or not 1 <= len(raw) <= max_digits or not raw.isdigit():
        return None
    return int(raw)
