"""Safety numbers: the same 60 digits on both sides, derived from both identity keys.

Each party's half is 30 digits from an iterated SHA-512 of a version tag, its identity key and
its address (as Signal's numeric fingerprints, §1.6 of the security reference); the halves are
ordered so both devices print the same number. Iteration slows brute-force search for a
colliding key.
"""

from __future__ import annotations

import hashlib

ITERATIONS = 5200


def _half(address: str, identity_key: bytes) -> str:
    digest = b"\x00\x00" + identity_key + address.encode()
    for _ in range(ITERATIONS):
        digest = hashlib.sha512(digest + identity_key).digest()
    chunks = [int.from_bytes(digest[i : i + 5], "big") % 100_000 for i in range(0, 30, 5)]
    return "".join(f"{c:05d}" for c in chunks)


def safety_number(addr_a: str, key_a: bytes, addr_b: str, key_b: bytes) -> str:
    """60 digits in 12 groups of 5, identical whichever side computes it."""
    halves = sorted([_half(addr_a, key_a), _half(addr_b, key_b)])
    digits = "".join(halves)
    return " ".join(digits[i : i + 5] for i in range(0, 60, 5))
