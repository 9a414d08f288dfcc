"""The multi-recipient group copy (federation/multi.py, docs/protocol.md §11.3)."""

from __future__ import annotations

import nacl.public
import pytest

from federation import multi
from federation.errors import MalformedEnvelope, TooLarge
from federation.sealing import BUCKETS, SealedContent, seal, unseal


def _keys(n: int) -> list[nacl.public.PrivateKey]:
    return [nacl.public.PrivateKey.generate() for _ in range(n)]


def test_each_recipient_opens_only_its_own_copy_and_sizes_are_buckets() -> None:
    keys = _keys(3)
    inner = multi.GroupInner(multi.INNER_MEGOLM, "a@h", "dev", b"m" * 500)
    sealed = multi.seal_multi(inner, [bytes(k.public_key) for k in keys])
    assert len(sealed.headers) == 3
    assert all(len(h) == multi.HEADER_LEN for h in sealed.headers)
    for i, k in enumerate(keys):
        copy = sealed.copy_for(i)
        assert len(copy) in BUCKETS  # as long as a sealed-sender body: sizes tell nothing
        assert multi.open_copy(bytes(k), bytes(k.public_key), copy) == inner
        other = keys[(i + 1) % 3]
        with pytest.raises(MalformedEnvelope):
            multi.open_copy(bytes(other), bytes(other.public_key), copy)


def test_tampered_copies_and_sealed_boxes_are_refused() -> None:
    (k,) = _keys(1)
    sk, pk = bytes(k), bytes(k.public_key)
    sealed = multi.seal_multi(multi.GroupInner(multi.INNER_STATE, "a@h", "d", b"s"), [pk])
    copy = bytearray(sealed.copy_for(0))
    for pos in (0, 40, 100, len(copy) - 1):  # eph, header, body nonce, body MAC
        bad = bytearray(copy)
        bad[pos] ^= 1
        with pytest.raises(MalformedEnvelope):
            multi.open_copy(sk, pk, bytes(bad))
    with pytest.raises(MalformedEnvelope):
        multi.open_copy(sk, pk, bytes(copy[:100]))
    # a 1:1 sealed-sender body is not a group copy, and a group copy is not a sealed box
    box = seal(pk, SealedContent("a@h", "d", 1, b"olm"))
    with pytest.raises(MalformedEnvelope):
        multi.open_copy(sk, pk, box)
    with pytest.raises(MalformedEnvelope):
        unseal(sk, bytes(copy))


def test_bounds() -> None:
    pk = bytes(_keys(1)[0].public_key)
    with pytest.raises(TooLarge):
        multi.seal_multi(multi.GroupInner(1, "a@h", "d", b"x"), [pk] * (multi.MAX_RECIPIENTS + 1))
    with pytest.raises(TooLarge):
        multi.seal_multi(multi.GroupInner(1, "a@h", "d", b"x" * multi.MAX_GBODY), [pk])
    with pytest.raises(MalformedEnvelope):
        multi.compose(b"e" * 31, b"h" * multi.HEADER_LEN, b"body")
    for raw in (b"\x90", b"\x95\x02\x01\xa1a\xa1d\xc4\x00", b"\x95\x01\x01\x01\xa1d\xc4\x00"):
        with pytest.raises(MalformedEnvelope):
            multi.GroupInner.decode(raw)
