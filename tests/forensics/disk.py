"""Loop-mounted ext4 images for seizure tests: create, mount, freeze-and-copy, canaries, Sleuth Kit.

An image is a sparse file formatted with ``mkfs.ext4`` and mounted with ``-o loop`` and no
``discard`` (a discard would punch freed blocks out of the backing file, hiding what a real disk
keeps). :meth:`LoopImage.snapshot` freezes the filesystem (``fsfreeze -f``) so that every dirty
block reaches the image, copies the raw file and thaws it: the copy is what an examiner who pulls
the disk gets. :meth:`LoopImage.plant_canary` writes a random marker to a file, fsyncs it and
deletes it, so the marker sits in unallocated blocks: a scan that cannot find it is not looking
at free space. Examination uses Sleuth Kit on the copy: ``blkls`` (unallocated blocks), ``fls``
and ``icat`` (files by name, as an examiner extracts ``epochs.key``).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 4096


def run(*cmd: str, input: bytes | None = None) -> bytes:
    proc = subprocess.run(cmd, input=input, capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def tools_missing() -> list[str]:
    """System tools this harness needs (root, e2fsprogs, util-linux, sleuthkit)."""
    missing = [t for t in ("mkfs.ext4", "fsfreeze", "mount", "umount", "blkls", "fls", "icat")]
    missing = [t for t in missing if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


@dataclass
class LoopImage:
    """One ext4 filesystem in a sparse file, mounted at ``mnt`` while the test runs."""

    path: Path
    mnt: Path
    size_mb: int = 64
    mounted: bool = field(default=False, init=False)

    def create(self) -> LoopImage:
        with open(self.path, "wb") as f:
            f.truncate(self.size_mb * 2**20)  # sparse: unwritten blocks read as zeros
        run("mkfs.ext4", "-q", "-F", "-b", str(BLOCK), "-E", "nodiscard", "-m", "0", str(self.path))
        self.mnt.mkdir(parents=True, exist_ok=True)
        run("mount", "-o", "loop,nodiscard", str(self.path), str(self.mnt))
        self.mounted = True
        return self

    def unmount(self) -> None:
        """Unmount (thawing first if a failure left it frozen); the loop device is released."""
        if not self.mounted:
            return
        subprocess.run(["fsfreeze", "-u", str(self.mnt)], capture_output=True, timeout=30)
        proc = subprocess.run(["umount", str(self.mnt)], capture_output=True, timeout=60)
        if proc.returncode != 0:  # something still holds a file: detach lazily, never leak
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True, timeout=60)
        self.mounted = False

    def plant_canary(self, blocks: int = 8) -> bytes:
        """Write a random marker into ``blocks`` blocks, fsync, delete: it is now free space."""
        marker = b"CANARY-" + secrets.token_hex(12).encode()
        data = (marker + b"\n") * (blocks * BLOCK // (len(marker) + 1) + 1)
        self.plant(data[: blocks * BLOCK])
        return marker

    def plant(self, data: bytes) -> None:
        """Write ``data`` to a new file, fsync it, delete it (durably): it is in free space."""
        path = self.mnt / f".canary-{secrets.token_hex(4)}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
        dfd = os.open(self.mnt, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the unlink is durable: the blocks are unallocated on disk
        finally:
            os.close(dfd)

    def snapshot(self, dest: Path) -> Path:
        """Freeze, copy the raw image, thaw (always): a consistent seizure copy."""
        run("fsfreeze", "-f", str(self.mnt))
        try:
            shutil.copyfile(self.path, dest)
        finally:
            run("fsfreeze", "-u", str(self.mnt))
        return dest


def nonzero_blocks(buf: bytes) -> bytes:
    """``buf`` without its all-zero blocks (the rest stays block-aligned, in order): what a
    scan of a sparse image needs to look at, a fraction of its size."""
    zero = bytes(BLOCK)
    view = memoryview(buf)
    keep = [view[i : i + BLOCK] for i in range(0, len(buf), BLOCK) if view[i : i + BLOCK] != zero]
    return b"".join(keep)


def unallocated(image: Path) -> bytes:
    """Every unallocated block of the filesystem in ``image`` (``blkls``), concatenated."""
    return run("blkls", str(image))


def allocated_paths(image: Path) -> list[str]:
    """Paths of every allocated file and directory in ``image`` (``fls -r -p -u``)."""
    lines = run("fls", "-r", "-p", "-u", str(image)).decode(errors="replace").splitlines()
    return [line.partition("\t")[2] for line in lines if "\t" in line]


def files_named(image: Path, name: str) -> list[bytes]:
    """Contents of every allocated file called ``name`` in ``image`` (``fls -r -p``, ``icat``)."""
    out = []
    for line in run("fls", "-r", "-p", "-u", str(image)).decode(errors="replace").splitlines():
        # "r/r 12:\tA/epochs.key"; deleted entries carry a "*" and are skipped by -u
        meta, _, path = line.partition("\t")
        if not path or Path(path).name != name or not meta.startswith("r/r"):
            continue
        inode = meta.split()[-1].rstrip(":").split("-")[0]
        out.append(run("icat", str(image), inode))
    return out
