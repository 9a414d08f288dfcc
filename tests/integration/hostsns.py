"""A node process with a private ``/etc/hosts`` (a mount namespace of its own, ``unshare -m``).

Relayed hosts (``<label>.relay.test``) must resolve for the peer that writes to them. The NAT
world gives every namespace its own hosts file; tests that stay on 127.0.0.1 instead start
only the peer's node in a mount namespace whose ``/etc/hosts`` is a bind-mounted file naming
127.0.0.1 for those hosts. Nothing outside that process tree sees the file. Needs root.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .harness import ROOT, NodeProc, wait_until

HOSTS_WRAPPER = 'mount --bind "$0" /etc/hosts && exec "$@"'


def hosts_file(path: Path, *hosts: str) -> Path:
    """Write a hosts file naming 127.0.0.1 for ``hosts`` (any ``:port`` suffix dropped)."""
    names = " ".join(h.rsplit(":", 1)[0] if ":" in h else h for h in hosts)
    path.write_text(f"127.0.0.1 localhost {names}\n")
    return path


class HostsNode(NodeProc):
    """A :class:`NodeProc` served with ``hosts`` as its ``/etc/hosts``."""

    hosts: Path | None = None

    @classmethod
    def of(cls, node: NodeProc, hosts: Path) -> HostsNode:
        """The same node home and port, served with ``hosts``."""
        out = cls(node.home, node.port, scheme=node.scheme)
        out.hosts = hosts
        return out

    def start(self) -> NodeProc:
        if self.hosts is None:
            raise AssertionError("HostsNode needs a hosts file")
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [
                *("unshare", "-m", "--propagation", "private", "sh", "-c", HOSTS_WRAPPER),
                str(self.hosts),
                *(sys.executable, "-m", "client.cli", "node", "serve", "--home", str(self.home)),
                *self.serve_args,
            ],
            stdout=logf,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
        logf.close()
        wait_until(self._listening, 20, f"node {self.home.name} to listen")
        return self
