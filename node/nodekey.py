"""Where the node key lives, and how it is kept off the data disk (docs/operations.md).

By default the 32-byte Ed25519 seed is ``node.key`` in the node home. Two options keep a seized
data disk from letting an examiner act as this node (sign requests, answer as it):

- ``key_file``: the seed lives elsewhere (a removable volume, a tmpfs filled at boot, a secrets
  mount). ``node.toml`` records the path; a missing file stops ``serve`` with one clear line.
- ``key_secret_file``: the key file holds the seed *wrapped*: XSalsa20-Poly1305 (``SecretBox``)
  under a key derived with Argon2id from the bytes of an operator secret, read at start from a
  file or, written ``credential:NAME``, from ``$CREDENTIALS_DIRECTORY/NAME`` (systemd
  ``LoadCredential=``/``LoadCredentialEncrypted=``). The secret never touches the data disk.

Both combine (a wrapped key in ``key_file``). Any freshly minted node key can already ask a peer
which names exist; keeping this key off the disk only prevents impersonating *this* node.

Wrapped file layout (fixed size, so the format is self-describing)::

    MAGIC (8) | opslimit u32 | memlimit u32 (bytes) | salt (16) | nonce (24) | box (32 + 16)
"""

from __future__ import annotations

import os
import struct

import nacl.exceptions
import nacl.pwhash.argon2id as argon2id
import nacl.secret

from federation.errors import LocalProtocolError
from federation.signing import NodeKey

from .config import KEY_NAME, NodeConfig

MAGIC = b"HVNKW1\x00\x00"
CREDENTIAL_PREFIX = "credential:"
_HEADER = struct.Struct(">8sII16s")
WRAPPED_SIZE = _HEADER.size + nacl.secret.SecretBox.NONCE_SIZE + 32 + nacl.secret.SecretBox.MACBYTES
MAX_SECRET_BYTES = 64 * 1024
# Argon2id "interactive" cost: the derivation runs once per start, rotation and init.
OPSLIMIT = argon2id.OPSLIMIT_INTERACTIVE
MEMLIMIT = argon2id.MEMLIMIT_INTERACTIVE


class NodeKeyUnavailable(LocalProtocolError):
    """The node key (or the secret that unwraps it) cannot be read."""

    code = "node_key_unavailable"


def key_path(home: str, config: NodeConfig) -> str:
    """The file that holds the (possibly wrapped) seed."""
    return config.key_file or os.path.join(home, KEY_NAME)


def secret_path(spec: str) -> str:
    """A secret file path, or ``credential:NAME`` resolved under ``$CREDENTIALS_DIRECTORY``."""
    if not spec.startswith(CREDENTIAL_PREFIX):
        return spec
    name = spec[len(CREDENTIAL_PREFIX) :]
    if not name or "/" in name or name in (".", ".."):
        raise NodeKeyUnavailable(f"bad credential name in key_secret_file {spec!r}")
    base = os.environ.get("CREDENTIALS_DIRECTORY", "")
    if not base:
        raise NodeKeyUnavailable(
            f"key_secret_file is {spec!r} but $CREDENTIALS_DIRECTORY is not set "
            "(start the node from a systemd unit with LoadCredential=)"
        )
    return os.path.join(base, name)


def read_secret(spec: str) -> bytes:
    """The operator secret's bytes (one trailing newline ignored)."""
    path = secret_path(spec)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        raise NodeKeyUnavailable(
            f"cannot read the node key secret {path}: {exc.strerror or exc}"
        ) from exc
    data = data.removesuffix(b"\n").removesuffix(b"\r")
    if not data or len(data) > MAX_SECRET_BYTES:
        raise NodeKeyUnavailable(f"the node key secret {path} is empty or too large")
    return data


def _box(secret: bytes, salt: bytes, opslimit: int, memlimit: int) -> nacl.secret.SecretBox:
    key = argon2id.kdf(nacl.secret.SecretBox.KEY_SIZE, secret, salt, opslimit, memlimit)
    return nacl.secret.SecretBox(key)


def wrap_seed(seed: bytes, secret: bytes) -> bytes:
    salt = os.urandom(argon2id.SALTBYTES)
    box = _box(secret, salt, OPSLIMIT, MEMLIMIT)
    return _HEADER.pack(MAGIC, OPSLIMIT, MEMLIMIT, salt) + bytes(box.encrypt(seed))


def unwrap_seed(data: bytes, secret: bytes) -> bytes:
    if len(data) != WRAPPED_SIZE or not data.startswith(MAGIC):
        raise NodeKeyUnavailable("the node key file is not a wrapped node key")
    _, opslimit, memlimit, salt = _HEADER.unpack_from(data)
    if opslimit > 16 or memlimit > 1 << 30:  # refuse a file that asks for absurd work
        raise NodeKeyUnavailable("the wrapped node key asks for an unsupported cost")
    try:
        return bytes(_box(secret, salt, opslimit, memlimit).decrypt(data[_HEADER.size :]))
    except nacl.exceptions.CryptoError as exc:
        raise NodeKeyUnavailable("the node key secret does not unwrap the node key") from exc


def encode_key(key: NodeKey, config: NodeConfig) -> bytes:
    """The bytes of the key file: the seed, wrapped when ``key_secret_file`` is set."""
    if config.key_secret_file:
        return wrap_seed(key.seed, read_secret(config.key_secret_file))
    return key.seed


def decode_key(data: bytes, config: NodeConfig, path: str) -> NodeKey:
    if data.startswith(MAGIC):
        if not config.key_secret_file:
            raise NodeKeyUnavailable(f"{path} is wrapped but node.toml sets no key_secret_file")
        return NodeKey(unwrap_seed(data, read_secret(config.key_secret_file)))
    if config.key_secret_file:
        raise NodeKeyUnavailable(f"{path} is not wrapped but node.toml sets key_secret_file")
    if len(data) != 32:
        raise NodeKeyUnavailable(f"{path} is not a node key")
    return NodeKey(data)


def load_key(home: str, config: NodeConfig) -> NodeKey:
    """Read (and unwrap) the node key.

    Raises:
        NodeKeyUnavailable: the file or the secret is missing, or the secret is wrong.
    """
    path = key_path(home, config)
    try:
        with open(path, "rb") as f:
            data = f.read(WRAPPED_SIZE + 1)
    except FileNotFoundError as exc:
        where = "key_file in node.toml" if config.key_file else "the node home"
        raise NodeKeyUnavailable(
            f"node key file {path} not found (is its volume mounted? see {where})"
        ) from exc
    except OSError as exc:
        raise NodeKeyUnavailable(f"cannot read node key {path}: {exc.strerror or exc}") from exc
    return decode_key(data, config, path)


def create_key_file(home: str, config: NodeConfig, key: NodeKey) -> None:
    """Write a new key file (``haven node init``); never overwrites one."""
    path = key_path(home, config)
    data = encode_key(key, config)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise LocalProtocolError(
            f"{path} already exists; refusing to overwrite a node key"
        ) from exc
    except OSError as exc:
        raise NodeKeyUnavailable(f"cannot write node key {path}: {exc.strerror or exc}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_key_file(home: str, config: NodeConfig, key: NodeKey) -> None:
    """Atomically replace the key file in place, keeping its location and wrapping
    (``haven node rotate-key``)."""
    path = key_path(home, config)
    data = encode_key(key, config)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
