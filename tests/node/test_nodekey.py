"""The node key off the data disk: key_file and wrapping under an operator secret."""

from __future__ import annotations

from pathlib import Path

import pytest

from federation.signing import NodeKey
from node import nodekey
from node.config import NodeConfig

URL = "http://127.0.0.1:1"


def test_plain_key_in_home_and_in_key_file(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    key = NodeKey.generate()
    cfg = NodeConfig(public_url=URL)
    nodekey.create_key_file(str(home), cfg, key)
    assert (home / "node.key").read_bytes() == key.seed
    assert nodekey.load_key(str(home), cfg).node_id == key.node_id
    with pytest.raises(Exception, match="refusing to overwrite"):
        nodekey.create_key_file(str(home), cfg, key)

    off = NodeConfig(public_url=URL, key_file=str(tmp_path / "vol" / "a.key"))
    with pytest.raises(nodekey.NodeKeyUnavailable):
        nodekey.create_key_file(str(home), off, key)  # the volume is not there
    (tmp_path / "vol").mkdir()
    nodekey.create_key_file(str(home), off, key)
    assert nodekey.load_key(str(home), off).node_id == key.node_id
    (tmp_path / "vol" / "a.key").unlink()
    with pytest.raises(nodekey.NodeKeyUnavailable, match="not found") as err:
        nodekey.load_key(str(home), off)
    assert err.value.code == "node_key_unavailable"


def test_wrapped_key_opens_only_with_its_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"correct horse battery staple\n")
    cfg = NodeConfig(public_url=URL, key_secret_file=str(secret))
    key = NodeKey.generate()
    nodekey.create_key_file(str(tmp_path), cfg, key)
    data = (tmp_path / "node.key").read_bytes()
    assert len(data) == nodekey.WRAPPED_SIZE and data.startswith(nodekey.MAGIC)
    assert key.seed not in data
    assert nodekey.load_key(str(tmp_path), cfg).node_id == key.node_id

    secret.write_bytes(b"wrong")
    with pytest.raises(nodekey.NodeKeyUnavailable, match="does not unwrap"):
        nodekey.load_key(str(tmp_path), cfg)
    with pytest.raises(nodekey.NodeKeyUnavailable, match="sets no key_secret_file"):
        nodekey.load_key(str(tmp_path), NodeConfig(public_url=URL))

    # systemd LoadCredential=: credential:NAME under $CREDENTIALS_DIRECTORY
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "haven-node").write_bytes(b"correct horse battery staple")
    cred = NodeConfig(public_url=URL, key_secret_file="credential:haven-node")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(nodekey.NodeKeyUnavailable, match="CREDENTIALS_DIRECTORY"):
        nodekey.load_key(str(tmp_path), cred)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert nodekey.load_key(str(tmp_path), cred).node_id == key.node_id

    # rotation keeps the place and the wrapping
    new = NodeKey.generate()
    nodekey.replace_key_file(str(tmp_path), cred, new)
    data = (tmp_path / "node.key").read_bytes()
    assert data.startswith(nodekey.MAGIC) and new.seed not in data
    assert nodekey.load_key(str(tmp_path), cred).node_id == new.node_id
