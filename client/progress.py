"""Transfer progress bars for the CLI (rich, on stderr).

Drawn only when stderr is a terminal and ``--json`` is not given: scripts and logs get no
control characters, and stdout stays clean for ``--json`` rows. Through a running app the
command's stderr is the app's socket, so no bar is drawn there either.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .transfers import Progress

_LABELS = {
    "encrypt": "encrypting",
    "upload": "uploading",
    "download": "downloading",
    "decrypt": "decrypting",
}


@contextmanager
def bar(out: Any, args: argparse.Namespace) -> Iterator[Progress | None]:
    """A progress callback drawing one bar per phase, or None (no terminal, or ``--json``)."""
    tty = getattr(out, "tty_err", None)
    if getattr(args, "json", False) or not callable(tty) or not tty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.progress import Progress as RichProgress

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with RichProgress(*columns, console=Console(stderr=True), transient=True) as rp:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = rp.add_task(_LABELS.get(phase, phase), total=total)
            rp.update(tasks[phase], completed=done, total=total)

        yield update
