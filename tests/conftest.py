from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LONG = os.environ.get("HAVEN_LONG") == "1"


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list]:  # type: ignore[type-arg]
    """A list the test appends NodeProc objects to; every one is stopped afterwards."""
    started: list = []  # type: ignore[type-arg]
    yield started
    for n in started:
        try:
            n.kill()
        except Exception:  # noqa: BLE001 - best-effort cleanup
            pass
