"""The Haven app: a device daemon (``haven app``) with a local web UI and API on loopback.

``core`` holds the unlocked device, its one connection to the home node and the durable
outgoing queue; ``web`` serves the UI and the JSON/WebSocket API (docs/app.md); ``ipc`` lets
CLI commands on the same device home go through the running daemon over a Unix socket.
"""
