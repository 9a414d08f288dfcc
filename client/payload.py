"""The innermost layer: what one device says to another, inside Olm (docs/protocol.md §3.1).

Kinds: ``text`` (with an optional disappearing timer), ``edit`` and ``delete`` (of an earlier
message by the same sender), ``delivered`` and ``read`` receipts (listing message ids), and
``sync``: a payload one of our own devices received and forwards to our devices its sender
missed (an outdated device list), ``profile`` (the sender's display name, ``name``) and
``timer`` (a conversation's disappearing timer, ``expires_in``, set at ``sent_at``) and
``file`` (an attachment: :class:`FileRef`, with ``text`` as its caption). Groups
(client/groups.py) add ``group_key`` (a Megolm session key, ``gkey``) and ``group_join`` (an
invite secret, ``gkey``), both 1:1, and inside Megolm (``to = "group:<hex>"``) ``text`` and
``read`` with ``wm`` (per-sender read watermarks) or ``hide`` (read receipts off). ``moved``
(1:1, docs/protocol.md §12.5): the sender's home node moved; ``old`` is the address it had
(the sealed sender), ``text`` the new one. Every
field, timers and names included, travels inside the encryption; nodes never see any of it.

A kind this version does not know (a newer device's: groups, attachments) still decodes, with
its fields; the receiver ignores it (:data:`KINDS` lists the kinds this version applies).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import nacl.encoding
import nacl.hash

from federation.errors import MalformedEnvelope
from federation.wire import packb, unpackb

PAYLOAD_VERSION = 1
KINDS = frozenset(
    {
        "text",
        "edit",
        "delete",
        "delivered",
        "read",
        "sync",
        "profile",
        "timer",
        "file",
        "group_key",
        "group_join",
        "devices",
        "moved",
    }
)
GKEY_MAX = 4096  # group_key / group_join: the msgpack map in ``gkey``
WM_MAX = 1000  # read watermarks in one group ``read`` payload (one per member at most)
ADDRESS_MAX = 320
NAME_MAX = 64  # profile: display name, in characters (longer ones are cut by the receiver)
KIND_MAX = 32
DEVICE_TAG_LEN = 8
MAX_DEVS = 16  # at most one tag per device of the recipient's signed list
FILE_NAME_MAX = 255  # UTF-8 bytes
FILE_MIME_MAX = 127
FILE_THUMB_MAX = 16 * 1024
FILE_SIZE_MAX = 1 << 40


def device_tag(device_id: str) -> bytes:
    """A short name for a device id inside payloads (``devs``): 8 bytes of BLAKE2b."""
    return nacl.hash.blake2b(
        device_id.encode(),
        digest_size=DEVICE_TAG_LEN,
        person=b"haven-devtag",
        encoder=nacl.encoding.RawEncoder,
    )


@dataclass(frozen=True, slots=True)
class FileRef:
    """A ``file`` payload's attachment (docs/protocol.md §3.1): where the padded ciphertext
    is (``blob`` on node ``node``), how to open it (``key``) and check it (``sha256``), what
    it is, and this recipient device's own fetch ``token``."""

    blob: bytes  # 16 random bytes
    node: str  # node id of the uploader's home node
    key: bytes  # secretstream key, 32 bytes
    sha256: bytes  # of the whole padded ciphertext
    size: int  # plaintext bytes
    padded: int  # ciphertext bytes as stored
    name: str
    mime: str
    thumb: bytes = b""  # images: a JPEG of at most 16 KiB
    token: bytes = b""  # 32 bytes, different for each recipient device

    def to_obj(self) -> dict[str, object]:
        return {
            "blob": self.blob,
            "node": self.node,
            "key": self.key,
            "sha256": self.sha256,
            "size": self.size,
            "padded": self.padded,
            "name": self.name,
            "mime": self.mime,
            "thumb": self.thumb,
            "token": self.token,
        }

    @classmethod
    def from_obj(cls, obj: object) -> FileRef:
        if not isinstance(obj, dict):
            raise MalformedEnvelope("bad file reference")
        f = cls(
            blob=bytes(obj["blob"]),
            node=str(obj["node"]),
            key=bytes(obj["key"]),
            sha256=bytes(obj["sha256"]),
            size=int(obj["size"]),
            padded=int(obj["padded"]),
            name=str(obj.get("name", "")),
            mime=str(obj.get("mime", "")),
            thumb=bytes(obj.get("thumb", b"")),
            token=bytes(obj.get("token", b"")),
        )
        if (
            len(f.blob) != 16
            or len(f.key) != 32
            or len(f.sha256) != 32
            or len(f.token) not in (0, 32)
            or not 0 <= f.size <= FILE_SIZE_MAX
            or not 0 < f.padded <= FILE_SIZE_MAX
            or not 0 < len(f.node) <= 64
            or len(f.name.encode()) > FILE_NAME_MAX
            or len(f.mime) > FILE_MIME_MAX
            or len(f.thumb) > FILE_THUMB_MAX
        ):
            raise MalformedEnvelope("bad file reference fields")
        return f


@dataclass(frozen=True, slots=True)
class Payload:
    id: bytes
    kind: str
    to: str  # the conversation's other party, as the sender addressed it
    sent_at: int
    text: str = ""
    target: bytes = b""  # edit/delete: the message it applies to
    expires_in: int = 0  # disappearing timer, ms (0 = keep)
    ids: tuple[bytes, ...] = field(default=())  # receipts: the messages they acknowledge
    # the recipient's devices the sender encrypted this payload for (device_tag each)
    devs: tuple[bytes, ...] = field(default=())
    origin: str = ""  # sync: who sent the forwarded payload
    inner: bytes = b""  # sync: the forwarded payload, as its sender encoded it
    name: str = ""  # profile: the sender's display name
    file: FileRef | None = None  # file: the attachment
    # group read: address -> sent_at ms ("I have read every message of this sender up to it")
    wm: dict[str, int] = field(default_factory=dict)
    hide: bool = False  # group read: "my read receipts are off" (counted as hidden)
    gkey: bytes = b""  # group_key / group_join: a msgpack map (client/groups.py)
    old: str = ""  # moved: the sender's former address (``text``: the new one)

    @property
    def known(self) -> bool:
        """Whether this version applies the kind (else: a newer device's, ignored)."""
        return self.kind in KINDS

    def encode(self) -> bytes:
        extra: dict[str, object] = {"name": self.name} if self.name else {}
        if self.file is not None:
            extra["file"] = self.file.to_obj()
        if self.wm:
            extra["wm"] = dict(self.wm)
        if self.hide:
            extra["hide"] = True
        if self.gkey:
            extra["gkey"] = self.gkey
        if self.old:
            extra["old"] = self.old
        return packb(
            {
                **extra,
                "v": PAYLOAD_VERSION,
                "id": self.id,
                "kind": self.kind,
                "to": self.to,
                "sent_at": self.sent_at,
                "text": self.text,
                "target": self.target,
                "expires_in": self.expires_in,
                "ids": list(self.ids),
                "devs": list(self.devs),
                "origin": self.origin,
                "inner": self.inner,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> Payload:
        obj = unpackb(data, max_len=len(data))
        try:
            kind = obj["kind"]
            if obj["v"] != PAYLOAD_VERSION or not isinstance(kind, str) or not kind:
                raise MalformedEnvelope("unknown payload version or kind")
            if len(kind) > KIND_MAX:
                raise MalformedEnvelope("payload kind too long")
            p = cls(
                id=bytes(obj["id"]),
                kind=str(obj["kind"]),
                to=str(obj["to"]),
                sent_at=int(obj["sent_at"]),
                text=str(obj.get("text", "")),
                target=bytes(obj.get("target", b"")),
                expires_in=int(obj.get("expires_in", 0)),
                ids=tuple(bytes(i) for i in obj.get("ids", [])),
                devs=tuple(bytes(i) for i in obj.get("devs", [])),
                origin=str(obj.get("origin", "")),
                inner=bytes(obj.get("inner", b"")),
                name=str(obj.get("name", "")),
                file=FileRef.from_obj(obj["file"]) if "file" in obj else None,
                wm=_watermarks(obj.get("wm", {})),
                hide=bool(obj.get("hide", False)),
                gkey=bytes(obj.get("gkey", b"")),
                old=str(obj.get("old", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedEnvelope("bad payload") from exc
        if len(p.id) != 16 or p.expires_in < 0 or len(p.ids) > 1000:
            raise MalformedEnvelope("bad payload fields")
        if len(p.devs) > MAX_DEVS or any(len(t) != DEVICE_TAG_LEN for t in p.devs):
            raise MalformedEnvelope("bad payload device tags")
        if (p.kind == "sync") != bool(p.inner) or (p.kind == "sync") != bool(p.origin):
            raise MalformedEnvelope("sync payloads, and only they, carry origin and inner")
        if (p.kind == "file") != (p.file is not None):
            raise MalformedEnvelope("file payloads, and only they, carry a file")
        if len(p.gkey) > GKEY_MAX or (p.kind in ("group_key", "group_join")) != bool(p.gkey):
            raise MalformedEnvelope("group key payloads, and only they, carry gkey")
        if (p.kind == "moved") != bool(p.old) or len(p.old) > ADDRESS_MAX:
            raise MalformedEnvelope("moved payloads, and only they, carry old")
        if p.kind == "moved" and not 0 < len(p.text) <= ADDRESS_MAX:
            raise MalformedEnvelope("a moved payload names the new address")
        return p


def _watermarks(obj: object) -> dict[str, int]:
    """``wm``: at most :data:`WM_MAX` entries of address -> non-negative ms."""
    if not isinstance(obj, dict) or len(obj) > WM_MAX:
        raise MalformedEnvelope("bad read watermarks")
    out: dict[str, int] = {}
    for k, v in obj.items():
        if not isinstance(k, str) or len(k) > ADDRESS_MAX or not isinstance(v, int) or v < 0:
            raise MalformedEnvelope("bad read watermark")
        out[k] = v
    return out
