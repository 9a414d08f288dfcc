"""Live fuzzing of every endpoint of a real node: input generators, runners and a tally.

Inputs are **structure-aware mutations of valid inputs** (a valid request or frame is built,
then one field, header or byte range is bent) plus random bytes. Every input is derived from
``(seed, endpoint, index)`` alone (:func:`rng_for`), so a failure is reproduced by re-running that
one index with the printed seed; only what the protocol makes fresh (nonces, signatures,
``Haven-Created``, challenges) differs between runs.

Endpoints (the keys of :data:`ENDPOINTS`):

- ``descriptor``  ``GET /.well-known/haven/node`` with odd query strings and ``?c=`` values;
- ``batch`` / ``keys``  signed federation POSTs from a pinned peer's key or fresh keys: headers
  bent one at a time (case, padding, leading zeros, signs, huge values, missing, duplicated),
  bodies truncated, bit-flipped, ill-typed, deeply nested, with huge array headers; many are
  signed over the mutated (still valid msgpack) body, so they reach the decoders;
- ``ws_preauth``  one WebSocket per input: mutated ``auth`` / ``register``, other frames before
  auth, non-binary and malformed WebSocket frames;
- ``ws_postauth``  an authenticated device: mutated ``send``, ``ack``, ``publish_keys``,
  ``query_keys``, ``mint_link``, unknown types, non-binary frames;
- ``stats`` / ``peers``  the loopback-only views, with odd query strings and headers;
- ``unknown``  unknown paths, known paths with other methods;
- ``tcp``  raw bytes on a TCP connection: garbage, broken HTTP framing, broken WebSocket framing.

The WebSocket endpoints use :class:`RawWs` (WebSocket over a bare stream), so a test controls
every frame bit and can attribute every answer: pre-auth inputs end with a close frame, post-auth
inputs are followed by a sync frame (an empty ``publish_keys``) whose ``ok`` echoes a unique
``rid``.

Checks (:class:`Tally`): no 5xx (a 503 only with body code ``storage_error``); every 4xx from
the three federation endpoints is the msgpack ``{code, message, now}`` of protocol §4.8 with a
known code and the status that code maps to; every ``error`` frame has a known code; no
``internal`` code anywhere; 200 answers verify (descriptor signature, response signature) and
decode; no hang (each input has a deadline); no connection dropped without an answer where the
input was well-framed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import random
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
from multidict import CIMultiDict

from federation import errors as E
from federation import frames as F
from federation.signing import (
    H_CREATED,
    H_DEST,
    H_NONCE,
    H_ORIGIN,
    H_SIG,
    H_VERSION,
    Descriptor,
    NodeKey,
    sign_request,
    verify_response,
)
from federation.transport import BATCH_PATH, CONTENT_TYPE, DESCRIPTOR_PATH, KEYS_PATH
from federation.wire import BatchResult, Envelope, packb

from .rawpeer import CLIENT_PATH, STATS_PATH, RawIdentity, now_ms

__all__ = ["CLIENT_PATH", "ENDPOINTS", "PEERS_PATH", "STATS_PATH", "Tally"]

PEERS_PATH = "/haven/v1/peers"
ENDPOINTS = (
    "descriptor",
    "batch",
    "keys",
    "ws_preauth",
    "ws_postauth",
    "stats",
    "peers",
    "unknown",
    "tcp",
)
FED_HEADERS = (H_VERSION, H_ORIGIN, H_DEST, H_CREATED, H_NONCE, H_SIG)
INPUT_DEADLINE_S = 20.0  # one input (request, frame exchange, TCP conversation): else a hang
EXAMPLES_PER_CLASS = 3

# docs/protocol.md §4.8: status of each federation error code (any other code: 400).
FED_STATUS = {
    "too_large": 413,
    "rate_limited": 429,
    "bad_signature": 401,
    "replay": 401,
    "clock_skew": 401,
    "wrong_destination": 421,
    "not_found": 404,
    "unsupported_version": 400,
    "malformed": 400,
    "storage_error": 503,
}


def _all_codes() -> frozenset[str]:
    """Every stable code: the ``HavenError`` tree (docs/protocol.md §7) plus node string codes.

    ``internal`` (an unexpected exception) and ``local_error`` (local misuse) are not answers to
    peer input, so they count as failures here."""
    codes: set[str] = {"unknown_destination"}
    todo: list[type[E.HavenError]] = [E.HavenError]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    return frozenset(codes - {"internal", "local_error"})


KNOWN_CODES = _all_codes()


def rng_for(seed: int, endpoint: str, index: int) -> random.Random:
    """The generator of input ``index`` of ``endpoint``: independent of scheduling."""
    h = hashlib.blake2b(f"{seed}:{endpoint}:{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "big"))


def rbytes(rng: random.Random, n: int) -> bytes:
    return rng.randbytes(n)


# ---- tally ---------------------------------------------------------------------------------------


@dataclass
class EndpointTally:
    inputs: int = 0
    status: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)  # observations, not failures
    examples: dict[str, list[str]] = field(default_factory=dict)

    def fail(self, kind: str, example: str) -> None:
        self.failures[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < EXAMPLES_PER_CLASS:
            ex.append(example[:600])

    def summary(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "status": dict(sorted(self.status.items())),
            "codes": dict(sorted(self.codes.items())),
            "failures": dict(sorted(self.failures.items())),
            "notes": dict(sorted(self.notes.items())),
            "examples": self.examples,
        }


@dataclass
class Tally:
    seed: int
    endpoints: dict[str, EndpointTally] = field(
        default_factory=lambda: {e: EndpointTally() for e in ENDPOINTS}
    )

    def __getitem__(self, endpoint: str) -> EndpointTally:
        return self.endpoints[endpoint]

    def summary(self) -> dict[str, Any]:
        return {"seed": self.seed, "endpoints": {k: v.summary() for k, v in self.endpoints.items()}}

    def compact(self) -> dict[str, Any]:
        """Inputs and status histogram per endpoint (for reports)."""
        return {
            "seed": self.seed,
            "endpoints": {
                k: {"inputs": v.inputs, "status": dict(sorted(v.status.items()))}
                | ({"failures": dict(v.failures)} if v.failures else {})
                for k, v in self.endpoints.items()
            },
        }


def _decode(raw: bytes) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - any decoding failure just means "not msgpack"
        return None


def check_http(
    t: EndpointTally, desc: str, status: int, raw: bytes, *, strict: bool
) -> dict[str, Any] | None:
    """Classify one HTTP answer; returns the decoded error body for a Haven error."""
    t.status[str(status)] += 1
    body = _decode(raw)
    err = (
        body
        if isinstance(body, dict)
        and isinstance(body.get("code"), str)
        and isinstance(body.get("message"), str)
        and isinstance(body.get("now"), int)
        and not isinstance(body.get("now"), bool)
        else None
    )
    if err is not None:
        t.codes[err["code"]] += 1
    where = f"{desc} -> {status} {raw[:160]!r}"
    if status >= 500:
        if status == 503 and err is not None and err["code"] == "storage_error":
            return err
        t.fail(f"http_{status}", where)
        return err
    if 400 <= status < 500:
        if err is None:
            if strict:
                t.fail("error_body_not_code_message_now", where)
            else:
                t.notes["4xx_not_msgpack"] += 1
            return None
        if err["code"] not in KNOWN_CODES:
            t.fail(f"unknown_code:{err['code']}", where)
        elif strict and FED_STATUS.get(err["code"], 400) != status:
            t.fail(f"status_mismatch:{err['code']}->{status}", where)
        if len(err["message"]) > 200:
            t.fail("message_over_200", where)
    return err


def check_frame(t: EndpointTally, desc: str, frame: F.Frame) -> None:
    t.status[frame.T] += 1
    codes: list[str] = []
    if isinstance(frame, F.Error):
        codes = [frame.code]
        if len(frame.message) > 200:
            t.fail("message_over_200", f"{desc} -> {frame!r}")
    elif isinstance(frame, F.Accepted):
        codes = [c for _, c in frame.rejected]
    for c in codes:
        t.codes[c] += 1
        if c not in KNOWN_CODES:
            t.fail(f"unknown_code:{c}", f"{desc} -> {frame!r}"[:600])


# ---- mutation primitives -------------------------------------------------------------------------

INTERESTING_BYTES = bytes.fromhex(
    "00017f80ffc0c1c2c3c4c5c6c7c8c9cacbcccdcecfd0d3d4d8d9dadbdcdddedf909f808fa0bfe0"
)


def mutate_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """1-4 byte-level edits: bit flips, interesting bytes, truncation, inserts, deletes, dups."""
    buf = bytearray(data)
    done: list[str] = []
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4))):
        op = rng.randrange(8)
        n = len(buf)
        if op == 0 and n:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
            done.append(f"flip@{i}")
        elif op == 1 and n:
            i = rng.randrange(n)
            buf[i] = rng.choice(INTERESTING_BYTES)
            done.append(f"set@{i}={buf[i]:#x}")
        elif op == 2 and n:
            i = rng.randrange(n)
            del buf[i:]
            done.append(f"truncate@{i}")
        elif op == 3:
            i = rng.randrange(n + 1)
            buf[i:i] = rbytes(rng, rng.choice((1, 2, 4, 8, 33)))
            done.append(f"insert@{i}")
        elif op == 4 and n:
            i = rng.randrange(n)
            j = min(n, i + rng.choice((1, 2, 4, 16, 256)))
            del buf[i:j]
            done.append(f"delete@{i}:{j}")
        elif op == 5 and n:
            i = rng.randrange(n)
            j = min(n, i + rng.choice((1, 4, 16, 64)))
            buf[j:j] = buf[i:j] * rng.choice((1, 2, 16))
            done.append(f"dup@{i}:{j}")
        elif op == 6:
            buf += rbytes(rng, rng.choice((1, 3, 16)))
            done.append("append")
        else:
            buf[:0] = bytes([rng.choice(INTERESTING_BYTES)])
            done.append("prepend")
    return bytes(buf), "bytes:" + ",".join(done)


ODD_INTS: tuple[Any, ...] = (None, True, False, 0, -1, 1, 127, 128, 255, 256, 65535, 65536)
ODD_INTS += (2**31 - 1, 2**31, 2**32, 2**53 - 1, 2**53, 2**63 - 1, -(2**63), 2**64 - 1, -(2**31))


def odd_value(rng: random.Random) -> Any:
    """A msgpack value of a random, probably wrong, type or size."""
    k = rng.randrange(30)
    if k < 10:
        return rng.choice(ODD_INTS)
    if k < 13:
        return rng.choice((0.0, -0.0, 1.5, -1.0, math.nan, math.inf, -math.inf, 1e300))
    if k < 18:
        n = rng.choice((0, 1, 8, 15, 16, 17, 24, 31, 32, 33, 63, 64, 65, 100, 200, 201, 301))
        return rng.choice(("x", "t", "\u00e9\ud55c\u202e\x00", "a@b", "\U0001f600")) * n
    if k < 24:
        n = rng.choice((0, 1, 15, 16, 17, 23, 24, 25, 31, 32, 33, 63, 64, 65, 100, 1024))
        return rbytes(rng, n)
    if k < 26:
        return [odd_value(rng) for _ in range(rng.choice((0, 1, 2, 5)))]
    if k < 28:
        return {rng.choice(("t", "rid", "x", "ids", "items")): odd_value(rng)}
    if k == 28:
        return msgpack.ExtType(rng.randrange(0, 128), rbytes(rng, rng.choice((0, 1, 4, 8))))
    return {rng.choice((1, b"k", None)): 1} if rng.random() < 0.5 else [None] * 70_000


def mutate_value(rng: random.Random, obj: Any, depth: int = 0) -> tuple[Any, str]:
    """One structural edit somewhere in ``obj``: replace, delete, insert, duplicate, wrap."""
    here = depth > 6 or not isinstance(obj, (list, dict)) or not obj or rng.random() < 0.3
    if not here:
        if isinstance(obj, dict):
            key = rng.choice(list(obj))
            new, what = mutate_value(rng, obj[key], depth + 1)
            return obj | {key: new}, f"{key}.{what}"
        i = rng.randrange(len(obj))
        new, what = mutate_value(rng, obj[i], depth + 1)
        return [*obj[:i], new, *obj[i + 1 :]], f"[{i}].{what}"
    op = rng.randrange(10)
    if isinstance(obj, dict) and obj and op < 3:
        key = str(rng.choice(list(obj)))
        obj = {str(k): v for k, v in obj.items()}
        if op == 0:
            return {k: v for k, v in obj.items() if k != key}, f"drop {key}"
        if op == 1:
            return obj | {key + "_": obj[key], "zz": odd_value(rng)}, "extra keys"
        return {(key.upper() if k == key else k): v for k, v in obj.items()}, f"case {key}"
    if isinstance(obj, list) and obj and op < 3:
        i = rng.randrange(len(obj))
        if op == 0:
            return obj[:i] + obj[i + 1 :], f"del [{i}]"
        if op == 1:
            return [*obj, obj[i]] * (rng.choice((1, 2, 64, 300)) if len(obj) < 64 else 1), "dup"
        return [*obj, odd_value(rng)], "append"
    if op == 3:
        return [obj], "wrap"
    if op == 4 and isinstance(obj, bytes):
        return obj + b"\x00", "bin+1"
    if op == 4 and isinstance(obj, str):
        return obj.encode(), "str->bin"
    if op == 5 and isinstance(obj, bytes) and obj:
        return obj[:-1], "bin-1"
    if op == 5 and isinstance(obj, int) and not isinstance(obj, bool):
        return rng.choice((-obj, obj + 1, obj - 1, obj * 2**20, str(obj))), "int edit"
    new = odd_value(rng)
    return new, f"-> {type(new).__name__}"


def raw_special(rng: random.Random) -> tuple[bytes, str]:
    """Hostile msgpack that the Python encoder would not produce."""
    k = rng.randrange(12)
    if k == 0:
        d = rng.choice((64, 512, 1000, 10_000, 100_000))
        return b"\x91" * d + b"\xc0", f"deep array {d}"
    if k == 1:
        d = rng.choice((64, 1000, 50_000))
        return b"\x81\xa1t" * d + b"\xc0", f"deep map {d}"
    if k == 2:
        n = rng.choice((65_537, 2**20, 2**32 - 1))
        return b"\xdd" + struct.pack(">I", n) + b"\xc0" * rng.choice((0, 3)), f"array32 {n}"
    if k == 3:
        n = rng.choice((4097, 2**20, 2**32 - 1))
        return b"\xdf" + struct.pack(">I", n) + b"\xa1t\xc0", f"map32 {n}"
    if k == 4:
        tag = rng.choice((b"\xc6", b"\xdb"))
        return tag + struct.pack(">I", 2**32 - 1) + b"ab", "bin32/str32 4 GiB"
    if k == 5:
        return b"\xa3\xff\xfe\xfd", "invalid utf-8 str"
    if k == 6:
        return b"\x82\xa1t\xa4auth\xa1t\xa4send", "duplicate map key"
    if k == 7:
        return b"\x81\xc0\x01", "nil map key"
    if k == 8:
        return b"\xc1", "never-used byte"
    if k == 9:
        return packb({"t": "ack", "ids": []}) + b"\x00", "trailing data"
    if k == 10:
        return b"\xcf" + struct.pack(">Q", 1) + b"\xd3" + struct.pack(">q", -1), "wide ints"
    return rbytes(rng, rng.choice((0, 1, 2, 16, 100, 4000))), "random bytes"


def splice_map(fields: dict[str, Any], key: str, raw: bytes) -> bytes:
    """``fields`` as a msgpack map with ``key``'s value replaced by the raw bytes ``raw``."""
    out = bytearray()
    items = [(k, v) for k, v in fields.items() if k != key]
    n = len(items) + 1
    out += bytes([0x80 | n]) if n < 16 else b"\xde" + struct.pack(">H", n)
    for k, v in items:
        out += packb(k) + packb(v)
    return bytes(out + packb(key) + raw)


def encode_any(obj: Any) -> bytes:
    """msgpack of anything :func:`mutate_value` builds (floats, ext types, odd keys included)."""
    return msgpack.packb(obj, use_bin_type=True, strict_types=False)  # type: ignore[no-any-return]


def mutated_msgpack(rng: random.Random, valid: Any) -> tuple[bytes, str]:
    """A mutation of the valid value ``valid``: structural, byte-level, spliced or raw."""
    r = rng.random()
    if r < 0.55:
        obj, what = valid, []
        for _ in range(rng.choice((1, 1, 2, 3))):
            obj, w = mutate_value(rng, obj)
            what.append(w)
        try:
            return encode_any(obj), "value:" + ";".join(what)
        except (OverflowError, ValueError, TypeError):  # e.g. an int beyond 64 bits
            return raw_special(rng)
    if r < 0.8:
        return mutate_bytes(rng, encode_any(valid))
    if r < 0.92 and isinstance(valid, dict) and valid:
        key = rng.choice(list(valid))
        raw, spliced = raw_special(rng)
        return splice_map(valid, key, raw), f"splice {key}: {spliced}"
    return raw_special(rng)


# ---- federation: descriptor, batch, keys ---------------------------------------------------------


@dataclass(frozen=True)
class HttpCase:
    desc: str
    method: str
    path: str  # with query
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    strict: bool = True  # 4xx must be a Haven error body
    may_reset: bool = False  # the node may close before reading all of the body


def gen_descriptor(rng: random.Random) -> HttpCase:
    k = rng.randrange(10)
    c = base64.urlsafe_b64encode(rbytes(rng, 16)).rstrip(b"=").decode()
    if k == 0:
        q = f"c={c}"
    elif k == 1:
        q = "c=" + base64.urlsafe_b64encode(rbytes(rng, rng.randrange(0, 80))).decode()
    elif k == 2:
        q = "c=" + rng.choice(("%", "%zz", "%00", "====", "+/+/", "\u00e9", "a", "ab=", ".."))
    elif k == 3:
        q = f"c={c}&c={c[::-1]}" + rng.choice(("", "&c=", "&c"))
    elif k == 4:
        q = "c=" + "A" * rng.choice((63, 64, 65, 100, 1000, 3000))
    elif k == 5:
        q = rng.choice(("", "c", "c=", "=", "&&", "x=1", "C=" + c, "c[]=" + c, ";c=" + c))
    elif k == 6:
        chars = "abAB09-_=+/%&;?#\x7f\u00ff"
        q = "c=" + "".join(rng.choice(chars) for _ in range(rng.randrange(1, 70)))
    elif k == 7:
        q = "c=" + "".join(f"%{b:02x}" for b in rbytes(rng, rng.randrange(1, 40)))
    elif k == 8:
        q = f"c={c}&" + "&".join(f"k{i}=v" for i in range(rng.choice((10, 200, 500))))
    else:
        m, _what = mutate_bytes(rng, c.encode())
        q = "c=" + "".join(
            chr(b) if 0x20 < b < 0x7F and chr(b) not in "#%&+" else f"%{b:02x}" for b in m
        )
    return HttpCase(f"descriptor ?{q[:120]}", "GET", f"{DESCRIPTOR_PATH}?{q}")


@dataclass(frozen=True)
class HeaderOp:
    """One edit of the signature headers, applied after signing."""

    kind: str  # drop, dup, dupother, rename, wrap, replace, transform
    name: str
    arg: str = ""
    arg2: str = ""

    def apply(self, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for k, v in headers:
            if k.lower() != self.name.lower():
                out.append((k, v))
            elif self.kind == "drop":
                pass
            elif self.kind == "dup":
                out += [(k, v), (k, v)]
            elif self.kind == "dupother":
                out += [(k, v), (k, self.arg)]
            elif self.kind == "rename":
                out.append((self.arg, v))
            elif self.kind == "wrap":
                out.append((k, self.arg + v + self.arg2))
            elif self.kind == "replace":
                out.append((k, self.arg))
            else:
                out.append((k, _transform(self.arg, v)))
        return out

    def canonical_change(self) -> bool:
        """An edit that leaves the value's meaning intact if the parser is lenient."""
        return self.kind in ("dup", "wrap") or (
            self.kind == "transform" and self.arg in ("zeros", "plus", "b64pad", "underscore")
        )


def _transform(kind: str, v: str) -> str:
    if kind == "zeros":
        return "000" + v
    if kind == "plus":
        return "+" + v
    if kind == "minus":
        return "-" + v
    if kind == "underscore":
        return v[:1] + "_" + v[1:] if len(v) > 1 else v
    if kind == "b64pad":
        return v + "=" * (-len(v) % 4 or 2)
    if kind == "b64std":
        return v.replace("-", "+").replace("_", "/")
    if kind == "chop":
        return v[:-1]
    if kind == "extra":
        return v + "A"
    if kind == "upper":
        return v.upper()
    if kind == "lower":
        return v.lower()
    if kind == "half":
        return v[: len(v) // 2]
    return v


def gen_header_op(rng: random.Random) -> HeaderOp:
    name = rng.choice((*FED_HEADERS, "Content-Type"))
    k = rng.randrange(14)
    if k == 0:
        return HeaderOp("drop", name)
    if k in (1, 2) and name == "Content-Type":
        # A duplicated singleton field is refused by the HTTP parser itself (tcp covers it).
        name = rng.choice(FED_HEADERS)
    if k == 1:
        return HeaderOp("dup", name)
    if k == 2:
        other = rng.choice(("1", "2", "", "AAAA", "-1", str(now_ms()), "x" * 64))
        return HeaderOp("dupother", name, other)
    if k == 3:
        new = rng.choice((name.upper(), name.lower(), name.replace("-", "_"), "X-" + name))
        return HeaderOp("rename", name, new)
    if k == 4:
        pads = (" ", "  ", "\t", " \t ", "\u00a0")
        return HeaderOp("wrap", name, rng.choice(("", *pads)), rng.choice(("", *pads)))
    if k == 5:
        return HeaderOp("transform", name, rng.choice(("zeros", "plus", "minus", "underscore")))
    if k == 6:
        huge = rng.choice(("9" * 19, "9" * 20, "9" * 400, "9" * 4000, "1" + "0" * 4300, "1e3"))
        return HeaderOp("replace", name, rng.choice((huge, "-" + huge, "0x10", "1.0", "NaN", "½")))
    if k == 7:
        kinds = ("b64pad", "b64std", "chop", "extra", "upper", "lower", "half")
        return HeaderOp("transform", name, rng.choice(kinds))
    if k == 8:
        return HeaderOp("replace", name, "")
    if k == 9:
        chars = "".join(rng.choice("aZ09-_=+/ .:é\x7f") for _ in range(rng.randrange(1, 120)))
        return HeaderOp("replace", name, chars)
    if k == 10:
        return HeaderOp("replace", name, "A" * rng.choice((1, 22, 43, 86, 87, 88, 1000, 4000)))
    if k == 11:
        ct = ("text/plain", "application/json", "", "application/msgpack; charset=x", "*/*")
        return HeaderOp("replace", "Content-Type", rng.choice(ct))
    if k == 12:
        return HeaderOp("replace", H_ORIGIN, _node_id_like(rng))
    return HeaderOp("replace", name, str(rng.choice((0, 1, 2, -1, 2**63, 2**64, -(2**63) - 1))))


def _node_id_like(rng: random.Random) -> str:
    nid = NodeKey(rbytes(rng, 32)).node_id
    return rng.choice((nid, nid.upper(), nid[:-1], nid + "a", nid + "=" * 4, nid.replace("a", "1")))


@dataclass(frozen=True)
class SignedCase:
    desc: str
    path: str
    body: bytes  # sent
    signed_body: bytes  # what the signature covers
    signer: int  # 0: the pinned peer's key; k > 0: fresh key k of the pool
    ops: tuple[HeaderOp, ...] = ()
    created_delta_ms: int = 0
    method: str = "POST"
    sign_path: str = ""  # the path the signature covers ("" = path)
    chunked: bool = False
    repeat: int = 1  # send the identical request again (replay)
    may_reset: bool = False

    @property
    def pristine(self) -> bool:
        """Signed over exactly what is sent, no header edits: a 200 must verify."""
        return (
            not self.ops
            and self.body == self.signed_body
            and not self.sign_path
            and self.method == "POST"
            and abs(self.created_delta_ms) < 30_000
        )


@dataclass(frozen=True)
class FedTargets:
    """What a structure-aware federation input may name."""

    node_id: str  # the fuzzed node
    hosted: tuple[bytes, ...]  # mailboxes hosted there (delivered ones are acked by the fuzzer)
    names: tuple[str, ...]  # account names there
    pool: int  # number of fresh peer keys


def _envelope(rng: random.Random, tg: FedTargets) -> Envelope:
    r = rng.random()
    to = rng.choice(tg.hosted) if r < 0.3 else rbytes(rng, 16)
    now = now_ms()
    expires = rng.choice(
        (now + 3_600_000, now + 30 * 86_400_000, now - 1000, 1, 2**62, now + rng.randrange(10**9))
    )
    body = rbytes(rng, rng.choice((0, 1, 64, 1024, 4096, 16_384)))
    return Envelope(rbytes(rng, 16), to, expires, body)


def _valid_batch(rng: random.Random, tg: FedTargets) -> dict[str, Any]:
    n = rng.choice((0, 1, 1, 2, 3, 8, 32))
    return {"envs": [_envelope(rng, tg).to_wire() for _ in range(n)]}


def _valid_keys(rng: random.Random, tg: FedTargets) -> dict[str, Any]:
    name = rng.choice((*tg.names, "nobody", "x" * 32, "a"))
    return {"name": name, "claim": rng.random() < 0.2}


def _gen_signed(
    rng: random.Random, tg: FedTargets, path: str, valid: Callable[..., dict[str, Any]]
) -> SignedCase:
    signer = 0 if rng.random() < 0.75 else 1 + rng.randrange(tg.pool)
    good = packb(valid(rng, tg))
    k = rng.randrange(100)
    if k < 12:  # valid
        return SignedCase(f"valid {len(good)}B", path, good, good, signer)
    if k < 40:  # mutated body, signed correctly: reaches the decoders
        body, what = mutated_msgpack(rng, valid(rng, tg))
        return SignedCase(f"signed mutated body ({what})", path, body, body, signer)
    if k < 48:  # signed random bytes / hostile msgpack
        body, what = raw_special(rng)
        return SignedCase(f"signed {what}", path, body, body, signer)
    if k < 55:  # body changed after signing
        body, what = mutate_bytes(rng, good)
        return SignedCase(f"body changed after signing ({what})", path, body, good, signer)
    if k < 80:  # one header bent
        op = gen_header_op(rng)
        return SignedCase(f"header {op}", path, good, good, signer, ops=(op,))
    if k < 84:  # two headers bent
        ops = (gen_header_op(rng), gen_header_op(rng))
        return SignedCase(f"headers {ops}", path, good, good, signer, ops=ops)
    if k < 88:
        delta = rng.choice((-61_000, 61_000, -59_000, 59_000, -(10**12), 10**12, -now_ms()))
        return SignedCase(f"created {delta:+}", path, good, good, signer, created_delta_ms=delta)
    if k < 90:
        return SignedCase("replayed", path, good, good, signer, repeat=2)
    if k < 92:
        return SignedCase("chunked", path, good, good, signer, chunked=True)
    if k < 94:
        other = BATCH_PATH if path == KEYS_PATH else KEYS_PATH
        sp = rng.choice((other, path + "/", path.upper(), path + "?x=1"))
        return SignedCase(f"signed for path {sp}", path, good, good, signer, sign_path=sp)
    if k < 96:  # over the limit
        limit = 2 * 1024 * 1024 if path == BATCH_PATH else 4096
        n = limit + rng.choice((1, 100, 65_536))
        body = packb({"envs": [], "pad": b"\x00" * n}) if rng.random() < 0.5 else b"\x00" * n
        return SignedCase(f"{len(body)}B body", path, body, body, signer, may_reset=True)
    if k < 98 and path == BATCH_PATH:  # too many envelopes / envelope too large
        if rng.random() < 0.5:
            envs = [_envelope(rng, tg).to_wire() for _ in range(257)]
            body = packb({"envs": envs})
            return SignedCase("257 envelopes", path, body, body, signer)
        env = [1, rbytes(rng, 16), rng.choice(tg.hosted), now_ms() + 60_000, b"\x00" * 65_537]
        body = packb({"envs": [env]})
        return SignedCase("envelope body 64 KiB + 1", path, body, body, signer)
    version = rng.choice(("2", "0", "-1", "01", "1.0", "v1"))
    op = HeaderOp("replace", H_VERSION, version)
    return SignedCase(f"version {version}", path, good, good, signer, ops=(op,))


def gen_batch(rng: random.Random, tg: FedTargets) -> SignedCase:
    return _gen_signed(rng, tg, BATCH_PATH, _valid_batch)


def gen_keys(rng: random.Random, tg: FedTargets) -> SignedCase:
    return _gen_signed(rng, tg, KEYS_PATH, _valid_keys)


@dataclass
class FedPeer:
    """Signing identities of the fuzzer and the node's clock as measured at the handshake."""

    http: aiohttp.ClientSession
    url: str
    dest: str
    offset_ms: int
    keys: list[NodeKey]  # [0] is pinned by the node

    @classmethod
    async def connect(
        cls, http: aiohttp.ClientSession, url: str, pinned: NodeKey, pool: list[NodeKey]
    ) -> FedPeer:
        t0 = now_ms()
        async with http.get(url + DESCRIPTOR_PATH) as resp:
            data = await resp.read()
        desc = Descriptor.verify_decode(data)
        return cls(http, url, desc.node_id, desc.now - (t0 + now_ms()) // 2, [pinned, *pool])


async def _chunks(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 997):
        yield body[i : i + 997]


async def run_signed(peer: FedPeer, case: SignedCase, t: EndpointTally) -> None:
    key = peer.keys[case.signer]
    when = now_ms() + peer.offset_ms + case.created_delta_ms
    req = sign_request(
        key, "POST", case.sign_path or case.path, peer.dest, case.signed_body, max(when, 0)
    )
    pairs = [*req.to_headers().items(), ("Content-Type", CONTENT_TYPE)]
    for op in case.ops:
        pairs = op.apply(pairs)
    headers: CIMultiDict[str] = CIMultiDict(pairs)
    skip = () if "content-type" in {k.lower() for k, _ in pairs} else ("Content-Type",)
    for _ in range(case.repeat):
        data: Any = _chunks(case.body) if case.chunked else case.body
        try:
            async with asyncio.timeout(INPUT_DEADLINE_S):
                async with peer.http.request(
                    case.method,
                    peer.url + case.path,
                    data=data,
                    headers=headers,
                    skip_auto_headers=skip,
                ) as resp:
                    raw = await resp.read()
                    status, sig = resp.status, resp.headers.get(H_SIG)
        except TimeoutError:
            t.fail("hang", case.desc)
            return
        except (aiohttp.ClientError, ConnectionError) as exc:
            if case.may_reset:
                t.status["reset"] += 1
            else:
                t.fail(f"disconnect:{type(exc).__name__}", case.desc)
            return
        except ValueError as exc:  # the client refused to send a header value (not a node fault)
            t.notes[f"client_refused:{type(exc).__name__}"] += 1
            return
        check_http(t, case.desc, status, raw, strict=True)
        if status == 200:
            _check_signed_ok(t, case, peer, key, req.nonce, raw, sig)


def _check_signed_ok(
    t: EndpointTally,
    case: SignedCase,
    peer: FedPeer,
    key: NodeKey,
    nonce: bytes,
    raw: bytes,
    sig: str | None,
) -> None:
    if not case.pristine:
        t.notes["accepted_after_edit"] += 1
        for op in case.ops:
            if op.canonical_change():  # a non-canonical header the parser let through
                t.notes[f"lenient:{op.name}:{op.kind}:{op.arg!r}{op.arg2!r}"] += 1
        if case.body != case.signed_body or case.sign_path or abs(case.created_delta_ms) > 60_000:
            t.fail("accepted_bad_request", case.desc)
        return
    if sig is None:
        t.fail("unsigned_200", case.desc)
        return
    try:
        verify_response(peer.dest, key.node_id, nonce, raw, sig)
        if case.path == BATCH_PATH:
            res = BatchResult.decode(raw)
            for _, c in res.rejected:
                t.codes[c] += 1
                if c not in KNOWN_CODES:
                    t.fail(f"unknown_code:{c}", case.desc)
    except E.HavenError as exc:
        t.fail(f"bad_200:{exc.code}", case.desc)


async def run_http(http: aiohttp.ClientSession, url: str, case: HttpCase, t: EndpointTally) -> None:
    try:
        async with asyncio.timeout(INPUT_DEADLINE_S):
            async with http.request(
                case.method,
                url + case.path,
                data=case.body,
                headers=CIMultiDict(case.headers),
                skip_auto_headers=("Content-Type",) if case.body is None else (),
            ) as resp:
                raw = await resp.read()
                status = resp.status
    except TimeoutError:
        t.fail("hang", case.desc)
        return
    except (aiohttp.ClientError, ConnectionError) as exc:
        if case.may_reset:
            t.status["reset"] += 1
        else:
            t.fail(f"disconnect:{type(exc).__name__}", case.desc)
        return
    except ValueError as exc:
        t.notes[f"client_refused:{type(exc).__name__}"] += 1
        return
    check_http(t, case.desc, status, raw, strict=case.strict)
    if status == 200 and case.method == "GET" and case.path.startswith(DESCRIPTOR_PATH):
        try:
            Descriptor.verify_decode(raw)
        except E.HavenError as exc:
            t.fail(f"bad_descriptor:{exc.code}", case.desc)
    elif (
        status == 200 and case.method == "GET" and case.path.startswith(("/haven/v1/s", PEERS_PATH))
    ):
        if _decode(raw) is None:
            t.fail("view_not_msgpack", case.desc)


# ---- stats, peers, unknown paths and methods -----------------------------------------------------


def _odd_query(rng: random.Random) -> str:
    k = rng.randrange(6)
    if k == 0:
        return ""
    if k == 1:
        return "?" + "&".join(f"{rng.choice('abcx')}={rng.randrange(10**6)}" for _ in range(5))
    if k == 2:
        return "?" + "".join(rng.choice("%&=;?+/\u00e9x") for _ in range(rng.randrange(1, 200)))
    if k == 3:
        return "?" + "a=" + "b" * rng.choice((1000, 3000))
    if k == 4:
        return "?format=json&limit=-1&since=" + str(2**64)
    return "?%00=%ff"


def _odd_headers(rng: random.Random) -> tuple[tuple[str, str], ...]:
    choices = (
        ("X-Forwarded-For", "203.0.113.7"),
        ("X-Forwarded-For", "not an ip, 10.0.0.1"),
        ("Forwarded", "for=198.51.100.1"),
        ("X-Real-IP", "192.0.2.1"),
        ("Accept", "text/html"),
        ("Range", "bytes=0-1"),
        ("If-None-Match", "*"),
        ("Host", "evil.example"),
        ("Authorization", "Basic Zm9vOmJhcg=="),
        ("Cookie", "a=" + "x" * 2000),
        ("Connection", "close"),
        ("Expect", "100-continue"),
    )
    return tuple(rng.choice(choices) for _ in range(rng.randrange(0, 3)))


def gen_view(path: str) -> Callable[[random.Random], HttpCase]:
    def gen(rng: random.Random) -> HttpCase:
        q = _odd_query(rng)
        hdrs = _odd_headers(rng)
        method = "GET" if rng.random() < 0.9 else "HEAD"
        return HttpCase(
            f"{method} {path}{q[:80]} {hdrs}", method, path + q, headers=hdrs, strict=False
        )

    return gen


KNOWN_PATHS = (DESCRIPTOR_PATH, BATCH_PATH, KEYS_PATH, CLIENT_PATH, STATS_PATH, PEERS_PATH)


def gen_unknown(rng: random.Random) -> HttpCase:
    base = rng.choice(KNOWN_PATHS)
    k = rng.randrange(9)
    if k == 0:
        path = base.upper()
    elif k == 1:
        path = base + rng.choice(("/", "//", "/x", "/..", "%2f", ".json", "%00"))
    elif k == 2:
        path = base.replace("/", "//", rng.randrange(1, 3))
    elif k == 3:
        path = "/" + "/".join(
            rng.choice(("..", "%2e%2e", ".", "haven", "v2", "\u00e9")) for _ in range(4)
        )
    elif k == 4:
        path = "/" + "a" * rng.choice((1, 255, 1000, 4000))
    elif k == 5:
        path = rng.choice(
            ("/", "/favicon.ico", "/haven", "/haven/v1", "/.well-known/", "/haven/v2/client")
        )
    elif k == 6:
        path = "/" + "".join(rng.choice("abc%/?#;=&\u00e9") for _ in range(rng.randrange(1, 60)))
        path = path.split("#")[0] or "/"
    else:
        path = base  # known path, other method
    methods = (
        "GET",
        "POST",
        "PUT",
        "DELETE",
        "PATCH",
        "OPTIONS",
        "HEAD",
        "TRACE",
        "PROPFIND",
        "FOO",
    )
    method = rng.choice(methods)
    body = (
        rbytes(rng, rng.choice((0, 10, 1000))) if method not in ("GET", "HEAD", "TRACE") else None
    )
    return HttpCase(f"{method} {path[:120]}", method, path, body=body, strict=False)


# ---- WebSocket over a bare stream ----------------------------------------------------------------


class WsClosed(Exception):
    """The node closed the WebSocket: ``code`` from its close frame, None for a bare EOF."""

    def __init__(self, code: int | None) -> None:
        super().__init__(code)
        self.code = code


def ws_frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    declared: int | None = None,
) -> bytes:
    """One client WebSocket frame; ``declared`` lies about the payload length."""
    n = len(payload) if declared is None else declared
    head = bytes([(0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)])
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 65_536:
        head += bytes([m | 126]) + struct.pack(">H", n)
    else:
        head += bytes([m | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _xor(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return payload
    k = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(len(payload), "big")


def ws_binary(payload: bytes) -> bytes:
    """A masked binary frame (fast path for large payloads)."""
    n = len(payload)
    head = b"\x82" + (
        bytes([0x80 | n])
        if n < 126
        else b"\xfe" + struct.pack(">H", n)
        if n < 65_536
        else b"\xff" + struct.pack(">Q", n)
    )
    key = os.urandom(4)
    return head + key + _xor(payload, key)


class RawWs:
    """A WebSocket client over an asyncio stream: every frame bit under the caller's control."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, host: str, port: int) -> tuple[RawWs, F.Challenge]:
        reader, writer = await asyncio.open_connection(host, port, limit=2**23)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET {CLIENT_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        ws = cls(reader, writer)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise WsClosed(None)
            first = await ws.read()
        except BaseException:
            await ws.abort()
            raise
        if not isinstance(first, F.Challenge):
            await ws.abort()
            raise WsClosed(None)
        return ws, first

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_raw(self) -> tuple[int, bytes]:
        """The next data frame (opcode, payload); answers pings; WsClosed on close or EOF."""
        while True:
            try:
                b0, b1 = await self.reader.readexactly(2)
                n = b1 & 0x7F
                if n == 126:
                    (n,) = struct.unpack(">H", await self.reader.readexactly(2))
                elif n == 127:
                    (n,) = struct.unpack(">Q", await self.reader.readexactly(8))
                key = await self.reader.readexactly(4) if b1 & 0x80 else b""
                payload = await self.reader.readexactly(n)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise WsClosed(None) from exc
            if key:
                payload = _xor(payload, key)
            op = b0 & 0x0F
            if op == 0x8:
                raise WsClosed(struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005)
            if op == 0x9:
                with contextlib.suppress(ConnectionError):
                    await self.send(ws_frame(0xA, payload))
                continue
            if op == 0xA:
                continue
            return op, payload

    async def read(self) -> F.Frame:
        op, payload = await self.read_raw()
        if op != 0x2:
            raise ProtocolViolation(f"node sent opcode {op}")
        try:
            return F.decode_frame(payload, 2 * F.MAX_FRAME)
        except E.HavenError as exc:
            raise ProtocolViolation(f"node frame undecodable ({exc.code})") from exc

    async def abort(self) -> None:
        """Drop the connection at once (``close()`` would wait for unsent data to drain)."""
        self.writer.transport.abort()


class ProtocolViolation(Exception):
    """The node sent something a device cannot read."""


@dataclass(frozen=True)
class WsTargets:
    node_id: str
    host: str  # the node's public host (local addresses)
    remote_node_id: str  # a pinned peer node (remote sends)
    remote_host: str
    dead_host: str  # 127.0.0.1 port that refuses connections
    hosted: tuple[bytes, ...]  # mailboxes on the node (the fuzz devices' own first)
    names: tuple[str, ...]


@dataclass(frozen=True)
class WsCase:
    desc: str
    build: Callable[[F.Challenge, list[bytes]], list[bytes]]  # wire bytes to send
    well_framed: bool = True  # every frame is a complete, valid WebSocket frame


def _rid(rng: random.Random) -> int:
    return rng.choice((1, 2, 7, 2**31, 2**53 - 1, rng.randrange(1, 2**40)))


def _frame_bytes(rng: random.Random, valid: dict[str, Any]) -> tuple[bytes, str]:
    if rng.random() < 0.15:
        return encode_any(valid), "valid"
    return mutated_msgpack(rng, valid)


def _text_or_control(rng: random.Random) -> tuple[list[bytes], str, bool]:
    """Non-binary and broken WebSocket frames: (wire, what, well_framed)."""
    k = rng.randrange(12)
    if k == 0:
        return [ws_frame(0x1, rng.choice((b"hello", b"{}", "\u00e9\ud55c".encode())))], "text", True
    if k == 1:
        return [ws_frame(0x1, b"\xff\xfe")], "text invalid utf-8", False  # 1007
    if k == 2:
        return [ws_frame(0x9, rbytes(rng, rng.choice((0, 5, 125))))], "ping", True
    if k == 3:
        return [ws_frame(0xA, b"unsolicited")], "pong", True
    if k == 4:
        op = rng.choice((0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF))
        return [ws_frame(op, b"x")], f"reserved opcode {op}", False
    if k == 5:
        return (
            [ws_frame(0x2, packb({"t": "ack", "ids": []}), rsv=rng.randrange(1, 8))],
            "rsv bits",
            False,
        )
    if k == 6:
        return (
            [ws_frame(0x2, b"\x82\xa1t", fin=False), ws_frame(0x0, b"\xa3ack\xa3ids\x90")],
            ("fragmented binary"),
            True,
        )
    if k == 7:
        return [ws_frame(0x0, b"orphan continuation")], "continuation first", False
    if k == 8:
        return [ws_frame(0x9, b"x" * 126)], "ping over 125 bytes", False
    if k == 9:
        return [ws_frame(0x9, b"p", fin=False)], "fragmented ping", False
    if k == 10:
        return [ws_frame(0x2, packb({"t": "ack", "ids": []}), mask=False)], "unmasked", False
    d = rng.choice((F.MAX_FRAME + 1, 2**40, 2**63 - 1))
    return [ws_frame(0x2, b"", declared=d)], f"declared {d} bytes", False


def _big(rng: random.Random) -> tuple[bytes, str]:
    n = rng.choice((65_536, 65_537, 1_000_000, F.MAX_FRAME - 64, F.MAX_FRAME + 1))
    return splice_map({"t": "send", "rid": 1}, "items", packb([[b"\x00" * n]])), f"{n}B frame"


def gen_ws_preauth(rng: random.Random, tg: WsTargets, ident: RawIdentity) -> WsCase:
    """One connection per input. ``ident`` is registered on the node (auth works)."""
    k = rng.randrange(100)
    if k < 30:

        def build(ch: F.Challenge, _: list[bytes]) -> list[bytes]:
            mb = ident.mailbox if rng.random() < 0.8 else rbytes(rng, 16)
            proof = ident.sign(_auth_msg(ch, mb))
            valid = F.Auth(_rid(rng), mb, proof).encode()
            data, _w = _frame_bytes(rng, msgpack.unpackb(valid))
            return [ws_binary(data)]

        return WsCase(f"auth mutation (rng {k})", build)
    if k < 50:

        def build_reg(ch: F.Challenge, _: list[bytes]) -> list[bytes]:
            other = RawIdentity(mailbox=rbytes(rng, 16))
            token = rbytes(rng, rng.choice((24, 0, 64, 65)))
            dl = (
                other.device_list(f"{rng.choice(tg.names)}@{tg.host}")
                if rng.random() < 0.7
                else None
            )
            proof = other.sign(_auth_msg(ch, other.mailbox))
            frame = F.Register(_rid(rng), token, other.mailbox, other.auth_key, proof, dl)
            data, _w = _frame_bytes(rng, msgpack.unpackb(frame.encode()))
            return [ws_binary(data)]

        return WsCase(f"register mutation (rng {k})", build_reg)
    if k < 62:
        valid = _postauth_valid(rng, tg, [])
        data, what = _frame_bytes(rng, valid)
        return WsCase(f"{valid['t']} before auth ({what})", lambda ch, _: [ws_binary(data)])
    if k < 72:
        data, what = raw_special(rng)
        return WsCase(f"raw {what}", lambda ch, _: [ws_binary(data)])
    if k < 76:
        data, what = _big(rng)
        return WsCase(f"pre-auth {what}", lambda ch, _: [ws_binary(data)], well_framed=False)
    if k < 80:
        t = rng.choice(("challenge", "auth_ok", "deliver", "error", "ok", "keys", "zz", "", "AUTH"))
        data = encode_any({"t": t, "rid": _rid(rng)})
        return WsCase(f"type {t!r} before auth", lambda ch, _: [ws_binary(data)])
    frames, what, framed = _text_or_control(rng)
    return WsCase(f"pre-auth {what}", lambda ch, _: frames, well_framed=framed)


def _auth_msg(ch: F.Challenge, mailbox: bytes) -> bytes:
    from federation.signing import device_auth_message

    return device_auth_message(ch.node_id, ch.nonce, mailbox)


def _address(rng: random.Random, tg: WsTargets) -> str:
    host = rng.choice(
        (tg.host, tg.host, tg.remote_host, tg.dead_host, tg.host.upper(), tg.host + ".", "[::1]:1")
    )
    name = rng.choice((*tg.names, "nobody", "a", "x" * 32))
    k = rng.randrange(10)
    if k < 6:
        return f"{name}@{host}"
    if k == 6:
        m = "".join(rng.choice("aZ._-@ \x00\u00e9/") for _ in range(rng.randrange(0, 40)))
        return f"{m}@{host}"
    if k == 7:
        return rng.choice(("", "@", "a@", f"@{host}", name, f"{name}@@{host}", f"{name}@{host}@x"))
    if k == 8:
        return f"{'a' * rng.choice((33, 290, 301))}@{host}"
    return f"{name.upper()}@{host}"


def _envelope_wire(rng: random.Random, tg: WsTargets) -> list[Any]:
    r = rng.random()
    to = tg.hosted[0] if r < 0.5 else rng.choice(tg.hosted) if r < 0.6 else rbytes(rng, 16)
    now = now_ms()
    expires = rng.choice((now + 3_600_000, now + 30 * 86_400_000, now - 1000, 1))
    body = rbytes(rng, rng.choice((0, 16, 1024, 4096)))
    return Envelope(rbytes(rng, 16), to, expires, body).to_wire()


def _postauth_valid(rng: random.Random, tg: WsTargets, delivered: list[bytes]) -> dict[str, Any]:
    k = rng.randrange(10)
    rid = _rid(rng)
    if k < 3:
        items = []
        for _ in range(rng.choice((1, 1, 2, 5, 16))):
            dest = rng.choice(
                (tg.node_id, tg.node_id, tg.remote_node_id, NodeKey(rbytes(rng, 32)).node_id)
            )
            items.append([dest, _envelope_wire(rng, tg)])
        return {"t": "send", "rid": rid, "items": items}
    if k < 5:
        ids = delivered[: rng.choice((1, 4, 64))] if delivered and rng.random() < 0.7 else []
        return {"t": "ack", "ids": ids or [rbytes(rng, 16) for _ in range(rng.choice((0, 1, 8)))]}
    if k < 7:
        return {
            "t": "query_keys",
            "rid": rid,
            "address": _address(rng, tg),
            "claim": rng.random() < 0.3,
        }
    if k < 9:
        otks = [
            [f"k{rng.randrange(10**9)}", base64.b64encode(rbytes(rng, 32)).decode()]
            for _ in range(rng.choice((0, 1, 3)))
        ]
        fb = [] if rng.random() < 0.5 else [[f"f{rng.randrange(10**6)}", "AAAA"]]
        return {"t": "publish_keys", "rid": rid, "otks": otks, "fallback": fb, "device_list": None}
    return {"t": "mint_link", "rid": rid}


def gen_ws_postauth(rng: random.Random, tg: WsTargets) -> WsCase:
    k = rng.randrange(100)
    if k < 80:

        def build(ch: F.Challenge, delivered: list[bytes]) -> list[bytes]:
            valid = _postauth_valid(rng, tg, delivered)
            data, _w = _frame_bytes(rng, valid)
            return [ws_binary(data)]

        return WsCase(f"post-auth mutation (rng {k})", build)
    if k < 86:
        data, what = raw_special(rng)
        return WsCase(f"raw {what}", lambda ch, d: [ws_binary(data)])
    if k < 90:
        t = rng.choice(
            (
                "challenge",
                "auth_ok",
                "deliver",
                "error",
                "ok",
                "keys",
                "zz",
                "",
                "SEND",
                "auth",
                "register",
            )
        )
        data = encode_any({"t": t, "rid": _rid(rng)} | ({"envs": []} if t == "deliver" else {}))
        return WsCase(f"type {t!r} after auth", lambda ch, d: [ws_binary(data)])
    if k < 92:
        data, what = _big(rng)
        return WsCase(f"post-auth {what}", lambda ch, d: [ws_binary(data)], well_framed=False)
    frames, what, framed = _text_or_control(rng)
    return WsCase(f"post-auth {what}", lambda ch, d: frames, well_framed=framed)


async def _drain(ws: RawWs, t: EndpointTally, desc: str, until_rid: int | None) -> list[bytes]:
    """Read frames until the sync answer (``until_rid``); delivered ids back. WsClosed when
    the node closes first."""
    delivered: list[bytes] = []
    authed = False  # after auth_ok / registered, a pre-auth sync is "already authenticated"
    while True:
        frame = await ws.read()
        authed = authed or isinstance(frame, (F.AuthOk, F.Registered))
        if isinstance(frame, F.Deliver):
            delivered += [e.id for e in frame.envs]
            t.notes["deliver_frames"] += 1
            continue
        if until_rid is not None and getattr(frame, "rid", None) == until_rid:
            codes = ("invalid_invite", "rate_limited") + (("malformed",) if authed else ())
            sync_ok = isinstance(frame, F.Ok) or (
                isinstance(frame, F.Error) and frame.code in codes
            )
            if not sync_ok:
                t.fail(f"sync_answer:{frame!r}"[:80], desc)
            return delivered
        check_frame(t, desc, frame)


def _close_ok(code: int | None, well_framed: bool) -> bool:
    """Close codes a node may answer a (possibly hostile) input with."""
    if code in (1000, 1001, 1002, 1003, 1007, 1008, 1009):
        return code in (1000, 1001, 1008, 1009) or not well_framed
    return code is None and not well_framed


PREAUTH_SYNC_RID = 2**53 - 12_345  # no rid mutation reaches it


def preauth_sync(ch: F.Challenge) -> bytes:
    ident = RawIdentity(mailbox=os.urandom(16))
    proof = ident.sign(_auth_msg(ch, ident.mailbox))
    return F.Register(
        PREAUTH_SYNC_RID, os.urandom(24), ident.mailbox, ident.auth_key, proof, None
    ).encode()


async def run_ws_preauth(host: str, port: int, case: WsCase, t: EndpointTally) -> None:
    try:
        async with asyncio.timeout(INPUT_DEADLINE_S):
            ws, ch = await RawWs.open(host, port)
            try:
                for w in case.build(ch, []):
                    await ws.send(w)
                # Sync: a register with a random invite is answered (invalid_invite or
                # rate_limited) with its rid and leaves the connection open.
                await ws.send(ws_binary(preauth_sync(ch)))
                await _drain(ws, t, case.desc, PREAUTH_SYNC_RID)
                await ws.send(ws_frame(0x8, struct.pack(">H", 1000)))
            except WsClosed as closed:
                t.status[f"close:{closed.code}"] += 1
                if not _close_ok(closed.code, case.well_framed):
                    t.fail(f"ws_close:{closed.code}", case.desc)
            except ConnectionError:
                t.status["reset"] += 1  # the node closed while we were still sending
            finally:
                await ws.abort()
    except TimeoutError:
        t.fail("hang", case.desc)
    except ProtocolViolation as exc:
        t.fail(f"node_frame:{exc}", case.desc)
    except WsClosed:
        t.fail("ws_upgrade_refused", case.desc)
    except ConnectionError as exc:
        t.fail(f"connect:{type(exc).__name__}", case.desc)


@dataclass
class Device:
    """An authenticated fuzz device; reconnects whenever the node closes it."""

    host: str
    port: int
    ident: RawIdentity
    ws: RawWs | None = None
    challenge: F.Challenge | None = None
    delivered: list[bytes] = field(default_factory=list)
    sync_rid: int = 10**15

    async def ensure(self, t: EndpointTally) -> tuple[RawWs, F.Challenge]:
        if self.ws is not None and self.challenge is not None:
            return self.ws, self.challenge
        ws, ch = await RawWs.open(self.host, self.port)
        proof = self.ident.sign(_auth_msg(ch, self.ident.mailbox))
        await ws.send(ws_binary(F.Auth(1, self.ident.mailbox, proof).encode()))
        while True:
            frame = await ws.read()
            if isinstance(frame, F.Deliver):
                self.delivered += [e.id for e in frame.envs]
                continue
            if not isinstance(frame, F.AuthOk):
                raise AssertionError(f"fuzz device could not authenticate: {frame!r}")
            break
        t.notes["reconnects"] += 1
        self.ws, self.challenge = ws, ch
        return ws, ch

    async def drop(self) -> None:
        if self.ws is not None:
            await self.ws.abort()
        self.ws = self.challenge = None

    async def run(self, case: WsCase, t: EndpointTally) -> None:
        try:
            async with asyncio.timeout(INPUT_DEADLINE_S):
                ws, ch = await self.ensure(t)
                try:
                    for w in case.build(ch, self.delivered):
                        await ws.send(w)
                    self.sync_rid += 1
                    await ws.send(ws_binary(F.PublishKeys(self.sync_rid, (), (), None).encode()))
                    self.delivered += await _drain(ws, t, case.desc, self.sync_rid)
                    if len(self.delivered) > 256:  # keep the window open and the store small
                        ids, self.delivered = self.delivered[:4096], self.delivered[4096:]
                        await ws.send(ws_binary(F.Ack(tuple(ids)).encode()))
                except WsClosed as closed:
                    t.status[f"close:{closed.code}"] += 1
                    if not _close_ok(closed.code, case.well_framed):
                        t.fail(f"ws_close:{closed.code}", case.desc)
                    await self.drop()
                except ConnectionError:
                    t.status["reset"] += 1  # the node closed while we were still sending
                    await self.drop()
        except TimeoutError:
            t.fail("hang", case.desc)
            await self.drop()
        except ProtocolViolation as exc:
            t.fail(f"node_frame:{exc}", case.desc)
            await self.drop()
        except (WsClosed, ConnectionError) as exc:
            t.fail(f"reconnect:{type(exc).__name__}", case.desc)
            await self.drop()


# ---- raw TCP -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcpCase:
    desc: str
    data: bytes
    ws_upgrade: bool = False  # open a WebSocket first, then send ``data``
    incomplete: bool = False  # the node must wait for more: half-close after ``data``


def _http_request(method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + body


def gen_tcp(rng: random.Random) -> TcpCase:
    k = rng.randrange(20)
    body = packb({"envs": []})
    sig = [(h, "x") for h in FED_HEADERS]
    if k == 0:
        return TcpCase("random bytes", rbytes(rng, rng.choice((1, 16, 512, 4096, 65_536))))
    if k == 1:
        req = _http_request("POST", BATCH_PATH, [*sig, ("Content-Length", str(len(body)))], body)
        data, what = mutate_bytes(rng, req)
        return TcpCase(f"mutated POST ({what})", data)
    if k == 2:
        req = _http_request("GET", DESCRIPTOR_PATH + "?c=AAAA", [], b"")
        data, what = mutate_bytes(rng, req)
        return TcpCase(f"mutated GET ({what})", data)
    if k == 3:
        cl = rng.choice(("-1", "abc", "1, 2", "99999999999999999999", " 5", "0x10", "+5", ""))
        return TcpCase(
            f"Content-Length {cl!r}",
            _http_request("POST", BATCH_PATH, [("Content-Length", cl)], body),
        )
    if k == 4:
        hdrs = [("Content-Length", "5"), ("Content-Length", "6")]
        return TcpCase("two Content-Lengths", _http_request("POST", BATCH_PATH, hdrs, b"123456"))
    if k == 5:
        hdrs = [("Transfer-Encoding", "chunked"), ("Content-Length", "3")]
        chunks = rng.choice(
            (b"zz\r\nab\r\n0\r\n\r\n", b"ffffffffffffffff\r\n", b"3\r\nabc", b"-1\r\n\r\n")
        )
        return TcpCase(
            f"bad chunked {chunks[:12]!r}", _http_request("POST", BATCH_PATH, hdrs, chunks)
        )
    if k == 6:
        n = rng.choice((8191, 8200, 65_536))
        return TcpCase(
            f"header of {n} bytes", _http_request("GET", DESCRIPTOR_PATH, [("X-Big", "a" * n)], b"")
        )
    if k == 7:
        n = rng.choice((101, 1000, 20_000))
        hdrs = [(f"X-{i}", "v") for i in range(n)]
        return TcpCase(f"{n} headers", _http_request("GET", STATS_PATH, hdrs, b""))
    if k == 8:
        return TcpCase("request line of 9 KiB", _http_request("GET", "/" + "a" * 9000, [], b""))
    if k == 9:
        line = rng.choice(
            (
                b"GET / HTTP/0.9\r\n\r\n",
                b"GET /\r\n\r\n",
                b"GET / HTTP/9.9\r\n\r\n",
                b"GET / HTTP/1.1\n\n",
                b"\r\n\r\n\r\n",
                b"GET  /  HTTP/1.1\r\n\r\n",
            )
        )
        return TcpCase(f"request line {line[:20]!r}", line)
    if k == 10:
        return TcpCase("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rbytes(rng, 64))
    if k == 11:
        return TcpCase(
            "TLS ClientHello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + rbytes(rng, 500)
        )
    if k == 12:
        bad = rng.choice(
            (
                "X-A: b\x00c",
                "X-A b",
                " X-A: folded",
                "X-A:\tb\r\n continued",
                "X-\u00e9: v",
                ": v",
                "Host: a\r\nHost: b",
            )
        )
        return TcpCase(
            f"header line {bad!r}",
            _http_request("GET", STATS_PATH, [], b"").replace(
                b"\r\n\r\n", ("\r\n" + bad + "\r\n\r\n").encode()
            ),
        )
    if k == 13:
        req = _http_request("GET", STATS_PATH, [], b"") * rng.choice((2, 50))
        return TcpCase("pipelined requests", req + rbytes(rng, 8))
    if k == 14:
        return TcpCase("CONNECT", b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n")
    if k == 15:
        req = _http_request("POST", BATCH_PATH, [*sig, ("Content-Length", "100000")], b"short")
        return TcpCase("body shorter than Content-Length, then EOF", req, incomplete=True)
    if k == 16:
        hdrs = [
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Version", rng.choice(("13", "8", "x"))),
            ("Sec-WebSocket-Key", rng.choice(("", "short", "a" * 100))),
        ]
        return TcpCase("bad WebSocket upgrade", _http_request("GET", CLIENT_PATH, hdrs, b""))
    # a WebSocket, then garbage frames
    frames, what, _framed = _text_or_control(rng)
    tail = rbytes(rng, rng.choice((1, 2, 7, 200))) if rng.random() < 0.5 else b""
    return TcpCase(
        f"ws then {what} + {len(tail)} garbage bytes", b"".join(frames) + tail, ws_upgrade=True
    )


# Ends a conversation whatever the garbage before it left open: a request that asks for the close.
TCP_TRAILER = b"GET /haven/v1/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
TCP_QUIET_S = 2.0  # no answer yet: the node may be waiting for declared bytes; half-close then


async def run_tcp(host: str, port: int, case: TcpCase, t: EndpointTally) -> None:
    """Send the bytes (plus a closing request, or a close frame on a WebSocket), read until the
    node closes. A node still waiting after :data:`TCP_QUIET_S` gets a half-close; one that then
    neither answers nor closes within the input deadline is a hang."""
    got = bytearray()
    try:
        async with asyncio.timeout(INPUT_DEADLINE_S):
            if case.ws_upgrade:
                ws, _ch = await RawWs.open(host, port)
                reader, writer = ws.reader, ws.writer
                tail = ws_frame(0x8, struct.pack(">H", 1000))
            else:
                reader, writer = await asyncio.open_connection(host, port)
                tail = b"" if case.incomplete else TCP_TRAILER
            try:
                writer.write(case.data + tail)
                await writer.drain()
                if case.incomplete:
                    writer.write_eof()
                half_closed = case.incomplete
                while True:
                    try:
                        async with asyncio.timeout(None if half_closed else TCP_QUIET_S):
                            chunk = await reader.read(65_536)
                    except TimeoutError:
                        t.notes["tcp_half_closed_after_quiet"] += 1
                        writer.write_eof()
                        half_closed = True
                        continue
                    if not chunk:
                        break
                    got += chunk
            except ConnectionError:
                t.status["reset"] += 1
            finally:
                writer.transport.abort()
    except TimeoutError:
        t.fail("hang", case.desc)
        return
    except (WsClosed, ConnectionError) as exc:
        t.fail(f"connect:{type(exc).__name__}", case.desc)
        return
    statuses = [
        int(got[i + 9 : i + 12])
        for i in _find_all(bytes(got), b"HTTP/1.")
        if got[i + 9 : i + 12].isdigit()
    ]
    for name in [str(s) for s in statuses] or ["none"]:
        t.status[name] += 1
    for s in statuses:
        if s >= 500:
            t.fail(f"http_{s}", f"{case.desc}: {bytes(got[:200])!r}")


def _find_all(data: bytes, needle: bytes) -> list[int]:
    out, i = [], data.find(needle)
    while i >= 0:
        if i == 0 or data[i - 1 : i] == b"\n":
            out.append(i)
        i = data.find(needle, i + 1)
    return out


# ---- driver --------------------------------------------------------------------------------------


async def pool(
    n: int, workers: int, one: Callable[[int], Awaitable[None]], t: EndpointTally
) -> None:
    """Run ``one(0..n-1)`` with at most ``workers`` at a time; a fuzzer bug is a failure."""
    it = iter(range(n))

    async def worker() -> None:
        for i in it:
            try:
                await one(i)
            except Exception as exc:  # noqa: BLE001 - reported with the input's index
                t.fail(f"fuzzer_error:{type(exc).__name__}", f"index {i}: {exc!r}")

    async with asyncio.TaskGroup() as tg:
        for _ in range(workers):
            tg.create_task(worker())


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)


def elapsed(t0: float) -> float:
    return round(time.monotonic() - t0, 1)
