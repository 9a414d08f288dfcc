"""The PostgreSQL store's plain tables: accounts, invites, devices, device lists, one-time and
fallback keys, peers. Stored in clear, as on SQLite (docs/threat-model.md §3); only the
deletions that reach pending envelopes (a removed device or account) touch sealed rows, by
their keyed mailbox hashes. :class:`node.pg_store.PgStore` adds the envelopes and outbox.
"""

from __future__ import annotations

from collections.abc import Collection

from .pg_base import PgBase
from .sealed_rows import (
    ENV_MB,
    hashes,
)
from .store import (
    DeviceRecord,
    InviteInfo,
    PeerRecord,
    day,
    invite_infos,
    revoke_prefix,
)


class PgAccounts(PgBase):
    """Accounts, invites, devices, keys and peers on PostgreSQL."""

    # ---- accounts, invites, devices ----------------------------------------------------------

    async def create_account(self, name: str, now: int) -> bool:
        # Stored as the UTC day (docs/threat-model.md: coarse metadata at rest).
        return (
            await self._exec(
                "INSERT INTO accounts (name, created) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                name,
                day(now),
            )
            == 1
        )

    async def account_exists(self, name: str) -> bool:
        return await self._one("SELECT 1 FROM accounts WHERE name=$1", name) is not None

    async def remove_account(self, name: str) -> int:
        mbs = [
            bytes(r[0])
            for r in await self._all("SELECT mailbox FROM devices WHERE account=$1", name)
        ]
        async with self._tx(exclusive=False) as conn:
            mbh = [h for mb in mbs for h in hashes(self.keys, ENV_MB, mb)]
            await conn.execute("DELETE FROM envelopes WHERE mbh = ANY($1::bytea[])", mbh)
            for table in ("otks", "fallback", "devices"):
                await conn.execute(f"DELETE FROM {table} WHERE mailbox = ANY($1::bytea[])", mbs)
            for table, col in (
                ("device_lists", "account"),
                ("invites", "name"),
                ("accounts", "name"),
            ):
                await conn.execute(f"DELETE FROM {table} WHERE {col}=$1", name)
        return len(mbs)

    async def add_invite(
        self, token_hash: bytes, name: str, expires: int, kind: str = "invite", uses: int = 1
    ) -> None:
        await self._exec(
            "INSERT INTO invites (token_hash, name, expires, kind, uses) "
            "VALUES ($1, $2, $3, $4, $5)",
            token_hash,
            name,
            expires,
            kind,
            max(1, uses),
        )

    async def redeem_invite(self, token_hash: bytes, now: int) -> tuple[str, str] | None:
        """Use a token once: ``(account, kind)``, or None if unknown or expired. The decrement
        (its row lock serialises concurrent redemptions) and the delete at zero or once
        expired are one transaction."""
        async with self._tx() as conn:
            row = await conn.fetchrow(
                "UPDATE invites SET uses = uses - 1 WHERE token_hash=$1 AND uses > 0 "
                "RETURNING name, expires, kind, uses",
                token_hash,
            )
            if row is not None and (row["uses"] <= 0 or row["expires"] <= now):
                await conn.execute("DELETE FROM invites WHERE token_hash=$1", token_hash)
        if row is None or int(row["expires"]) <= now:
            return None
        return str(row["name"]), str(row["kind"])

    async def account_status(self, name: str) -> str | None:
        row = await self._one("SELECT disabled FROM accounts WHERE name=$1", name)
        return None if row is None else ("disabled" if row[0] else "active")

    async def set_account_disabled(self, name: str, disabled: bool) -> bool:
        return (
            await self._exec("UPDATE accounts SET disabled=$1 WHERE name=$2", disabled, name) == 1
        )

    async def set_account_quota(self, name: str, quota: int) -> bool:
        return (
            await self._exec("UPDATE accounts SET quota=$1 WHERE name=$2", max(0, quota), name) == 1
        )

    async def list_invites(self, now: int) -> list[InviteInfo]:
        rows = await self._all(
            "SELECT token_hash, name, kind, expires, uses FROM invites WHERE expires > $1 "
            "ORDER BY expires, name",
            now,
        )
        return invite_infos(rows)

    async def revoke_invite(self, ref: str) -> int:
        prefix = revoke_prefix(ref)
        if prefix is None:
            return 0
        return await self._exec(
            "DELETE FROM invites WHERE substr(encode(token_hash, 'hex'), 1, $1) = $2",
            len(prefix),
            prefix,
        )

    async def add_device(self, account: str, mailbox: bytes, auth_key: bytes) -> None:
        await self._exec("INSERT INTO devices VALUES ($1, $2, $3)", mailbox, account, auth_key)

    async def get_device(self, mailbox: bytes) -> DeviceRecord | None:
        row = await self._one("SELECT account, auth_key FROM devices WHERE mailbox=$1", mailbox)
        return None if row is None else DeviceRecord(str(row[0]), mailbox, bytes(row[1]))

    async def devices_of(self, account: str) -> list[bytes]:
        rows = await self._all("SELECT mailbox FROM devices WHERE account=$1", account)
        return [bytes(r[0]) for r in rows]

    async def remove_device(self, mailbox: bytes) -> None:
        async with self._tx(exclusive=False) as conn:
            mbh = list(hashes(self.keys, ENV_MB, mailbox))
            await conn.execute("DELETE FROM envelopes WHERE mbh = ANY($1::bytea[])", mbh)
            for table in ("otks", "fallback", "devices"):
                await conn.execute(f"DELETE FROM {table} WHERE mailbox=$1", mailbox)

    async def set_device_list(self, account: str, version: int, blob: bytes, sig: bytes) -> bool:
        """Store a newer signed list; refuse a version rollback."""
        n = await self._exec(
            "INSERT INTO device_lists VALUES ($1, $2, $3, $4) ON CONFLICT (account) DO UPDATE "
            "SET version=excluded.version, blob=excluded.blob, sig=excluded.sig "
            "WHERE excluded.version >= device_lists.version",
            account,
            version,
            blob,
            sig,
        )
        return n == 1

    async def get_device_list(self, account: str) -> tuple[bytes, bytes] | None:
        row = await self._one("SELECT blob, sig FROM device_lists WHERE account=$1", account)
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    # ---- keys --------------------------------------------------------------------------------

    async def add_otks(self, mailbox: bytes, keys: list[tuple[str, str]]) -> int:
        await self._exec(
            "INSERT INTO otks SELECT $1, k, v FROM unnest($2::text[], $3::text[]) AS t(k, v) "
            "ON CONFLICT DO NOTHING",
            mailbox,
            [k for k, _ in keys],
            [v for _, v in keys],
        )
        return await self.count_otks(mailbox)

    async def set_fallback(self, mailbox: bytes, key_id: str, key: str) -> None:
        await self._exec(
            "INSERT INTO fallback VALUES ($1, $2, $3) ON CONFLICT (mailbox) DO UPDATE "
            "SET key_id=excluded.key_id, key=excluded.key",
            mailbox,
            key_id,
            key,
        )

    async def claim_otk(self, mailbox: bytes) -> tuple[str, str] | None:
        """One statement: two concurrent claims never get the same key (SKIP LOCKED: a key
        another claim holds is passed over; if that claim rolls back, the key stays)."""
        row = await self._one(
            "DELETE FROM otks WHERE (mailbox, key_id) = (SELECT mailbox, key_id FROM otks "
            "WHERE mailbox=$1 LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING key_id, key",
            mailbox,
        )
        if row is None:
            row = await self._one("SELECT key_id, key FROM fallback WHERE mailbox=$1", mailbox)
        return None if row is None else (str(row[0]), str(row[1]))

    async def count_otks(self, mailbox: bytes) -> int:
        return int(await self._val("SELECT count(*) FROM otks WHERE mailbox=$1", mailbox))

    # ---- peers -------------------------------------------------------------------------------

    async def get_peer(self, node_id: str) -> PeerRecord | None:
        row = await self._one(
            "SELECT node_id, url, host, last_seen FROM peers WHERE node_id=$1", node_id
        )
        return None if row is None else PeerRecord(*row)

    async def peer_by_host(self, host: str) -> PeerRecord | None:
        row = await self._one(
            "SELECT node_id, url, host, last_seen FROM peers WHERE host=$1 UNION ALL "
            "SELECT p.node_id, p.url, p.host, p.last_seen FROM peer_hosts a "
            "JOIN peers p ON p.node_id = a.node_id WHERE a.host=$1 LIMIT 1",
            host,
        )
        return None if row is None else PeerRecord(*row)

    async def add_peer_host(self, host: str, node_id: str) -> None:
        """Keep ``host`` (a peer's former host) routed to ``node_id`` (§12.5)."""
        await self._exec(
            "INSERT INTO peer_hosts VALUES ($1, $2) ON CONFLICT (host) DO UPDATE SET "
            "node_id=excluded.node_id",
            host,
            node_id,
        )

    async def upsert_peer(self, peer: PeerRecord) -> None:
        """Pin (or update) a peer; ``last_seen`` is stored as its UTC day."""
        await self._exec(
            "INSERT INTO peers (node_id, url, host, last_seen) VALUES ($1, $2, $3, $4) "
            "ON CONFLICT (node_id) DO UPDATE SET "
            "url=excluded.url, host=excluded.host, last_seen=excluded.last_seen",
            peer.node_id,
            peer.url,
            peer.host,
            day(peer.last_seen),
        )

    async def peer_moved_at(self, node_id: str) -> int:
        """``created`` of the last locator change followed for ``node_id`` (0: none)."""
        row = await self._one("SELECT moved FROM peers WHERE node_id=$1", node_id)
        return 0 if row is None else int(row[0])

    async def set_peer_moved_at(self, node_id: str, created: int) -> None:
        """Note the last locator change followed for ``node_id`` (never lowered)."""
        await self._exec(
            "UPDATE peers SET moved=$2 WHERE node_id=$1 AND moved < $2", node_id, created
        )

    async def drop_stale_peers(self, before: int, keep: Collection[str] = ()) -> list[str]:
        """Delete pins last seen before ``before`` (ms), except ``keep``; the ids dropped."""
        rows = await self._all(
            "DELETE FROM peers WHERE last_seen < $1 AND NOT node_id = ANY($2::text[]) "
            "RETURNING node_id",
            before,
            list(keep),
        )
        return sorted(str(r[0]) for r in rows)

    async def all_mailboxes(self) -> list[bytes]:
        return [bytes(r[0]) for r in await self._all("SELECT mailbox FROM devices")]

    async def all_peers(self) -> list[PeerRecord]:
        rows = await self._all("SELECT node_id, url, host, last_seen FROM peers")
        return [PeerRecord(*r) for r in rows]

    async def counts(self) -> dict[str, int]:
        row = await self._one(
            "SELECT (SELECT count(*) FROM accounts), (SELECT count(*) FROM envelopes), "
            "(SELECT count(*) FROM outbox), (SELECT count(*) FROM peers)"
        )
        values = [int(v) for v in row] if row else [0, 0, 0, 0]
        return dict(
            zip(("accounts", "pending_envelopes", "outbox_envelopes", "peers"), values, strict=True)
        )
