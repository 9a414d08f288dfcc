"""Blinded LAN ids and their TXT record (federation.lanid): recognisable only with the node key,
rotating hourly, tolerant of ±1 hour of drift, and a parser that never raises on network input."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from federation.lanid import (
    HOUR_MS,
    LanCandidate,
    blinded_id,
    hour_of,
    ms_until_rotation,
    parse_txt,
    recognise,
    txt_record,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
NOW = 1_700_000_000_000  # 2023-11-14T22:13:20Z, mid-hour
keys32 = st.binary(min_size=32, max_size=32)
times = st.integers(min_value=0, max_value=2**50)


def _as_received(txt: dict[str, str]) -> dict[bytes, bytes | None]:
    """What zeroconf's ServiceInfo.properties yields for a TXT record we announced."""
    return {k.encode(): v.encode() for k, v in txt.items()}


def test_blinded_id_matches_the_specified_construction() -> None:
    # Frozen test vector: changing it breaks recognition between releases (docs/protocol.md).
    assert blinded_id(KEY_A, 472222) == "2e7171c511a7711cac474045b862f368"
    expected = hashlib.blake2b(
        b"haven-lan-v1" + (472222).to_bytes(8, "big"), key=KEY_A, digest_size=16
    ).hexdigest()
    assert blinded_id(KEY_A, 472222) == expected


def test_blinded_id_rejects_keys_that_are_not_32_bytes() -> None:
    with pytest.raises(ValueError):
        blinded_id(b"\x00" * 31, 1)


@given(key=keys32, now=times)
def test_recognised_with_the_right_key_only(key: bytes, now: int) -> None:
    blinded = blinded_id(key, hour_of(now))
    assert recognise(blinded, {"self": key}, now) == "self"
    other = bytes(b ^ 0x01 for b in key)
    assert recognise(blinded, {"other": other}, now) is None
    assert recognise(blinded, {}, now) is None


def test_recognise_picks_the_matching_node_among_many() -> None:
    known = {f"n{i}": bytes([i]) * 32 for i in range(50)}
    assert recognise(blinded_id(known["n37"], hour_of(NOW)), known, NOW) == "n37"


def test_recognise_skips_malformed_known_keys_and_inputs() -> None:
    blinded = blinded_id(KEY_A, hour_of(NOW))
    assert recognise(blinded, {"short": b"x", "a": KEY_A}, NOW) == "a"
    assert recognise(blinded.upper(), {"a": KEY_A}, NOW) is None
    assert recognise(blinded[:-1], {"a": KEY_A}, NOW) is None
    assert recognise("é" * 32, {"a": KEY_A}, NOW) is None
    assert recognise(123, {"a": KEY_A}, NOW) is None  # type: ignore[arg-type]


@given(key=keys32, now=times)
def test_rotates_every_hour(key: bytes, now: int) -> None:
    hour = hour_of(now)
    assert blinded_id(key, hour) != blinded_id(key, hour + 1)
    start = hour * HOUR_MS
    assert hour_of(start) == hour_of(start + HOUR_MS - 1) == hour
    assert hour_of(start + HOUR_MS) == hour + 1


def test_ms_until_rotation_points_at_the_next_hour() -> None:
    assert ms_until_rotation(0) == HOUR_MS
    assert ms_until_rotation(HOUR_MS - 1) == 1
    assert hour_of(NOW + ms_until_rotation(NOW)) == hour_of(NOW) + 1
    assert hour_of(NOW + ms_until_rotation(NOW) - 1) == hour_of(NOW)


@given(key=keys32, now=times, drift=st.integers(min_value=-HOUR_MS, max_value=HOUR_MS))
def test_tolerates_one_hour_of_clock_drift(key: bytes, now: int, drift: int) -> None:
    # The announcer's clock reads now + drift; the browser's reads now.
    blinded = txt_record(key, now + drift, 7000)["id"]
    assert recognise(blinded, {"peer": key}, now) == "peer"


@pytest.mark.parametrize("hours_off", [-3, -2, 2, 3])
def test_more_than_one_hour_of_drift_is_not_recognised(hours_off: int) -> None:
    blinded = blinded_id(KEY_A, hour_of(NOW) + hours_off)
    assert recognise(blinded, {"a": KEY_A}, NOW) is None


def test_recognise_works_at_the_epoch() -> None:
    assert recognise(blinded_id(KEY_A, 0), {"a": KEY_A}, 0) == "a"


def test_txt_record_is_small_and_names_nothing_identifying() -> None:
    txt = txt_record(KEY_A, NOW, 7000)
    assert txt == {"v": "1", "id": blinded_id(KEY_A, hour_of(NOW)), "p": "7000"}
    assert KEY_A.hex() not in "".join(txt.values())


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_txt_record_rejects_bad_ports(port: int) -> None:
    with pytest.raises(ValueError):
        txt_record(KEY_A, NOW, port)


@given(key=keys32, now=times, port=st.integers(1, 65535), version=st.integers(1, 999))
def test_txt_round_trips(key: bytes, now: int, port: int, version: int) -> None:
    parsed = parse_txt(_as_received(txt_record(key, now, port, version)))
    assert parsed == (blinded_id(key, hour_of(now)), port, version)


def test_parse_txt_ignores_unknown_keys_and_valueless_flags() -> None:
    props = _as_received(txt_record(KEY_A, NOW, 7000))
    props[b"future"] = b"something"
    props[b"flag"] = None
    assert parse_txt(props) == (blinded_id(KEY_A, hour_of(NOW)), 7000, 1)


GOOD: dict[bytes, bytes | None] = {b"v": b"1", b"id": b"0" * 32, b"p": b"7000"}


@pytest.mark.parametrize(
    "change",
    [
        {b"id": b"0" * 31},
        {b"id": b"0" * 33},
        {b"id": b"A" * 32},  # uppercase is not canonical
        {b"id": b"g" * 32},
        {b"id": None},
        {b"p": b"0"},
        {b"p": b"65536"},
        {b"p": b"-1"},
        {b"p": b"+80"},
        {b"p": b" 80"},
        {b"p": "\u0661\u0662".encode()},  # Arabic-Indic digits are digits to str, not to bytes
        {b"p": b"123456"},
        {b"v": b"0"},
        {b"v": b""},
        {b"v": b"1000"},
        {b"x" * 17: b"1"},  # oversized key
        {b"junk": b"x" * 65},  # oversized value
        {**{bytes([i]): b"" for i in range(14)}},  # too many entries
    ],
)
def test_parse_txt_rejects_malformed_records(change: dict[bytes, bytes | None]) -> None:
    assert parse_txt({**GOOD, **change}) is None


@pytest.mark.parametrize("props", [None, [], "id=00", b"", {"id": "0" * 32, "p": "1", "v": "1"}])
def test_parse_txt_rejects_non_mappings_and_str_keys(props: Any) -> None:
    assert parse_txt(props) is None


_scalar = st.one_of(
    st.none(), st.binary(max_size=80), st.text(max_size=10), st.integers(), st.floats()
)
_keys = st.one_of(
    st.sampled_from([b"id", b"p", b"v"]), st.binary(max_size=20), st.text(max_size=5), st.integers()
)


@given(st.dictionaries(_keys, _scalar, max_size=20))
def test_parse_txt_never_raises_on_random_dicts(props: dict[Any, Any]) -> None:
    parsed = parse_txt(props)
    if parsed is not None:
        blinded, port, version = parsed
        assert len(blinded) == 32 and 1 <= port <= 65535 and version >= 1


@given(
    blinded=st.text(alphabet="0123456789abcdef", min_size=32, max_size=32),
    port=st.integers(1, 65535),
    version=st.integers(1, 999),
)
def test_parse_txt_accepts_every_well_formed_record(blinded: str, port: int, version: int) -> None:
    props = {b"id": blinded.encode(), b"p": str(port).encode(), b"v": str(version).encode()}
    assert parse_txt(props) == (blinded, port, version)


def test_lan_candidate_is_a_frozen_value() -> None:
    c = LanCandidate(blinded="0" * 32, addresses=("169.254.1.1",), port=7000, version=1)
    assert c == LanCandidate(blinded="0" * 32, addresses=("169.254.1.1",), port=7000, version=1)
    with pytest.raises(AttributeError):
        c.port = 1  # type: ignore[misc]
