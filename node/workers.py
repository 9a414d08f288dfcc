"""``haven node serve --workers N``: several node processes for one node identity on one host.

The supervisor (the ``serve`` process) makes the *bus key* (32 random bytes, memory only),
prepares the shared tables (node/pg_bus.py) and starts N workers: ``python -m node.workers``,
each a full :class:`node.app.Node` on the same home, config, node key and PostgreSQL store.
Each worker gets the bus key and the start time through a socket pair inherited as a file
descriptor (never argv, environment or disk); the same socket tells the supervisor when the
worker serves, and tells the worker when the supervisor is gone (end of file: it exits at
once, as if killed, and the kernel's parent-death signal backs that up).

All workers listen on the configured address with ``SO_REUSEPORT``: the kernel spreads new
connections over them, so one public URL serves them all. ``--worker-ports BASE`` also makes
worker *i* listen on ``127.0.0.1:BASE+i``, for a reverse proxy that balances over them
(docs/operations.md "Several workers"). Worker 0 is the leader: it alone runs the sweeper
(TTL expiry, epoch rotation, key destruction) and the mDNS announcement.

A worker that dies (``kill -9`` included) is started again after a short backoff (doubling
from :data:`RESTART_MIN_S` to :data:`RESTART_MAX_S`, reset once it ran
:data:`HEALTHY_AFTER_S`); what it had acknowledged is in PostgreSQL, its advisory locks die
with its connections, and a request created before the supervisor's start is refused by every
worker, so a restarted one accepts no replay. SIGTERM and SIGINT stop the followers first,
then the leader (whose clean stop re-seals what is pending and destroys the other keys).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from federation.clock import Clock, SystemClock
from federation.errors import HavenError, LocalProtocolError

from . import admin, logs
from .atrest import EpochKeys
from .config import EPOCH_KEYS_NAME, NodeConfig

if TYPE_CHECKING:
    from .app import Node

log = logging.getLogger("haven.workers")

RESTART_MIN_S = 0.2
RESTART_MAX_S = 10.0
HEALTHY_AFTER_S = 30.0
STOP_TIMEOUT_S = 20.0
START_TIMEOUT_S = 60.0
_HELLO = struct.Struct(">32sQ")  # bus key, start (ms)
READY = b"R"
PR_SET_PDEATHSIG = 1


def store_dsn(config: NodeConfig) -> str:
    """The PostgreSQL DSN the node's store uses, or "" for the embedded SQLite store."""
    for name in ("store", "store_url", "store_dsn"):
        value = getattr(config, name, "")
        if isinstance(value, str) and value.startswith(("postgresql://", "postgres://")):
            return value
    return ""


def check_workers(config: NodeConfig, workers: int, worker_ports: int = 0) -> None:
    """Refuse ``--workers`` where it cannot work, with one line and a stable code."""
    if workers < 1:
        raise LocalProtocolError("--workers must be at least 1", code="bad_argument")
    if not 0 <= worker_ports <= 65535 - workers:
        raise LocalProtocolError("--worker-ports must be a port number", code="bad_argument")
    if (workers > 1 or worker_ports) and not store_dsn(config):
        raise LocalProtocolError("--workers needs the PostgreSQL store", code="bad_argument")


# ---- supervisor -------------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    sock: socket.socket | None = None
    started: float = 0.0
    backoff: float = RESTART_MIN_S
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None  # waits for the worker's "ready" byte


class Supervisor:
    """Starts, restarts and stops the workers of one node."""

    def __init__(
        self,
        home: str,
        count: int,
        *,
        worker_ports: int = 0,
        lan: bool | None = None,
        interfaces: str = "",
        clock: Clock | None = None,
        admin_listen: str = "",
        log_json: bool = False,
    ) -> None:
        self.home = home
        self.admin_listen = admin_listen  # "" = no admin listener (node/admin.py)
        self.log_json = log_json
        self.count = count
        self.worker_ports = worker_ports
        self.lan = lan
        self.interfaces = interfaces
        self.clock = clock or SystemClock()
        self.key = os.urandom(32)
        self.started_ms = 0
        self.workers = [_Worker(i) for i in range(count)]
        self._stopping = False

    def _argv(self, w: _Worker, fd: int) -> list[str]:
        argv = [sys.executable, "-m", "node.workers", "--home", self.home]
        argv += ["--index", str(w.index), "--count", str(self.count), "--fd", str(fd)]
        if self.worker_ports:
            argv += ["--worker-port", str(self.worker_ports + w.index)]
        if self.lan is not None:
            argv.append("--lan" if self.lan else "--no-lan")
        if self.interfaces:
            argv += ["--interface", self.interfaces]
        offset = getattr(self.clock, "offset_ms", 0)
        if offset:
            argv += ["--clock-offset-ms", str(offset)]
        if self.log_json:
            argv.append("--log-json")
        return argv

    async def _spawn(self, w: _Worker) -> None:
        mine, theirs = socket.socketpair()
        try:
            w.proc = await asyncio.create_subprocess_exec(
                *self._argv(w, theirs.fileno()), pass_fds=(theirs.fileno(),)
            )
        finally:
            theirs.close()
        mine.sendall(_HELLO.pack(self.key, self.started_ms))
        mine.setblocking(False)
        w.sock, w.started = mine, asyncio.get_running_loop().time()
        w.ready.clear()
        if w.reader is not None:
            w.reader.cancel()
        w.reader = asyncio.get_running_loop().create_task(self._await_ready(w, mine))

    async def _await_ready(self, w: _Worker, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            if await loop.sock_recv(sock, 1) == READY and w.sock is sock:
                w.ready.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until ``stop`` is set; print the start-up line once every worker serves."""
        from . import pg_bus

        config = _load_config(self.home)
        dsn = store_dsn(config)
        # The shared epoch key file exists before any worker opens it: workers starting at
        # once on a fresh home would otherwise race to create it (and read it half-written).
        EpochKeys(os.path.join(self.home, EPOCH_KEYS_NAME), config.epoch_ms)
        lease, pg_started = await pg_bus.prepare(dsn)
        self.started_ms = max(self.clock.now_ms(), pg_started)
        server: admin.AdminServer | None = None
        try:
            if self.admin_listen:  # one listener, the supervisor's, sums every worker's values
                admin.setup_multiprocess(self.home)
                server = await admin.start_supervisor_admin(
                    self.home, self.admin_listen, self._readiness
                )
            for w in self.workers:
                await self._spawn(w)
            await self._wait_first_ready(stop)
            if stop.is_set():
                return
            config = _load_config(self.home)
            from .app import load_node_key

            node_id = load_node_key(self.home, config).node_id
            print(
                f"haven node {node_id} listening on {config.listen_host}:{config.listen_port}"
                f" as {config.public_url} ({self.count} workers)"
                + (f"; metrics on {server.url}/metrics" if server is not None else ""),
                flush=True,
            )
            await self._watch(stop)
        finally:
            self._stopping = True
            await self._stop_all()
            if server is not None:
                await admin.stop_supervisor_admin(self.home, server)
            await lease.close()

    async def _readiness(self) -> str | None:
        """/readyz of the node: ready while every worker serves."""
        if self._stopping:
            return "stopping"
        if not all(w.ready.is_set() for w in self.workers):
            return "starting"
        return None

    async def _wait_first_ready(self, stop: asyncio.Event) -> None:
        async def all_ready() -> None:
            for w in self.workers:
                while not w.ready.is_set():
                    if w.proc is not None and w.proc.returncode is not None:
                        raise LocalProtocolError(
                            f"worker {w.index} exited at start ({w.proc.returncode})",
                            code="worker_failed",
                        )
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await w.ready.wait()

        waiter = asyncio.ensure_future(all_ready())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait(
                {waiter, stopper}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            stopper.cancel()
            finished = waiter.done()
            if not finished:
                waiter.cancel()
        if finished:
            waiter.result()  # raises if a worker exited at start
        elif not stop.is_set():
            raise LocalProtocolError("workers did not start in time", code="worker_failed")

    async def _watch(self, stop: asyncio.Event) -> None:
        """Restart any worker that exits, until ``stop``."""
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            waits = {
                asyncio.ensure_future(w.proc.wait()): w for w in self.workers if w.proc is not None
            }
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({*waits, stopper}, return_when=asyncio.FIRST_COMPLETED)
            for f in waits:
                f.cancel()
            stopper.cancel()
            if stop.is_set():
                return
            for f, w in waits.items():
                if f not in done or w.proc is None:
                    continue
                code = w.proc.returncode
                admin.worker_exited(w.proc.pid)  # its live gauges leave the sums
                w.ready.clear()
                ran = loop.time() - w.started
                w.backoff = RESTART_MIN_S if ran >= HEALTHY_AFTER_S else w.backoff
                log.warning("worker %d exited (%s); restarting in %.1f s", w.index, code, w.backoff)
                if w.sock is not None:
                    w.sock.close()
                    w.sock = None
                w.proc = None
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(w.backoff):
                        await stop.wait()
                if stop.is_set():
                    return
                w.backoff = min(RESTART_MAX_S, w.backoff * 2)
                await self._spawn(w)

    async def _stop_all(self) -> None:
        """Followers first, then the leader: its clean stop re-seals and destroys keys."""
        followers = [w for w in self.workers if w.index != 0]
        await asyncio.gather(*(self._stop_one(w) for w in followers))
        await self._stop_one(self.workers[0])

    async def _stop_one(self, w: _Worker) -> None:
        proc = w.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT_S):
                    await proc.wait()
            except TimeoutError:
                log.error("worker %d did not stop in time; killing it", w.index)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if w.reader is not None:
            w.reader.cancel()
            w.reader = None
        if w.sock is not None:
            w.sock.close()
            w.sock = None

    def pids(self) -> dict[int, int]:
        return {w.index: w.proc.pid for w in self.workers if w.proc is not None}


def _load_config(home: str) -> NodeConfig:
    return NodeConfig.load(home)


async def supervise(
    home: str,
    count: int,
    *,
    worker_ports: int = 0,
    lan: bool | None = None,
    interfaces: str = "",
    clock_offset_ms: int = 0,
    admin_listen: str = "",
    log_json: bool = False,
) -> None:
    """``haven node serve --workers N``: run the supervisor until SIGINT/SIGTERM.
    ``admin_listen`` overrides the config's (node/admin.py); ``log_json`` as for ``serve``."""
    config = _load_config(home)
    check_workers(config, count, worker_ports)
    json_lines = log_json or config.log_format == "json"
    logs.install(config.log_lines_per_minute, json_lines=json_lines)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(logs.loop_exception_handler)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    clock = SystemClock(clock_offset_ms) if clock_offset_ms else SystemClock()
    if admin_listen:
        admin.parse_listen(admin_listen)
    sup = Supervisor(
        home,
        count,
        worker_ports=worker_ports,
        lan=lan,
        interfaces=interfaces,
        clock=clock,
        admin_listen=admin_listen or config.admin_listen,
        log_json=json_lines,
    )
    await sup.run(stop)


# ---- worker -----------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Ask the kernel to kill this process when the supervisor dies (Linux; best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _read_hello(sock: socket.socket) -> tuple[bytes, int]:
    data = b""
    while len(data) < _HELLO.size:
        chunk = sock.recv(_HELLO.size - len(data))
        if not chunk:
            raise LocalProtocolError("supervisor went away", code="worker_failed")
        data += chunk
    key, started = _HELLO.unpack(data)
    return key, int(started)


def build_worker(
    home: str, index: int, count: int, key: bytes, started_ms: int, worker_port: int, clock: Clock
) -> Node:
    """The worker's node: the home's node with a follower store unless it leads."""
    from .app import Node, load_node_key, open_store
    from .pg_bus import PgBus
    from .worker_role import WorkerRole

    config = _load_config(home)
    store = open_store(home, config, leader=index == 0)
    node = Node(home, config, load_node_key(home, config), clock, store)
    bus = PgBus(store_dsn(config), key, index, leader=index == 0)
    node.use_role(WorkerRole(index, count, bus, started_ms, worker_port))
    return node


async def _worker(args: argparse.Namespace) -> None:
    sock = socket.socket(fileno=args.fd)
    key, started_ms = _read_hello(sock)
    clock = SystemClock(args.clock_offset_ms) if args.clock_offset_ms else SystemClock()
    node = build_worker(args.home, args.index, args.count, key, started_ms, args.worker_port, clock)
    del key
    config = node.config
    node.admin_enabled = False  # the supervisor serves /metrics for every worker
    logs.install(
        config.log_lines_per_minute, json_lines=args.log_json or config.log_format == "json"
    )
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(logs.loop_exception_handler)
    if args.lan is not None:
        node.lan_enabled = args.lan and args.index == 0
    if args.interface:
        from dataclasses import replace

        node.config = replace(node.config, lan_interfaces=args.interface)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    sock.setblocking(False)

    async def lifeline() -> None:
        with contextlib.suppress(OSError):
            while await loop.sock_recv(sock, 64):
                pass
        os._exit(1)  # the supervisor is gone: stop as if killed (it may be restarting)

    task = asyncio.create_task(node.run(stop))
    ready = asyncio.create_task(node.ready.wait())
    watcher = asyncio.create_task(lifeline())
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if node.ready.is_set():
        with contextlib.suppress(OSError):
            await loop.sock_sendall(sock, READY)
    ready.cancel()
    try:
        await task
    finally:
        watcher.cancel()


def worker_main(argv: list[str]) -> int:
    """Entry point of one worker process (started by :class:`Supervisor` only)."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops us, in order
    p = argparse.ArgumentParser(prog="haven-node-worker")
    p.add_argument("--home", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--worker-port", type=int, default=0)
    p.add_argument("--lan", dest="lan", action="store_true", default=None)
    p.add_argument("--no-lan", dest="lan", action="store_false")
    p.add_argument("--interface", default="")
    p.add_argument("--clock-offset-ms", type=int, default=0)
    p.add_argument("--log-json", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s %(name)s[w{args.index}]: %(message)s",
    )
    logging.getLogger("aiohttp.access").disabled = True
    for noisy in ("zeroconf", "aiohttp.server", "aiohttp.web", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        asyncio.run(_worker(args))
    except HavenError as exc:
        print(f"error: worker {args.index}: {exc} ({exc.code})", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: worker {args.index}: {exc.strerror or exc} (os_error)", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - an operator never sees a traceback
        what = type(exc).__name__
        print(f"error: worker {args.index}: internal error {what} (internal)", file=sys.stderr)
        return 70
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
