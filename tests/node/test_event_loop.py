"""The node's event loop choice: asyncio's own by default, uvloop only on request."""

from __future__ import annotations

import asyncio

import pytest

from node.cli import event_loop_factory


def test_asyncio_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HAVEN_EVENT_LOOP", raising=False)
    assert event_loop_factory() is None
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        assert runner.run(asyncio.sleep(0, "ran")) == "ran"


def test_uvloop_on_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAVEN_EVENT_LOOP", "uvloop")
    factory = event_loop_factory()
    try:
        import uvloop
    except ImportError:
        assert factory is None
    else:
        assert factory is uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(asyncio.sleep(0, "ran")) == "ran"
