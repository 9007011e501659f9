"""Latencies of waited-for predictions, split into the job record's stages.

Used where interactive latency is measured against a loaded fleet: bench figure (m)
(bench/figures/interactive_tail.py) and tests/test_pacing.py.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from datetime import datetime
from typing import Any


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


class Latencies(list[float]):
    """Seconds each request took; ``parts`` splits each into the job record's stages, in
    ms: queue (created → started), run (started → finished) and answer (finished → the
    client had the answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[tuple[float, float, float]] = []

    def add(self, seconds: float, job: Mapping[str, Any], answered: float) -> None:
        """One request: it took ``seconds``; ``job`` is the prediction it was answered
        (its ISO 8601 ``created_at``, ``started_at``, ``finished_at``), ``answered`` the
        epoch second the client had it."""
        created, begun, ended = (_epoch(job[k]) for k in ("created_at", "started_at",
                                                          "finished_at"))  # fmt: skip
        self.append(seconds)
        self.parts.append(((begun - created) * 1000, (ended - begun) * 1000,
                           (answered - ended) * 1000))  # fmt: skip

    def extend_from(self, other: Latencies) -> None:
        """Add every request of ``other``."""
        self.extend(other)
        self.parts.extend(other.parts)

    def p95(self) -> float:
        """The 95th percentile in seconds (statistics.quantiles, exclusive method: needs at
        least two requests)."""
        return statistics.quantiles(self, n=20)[18]

    def slowest(self, n: int = 3) -> str:
        """The ``n`` slowest requests and their stages, as text."""
        ranked = sorted(zip(self, self.parts, strict=True), reverse=True)[:n]
        return "; ".join(f"{t * 1000:.0f} ms = queue {q:.0f} + run {r:.0f} + answer {a:.0f}"
                         for t, (q, r, a) in ranked)  # fmt: skip
