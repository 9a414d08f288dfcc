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
    pin_ttl_days: int = 30  # personal node: peer pins unused this long are dropped; 0 = never
    client_url: str = ""  # URL devices use to reach this node; "" = public_url
    tls_cert: str = ""
    tls_key: str = ""
    key_file: str = ""  # node key outside the home (node/nodekey.py); "" = HOME/node.key
    key_secret_file: str = ""  # node key wrapped under this secret; "credential:NAME" = systemd
    max_pending_per_mailbox: int = 10_000
    max_db_mb: int = 0  # cap on the store's size (PRAGMA max_page_count); 0 = the disk's size
    epoch_ms: int = 600_000  # at-rest key lifetime (node/atrest.py; docs/operations.md §5)
    # "" = SQLite in the home; a postgresql:// (or postgres://) DSN = PostgreSQL (node/pg_store.py;
    # docs/operations.md "PostgreSQL back end"). A password belongs in a libpq passfile.
    store: str = ""
    # ---- limits (docs/operations.md "Limits"); all in memory, none persisted -----------------
    # connection admission (node/admission.py)
    max_connections: int = 4096  # every open TCP connection
    max_unauthenticated: int = 1024  # not yet authenticated; the rest is reserved for devices
    max_connections_per_source: int = 64  # a "source" is the peer IP, in memory only
    max_unauthenticated_per_source: int = 16
    exempt_loopback: bool = True  # loopback sources skip the per-source caps (tests, relays)
    trusted_proxy: bool = False  # take the source from X-Forwarded-For (behind a reverse proxy)
    auth_timeout_ms: int = 10_000  # a WebSocket must authenticate within this
    read_grace_ms: int = 10_000  # a started request/frame may take this long ...
    min_read_rate: int = 16_384  # ... plus its bytes at this rate (bytes/s)
    idle_timeout_ms: int = 75_000  # idle keep-alive HTTP connection
    max_write_queue_bytes: int = 8 * 1024 * 1024  # a device that does not read is disconnected
    preauth_max_frame: int = 64 * 1024  # largest frame before authentication
    # delivery (node/client_api.py): Deliver frames and the unacked window
    max_deliver_bytes: int = 1024 * 1024
    max_deliver_envelopes: int = 256
    deliver_window_bytes: int = 4 * 1024 * 1024
    deliver_window_envelopes: int = 2000
    # outbox quotas
    max_outbox_per_destination: int = 100_000  # queued envelopes for one peer node
    max_outbox_per_account: int = 20_000  # queued remote envelopes of one account (memory only)
    # new peers and tokens
    new_peer_rate: int = 20  # requests/s shared by all node keys this node has not pinned
    new_peer_burst: int = 100
    link_tokens_per_hour: int = 30  # mint_link per account
    registrations_per_minute: int = 60  # invite/link redemption attempts, node-wide
    # accounts (docs/operations.md "Accounts and invites")
    open_registration: bool = False  # invite-only unless true: devices may pick a free name
    registrations_per_ip_per_hour: int = 5  # open registrations per source (memory only)
    # disk
    ballast_mb: int = 32  # released when the disk fills so deletes and acks still succeed
    # attachments (node/blobs.py; docs/operations.md §3)
    max_file_mb: int = 100  # largest file (plaintext MiB; its padded ciphertext may be 12.5% more)
    max_blob_mb_per_account: int = 300  # bytes in flight per account (memory only)
    max_blob_store_mb: int = 2048  # node-wide cap on HOME/blobs, fetched copies included
    # groups: multi-recipient submission and batched key queries (docs/protocol.md §11.3-11.4);
    # false = serve as a node without the feature (no advert, its frames and endpoints refused)
    multi: bool = True
    # logs
    log_lines_per_minute: int = 120  # per kind of error line; the rest are counted
    log_format: str = "text"  # "text" or "json": one JSON object per line (node/logs.py)
    # admin listener: /metrics, /healthz, /readyz (node/admin.py); port 0 = the kernel picks
    admin_listen: str = "127.0.0.1:0"
    # relay service (node/relay.py; docs/operations.md "Relays"): route <label>.relay_domain
    relay: bool = False
    relay_domain: str = ""  # "" = the host part of public_url
    relay_quota_mb: int = 64  # default quota of held envelopes per client

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


STORE_SCHEMES = ("postgresql", "postgres")


def validate_store(dsn: str) -> str:
    """``""`` (SQLite in the node home) or a ``postgresql://`` / ``postgres://`` DSN. The
    message never repeats the DSN (it may hold a password)."""
    if dsn and urlsplit(dsn).scheme not in STORE_SCHEMES:
        raise LocalProtocolError("--store must be a postgresql:// or postgres:// DSN")
    return dsn
