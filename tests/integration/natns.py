"""A throwaway NAT world made of Linux network namespaces, for relay tests.

Layout for the random prefix ``hv1a2b3c`` (every name below carries it)::

    "public" segment 203.0.113.0/24: a bridge br0 in netns hv1a2b3csw, ports hv1a2b3cp0..p3
        netns hv1a2b3crouter  pub0 203.0.113.1      (relay.test etc. resolve to the rows below)
        netns hv1a2b3crelay   eth0 203.0.113.10     relay.test, *.relay.test via add_host()
        netns hv1a2b3crelay2  eth0 203.0.113.11     relay2.test
        netns hv1a2b3cpeer    eth0 203.0.113.20     peer.test
    "home" segment 198.51.100.0/24: one veth pair
        netns hv1a2b3crouter  lan0 198.51.100.1
        netns hv1a2b3chome    eth0 198.51.100.2     default route via 198.51.100.1

The router forwards (``net.ipv4.ip_forward`` set in its namespace only) and runs one nftables
table: ``postrouting`` masquerades what leaves through ``pub0``, and the ``forward`` chain has
policy drop with two accepts: ``ct state established,related`` and new connections entering from
``lan0``. So ``home`` reaches every public host (seen as 203.0.113.1) while no public host can open
a connection to ``home``, even though every public host has a route to 198.51.100.0/24 via the
router (as a neighbour on the router's outside link could add). :meth:`NatWorld.forward_policy`
switches the policy to accept and back: with masquerade alone the outside connects in
(tests/integration/test_nat.py measures both).

Names resolve only through per-namespace hosts files ``/etc/netns/<ns>/hosts`` (and an empty
``resolv.conf``, so nothing asks the host's DNS), which ``ip netns exec`` bind-mounts over
``/etc/hosts``. :meth:`NatWorld.add_host` adds a name (e.g. a relayed client's
``<label>.relay.test``) to every namespace's file, rewritten in place so processes already running
see it too.

:class:`NsNode` is a real ``haven node`` (init, serve, CLI commands) inside one namespace,
listening on ``0.0.0.0:PORT`` there (so on the namespace's address and its own 127.0.0.1) with
public URL ``http://<role>.test:PORT``; :class:`NsDevice` is a CLI device in the same namespace,
talking to its node via 127.0.0.1. :meth:`NatWorld.block` / :meth:`NatWorld.unblock` unplug and
replug a host's cable (the host keeps its addresses and routes; processes keep running).

Everything lives in namespaces created here; the host's network is never touched. Closing the world
(also via atexit, and on any failure while building) kills what runs inside, deletes the namespaces
(and with them every veth, the bridge and the nftables table) and removes its ``/etc/netns``
entries. Needs root, ``ip`` (iproute2) and ``nft`` (nftables): when any is missing, construction
raises RuntimeError naming it — NAT tests fail loudly, never skip.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import msgpack

from .harness import ROOT, wait_until

NETNS_ETC = Path("/etc/netns")
PUBLIC_NET = "203.0.113"
HOME_NET = "198.51.100"
#: role -> its address (the router's public side; its home side is :data:`ROUTER_HOME_IP`).
ADDRESSES = {
    "router": f"{PUBLIC_NET}.1",
    "relay": f"{PUBLIC_NET}.10",
    "relay2": f"{PUBLIC_NET}.11",
    "peer": f"{PUBLIC_NET}.20",
    "home": f"{HOME_NET}.2",
}
ROUTER_HOME_IP = f"{HOME_NET}.1"
PUBLIC_ROLES = ("router", "relay", "relay2", "peer")
ROLES = (*PUBLIC_ROLES, "home")
#: names every namespace resolves from the start (more via :meth:`NatWorld.add_host`).
BASE_NAMES = {
    "relay.test": ADDRESSES["relay"],
    "relay2.test": ADDRESSES["relay2"],
    "peer.test": ADDRESSES["peer"],
    "home.test": ADDRESSES["home"],
    "router.test": ADDRESSES["router"],
}
DEFAULT_PORT = 8080
_TABLE = "hvnat"

# A one-shot TCP/HTTP probe run inside a namespace (see NatWorld.connect / NatWorld.get).
_PROBE = """
import json, socket, sys, urllib.error, urllib.request
kind, target, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
try:
    if kind == "tcp":
        host, port = target.rsplit(":", 1)
        socket.create_connection((host, int(port)), timeout=timeout).close()
        out = {"ok": True}
    else:
        with urllib.request.urlopen(target, timeout=timeout) as r:
            out = {"ok": True, "status": r.status, "body": r.read().hex()}
except urllib.error.HTTPError as e:
    out = {"ok": True, "status": e.code, "body": e.read().hex()}
except (OSError, ValueError) as e:
    reason = getattr(e, "reason", e)
    out = {"ok": False, "error": type(reason).__name__}
print(json.dumps(out))
"""


class NatWorld:
    """Router with masquerade + FORWARD drop, a home host behind it, three public hosts.

    A context manager that always cleans up; ``base`` holds node homes, device homes and logs.
    """

    def __init__(self, base: Path) -> None:
        """Create the namespaces, links, addresses, routes, nftables rules and hosts files.

        Raises:
            RuntimeError: naming what is missing (root, iproute2, nftables, a kernel feature).
        """
        for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
            if shutil.which(tool) is None:
                raise RuntimeError(f"NAT tests need the `{tool}` command ({package}) on PATH")
        if os.geteuid() != 0:
            raise RuntimeError(
                "NAT tests need root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces"
            )
        self.base = base
        self.prefix = "hv" + secrets.token_hex(3)  # interface names stay far below IFNAMSIZ (15)
        self.switch = f"{self.prefix}sw"
        self.names: dict[str, str] = dict(BASE_NAMES)
        self._created: list[str] = []
        self._etc: list[Path] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        atexit.register(self.close)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NatWorld:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- naming -----------------------------------------------------------------------------

    def ns(self, role: str) -> str:
        """Namespace name of ``role`` (one of :data:`ROLES`)."""
        if role not in ROLES:
            raise KeyError(f"no role {role!r} in {ROLES}")
        return f"{self.prefix}{role}"

    @staticmethod
    def ip(role: str) -> str:
        """IPv4 address of ``role`` (the router's public side for ``router``)."""
        return ADDRESSES[role]

    def namespaces(self) -> list[str]:
        """Every namespace of this world (the switch included)."""
        return [self.switch, *(self.ns(r) for r in ROLES)]

    def exec_prefix(self, role: str) -> list[str]:
        """Argv prefix that runs a command inside ``role``'s namespace."""
        return ["ip", "netns", "exec", self.ns(role)]

    def add_host(self, name: str, ip: str) -> None:
        """Make ``name`` resolve to ``ip`` in every namespace (hosts files rewritten in place)."""
        self.names[name.lower()] = ip
        self._write_hosts()

    # ---- running things inside --------------------------------------------------------------

    def run(
        self, role: str, *argv: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside ``role``'s namespace (cwd: the repository)."""
        proc = subprocess.run(
            [*self.exec_prefix(role), *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{argv} failed in {role} ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def haven(
        self, role: str, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``haven`` CLI inside ``role``'s namespace."""
        return self.run(
            role, sys.executable, "-m", "client.cli", *args, check=check, timeout=timeout
        )

    def popen(self, role: str, *argv: str, log: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside ``role``'s namespace, output appended to ``log``; killed on
        :meth:`close` if still running."""
        with open(log, "ab") as logf:
            proc = subprocess.Popen(
                [*self.exec_prefix(role), *argv],
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=os.environ | {"PYTHONPATH": str(ROOT)},
            )
        self._procs.append(proc)
        return proc

    def connect(self, role: str, host: str, port: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connection from ``role`` to ``host:port`` opens within ``timeout``."""
        return bool(self._probe(role, "tcp", f"{host}:{port}", timeout)["ok"])

    def get(self, role: str, url: str, timeout: float = 5.0) -> dict[str, Any]:
        """HTTP GET ``url`` from inside ``role``: ``{"ok", "status", "body": bytes}`` or
        ``{"ok": False, "error": exception name}``."""
        out = self._probe(role, "http", url, timeout)
        if "body" in out:
            out["body"] = bytes.fromhex(out["body"])
        return out

    def _probe(self, role: str, kind: str, target: str, timeout: float) -> dict[str, Any]:
        p = self.run(role, sys.executable, "-c", _PROBE, kind, target, str(timeout))
        return json.loads(p.stdout)  # type: ignore[no-any-return]

    # ---- network controls -------------------------------------------------------------------

    def forward_policy(self, policy: str) -> None:
        """Set the router's FORWARD policy: ``"drop"`` (the default: a real NAT) or ``"accept"``
        (masquerade alone)."""
        if policy not in ("drop", "accept"):
            raise ValueError("policy is 'drop' or 'accept'")
        self._nft(f"chain ip {_TABLE} forward {{ policy {policy}; }}")

    @contextlib.contextmanager
    def masquerade_only(self) -> Iterator[None]:
        """``with world.masquerade_only():`` FORWARD policy accept, restored to drop on exit."""
        self.forward_policy("accept")
        try:
            yield
        finally:
            self.forward_policy("drop")

    def ruleset(self) -> str:
        """The router's nftables ruleset (for assertions and failure messages)."""
        return self.run("router", "nft", "list", "ruleset").stdout

    def block(self, role: str) -> None:
        """Unplug ``role``'s cable: it keeps addresses, routes and processes, loses carrier."""
        self._set_link(role, "down")

    def unblock(self, role: str) -> None:
        """Plug ``role``'s cable back in."""
        self._set_link(role, "up")

    def _set_link(self, role: str, state: str) -> None:
        if role == "home":  # the router's end of the home cable; home sees carrier loss
            self._ip("-n", self.ns("router"), "link", "set", "lan0", state, need="veth")
            if state == "up":  # the router dropped its connected route with the link; re-add
                self._ip(
                    "-n", self.ns("router"), "route", "replace", f"{HOME_NET}.0/24",
                    "dev", "lan0", "src", ROUTER_HOME_IP, need="IPv4 routing",
                )  # fmt: skip
        else:
            self._ip("-n", self.switch, "link", "set", self._port(role), state, need="veth")

    # ---- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """Stop what runs inside, delete the namespaces and /etc/netns entries. Idempotent."""
        atexit.unregister(self.close)
        procs, self._procs = self._procs, []
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        created, self._created = self._created, []
        for name in reversed(created):
            _kill_inside(name)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        etc, self._etc = self._etc, []
        for d in etc:
            shutil.rmtree(d, ignore_errors=True)
        if etc:
            with contextlib.suppress(OSError):  # another world may still use it
                NETNS_ETC.rmdir()

    def _build(self) -> None:
        for role in ROLES:  # hosts files first: ip netns exec bind-mounts what exists then
            d = NETNS_ETC / self.ns(role)
            for _ in range(5):  # another world's close() may rmdir /etc/netns meanwhile
                try:
                    d.mkdir(parents=True)
                    break
                except FileNotFoundError:
                    continue
            self._etc.append(d)
            (d / "resolv.conf").write_text("# haven NAT test world: names come from hosts\n")
        self._write_hosts()

        self._add_ns(self.switch)
        sw = ("-n", self.switch)
        self._ip(*sw, "link", "set", "lo", "up", need="network namespaces")
        self._ip(
            *sw, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0",
            need="the bridge kernel module",
        )  # fmt: skip
        self._ip(*sw, "link", "set", "br0", "up", need="the bridge kernel module")
        for role in ROLES:
            self._add_ns(self.ns(role))
            self._ip("-n", self.ns(role), "link", "set", "lo", "up", need="network namespaces")
        for role in PUBLIC_ROLES:
            host = self.ns(role)
            iface = "pub0" if role == "router" else "eth0"
            self._ip(
                *sw, "link", "add", self._port(role), "type", "veth",
                "peer", "name", iface, "netns", host, need="the veth kernel module",
            )  # fmt: skip
            self._ip(*sw, "link", "set", self._port(role), "master", "br0", "up", need="bridge")
            hn = ("-n", host)
            self._ip(*hn, "addr", "add", f"{self.ip(role)}/24", "dev", iface, need="IPv4")
            self._ip(*hn, "link", "set", iface, "up", need="veth")
            if role != "router":  # reachable only through the router, which drops it
                self._ip(
                    *hn, "route", "add", f"{HOME_NET}.0/24", "via", self.ip("router"),
                    need="IPv4 routing",
                )  # fmt: skip
        router, home = ("-n", self.ns("router")), ("-n", self.ns("home"))
        self._ip(
            *router, "link", "add", "lan0", "type", "veth",
            "peer", "name", "eth0", "netns", self.ns("home"), need="the veth kernel module",
        )  # fmt: skip
        self._ip(*router, "addr", "add", f"{ROUTER_HOME_IP}/24", "dev", "lan0", need="IPv4")
        self._ip(*router, "link", "set", "lan0", "up", need="veth")
        self._ip(*home, "addr", "add", f"{self.ip('home')}/24", "dev", "eth0", need="IPv4")
        self._ip(*home, "link", "set", "eth0", "up", need="veth")
        self._ip(*home, "route", "add", "default", "via", ROUTER_HOME_IP, need="IPv4 routing")
        fwd = self.run("router", "sysctl", "-qw", "net.ipv4.ip_forward=1", check=False)
        if fwd.returncode != 0:
            raise RuntimeError(f"NAT tests need IPv4 forwarding: {fwd.stderr.strip()}")
        self._nft(
            f"""
            table ip {_TABLE} {{
                chain forward {{
                    type filter hook forward priority filter; policy drop;
                    ct state established,related accept
                    iifname "lan0" oifname "pub0" ct state new accept
                }}
                chain postrouting {{
                    type nat hook postrouting priority srcnat; policy accept;
                    oifname "pub0" masquerade
                }}
            }}
            """
        )

    def _write_hosts(self) -> None:
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost"]
        lines += [f"{ip}\t{name}" for name, ip in sorted(self.names.items())]
        text = "\n".join(lines) + "\n"
        for d in self._etc:
            with open(d / "hosts", "w") as f:  # in place: running processes' bind mounts see it
                f.write(text)

    def _add_ns(self, name: str) -> None:
        self._ip("netns", "add", name, need="network namespaces (CAP_SYS_ADMIN, /run/netns)")
        self._created.append(name)

    def _port(self, role: str) -> str:
        return f"{self.prefix}p{PUBLIC_ROLES.index(role)}"

    def _nft(self, script: str) -> None:
        proc = subprocess.run(
            [*self.exec_prefix("router"), "nft", "-f", "-"],
            input=script,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"NAT tests need nftables with NAT and conntrack: `nft` failed: "
                f"{proc.stderr.strip()}"
            )

    @staticmethod
    def _ip(*args: str, need: str) -> None:
        proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(
                f"NAT tests need {need}: `ip {' '.join(args)}` failed: {proc.stderr.strip()}"
            )


def _kill_inside(name: str) -> None:
    """SIGKILL processes left in a namespace we created (ours by construction), by pid."""
    proc = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    )
    for pid in proc.stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def nat_world(base: Path) -> Iterator[NatWorld]:
    """``with nat_world(tmp) as world:`` — a :class:`NatWorld` removed on exit. For a module
    fixture: ``with nat_world(tmp_path_factory.mktemp("nat")) as w: yield w``."""
    world = NatWorld(base)
    try:
        yield world
    finally:
        world.close()


@dataclass
class NsNode:
    """A node home plus (while running) its ``haven node serve`` inside one namespace."""

    world: NatWorld
    role: str
    home: Path
    port: int
    public_url: str
    proc: subprocess.Popen[bytes] | None = None
    serve_args: tuple[str, ...] = ()
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.home.parent / f"{self.home.name}.log"

    @classmethod
    def create(
        cls,
        world: NatWorld,
        role: str,
        name: str,
        *extra: str,
        port: int = DEFAULT_PORT,
        public_url: str | None = None,
    ) -> NsNode:
        """``haven node init`` in ``role``'s namespace: home ``world.base/name``, listening on
        ``0.0.0.0:port``, devices via ``http://127.0.0.1:port``, public URL
        ``http://<role>.test:port`` unless given (``""``: none passed, e.g. with
        ``--via-relay``, which sets it)."""
        home = world.base / name
        url = f"http://{role}.test:{port}" if public_url is None else public_url
        args = ["node", "init", "--home", str(home), "--listen", f"0.0.0.0:{port}"]
        args += ["--client-url", f"http://127.0.0.1:{port}"]
        if url:
            args += ["--public-url", url]
        world.haven(role, *args, *extra)
        return cls(world, role, home, port, url)

    @property
    def local_url(self) -> str:
        """The node's URL from inside its own namespace."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The node's URL on its namespace's address (reachable as far as the network allows)."""
        return f"http://{self.world.ip(self.role)}:{self.port}"

    def start(self) -> NsNode:
        """``haven node serve`` in the namespace; returns once it says it is listening."""
        size = self.log.stat().st_size if self.log.exists() else 0
        self.proc = self.world.popen(
            self.role,
            *(sys.executable, "-m", "client.cli", "node", "serve", "--home", str(self.home)),
            *self.serve_args,
            log=self.log,
        )
        wait_until(lambda: self._listening(size), 60, f"node {self.home.name} to listen")
        return self

    def _listening(self, size: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node {self.home.name} exited:\n{self.log.read_text()}")
        with open(self.log, "rb") as f:
            f.seek(size)
            return b" listening on " in f.read()

    def running(self) -> NsNode:
        """This node, started again if it is not running."""
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        return self

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=20)
        self.proc = None

    def haven(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        """``haven <args>`` in this node's namespace; its stdout."""
        return self.world.haven(self.role, *args, check=check, timeout=timeout).stdout

    def node(self, cmd: str, *args: str, check: bool = True) -> str:
        """``haven node <cmd> --home HOME <args>`` in this node's namespace; its stdout."""
        return self.haven("node", cmd, "--home", str(self.home), *args, check=check)

    def invite(self, name: str) -> str:
        """A device invite for a new account ``name``."""
        return self.node("invite", name).strip().splitlines()[-1]

    def status(self) -> dict[str, Any]:
        """``haven node status --json``."""
        return json.loads(self.node("status", "--json"))  # type: ignore[no-any-return]

    def peers(self) -> dict[str, dict[str, Any]]:
        """``haven node peers --json`` keyed by host."""
        return {p["host"]: p for p in json.loads(self.node("peers", "--json"))}

    def stats(self) -> dict[str, Any]:
        """Counters of the running node (``GET /haven/v1/stats`` from inside the namespace)."""
        got = self.world.get(self.role, self.local_url + "/haven/v1/stats", timeout=10)
        if got.get("status") != 200:
            raise AssertionError(f"stats of {self.home.name}: {got}")
        return msgpack.unpackb(got["body"])  # type: ignore[no-any-return]

    def join(self, name: str) -> NsDevice:
        """A new account ``name`` on this node and its first device (in the same namespace)."""
        home = self.world.base / f"dev-{self.home.name}-{name}"
        out = self.haven("join", self.invite(name), "--home", str(home))
        return NsDevice(self.world, self.role, home, out.strip().splitlines()[-1])


@dataclass
class NsDevice:
    """A CLI device home inside a namespace (it reaches its node via 127.0.0.1)."""

    world: NatWorld
    role: str
    home: Path
    address: str

    def haven(self, cmd: str, *args: str, check: bool = True, timeout: float = 60) -> str:
        """``haven <cmd> --home HOME <args>`` in the device's namespace; its stdout."""
        return self.world.haven(
            self.role, cmd, "--home", str(self.home), *args, check=check, timeout=timeout
        ).stdout

    def send(self, to: str, text: str) -> None:
        """``haven send TO TEXT``."""
        self.haven("send", to, text)

    def recv(self, wait: float = 1.0) -> list[dict[str, Any]]:
        """``haven recv --wait W --json``: the messages received."""
        out = self.haven("recv", "--wait", str(wait), "--json")
        return [json.loads(line) for line in out.splitlines() if line.strip()]
