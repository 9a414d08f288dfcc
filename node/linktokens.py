"""Device-link tokens, held in memory only (docs/protocol.md §5, "mint_link").

A signed-in device mints a single-use token that lets another device join its account for
five minutes. Written to the store, its row would record the link time to the millisecond
(and stale WAL frames would keep it after use), so the token's hash lives only in this bounded
table. A node restart forgets every outstanding token: the user mints a new one.

Pure: takes ``now`` and returns values; no I/O.
"""

from __future__ import annotations

MAX_LINK_TOKENS = 4096


class LinkTokens:
    """Token hash -> (account, expiry), in insertion order, at most ``max_tokens`` entries."""

    def __init__(self, ttl_ms: int, max_tokens: int = MAX_LINK_TOKENS) -> None:
        self.ttl_ms = ttl_ms
        self.max_tokens = max_tokens
        self._tokens: dict[bytes, tuple[str, int]] = {}

    def __len__(self) -> int:
        return len(self._tokens)

    def mint(self, token_hash: bytes, account: str, now: int) -> int:
        """Remember a token for ``account``; returns its expiry. When the table is full the
        oldest token gives way (the per-account mint rate keeps honest accounts far below)."""
        self._purge(now)
        while len(self._tokens) >= self.max_tokens:
            del self._tokens[next(iter(self._tokens))]
        expires = now + self.ttl_ms
        self._tokens[token_hash] = (account, expires)
        return expires

    def redeem(self, token_hash: bytes, now: int) -> str | None:
        """Consume a token: its account, or None if unknown, used or expired."""
        entry = self._tokens.pop(token_hash, None)
        if entry is None or entry[1] <= now:
            return None
        return entry[0]

    def _purge(self, now: int) -> None:
        for h in [h for h, (_, exp) in self._tokens.items() if exp <= now]:
            del self._tokens[h]
