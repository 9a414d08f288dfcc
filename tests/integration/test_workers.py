"""``haven node serve --workers 2`` on PostgreSQL: real worker processes behind one address.

The org node ``A`` runs two workers sharing the listen port (SO_REUSEPORT); each also listens on
its own loopback port (``--worker-ports``), so a test can attach a device to a chosen worker.
Its public URL is worker 1's port (federation from the peer node arrives there) and its client
URL worker 0's (devices join there); ``use_worker`` moves a device to the other one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

import aiohttp
import pytest

from client.device import Device, parse_invite
from client.linking import link_device
from federation.errors import HavenError
from federation.signing import Descriptor, b64d, b64e
from federation.wire import Batch, packb, unpackb

from ..ports import free_port_run
from .harness import NodeProc, free_port, haven, join, wait_until
from .rawpeer import BATCH_PATH, RawPeer, envelope, stats
from .test_admin import admin_url, get, scrape, value
from .test_federated_exchange import _send_all
from .test_federated_exchange import test_exchange_both_ways_offline_and_drained as _exchange
from .test_federated_exchange import test_kill9_and_restart_lose_nothing_acked as _kill9_restart

WORKERS = 2


class OrgNode(NodeProc):
    """A node on PostgreSQL served by :data:`WORKERS` workers with per-worker ports."""

    base: int = 0

    def worker_url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.base + i}"

    def start(self) -> OrgNode:
        lines = self._started_lines()
        super().start()
        wait_until(lambda: self._started_lines() > lines, 30, "every worker to serve")
        return self

    def _started_lines(self) -> int:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"node exited early:\n{self.log.read_text()}")
        return self.log.read_bytes().count(b" workers)") if self.log.exists() else 0

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid, from the supervisor's children."""
        assert self.proc is not None
        out: dict[int, int] = {}
        for tid in os.listdir(f"/proc/{self.proc.pid}/task"):
            children = Path(f"/proc/{self.proc.pid}/task/{tid}/children").read_text().split()
            for pid in children:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if b"node.workers" in argv:
                    out[int(argv[argv.index(b"--index") + 1])] = int(pid)
        return out

    def kill_worker(self, i: int) -> int:
        """SIGKILL worker ``i``; wait until the supervisor started a new one. Returns its pid."""
        old = self.worker_pids()[i]
        os.kill(old, signal.SIGKILL)
        return int(
            wait_until(
                lambda: (
                    (p := self.worker_pids().get(i)) not in (None, old) and self._serves(i) and p
                ),
                30,
                f"worker {i} restarted",
            )
        )

    def _serves(self, i: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.base + i)) == 0


def make_org(
    base_dir: Path, name: str, dsn: str, *, public: int | None = None, client: int | None = None
) -> OrgNode:
    """Init an org node. ``public``/``client``: the worker whose port those URLs name
    (default: the shared listen port, as for any node)."""
    port, wbase = free_port(), free_port_run(WORKERS)
    url = {None: f"http://127.0.0.1:{port}"}
    url |= {i: f"http://127.0.0.1:{wbase + i}" for i in range(WORKERS)}
    home = base_dir / name
    args = ["node", "init", "--home", str(home), "--public-url", url[public]]
    args += ["--listen", f"127.0.0.1:{port}", "--store", dsn]
    if client is not None:
        args += ["--client-url", url[client]]
    haven(*args)
    node = OrgNode(home, port, serve_args=("--workers", str(WORKERS), "--worker-ports", str(wbase)))
    node.base = wbase
    return node


def use_worker(dev_home: Path, url: str) -> None:
    """Point a joined device at another worker's port (a reverse proxy could do the same)."""
    dev = Device(str(dev_home))
    try:
        with dev.state.tx() as db:
            dev.state.put(db, "node_url", url.encode())
    finally:
        dev.close()


@pytest.fixture
def org_pair(tmp_path: Path, pg_dsn: str, nodes: list[NodeProc]) -> tuple[NodeProc, NodeProc]:
    """The pair of tests/integration/test_federated_exchange.py with B an org node: on
    PostgreSQL, two workers (B is the recipient killed, restarted, and the one replying)."""
    a = NodeProc.create(tmp_path, "A").start()
    nodes.append(a)
    b = make_org(tmp_path, "B", pg_dsn)
    nodes.append(b)
    b.start()
    return a, b


# ---- the federated exchange, restart and kill -9 tests, on two-worker nodes ------------------


def test_exchange_with_workers(tmp_path: Path, org_pair: tuple[NodeProc, NodeProc]) -> None:
    _exchange(tmp_path, org_pair)


async def test_kill9_and_restart_with_workers(
    tmp_path: Path, org_pair: tuple[NodeProc, NodeProc]
) -> None:
    await _kill9_restart(tmp_path, org_pair)


# ---- across workers -------------------------------------------------------------------------


@pytest.fixture
def org_and_peer(tmp_path: Path, pg_dsn: str, nodes: list[NodeProc]) -> tuple[OrgNode, NodeProc]:
    """Org node A (federation through worker 1, devices on worker 0) and a SQLite peer B."""
    a = make_org(tmp_path, "A", pg_dsn, public=1, client=0)
    b = NodeProc.create(tmp_path, "B")
    nodes += [a, b]
    a.start()
    b.start()
    return a, b


async def _authenticated(url: str) -> int:
    async with aiohttp.ClientSession() as http:
        conns = (await stats(http, url))["connections"]
    return int(conns["open"]) - int(conns["unauthenticated"])


async def _poll(pred, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not await pred():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _trio(a: OrgNode, b: NodeProc, tmp_path: Path) -> tuple[Device, Device, Device]:
    """alice on the org node (worker 0 by default), carol on it through worker 1's own port,
    bob on the peer node."""
    alice_home, _ = join(a, tmp_path, "alice")
    carol_home, _ = join(a, tmp_path, "carol")
    use_worker(carol_home, a.worker_url(1))
    bob_home, _ = join(b, tmp_path, "bob")
    alice, carol, bob = (Device(str(h)) for h in (alice_home, carol_home, bob_home))
    return alice, carol, bob


async def test_device_on_worker_0_gets_what_worker_1_accepted(
    tmp_path: Path, org_and_peer: tuple[OrgNode, NodeProc]
) -> None:
    a, b = org_and_peer
    alice, carol, bob = _trio(a, b, tmp_path)
    alice_addr = alice.address
    try:
        conn = await alice.connect()  # worker 0, and it stays connected
        try:
            await _poll(lambda: _one(a), "alice attached to worker 0")
            await carol.send(alice_addr, "from carol on worker 1")
            await bob.send(alice_addr, "from bob through worker 1")
            got: list[str] = []
            deadline = asyncio.get_running_loop().time() + 30
            while len(got) < 2:
                left = deadline - asyncio.get_running_loop().time()
                assert left > 0, f"only {got} reached alice while connected to worker 0"
                async with asyncio.timeout(left):
                    envs = await conn.deliveries.get()
                got += [m.text for m in await alice.process(conn, envs) if m.kind == "text"]
            assert sorted(got) == ["from bob through worker 1", "from carol on worker 1"]
        finally:
            await alice.release(conn)
    finally:
        for d in (alice, carol, bob):
            d.close()

    # one /metrics for the node: worker 1's acceptances and worker 0's deliveries, summed
    def counted() -> bool:
        s = scrape(a)
        return (
            value(s, "haven_envelopes_accepted_total", surface="client") >= 1
            and value(s, "haven_federation_requests_total", direction="in", result="ok") >= 1
            and value(s, "haven_envelopes_delivered_total") >= 2
        )

    wait_until(counted, 20, "the supervisor's /metrics to sum both workers")
    assert get(admin_url(a) + "/readyz")[0] == 200


async def _one(a: OrgNode) -> bool:
    return await _authenticated(a.worker_url(0)) >= 1


async def test_replayed_request_to_the_other_worker_is_refused(
    org_and_peer: tuple[OrgNode, NodeProc],
) -> None:
    a, _ = org_and_peer
    async with aiohttp.ClientSession() as http:
        peer = RawPeer(http, a.worker_url(0))
        await peer.handshake()
        body = Batch((envelope(os.urandom(16)),)).encode()
        req = peer.sign(BATCH_PATH, body)
        first = await peer.post_raw(BATCH_PATH, body, peer.headers(req), req)
        assert first.status == 200  # the envelope itself is refused: no such mailbox
        peer.check_signed(first)
        replay = await RawPeer(http, a.worker_url(1), key=peer.key, dest=peer.dest).post_raw(
            BATCH_PATH, body, peer.headers(req), req
        )
        assert (replay.status, replay.code) == (401, "replay")
        again = await peer.post_raw(BATCH_PATH, body, peer.headers(req), req)
        assert (again.status, again.code) == (401, "replay")  # and to the first one, as ever


async def test_a_node_with_workers_offers_no_files_yet(
    org_and_peer: tuple[OrgNode, NodeProc],
) -> None:
    """The blob store is one process's (docs/operations.md §15.3): several workers do not list
    ``blobs`` in their descriptor; a one-process peer does."""
    a, b = org_and_peer

    async def features(url: str) -> tuple[str, ...]:
        async with aiohttp.ClientSession() as http:
            async with http.get(url + "/.well-known/haven/node") as r:
                return Descriptor.verify_decode(await r.read()).features

    assert "blobs" not in await features(a.worker_url(0))
    assert "blobs" not in await features(a.worker_url(1))
    assert "blobs" in await features(b.url)


async def test_newer_connection_on_worker_1_replaces_older_on_worker_0(
    tmp_path: Path, org_and_peer: tuple[OrgNode, NodeProc]
) -> None:
    a, _ = org_and_peer
    alice_home, _ = join(a, tmp_path, "alice")
    alice = Device(str(alice_home))
    try:
        old = await alice.connect()  # worker 0
        use_worker(alice_home, a.worker_url(1))
        alice.close()
        alice = Device(str(alice_home))
        new = await alice.connect()  # worker 1
        try:
            async with asyncio.timeout(20):
                await old.wait_closed()
            assert old.closed and not new.closed
        finally:
            await alice.release(new)
            await old.__aexit__(None, None, None)
    finally:
        alice.close()


async def test_kill9_one_worker_mid_traffic_loses_and_repeats_nothing(
    tmp_path: Path, org_and_peer: tuple[OrgNode, NodeProc]
) -> None:
    a, b = org_and_peer
    alice, carol, bob = _trio(a, b, tmp_path)
    alice_addr = alice.address
    sent: dict[str, list[str]] = {"carol": [], "bob": []}
    got: list[tuple[str, str]] = []
    try:
        for cycle, victim in enumerate((1, 0, 1)):
            sent["carol"] += await _send_all(carol, alice_addr, [f"c{cycle}-{i}" for i in range(4)])
            sent["bob"] += await _send_all(bob, alice_addr, [f"b{cycle}-{i}" for i in range(4)])
            got += [(m.sender, m.text) for m in await alice.receive(wait_s=0.3) if m.kind == "text"]
            a.kill_worker(victim)
        wait_until(lambda: b.status()["outbox_envelopes"] == 0, timeout=60, what="B's outbox")
        for _ in range(3):
            got += [(m.sender, m.text) for m in await alice.receive(wait_s=0.7) if m.kind == "text"]
        assert len(sent["carol"]) == len(sent["bob"]) == 12  # a worker was up for every send
        by_sender: dict[str, list[str]] = {}
        for sender, text in got:
            by_sender.setdefault(sender.split("@")[0], []).append(text)
        assert by_sender == sent  # none lost, none twice, each sender's order kept
    finally:
        for d in (alice, carol, bob):
            d.close()


async def test_link_token_minted_on_worker_0_is_redeemed_once_on_worker_1(
    tmp_path: Path, org_and_peer: tuple[OrgNode, NodeProc]
) -> None:
    a, _ = org_and_peer
    alice_home, alice_addr = join(a, tmp_path, "alice")
    alice = Device(str(alice_home))
    code: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    linker = asyncio.create_task(link_device(alice, code.set_result, timeout_s=30))
    try:
        minted = await code  # through worker 0, alice's
        assert parse_invite(minted)["url"] == a.worker_url(0)
        laptop = Device(str(tmp_path / "alice-laptop"))
        try:
            assert (
                await laptop.join(_with_url(minted, a.worker_url(1)), name="laptop") == alice_addr
            )
        finally:
            laptop.close()
        await linker
        again = Device(str(tmp_path / "alice-phone"))
        try:
            with pytest.raises(HavenError) as refused:
                await again.join(minted, name="phone")
            assert refused.value.code == "invalid_invite"  # used up, on every worker
        finally:
            again.close()
    finally:
        linker.cancel()
        alice.close()


def _with_url(code: str, url: str) -> str:
    """The same device-link code, pointing the new device at another worker."""
    prefix = "haven:link:"
    obj = unpackb(b64d(code[len(prefix) :]), max_len=4096)
    return prefix + b64e(packb(obj | {"url": url}))


def test_workers_on_sqlite_are_refused(tmp_path: Path) -> None:
    node = NodeProc.create(tmp_path, "S")
    out = haven("node", "serve", "--home", str(node.home), "--workers", "2", check=False)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --workers needs the PostgreSQL store (bad_argument)"
    ]


def test_a_worker_that_cannot_start_stops_serve_with_one_line(tmp_path: Path, pg_dsn: str) -> None:
    node = make_org(tmp_path, "W", pg_dsn)
    with socket.socket() as taken:  # worker 1's own port is in use by someone else
        taken.bind(("127.0.0.1", node.base + 1))
        taken.listen()
        out = haven("node", "serve", "--home", str(node.home), *node.serve_args, check=False)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1] == "error: worker 1 exited at start (2) (worker_failed)", lines
    assert "Traceback" not in out.stderr


async def test_send_multi_through_workers_reaches_both_nodes(
    org_and_peer: tuple[OrgNode, NodeProc],
) -> None:
    """Group fan-out (docs/protocol.md §11.4) on a node served by two workers: the sender's
    device on worker 0 asks for keys in one batch and submits one ``send_multi``; a recipient
    device on worker 1 and one on the peer each get their composed copy."""
    from federation import frames as F
    from federation.multi import INNER_MEGOLM, GroupInner, open_copy, seal_multi

    from .rawpeer import RawDevice, now_ms
    from .test_multi_node import delivered, register

    a, b = org_and_peer
    alice, carol, bob = (
        await register(a, "alice"),
        await register(a, "carol"),
        await register(b, "bob"),
    )
    async with aiohttp.ClientSession() as http:
        devs = []
        for url, ident in ((a.worker_url(0), alice), (a.worker_url(1), carol), (b.url, bob)):
            dev = await RawDevice.connect(http, url)
            assert isinstance(await dev.auth(ident), F.AuthOk)
            devs.append(dev)
        sender, on_worker_1, on_peer = devs
        ans = await sender.request(
            F.QueryKeysMulti(sender.next_rid(), (carol.address, bob.address), True)
        )
        assert isinstance(ans, F.KeysMulti) and [r[4] for r in ans.results] == ["", ""], ans
        node_a, node_b = ans.results[0][1], ans.results[1][1]
        inner = GroupInner(INNER_MEGOLM, alice.address, "d", b"through workers")
        sealed = seal_multi(inner, [bytes(carol.sealing.public_key), bytes(bob.sealing.public_key)])
        ids = [os.urandom(16), os.urandom(16)]
        frame = F.SendMulti(
            sender.next_rid(),
            sealed.eph,
            now_ms() + 3_600_000,
            sealed.gbody,
            (
                (node_a, ((ids[0], carol.mailbox, sealed.headers[0]),)),
                (node_b, ((ids[1], bob.mailbox, sealed.headers[1]),)),
            ),
        )
        got = await sender.request(frame)
        assert isinstance(got, F.Accepted) and sorted(got.ids) == sorted(ids), got
        for i, (dev, ident) in enumerate(((on_worker_1, carol), (on_peer, bob))):
            (env,) = await delivered(dev, 1)
            assert env.id == ids[i] and env.body == sealed.copy_for(i)
            opened = open_copy(bytes(ident.sealing), bytes(ident.sealing.public_key), env.body)
            assert opened.data == b"through workers"
        for dev in devs:
            await dev.close()
