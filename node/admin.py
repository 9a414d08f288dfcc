"""The admin listener: ``/metrics`` (Prometheus text), ``/healthz`` and ``/readyz``.

A second HTTP listener, separate from the public port, bound to ``admin_listen`` (node.toml,
``--admin-listen HOST:PORT``). The default is ``127.0.0.1:0``: loopback, on a port the kernel
picks, so nodes started side by side (tests, several nodes on one host) never collide. The
bound URL is written to ``HOME/admin.json`` (with the process id) while the node runs and
removed at stop; ``haven node status --json`` reads it to give ``metrics_url``. An operator who
wants a fixed port (for a Prometheus scrape config) sets one; a non-loopback address is used
only when given explicitly, and must then sit behind a firewall or an authenticating proxy:
the listener has no authentication of its own.

What it serves holds no ids, addresses, account names or per-peer labels (:mod:`node.metrics`),
and no request is logged (aiohttp's access log is off: it would name the client address).

* ``GET /metrics``: ``generate_latest`` of the node's own registry, or, in multiprocess mode,
  of a registry with a ``MultiProcessCollector`` summing every worker's values;
* ``GET /healthz``: ``200 ok`` while the process and its event loop run (no store call);
* ``GET /readyz``: ``200 ready`` once the node serves and its store answers a cheap query
  within :data:`READY_STORE_S`; else ``503`` and one word: ``starting``, ``store``,
  ``stopping`` or ``disk_full``;
* anything else: ``404``.

Hand-over for ``haven node serve --workers N`` (the supervisor):

1. Before forking or spawning any worker, and before it creates any ``Node`` or
   :class:`node.metrics.Metrics` itself, the supervisor calls ``setup_multiprocess(home)``:
   it wipes and creates ``HOME/run/prometheus``, sets
   ``PROMETHEUS_MULTIPROC_DIR`` (inherited by the workers) and switches prometheus-client's
   value class in this process, so metrics created afterwards (in the supervisor or in a
   forked child) write to the directory. Workers started with ``spawn``/``exec`` inherit the
   environment variable and need nothing else; every ``Node`` then writes its values there.
2. Each worker runs its ``Node`` with ``node.admin_enabled = False``: only one listener, the
   supervisor's, binds ``admin_listen``. Workers keep their gauges fresh on their own (every
   :data:`node.app.GAUGE_EVERY_S`), so the supervisor never needs to ask them.
3. The supervisor calls ``server = await start_supervisor_admin(home, config.admin_listen,
   readiness)``, where ``readiness`` is its own check (e.g. ``starting`` until every worker
   reported ready): it serves the multiprocess sums and writes the runtime file; at stop,
   ``await stop_supervisor_admin(home, server)``.
4. When a worker exits (or is killed), the supervisor calls ``worker_exited(pid)`` so that the
   dead worker's "live" gauges (connections, pending) stop counting; its counters stay in the
   sum, as a counter must never go down.

Counters are summed across workers; connection gauges are summed (``livesum``); store-wide
gauges (pending, outbox, epoch keys, peers, disk full) take the largest value any live worker
reports (``livemax``), as every worker sees the same store; ``haven_ready`` takes the smallest.
Process metrics (``process_*``) are the supervisor's own in that mode: prometheus-client's
process collector does not aggregate.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, values
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.process_collector import ProcessCollector

from federation.errors import LocalProtocolError

log = logging.getLogger("haven.admin")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
RUN_DIR = "run"
MULTIPROC_SUBDIR = "prometheus"
RUNTIME_NAME = "admin.json"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:0"
READY_STORE_S = 2.0  # /readyz: the store must answer its cheap query within this

Readiness = Callable[[], Awaitable[str | None]]  # None when ready, else the one-word reason


# ---- addresses --------------------------------------------------------------------------------


def parse_listen(spec: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 in brackets) as (host, port).

    Raises:
        LocalProtocolError: not of that form.
    """
    host, _, port = str(spec).rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or int(port) > 65535:
        raise LocalProtocolError(
            f"admin listen address must be HOST:PORT, got {spec!r}", code="bad_argument"
        )
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- multiprocess mode ------------------------------------------------------------------------


def multiprocess_dir(home: str) -> str:
    """Where the workers of the node in ``home`` write their metric values."""
    return os.path.join(home, RUN_DIR, MULTIPROC_SUBDIR)


def setup_multiprocess(home: str) -> str:
    """Prepare multiprocess metrics for a supervisor and its workers; returns the directory.

    Call once in the supervisor before any worker starts. Wipes what an earlier run left (the
    directory must start empty: values are keyed by process id, which the kernel reuses).
    """
    path = multiprocess_dir(home)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.environ[MULTIPROC_ENV] = path
    # prometheus-client picks its value class when it is first imported; this process imported
    # it before the variable was set, so switch it now (forked children inherit the switch).
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    return path


def multiprocess_enabled() -> bool:
    """True when metric values go to a multiprocess directory."""
    return bool(os.environ.get(MULTIPROC_ENV))


def multiprocess_registry() -> CollectorRegistry:
    """A registry summing every process's values in the multiprocess directory (plus the
    calling process's own ``process_*`` metrics)."""
    registry = CollectorRegistry()
    prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    ProcessCollector(registry=registry)
    return registry


def worker_exited(pid: int) -> None:
    """A worker is gone: drop its live gauges from the sums (its counters stay)."""
    if multiprocess_enabled():
        prom_multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


async def start_supervisor_admin(home: str, listen: str, readiness: Readiness) -> AdminServer:
    """The supervisor's admin listener: every worker's values summed; the runtime file written.

    Raises:
        LocalProtocolError: a malformed address, or one that cannot be bound.
    """
    host, port = parse_listen(listen)
    server = AdminServer(host, port, multiprocess_registry(), readiness)
    write_runtime(home, await server.start())
    return server


async def stop_supervisor_admin(home: str, server: AdminServer) -> None:
    """Remove the runtime file and stop the supervisor's listener."""
    remove_runtime(home)
    await server.stop()


# ---- runtime file -----------------------------------------------------------------------------


def write_runtime(home: str, url: str) -> None:
    """Record the running listener's base URL (and our pid) in ``HOME/admin.json``."""
    path = os.path.join(home, RUNTIME_NAME)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"url": url, "pid": os.getpid()}, f)
    os.replace(tmp, path)


def remove_runtime(home: str) -> None:
    """Remove ``HOME/admin.json`` (the node stopped)."""
    try:
        os.unlink(os.path.join(home, RUNTIME_NAME))
    except FileNotFoundError:
        pass


def read_runtime(home: str) -> str | None:
    """The admin base URL of the node running in ``home``, or None (not running, or a file
    left by a process that was killed)."""
    try:
        with open(os.path.join(home, RUNTIME_NAME), encoding="utf-8") as f:
            obj = json.load(f)
        url, pid = str(obj["url"]), int(obj["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, another user's process (e.g. the service user)
    return url


# ---- the listener -----------------------------------------------------------------------------


class AdminServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on their own listener."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        readiness: Readiness,
        before_scrape: Callable[[], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.readiness = readiness
        self.before_scrape = before_scrape
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Base URL of the bound listener."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=404, text="not found\n")
        if request.path == "/healthz":
            return web.Response(text="ok\n")
        if request.path == "/readyz":
            reason = await self.readiness()
            if reason is None:
                return web.Response(text="ready\n")
            return web.Response(status=503, text=reason + "\n")
        if request.path == "/metrics":
            return await self._metrics()
        return web.Response(status=404, text="not found\n")

    async def _metrics(self) -> web.Response:
        if self.before_scrape is not None:
            self.before_scrape()
        if multiprocess_enabled():  # reads one file per worker and metric type
            body = await asyncio.to_thread(generate_latest, self.registry)
        else:
            body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> str:
        """Bind and serve; returns the base URL (with the port the kernel chose for ``:0``)."""
        if not is_loopback(self.host):
            log.warning("admin listener on a non-loopback address: keep it behind a firewall")
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise LocalProtocolError(
                f"admin listener {self.host}:{self.port}: "
                f"{os.strerror(exc.errno).lower() if exc.errno else exc}"
                " (set admin_listen or --admin-listen)",
                code="os_error",
            ) from exc
        server = site._server
        sockets = getattr(server, "sockets", None)
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self.url

    async def stop(self) -> None:
        """Stop serving."""
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


async def loopback_view(config: Any, path: str) -> list[Any] | None:
    """The running node's answer to ``GET path`` on its own listener (a loopback-only operator
    view such as ``/haven/v1/peers``), or None when no node answers there: the caller then reads
    the store. Our own certificate names the public host, not 127.0.0.1, so TLS is not
    verified on this loopback call."""
    import aiohttp

    from federation.wire import unpackb

    scheme = "https" if config.tls_cert else "http"
    url = f"{scheme}://127.0.0.1:{config.listen_port}{path}"
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(url, timeout=aiohttp.ClientTimeout(5), ssl=False) as r,
        ):
            if r.status == 200:
                return list(unpackb(await r.read(), max_len=1 << 22))
    except (aiohttp.ClientError, OSError, TimeoutError):
        pass
    return None
