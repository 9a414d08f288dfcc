"""Public nodes over TLS: two nodes serving HTTPS with their own certificates federate.

The test makes a private CA with the openssl CLI, gives each node a certificate for 127.0.0.1
(``haven node init --tls-cert/--tls-key``) and trusts the CA through ``SSL_CERT_FILE``, as an
operator with a private CA would. Plain HTTP to a TLS node is refused.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .harness import NodeProc, haven, join, recv, wait_until


def _openssl(*args: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("the TLS test needs the openssl command (apt-get install openssl)")
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path) -> Path:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=haven test CA",
        cwd=d,
    )
    return d / "ca.pem"


def make_cert(d: Path, name: str) -> tuple[Path, Path]:
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )
    (d / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )
    return d / f"{name}.pem", d / f"{name}.key"


def test_two_tls_nodes_federate(
    tmp_path: Path, nodes: list[NodeProc], monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    monkeypatch.setenv("SSL_CERT_FILE", str(make_ca(pki)))
    tls_nodes = []
    for name in ("A", "B"):
        cert, key = make_cert(pki, name)
        node = NodeProc.create(
            tmp_path, name, "--tls-cert", str(cert), "--tls-key", str(key), scheme="https"
        )
        nodes.append(node.start())
        tls_nodes.append(node)
    a, b = tls_nodes
    # plain HTTP to a TLS-only node gets no answer
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"http://127.0.0.1:{a.port}/.well-known/haven/node", timeout=5)

    alice, alice_addr = join(a, tmp_path, "alice")
    bob, bob_addr = join(b, tmp_path, "bob")
    haven("send", "--home", str(alice), bob_addr, "over TLS")
    wait_until(lambda: b.status()["pending_envelopes"] == 1, what="delivery to B over HTTPS")
    assert [m["text"] for m in recv(bob)] == ["over TLS"]
    haven("send", "--home", str(bob), alice_addr, "and back")
    wait_until(lambda: a.status()["pending_envelopes"] >= 1, what="delivery to A over HTTPS")
    assert [m["text"] for m in recv(alice)] == ["and back"]
    peers = a.status()["peers"]
    assert peers == 1
