"""In-memory counters of refused input, by stable error code. Never per message or per sender."""

from __future__ import annotations

from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self.errors: Counter[str] = Counter()
        self.events: Counter[str] = Counter()

    def error(self, surface: str, code: str) -> None:
        self.errors[f"{surface}.{code}"] += 1

    def event(self, name: str, n: int = 1) -> None:
        self.events[name] += n

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"errors": dict(self.errors), "events": dict(self.events)}
