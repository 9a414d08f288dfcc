"""Node configuration: a small TOML file in the node's home directory."""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit

from federation.errors import LocalProtocolError

CONFIG_NAME = "node.toml"
KEY_NAME = "node.key"
DB_NAME = "store.db"
EPOCH_KEYS_NAME = "epochs.key"
DEFAULT_TTL_MS = 7 * 86_400_000
MAX_TTL_MS = 14 * 86_400_000


@dataclass(frozen=True, slots=True)
class NodeConfig:
    public_url: str
    listen_host: str = "127.0.0.1"
    listen_port: int = 8765
    ttl_ms: int = DEFAULT_TTL_MS
    max_ttl_ms: int = MAX_TTL_MS
    lan: bool = False
    lan_interfaces: str = ""  # comma-separated interface names or IPv4 addresses; "" = all
    owner: str = ""  # personal node: the owner's account name (shown on LAN contact cards)
    client_url: str = ""  # URL devices use to reach this node; "" = public_url
    tls_cert: str = ""
    tls_key: str = ""
    max_pending_per_mailbox: int = 10_000
    max_db_mb: int = 0  # cap on the store's size (PRAGMA max_page_count); 0 = the disk's size
    epoch_ms: int = 3_600_000

    @property
    def device_url(self) -> str:
        return self.client_url or self.public_url

    @property
    def interfaces(self) -> list[str] | None:
        names = [i.strip() for i in self.lan_interfaces.split(",") if i.strip()]
        return names or None

    @property
    def public_host(self) -> str:
        """``host[:port]`` as it appears in user addresses."""
        return urlsplit(self.public_url).netloc.lower()

    def save(self, home: str) -> None:
        lines = ["# Haven node configuration (see docs/operations.md)"]
        for key, value in asdict(self).items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, int):
                lines.append(f"{key} = {value}")
            else:
                escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
                lines.append(f'{key} = "{escaped}"')
        path = os.path.join(home, CONFIG_NAME)
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, home: str) -> NodeConfig:
        path = os.path.join(home, CONFIG_NAME)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError as exc:
            raise LocalProtocolError(f"no node at {home} (run `haven node init` first)") from exc
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in known})


def validate_public_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
        raise LocalProtocolError(f"public URL must look like https://host[:port], got {url!r}")
    return f"{parts.scheme}://{parts.netloc.lower()}"
