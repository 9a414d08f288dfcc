"""A throwaway Ethernet LAN made of Linux network namespaces, for LAN-discovery tests.

Layout for ``NetnsLan(3)`` with the random prefix ``hv1a2b3c``::

    netns hv1a2b3csw  (the "switch"):  br0 <- hv1a2b3cp0, hv1a2b3cp1, hv1a2b3cp2
    netns hv1a2b3c0:  lo, eth0 169.254.42.1/16   (eth0 is the peer of hv1a2b3cp0)
    netns hv1a2b3c1:  lo, eth0 169.254.42.2/16
    netns hv1a2b3c2:  lo, eth0 169.254.42.3/16

Everything, the bridge included, lives in namespaces created here: the host's own network is never
touched, and deleting the namespaces removes every veth and the bridge. Hosts get link-local
addresses only and no default route, as on an offline LAN. The bridge forwards at once (STP off) and
floods multicast (snooping off), so mDNS works from the first packet.

:meth:`NetnsLan.link_down` unplugs a host's cable: it downs the *switch* port, so the host keeps its
address and routes and only loses carrier, and :meth:`NetnsLan.link_up` restores it exactly.

Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN) and the ``ip`` command (iproute2) with veth and bridge
support. When any of that is missing, construction raises RuntimeError naming it: LAN tests must
fail loudly, never skip.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from types import TracebackType

HOST_IFACE = "eth0"
_SUBNET = "169.254.42"  # 169.254.0.0/24 and 169.254.255.0/24 are reserved (RFC 3927 §2.1)


class NetnsLan:
    """N hosts on one bridged link-local LAN; a context manager that always cleans up."""

    def __init__(self, n: int = 3) -> None:
        """Create the switch namespace and ``n`` host namespaces.

        Raises:
            RuntimeError: naming the missing capability (root, iproute2, netns, veth, bridge).
            ValueError: if ``n`` is not 1..200.
        """
        if not 1 <= n <= 200:
            raise ValueError("NetnsLan supports 1..200 hosts")
        if shutil.which("ip") is None:
            raise RuntimeError("LAN tests need the `ip` command (iproute2) on PATH")
        if os.geteuid() != 0:
            raise RuntimeError(
                "LAN tests need root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces"
            )
        self.n = n
        self.prefix = "hv" + secrets.token_hex(3)  # interface names stay far below IFNAMSIZ (15)
        self.switch = f"{self.prefix}sw"
        self._created: list[str] = []
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NetnsLan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def ns_name(self, i: int) -> str:
        """Name of host ``i``'s namespace."""
        self._check(i)
        return f"{self.prefix}{i}"

    def host_ip(self, i: int) -> str:
        """Host ``i``'s IPv4 address (without prefix length)."""
        self._check(i)
        return f"{_SUBNET}.{i + 1}"

    def exec_prefix(self, i: int) -> list[str]:
        """Argv prefix that runs a command inside host ``i``'s namespace."""
        return ["ip", "netns", "exec", self.ns_name(i)]

    def link_down(self, i: int) -> None:
        """Unplug host ``i``: its switch port goes down, the host sees carrier loss."""
        self._check(i)
        self._ip("-n", self.switch, "link", "set", self._port(i), "down", need="veth")

    def link_up(self, i: int) -> None:
        """Plug host ``i`` back in."""
        self._check(i)
        self._ip("-n", self.switch, "link", "set", self._port(i), "up", need="veth")

    def close(self) -> None:
        """Kill what still runs inside our namespaces, then delete them. Idempotent."""
        atexit.unregister(self.close)
        created, self._created = self._created, []
        for name in reversed(created):
            self._kill_inside(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)

    def _build(self) -> None:
        self._add_ns(self.switch)
        sw = ("-n", self.switch)
        self._ip(*sw, "link", "set", "lo", "up", need="network namespaces")
        self._ip(
            *sw, "link", "add", "br0", "type", "bridge",
            "stp_state", "0", "forward_delay", "0", "mcast_snooping", "0",
            need="the bridge kernel module",
        )  # fmt: skip
        self._ip(*sw, "link", "set", "br0", "up", need="the bridge kernel module")
        for i in range(self.n):
            host = self.ns_name(i)
            self._add_ns(host)
            self._ip(
                *sw, "link", "add", self._port(i), "type", "veth",
                "peer", "name", HOST_IFACE, "netns", host,
                need="the veth kernel module",
            )  # fmt: skip
            self._ip(*sw, "link", "set", self._port(i), "master", "br0", "up", need="bridge")
            hn = ("-n", host)
            self._ip(*hn, "link", "set", "lo", "up", need="network namespaces")
            addr = f"{self.host_ip(i)}/16"
            self._ip(*hn, "addr", "add", addr, "dev", HOST_IFACE, need="IPv4 addressing")
            self._ip(*hn, "link", "set", HOST_IFACE, "up", need="veth")
            # Zeroconf sets IP_MULTICAST_IF, so it needs no route; other multicast users might.
            # Carrier loss (link_down) keeps this route, so link_up needs nothing more.
            self._ip(
                *hn, "route", "add", "224.0.0.0/4", "dev", HOST_IFACE, need="multicast routing"
            )

    def _add_ns(self, name: str) -> None:
        self._ip("netns", "add", name, need="network namespaces (CAP_SYS_ADMIN, /run/netns)")
        self._created.append(name)

    def _port(self, i: int) -> str:
        return f"{self.prefix}p{i}"

    def _check(self, i: int) -> None:
        if not 0 <= i < self.n:
            raise IndexError(f"host {i} not in 0..{self.n - 1}")

    @staticmethod
    def _ip(*args: str, need: str) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"LAN tests need {need}: `ip {' '.join(args)}` failed: {proc.stderr.strip()}"
            )

    @staticmethod
    def _kill_inside(name: str) -> None:
        """SIGKILL processes left in a namespace we created (ours by construction), by pid."""
        proc = subprocess.run(
            ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
        )
        for pid in proc.stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def netns_lan(n: int = 3) -> Iterator[NetnsLan]:
    """``with netns_lan(3) as lan:`` — a :class:`NetnsLan` that is removed on exit."""
    lan = NetnsLan(n)
    try:
        yield lan
    finally:
        lan.close()
