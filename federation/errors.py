"""Typed errors with stable string codes (docs/protocol.md §7).

``RemoteProtocolError``: the other side sent bad data. ``LocalProtocolError``: we misused an API.
Library exceptions are translated into these where they enter our code; only the API layer turns
codes into HTTP or WebSocket answers.
"""

from __future__ import annotations


class HavenError(Exception):
    """Root of every Haven error. ``code`` is stable and goes on the wire."""

    code = "internal"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.code)
        if code is not None:
            self.code = code


class RemoteProtocolError(HavenError):
    code = "protocol_error"


class MalformedEnvelope(RemoteProtocolError):
    code = "malformed"


class MalformedFrame(RemoteProtocolError):
    code = "malformed"


class UnknownFrame(RemoteProtocolError):
    code = "unknown_frame"


class BadSignature(RemoteProtocolError):
    code = "bad_signature"


class Replay(RemoteProtocolError):
    code = "replay"


class Expired(RemoteProtocolError):
    code = "expired"


class ClockSkew(RemoteProtocolError):
    code = "clock_skew"


class TooLarge(RemoteProtocolError):
    code = "too_large"


class UnsupportedVersion(RemoteProtocolError):
    code = "unsupported_version"


class WrongDestination(RemoteProtocolError):
    code = "wrong_destination"


class RateLimited(RemoteProtocolError):
    code = "rate_limited"


class KeyChanged(RemoteProtocolError):
    """A peer presented a node key different from the pinned one, with no valid rotation."""

    code = "key_changed"


class Unauthorized(RemoteProtocolError):
    """Bad credential *or* unknown mailbox: one answer, so there is no oracle (ARCHITECTURE §4)."""

    code = "unauthorized"


class InvalidInvite(RemoteProtocolError):
    code = "invalid_invite"


class NotFound(RemoteProtocolError):
    code = "not_found"


class KeysExhausted(RemoteProtocolError):
    code = "keys_exhausted"


class QuotaExceeded(RemoteProtocolError):
    code = "quota_exceeded"


class HashMismatch(RemoteProtocolError):
    """A blob chunk whose SHA-256 is not the one announced for its index."""

    code = "hash_mismatch"


class Conflict(RemoteProtocolError):
    """A blob id already announced with another size or other chunk hashes."""

    code = "conflict"


class NotReady(RemoteProtocolError):
    """The blob's upload is not complete yet: retry later."""

    code = "not_ready"


class Unsupported(RemoteProtocolError):
    """The other node does not offer this feature (its descriptor does not list it)."""

    code = "unsupported"


class LocalProtocolError(HavenError):
    code = "local_error"


class TransportError(HavenError):
    code = "unreachable"


class StorageError(HavenError):
    code = "storage_error"


class Unavailable(HavenError):
    """The node holding a blob could not be reached (or failed): retry later."""

    code = "unavailable"


class KeysUnavailable(HavenError):
    """A contact's keys could not be fetched (node unreachable, unknown user)."""

    code = "keys_unavailable"


class UntrustedKey(HavenError):
    """A contact's identity key or device list failed verification against the pinned one."""

    code = "untrusted_key"


class IdentityChanged(UntrustedKey):
    """A contact's identity key differs from the pinned one: sending stops until accepted."""

    code = "identity_changed"
