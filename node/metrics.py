"""The node's counters and gauges: aggregate numbers only, never per message, sender or peer.

Two views of the same counts:

* :class:`Metrics` keeps the in-memory ``Counter`` maps the loopback ``/haven/v1/stats``
  endpoint has always served (``errors`` by ``surface.code``, ``events`` by name);
* and, for the admin listener's ``/metrics`` (:mod:`node.admin`), prometheus-client metrics on
  a registry of its own, so several nodes in one test process never share a value. When
  ``PROMETHEUS_MULTIPROC_DIR`` is set (a supervisor with workers,
  :func:`node.admin.setup_multiprocess`), prometheus-client writes the same values into that
  directory instead and the supervisor's listener sums them across processes.

Label values come from small fixed sets (surfaces, stable error codes, event names): anything
that does not look like a short lower-case code is counted as ``other``, so no id, address or
name can become a label even by mistake.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter
from prometheus_client.process_collector import ProcessCollector

_LABEL = re.compile(r"[a-z][a-z0-9_]{0,47}")
OTHER = "other"

# event name -> (counter attribute, surface label or "")
_EVENTS: dict[str, tuple[str, str]] = {
    "client.envelopes_in": ("accepted", "client"),
    "federation.envelopes_in": ("accepted", "federation"),
    "federation.envelopes_out": ("sent", ""),
    "envelopes.delivered": ("delivered", ""),
    "envelopes.expired": ("expired", ""),
    "deliver.frames": ("deliver_frames", ""),
}


def label(value: str) -> str:
    """``value`` if it is a short lower-case code (``[a-z][a-z0-9_]*``), else ``other``."""
    return value if _LABEL.fullmatch(value) else OTHER


@dataclass(frozen=True, slots=True)
class GaugeSample:
    """What the node holds right now, from counts it keeps in memory anyway (no store scan)."""

    devices: int  # signed-in device connections
    unauthenticated: int  # connections not (yet) signed in: federation requests, new sockets
    open_connections: int
    max_connections: int
    known_peers: int
    pending_envelopes: int  # for local mailboxes, including those not yet committed
    outbox_envelopes: int  # queued for other nodes
    epoch_keys: int
    disk_full: bool
    ready: bool


class Metrics:
    """Counters of refused input and events, plus the gauges :meth:`sample` sets."""

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.errors: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self._children: dict[tuple[str, str, str], Any] = {}  # labelled children, by use
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.refused = PromCounter(
            "haven_refused",
            "Input refused, by surface and stable error code",
            ["surface", "code"],
            registry=r,
        )
        self.store_errors = PromCounter(
            "haven_store_errors", "Store operations that failed, by code", ["code"], registry=r
        )
        self.accepted = PromCounter(
            "haven_envelopes_accepted",
            "Envelopes accepted for storage, by where they came from",
            ["surface"],
            registry=r,
        )
        self.delivered = PromCounter(
            "haven_envelopes_delivered", "Envelopes acknowledged by a local device", registry=r
        )
        self.expired = PromCounter(
            "haven_envelopes_expired", "Envelopes deleted undelivered at expiry", registry=r
        )
        self.sent = PromCounter(
            "haven_federation_envelopes_out", "Envelopes accepted by peer nodes", registry=r
        )
        self.deliver_frames = PromCounter(
            "haven_deliver_frames", "Deliver frames pushed to devices", registry=r
        )
        self.requests = PromCounter(
            "haven_federation_requests",
            "Federation requests, by direction (in, out) and result (ok or an error code)",
            ["direction", "result"],
            registry=r,
        )
        self.other_events = PromCounter(
            "haven_other_events", "Other node events, by name", ["event"], registry=r
        )
        self.connections = Gauge(
            "haven_connections",
            "Open connections, by kind (device, unauthenticated, open)",
            ["kind"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.max_connections = Gauge(
            "haven_max_connections",
            "Connection cap (lowered below the fd limit)",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.peers = Gauge(
            "haven_known_peers", "Peer nodes pinned", registry=r, multiprocess_mode="livemax"
        )
        self.pending = Gauge(
            "haven_pending_envelopes",
            "Envelopes held for local devices",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.outbox = Gauge(
            "haven_outbox_envelopes",
            "Envelopes queued for other nodes",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.epoch_keys = Gauge(
            "haven_epoch_keys",
            "At-rest epoch keys held (docs/operations.md, at rest)",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.disk_full = Gauge(
            "haven_disk_full",
            "1 while the disk guard refuses new envelopes",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.ready = Gauge(
            "haven_ready", "1 while serving", registry=r, multiprocess_mode="livemin"
        )
        for surface in ("client", "federation"):  # present from the start, at 0
            self.accepted.labels(surface)
        for direction in ("in", "out"):
            self.requests.labels(direction, "ok")
        if process:
            ProcessCollector(registry=r)

    def _child(self, kind: str, a: str, b: str) -> Any:
        """The counter (child) for these labels; looked up once, as ``labels()`` is slow."""
        key = (kind, a, b)
        child = self._children.get(key)
        if child is None:
            if kind == "error":
                child = (
                    self.store_errors.labels(label(b))
                    if a == "store"
                    else self.refused.labels(label(a), label(b))
                )
            elif kind == "request":
                child = self.requests.labels(label(a), label(b))
            elif a in _EVENTS:
                attr, surface = _EVENTS[a]
                counter: PromCounter = getattr(self, attr)
                child = counter.labels(surface) if surface else counter
            else:
                child = self.other_events.labels(label(a.replace(".", "_")))
            if len(self._children) < 4096:  # label values come from fixed sets; a backstop
                self._children[key] = child
        return child

    def error(self, surface: str, code: str) -> None:
        """Count one refusal (or, for surface ``store``, one store failure)."""
        self.errors[f"{surface}.{code}"] += 1
        self._child("error", surface, code).inc()

    def event(self, name: str, n: int = 1) -> None:
        """Count ``n`` occurrences of a named event (names from a fixed set)."""
        self.events[name] += n
        if n > 0:
            self._child("event", name, "").inc(n)

    def request(self, direction: str, result: str) -> None:
        """One federation request in or out: ``ok`` or the stable error code."""
        self._child("request", direction, result).inc()

    def sample(self, s: GaugeSample) -> None:
        """Set every gauge from ``s``."""
        self.connections.labels("device").set(s.devices)
        self.connections.labels("unauthenticated").set(s.unauthenticated)
        self.connections.labels("open").set(s.open_connections)
        self.max_connections.set(s.max_connections)
        self.peers.set(s.known_peers)
        self.pending.set(s.pending_envelopes)
        self.outbox.set(s.outbox_envelopes)
        self.epoch_keys.set(s.epoch_keys)
        self.disk_full.set(1 if s.disk_full else 0)
        self.ready.set(1 if s.ready else 0)

    def snapshot(self) -> dict[str, dict[str, int]]:
        """The in-memory counters as served by ``/haven/v1/stats``."""
        return {"errors": dict(self.errors), "events": dict(self.events)}
