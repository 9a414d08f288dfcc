"""Nodes shared by the tests of a module (``node_a``, ``node_b``): one ``node init`` and one
process start per module instead of per test. Tests use accounts of their own on them
(``devworld.new_device`` numbers the names); a test that stops a node starts it again, and if
it failed before doing so the next test gets it started."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.forkcli import create_node
from tests.integration.harness import NodeProc


@pytest.fixture(scope="module")
def _module_node_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    node = create_node(tmp_path_factory.mktemp("node"), "A").start()
    yield node
    node.kill()


@pytest.fixture(scope="module")
def _module_node_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProc]:
    node = create_node(tmp_path_factory.mktemp("node"), "B").start()
    yield node
    node.kill()


@pytest.fixture
def node_a(_module_node_a: NodeProc) -> NodeProc:
    """The module's node A, running."""
    return _module_node_a.running()


@pytest.fixture
def node_b(_module_node_b: NodeProc) -> NodeProc:
    """The module's node B, running."""
    return _module_node_b.running()
