"""Bodies of ``/federation/multi`` and ``/federation/keys_multi`` (federation/fanout.py): round
trips, stable codes for bad input, and random bytes raising only our typed errors."""

from __future__ import annotations

import os

import nacl.public
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.errors import RemoteProtocolError
from federation.fanout import KeysMultiAnswer, KeysMultiQuery, MultiBatch
from federation.multi import INNER_MEGOLM, MAX_RECIPIENTS, GroupInner, open_copy, seal_multi
from federation.wire import packb


def test_multi_batch_composes_each_recipients_copy() -> None:
    keys = [nacl.public.PrivateKey.generate() for _ in range(3)]
    mailboxes = [os.urandom(16) for _ in keys]
    inner = GroupInner(INNER_MEGOLM, "a@x", "dev", b"hi")
    sealed = seal_multi(inner, [bytes(k.public_key) for k in keys])
    ids = [os.urandom(16) for _ in keys]
    rows = tuple(zip(ids, mailboxes, sealed.headers, strict=True))
    envs = MultiBatch.decode(
        MultiBatch(sealed.eph, 10**13, sealed.gbody, rows).encode()
    ).envelopes()
    assert [(e.id, e.to, e.expires) for e in envs] == [(i, m, 10**13) for i, m, _ in rows]
    for k, (env, key) in enumerate(zip(envs, keys, strict=True)):
        assert env.body == sealed.copy_for(k)
        assert open_copy(bytes(key), bytes(key.public_key), env.body) == inner


def _multi(recips: list[tuple[bytes, bytes, bytes]]) -> bytes:
    return packb({"eph": bytes(32), "expires": 1, "body": b"x", "recips": recips})


@pytest.mark.parametrize(
    ("recips", "code"),
    [
        ([], "malformed"),  # nobody
        ([(b"i" * 16, b"m" * 16, bytes(47))], "malformed"),  # header one byte short
        ([(b"i" * 16, b"m" * 16, bytes(48)), (b"i" * 16, b"n" * 16, bytes(48))], "malformed"),
        ([(b"i" * 16, b"m" * 16, bytes(48)), (b"j" * 16, b"m" * 16, bytes(48))], "malformed"),
        (
            [(os.urandom(16), os.urandom(16), bytes(48)) for _ in range(MAX_RECIPIENTS + 1)],
            "too_large",
        ),
    ],
)
def test_bad_multi_batches_have_stable_codes(
    recips: list[tuple[bytes, bytes, bytes]], code: str
) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        MultiBatch.decode(_multi(recips))
    assert err.value.code == code


def test_keys_multi_round_trip_and_bounds() -> None:
    q = KeysMultiQuery(("a", "b"), True)
    assert KeysMultiQuery.decode(q.encode()) == q
    ans = KeysMultiAnswer((("a", None, {}, "not_found"),))
    assert KeysMultiAnswer.decode(ans.encode()) == ans
    with pytest.raises(RemoteProtocolError) as err:
        KeysMultiQuery.decode(packb({"names": ["n"] * 1001, "claim": False}))
    assert err.value.code == "malformed"
    with pytest.raises(RemoteProtocolError):
        KeysMultiQuery.decode(packb({"names": ["x" * 65], "claim": False}))


@settings(max_examples=200)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_typed_errors(data: bytes) -> None:
    for decode in (MultiBatch.decode, KeysMultiQuery.decode, KeysMultiAnswer.decode):
        try:
            decode(data)
        except RemoteProtocolError:
            pass
