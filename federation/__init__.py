"""Haven protocol: wire types, signing, replay windows, sealing, E2E sessions, peer transport.

The *pure core* (``errors``, ``ids``, ``clock``, ``wire``, ``frames``, ``signing``, ``replay``,
``backoff``, ``sealing``, ``devicelist``, ``lanid``) takes bytes and ``now`` and returns values or
raises typed errors. It imports no asyncio, aiohttp, sqlite or zeroconf, so it is tested without
sockets. The thin asyncio shells (``transport``, ``lan``) only move bytes, run timers and
translate library exceptions into :mod:`federation.errors`.

This package never imports ``node`` or ``client`` (enforced by import-linter in ``scripts/check``).
See ``docs/protocol.md`` for the contract these modules implement.
"""
