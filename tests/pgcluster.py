"""A real, throw-away PostgreSQL server for the tests (``scripts/test`` starts one).

``initdb`` from the Debian server package (``/usr/lib/postgresql/15/bin``, not on PATH) into a
``mkdtemp`` directory outside pytest's temp folder (that one is mode 0700, unreachable for the
``postgres`` user), owned by ``postgres``, listening on 127.0.0.1 only on a free port, with
``fsync=on`` (the durability tests kill -9 nodes and expect nothing acknowledged lost). Local
trust authentication: the server only exists for the duration of one test run.

Usage from a shell::

    eval "$(python -m tests.pgcluster start)"   # exports HAVEN_TEST_PG and HAVEN_TEST_PG_DIR
    python -m tests.pgcluster stop "$HAVEN_TEST_PG_DIR"

From Python: :func:`start` / :meth:`Cluster.stop`; :func:`fresh_database` makes one database
per test.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

from .ports import free_port

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
START_TIMEOUT_S = 60.0


def pg_bin() -> str:
    """The newest installed server's bin directory (initdb, pg_ctl, postgres)."""
    dirs = sorted(glob.glob(PG_BIN_GLOB), key=lambda d: int(d.split("/")[-2]))
    for d in reversed(dirs):
        if os.path.exists(os.path.join(d, "initdb")):
            return d
    raise RuntimeError("PostgreSQL server not installed (apt-get install postgresql)")


def _as_postgres(cmd: list[str]) -> list[str]:
    """Run as the ``postgres`` user when we are root (PostgreSQL refuses to run as root)."""
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


def _chown_postgres(path: str) -> None:
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam("postgres")
    os.chown(path, pw.pw_uid, pw.pw_gid)


@dataclass
class Cluster:
    root: str  # what stop() removes (data directory and socket directory live under it)
    data: str
    port: int
    owns_root: bool = True

    @property
    def dsn(self) -> str:
        """DSN of the maintenance database ``postgres``."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def dsn_for(self, db: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run one SQL command with psql; returns its unaligned output."""
        out = subprocess.run(
            ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", self.dsn_for(db), "-c", sql],
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout.strip()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server and (if this cluster made it) remove its directory."""
        subprocess.run(
            _as_postgres(
                [os.path.join(pg_bin(), "pg_ctl"), "-D", self.data, "-m", mode, "-w", "stop"]
            ),
            capture_output=True,
        )
        if self.owns_root:
            shutil.rmtree(self.root, ignore_errors=True)


def start(
    root: str | None = None, port: int | None = None, settings: dict[str, str] | None = None
) -> Cluster:
    """initdb + start a server under ``root`` (default: a new ``mkdtemp`` directory).

    ``root`` may be, for example, a loop-mounted image's mount point (the seizure tests); it
    must be reachable for the ``postgres`` user. ``settings`` are extra ``-c name=value``.
    """
    owns = root is None
    root = root or tempfile.mkdtemp(prefix="haven-pg-", dir="/tmp")
    os.chmod(root, 0o755)
    data = os.path.join(root, "data")
    sock = os.path.join(root, "sock")
    for d in (data, sock):
        os.makedirs(d, exist_ok=True)
        _chown_postgres(d)
    os.chmod(data, 0o700)
    bindir = pg_bin()
    subprocess.run(
        _as_postgres(
            [
                os.path.join(bindir, "initdb"),
                "-D",
                data,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
            ]
        ),
        check=True,
        capture_output=True,
    )
    port = port or free_port()
    opts = {
        "listen_addresses": "127.0.0.1",
        "port": str(port),
        "unix_socket_directories": sock,
        "fsync": "on",
        "synchronous_commit": "on",
        "max_connections": "400",  # three test workers at once (scripts/test -n 3)
        "shared_buffers": "64MB",
        "log_min_messages": "warning",
        **(settings or {}),
    }
    o = " ".join(f"-c {k}={v}" for k, v in opts.items())
    log = os.path.join(sock, "server.log")  # a directory the postgres user may write
    subprocess.run(
        _as_postgres(
            [
                os.path.join(bindir, "pg_ctl"),
                "-D",
                data,
                "-l",
                log,
                "-o",
                o,
                "-w",
                "-t",
                str(int(START_TIMEOUT_S)),
                "start",
            ]
        ),
        check=True,
        capture_output=True,
    )
    cluster = Cluster(root=root, data=data, port=port, owns_root=owns)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            cluster.psql("SELECT 1")
            return cluster
        except subprocess.CalledProcessError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def from_env() -> Cluster | None:
    """The cluster ``scripts/test`` started (``HAVEN_TEST_PG`` = its maintenance DSN)."""
    dsn = os.environ.get("HAVEN_TEST_PG", "")
    if not dsn:
        return None
    port = int(dsn.rsplit(":", 1)[1].split("/", 1)[0])
    root = os.environ.get("HAVEN_TEST_PG_DIR", "")
    return Cluster(root=root, data=os.path.join(root, "data"), port=port, owns_root=False)


def fresh_database(cluster: Cluster, prefix: str = "t") -> str:
    """Create an empty database; returns its DSN."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    cluster.psql(f'CREATE DATABASE "{name}"')
    return cluster.dsn_for(name)


def drop_database(cluster: Cluster, dsn: str) -> None:
    name = dsn.rsplit("/", 1)[1]
    cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main(argv: list[str]) -> int:
    if argv[:1] == ["start"]:
        c = start()
        print(f"export HAVEN_TEST_PG={c.dsn}")
        print(f"export HAVEN_TEST_PG_DIR={c.root}")
        return 0
    if argv[:1] == ["stop"] and len(argv) == 2:
        root = argv[1]
        Cluster(root=root, data=os.path.join(root, "data"), port=0).stop()
        return 0
    print("usage: python -m tests.pgcluster start | stop DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
