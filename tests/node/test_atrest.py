"""Epoch keys at rest (node/atrest.py): fixed slots overwritten in place, keyed index hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.errors import StorageError
from node.atrest import SLOTS, EpochKeys

T0 = 1_700_000_000_000
EPOCH = 600_000


def test_key_file_has_fixed_size_and_destroy_zeroes_the_slot(tmp_path: Path) -> None:
    path = tmp_path / "epochs.key"
    keys = EpochKeys(str(path), EPOCH)
    assert path.read_bytes() == bytes(40 * SLOTS)
    kid = keys.current(T0)
    raw = path.read_bytes()
    assert len(raw) == 40 * SLOTS and any(raw)
    key = raw[kid * 40 + 8 : kid * 40 + 40]
    sealed = keys.seal(kid, b"row")
    keys.destroy(kid)
    assert path.read_bytes() == bytes(40 * SLOTS)  # same file, same size, the key is gone
    assert key not in path.read_bytes()
    with pytest.raises(StorageError):
        keys.open(kid, sealed)
    assert keys.try_open(sealed) is None


def test_current_key_lasts_one_epoch(tmp_path: Path) -> None:
    keys = EpochKeys(str(tmp_path / "e.key"), EPOCH)
    first = keys.current(T0)
    assert keys.current(T0 + 1) == first
    assert keys.epochs == [keys.epoch_of(T0)]
    nxt = keys.current(T0 + EPOCH)  # the epoch passed: a new key (the old is re-sealed away)
    assert nxt != first and keys.ids == [first, nxt]
    assert keys.current(T0 + EPOCH - 1) == nxt  # clock a little behind: keep the newest
    far = keys.current(T0 - 10 * EPOCH)  # far behind: a key of that epoch replaces it
    assert far not in (first, nxt) and keys.ids[-1] == far


def test_keys_survive_a_reload_in_creation_order(tmp_path: Path) -> None:
    path = str(tmp_path / "e.key")
    keys = EpochKeys(path, EPOCH)
    a = keys.current(T0)
    b = keys.current(T0 + EPOCH)
    sa, sb = keys.seal(a, b"a"), keys.seal(b, b"b")
    again = EpochKeys(path, EPOCH)
    assert again.ids == [a, b] and again.newest() == b
    assert again.try_open(sa) == (a, b"a") and again.try_open(sb) == (b, b"b")
    assert again.index(a, b"env-mb", b"m") == keys.index(a, b"env-mb", b"m")


def test_index_hashes_depend_on_key_and_purpose(tmp_path: Path) -> None:
    keys = EpochKeys(str(tmp_path / "e.key"), EPOCH)
    a, b = keys.current(T0), keys.fresh(T0)
    value = b"m" * 16
    hashes = {
        keys.index(a, b"env-mb", value),
        keys.index(b, b"env-mb", value),
        keys.index(a, b"obx-mb", value),
    }
    assert len(hashes) == 3 and all(len(h) == 16 for h in hashes)
    assert value not in b"".join(hashes)


def test_slots_are_bounded(tmp_path: Path) -> None:
    keys = EpochKeys(str(tmp_path / "e.key"), EPOCH)
    for _ in range(SLOTS):
        keys.fresh(T0)
    with pytest.raises(StorageError):
        keys.fresh(T0)
    keys.destroy_many(keys.ids[:-1])
    assert len(keys.ids) == 1
    keys.fresh(T0)  # a slot is free again


def test_reload_sees_keys_another_process_made_and_destroyed(tmp_path: Path) -> None:
    path = str(tmp_path / "epochs.key")
    leader, follower = EpochKeys(path, EPOCH), EpochKeys(path, EPOCH)  # two processes
    assert not follower.reload()  # nothing changed: no work
    first = leader.current(T0)
    sealed = leader.seal(first, b"row")
    assert follower.try_open(sealed) is None  # not read yet
    assert follower.reload() and follower.open(first, sealed) == b"row"
    second = leader.fresh(T0 + EPOCH)
    assert follower.reload() and follower.newest() == second  # a new key is the newest
    generation = follower.generation
    leader.destroy(first)
    assert follower.reload() and follower.generation > generation
    assert follower.ids == [second] and follower.try_open(sealed) is None
    assert follower.index(second, b"p", b"v") == leader.index(second, b"p", b"v")
