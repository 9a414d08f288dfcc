"""Decrypt SQLCipher 4 pages found anywhere in a raw image, for the carver (examiner with the key).

SQLCipher 4 defaults: 4096-byte pages whose last 80 bytes are reserved (16-byte IV, 64-byte
HMAC-SHA512); the first 4016 bytes are AES-256-CBC ciphertext under the database key (with the
raw-key syntax ``x'…'`` the 32 bytes are the AES key as they are, no KDF). Page 1 starts with
the 16-byte salt instead. WAL frames carry the same encrypted page after a clear 24-byte frame
header (page number, big-endian, first).

Candidates: every 4 KiB block of the image (database file pages) and every WAL-frame position
(a multiple of 8: the WAL header is 32 bytes and frames are 24 + 4096, and files start on a
block boundary) whose clear frame header holds a plausible page number. Each is
decrypted without checking the HMAC (the page number of a freed block is unknown); the carver's
own validation then keeps only real b-tree pages. The output is a buffer of 4096-byte pages
(plaintext plus zeroed reserve) that :func:`tests.forensics.carve.carve` reads with
``usable=4016``. AES comes from the system's libcrypto through ctypes (Python's ``ssl`` module
links the same library), so no extra package is needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re

PAGE = 4096
RESERVE = 80
USABLE = PAGE - RESERVE
_lib: ctypes.CDLL | None = None
# a WAL frame header starts with a big-endian page number below 65536 (and not zero)
_FRAME = re.compile(rb"(?=\x00\x00(?!\x00\x00))")
_frames_of: tuple[int, list[int]] = (0, [])


def frame_candidates(raw: bytes) -> list[int]:
    """Offsets (multiples of 8) where an encrypted page could follow a clear WAL frame header."""
    global _frames_of
    if _frames_of[0] != id(raw):
        hits = (m.start() + 24 for m in _FRAME.finditer(raw) if m.start() % 8 == 0)
        _frames_of = (id(raw), [at for at in hits if at + PAGE <= len(raw)])
    return _frames_of[1]


def _crypto() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("crypto") or "libcrypto.so.3"
        lib = ctypes.CDLL(name)
        lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
        lib.EVP_aes_256_cbc.restype = ctypes.c_void_p
        lib.EVP_DecryptInit_ex.argtypes = [ctypes.c_void_p] * 5
        lib.EVP_CIPHER_CTX_set_padding.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.EVP_DecryptUpdate.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_char_p,
            ctypes.c_int,
        ]
        lib.EVP_CIPHER_CTX_free.argtypes = [ctypes.c_void_p]
        _lib = lib
    return _lib


def aes256cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    lib = _crypto()
    ctx = lib.EVP_CIPHER_CTX_new()
    try:
        if not lib.EVP_DecryptInit_ex(ctx, lib.EVP_aes_256_cbc(), None, key, iv):
            raise ValueError("EVP_DecryptInit_ex failed")
        lib.EVP_CIPHER_CTX_set_padding(ctx, 0)
        out = ctypes.create_string_buffer(len(data) + 32)
        n = ctypes.c_int(0)
        if not lib.EVP_DecryptUpdate(ctx, out, ctypes.byref(n), data, len(data)):
            raise ValueError("EVP_DecryptUpdate failed")
        return out.raw[: n.value]
    finally:
        lib.EVP_CIPHER_CTX_free(ctx)


def _page(key: bytes, raw: bytes, at: int) -> bytes:
    iv = raw[at + USABLE : at + USABLE + 16]
    plain = aes256cbc_decrypt(key, iv, raw[at : at + USABLE])
    return plain + bytes(RESERVE)


def sqlcipher_pages(raw: bytes, key: bytes) -> bytes:
    """Every candidate page of ``raw`` decrypted under ``key`` (a 32-byte raw SQLCipher key)."""
    if len(key) != 32:
        return b""
    zero = bytes(PAGE)
    out = []
    for block in range(0, len(raw) - PAGE + 1, PAGE):
        chunk = raw[block : block + PAGE]
        if chunk == zero:
            continue
        out.append(_page(key, raw, block))  # (page 1, the schema, is not decoded)
    for at in frame_candidates(raw):
        if raw[at : at + PAGE] != zero:
            out.append(_page(key, raw, at))
    return b"".join(out)


def sqlcipher_decryptor(raw: bytes, key: bytes) -> tuple[bytes, int]:
    """:data:`tests.forensics.examine.PageDecryptor` for SQLCipher 4 databases."""
    return sqlcipher_pages(raw, key), USABLE
