"""Haven node: the daemon that holds ciphertext only until it is delivered.

Composition (``node.app.build``) wires, explicitly: config, clock, the node key, the store
(:mod:`node.sqlite_store`), the group committer and delivery registry (:mod:`node.mailbox`), the
per-peer outbox sender (:mod:`node.outbox`), the peer directory (:mod:`node.peers`), the sweeper
(:mod:`node.sweeper`) and the two HTTP surfaces: the device WebSocket API
(:mod:`node.client_api`) and the federation API (:mod:`node.federation_api`). Every background task
belongs to one TaskGroup owned by :class:`node.app.Node`.
"""
