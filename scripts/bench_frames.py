"""Decode speed of client ``send`` frames and federation batches (1 and 100 envelopes).

Run: ``.venv/bin/python scripts/bench_frames.py``. Prints microseconds per decode (best of 5);
a measurement, not a test.
"""

from __future__ import annotations

import os
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federation import frames as F
from federation.wire import Batch, Envelope


def main() -> None:
    for n in (1, 100):
        envs = [
            Envelope(os.urandom(16), os.urandom(16), 1_800_000_000_000, os.urandom(1000))
            for _ in range(n)
        ]
        send = F.Send(7, tuple(("n" * 52, e) for e in envs)).encode()
        batch = Batch(tuple(envs)).encode()
        k = 20_000 if n == 1 else 500
        t_send = min(timeit.repeat(lambda d=send: F.decode_frame(d), number=k, repeat=5)) / k
        t_batch = min(timeit.repeat(lambda d=batch: Batch.decode(d), number=k, repeat=5)) / k
        print(
            f"{n:3d} envelope(s): send frame {len(send):6d} B {t_send * 1e6:8.2f} us/decode; "
            f"batch {len(batch):6d} B {t_batch * 1e6:8.2f} us/decode"
        )


if __name__ == "__main__":
    main()
