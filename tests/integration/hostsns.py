"""A node process with a private ``/etc/hosts`` (a mount namespace of its own, ``unshare -m``).

Relayed hosts (``<label>.relay.test``) must resolve for the peer that writes to them. The NAT
world gives every namespace its own hosts file; tests that stay on 127.0.0.1 instead start
only the peer's node in a mount namespace whose ``/etc/hosts`` is a bind-mounted file naming
127.0.0.1 for those hosts. Nothing outside that process tree sees the file. Needs root.
"""

from __future__ import annotations

from pathlib import Path

from .harness import NodeProc

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

    def launcher(self) -> list[str]:
        if self.hosts is None:
            raise AssertionError("HostsNode needs a hosts file")
        unshare = ["unshare", "-m", "--propagation", "private", "sh", "-c", HOSTS_WRAPPER]
        return [*unshare, str(self.hosts)]
