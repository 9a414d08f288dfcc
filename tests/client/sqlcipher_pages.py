"""An examiner's tool: decrypt every SQLCipher 4 page found in raw bytes, given the raw key.

SQLCipher 4 with a raw key (``PRAGMA key = "x'…'"``) encrypts each 4096-byte page with
AES-256-CBC under that key; the last 80 bytes of a page are the reserve (16-byte IV, 64-byte
HMAC), and page 1 keeps its first 16 bytes for the salt. This tool does not check HMACs and does
not need page numbers, so it opens pages wherever they sit: in ``device.db``, in WAL frames
(``-wal``: 32-byte header, then 24-byte frame header + page), or carved from free blocks. It
uses the ``openssl`` command (ECB over all blocks in one call, then the CBC chaining here).
"""

from __future__ import annotations

import subprocess

PAGE = 4096
RESERVE = 80
BLOCK = 16
WAL_HEADER, FRAME_HEADER = 32, 24


def _ecb_decrypt(key: bytes, data: bytes) -> bytes:
    out = subprocess.run(
        ["openssl", "enc", "-d", "-aes-256-ecb", "-nopad", "-K", key.hex()],
        input=data,
        capture_output=True,
        check=True,
    )
    return out.stdout


def decrypt_pages(key: bytes, pages: list[tuple[bytes, int]]) -> list[bytes]:
    """Decrypt ``(page, skip)`` pairs (``skip`` = 16 for a page 1, else 0)."""
    regions = []
    for page, skip in pages:
        regions.append(page[skip : PAGE - RESERVE])
    plain = _ecb_decrypt(key, b"".join(regions)) if regions else b""
    out, pos = [], 0
    for (page, _skip), region in zip(pages, regions, strict=True):
        iv = page[PAGE - RESERVE : PAGE - RESERVE + BLOCK]
        dec = bytearray(plain[pos : pos + len(region)])
        pos += len(region)
        prev = iv
        for i in range(0, len(region), BLOCK):
            for j in range(BLOCK):
                dec[i + j] ^= prev[j]
            prev = region[i : i + BLOCK]
        out.append(bytes(dec))
    return out


def carve(key: bytes, data: bytes) -> list[bytes]:
    """Every page-sized piece of ``data`` at a database or WAL alignment, decrypted (garbage
    where it was no page under ``key``)."""
    pages: list[tuple[bytes, int]] = []
    for off in range(0, len(data) - PAGE + 1, PAGE):  # database file / page-aligned blocks
        pages.append((data[off : off + PAGE], BLOCK if off == 0 else 0))
        pages.append((data[off : off + PAGE], 0))
    step = FRAME_HEADER + PAGE
    for off in range(WAL_HEADER + FRAME_HEADER, len(data) - PAGE + 1, step):  # WAL frames
        pages.append((data[off : off + PAGE], 0))
        pages.append((data[off : off + PAGE], BLOCK))
    return decrypt_pages(key, pages)
