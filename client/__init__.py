"""Haven device: keys, Olm sessions, sealed sender, local history, and the ``haven`` CLI.

:class:`client.device.Device` is the Python API; ``client.cli`` is a thin layer over it. A device
talks only to its home node (``client.connection``); the home node fetches foreign keys over
federation. Keys and Olm sessions are pickled encrypted under the device's local storage key and
persisted, atomically, before any ciphertext they produced is sent.
"""

from .device import Device, ReceivedMessage

__all__ = ["Device", "ReceivedMessage"]
