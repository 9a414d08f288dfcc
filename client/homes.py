"""Default homes: where a device or a node lives when ``--home`` is not given.

``HAVEN_HOME`` names the *parent* folder (as ``scripts/run`` treats it): the device home is
``$HAVEN_HOME/device`` and the node home ``$HAVEN_HOME/node``. Without it, both live under
``~/.haven``. An explicit ``--home`` always wins.
"""

from __future__ import annotations

import os

DEVICE_DIR = "device"
NODE_DIR = "node"


def base_dir() -> str:
    """The parent folder of the default homes: ``$HAVEN_HOME``, else ``~/.haven``."""
    env = os.environ.get("HAVEN_HOME")
    return os.path.expanduser(env) if env else os.path.join(os.path.expanduser("~"), ".haven")


def device_home(arg: str | None) -> str:
    """The device home: ``--home`` if given, else ``$HAVEN_HOME/device`` or ``~/.haven/device``."""
    return arg if arg else os.path.join(base_dir(), DEVICE_DIR)


def node_home(arg: str | None) -> str:
    """The node home: ``--home`` if given, else ``$HAVEN_HOME/node`` or ``~/.haven/node``."""
    return arg if arg else os.path.join(base_dir(), NODE_DIR)
