"""Ids given on the command line (or to the local API) as unique prefixes.

The CLI prints short ids (the first 8 characters); any unique prefix of at least
:data:`MIN_PREFIX` characters is accepted wherever an id is taken. Message ids are hex and
case-insensitive; device ids are base64 and case-sensitive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from federation.errors import LocalProtocolError

MIN_PREFIX = 8
_HEX = re.compile(r"[0-9a-f]+")


def _too_short(what: str, given: str) -> LocalProtocolError:
    return LocalProtocolError(
        f"{what} {given!r} is too short: give at least {MIN_PREFIX} characters",
        code="bad_argument",
    )


def message_id(db: Any, prefix: str, peer: str | None = None) -> bytes:
    """The message id (16 bytes) that ``prefix`` (hex, any case) names in this device's history.

    Args:
        db: the device's SQLite connection (``dev.state.db``).
        prefix: a hex prefix of at least 8 characters (a full id is accepted too).
        peer: restrict to one conversation.

    Raises:
        LocalProtocolError: ``bad_argument`` (not hex, or too short), ``not_found`` (no message
            has it), ``ambiguous_id`` (more than one message has it).
    """
    p = prefix.strip().lower()
    if not _HEX.fullmatch(p):
        raise LocalProtocolError(f"message id {prefix!r} is not hex", code="bad_argument")
    if len(p) < MIN_PREFIX:
        raise _too_short("message id", prefix)
    if len(p) == 32:
        full = bytes.fromhex(p)
        rows = db.execute("SELECT msg_id FROM history WHERE msg_id=?", (full,)).fetchall()
    else:
        # hex(msg_id) is upper case; a prefix on the hex text is exact and needs no range math
        sql = "SELECT msg_id FROM history WHERE substr(hex(msg_id), 1, ?) = ?"
        params: tuple[Any, ...] = (len(p), p.upper())
        if peer is not None:
            sql += " AND peer=?"
            params += (peer,)
        rows = db.execute(sql + " LIMIT 2", params).fetchall()
    if not rows:
        where = f" in the conversation with {peer}" if peer else ""
        raise LocalProtocolError(f"no message {prefix}{where}", code="not_found")
    if len(rows) > 1:
        raise LocalProtocolError(
            f"message id {prefix} is ambiguous: give more characters", code="ambiguous_id"
        )
    return bytes(rows[0][0])


def device_id(ids: Iterable[str], prefix: str) -> str:
    """The one device id among ``ids`` that starts with ``prefix`` (case-sensitive).

    Raises:
        LocalProtocolError: ``bad_argument`` (too short), ``not_found``, ``ambiguous_id``.
    """
    p = prefix.strip()
    all_ids = list(ids)
    if p in all_ids:
        return p
    if len(p) < MIN_PREFIX:
        raise _too_short("device id", prefix)
    matches = [i for i in all_ids if i.startswith(p)]
    if not matches:
        raise LocalProtocolError(f"no device {prefix} on this account", code="not_found")
    if len(matches) > 1:
        raise LocalProtocolError(
            f"device id {prefix} is ambiguous: give more characters", code="ambiguous_id"
        )
    return matches[0]
