"""What every figure gets: the running stack, the run sizes, the producers and a logger."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from bench.load import steady_rate
from bench.producers import Producers
from bench.report import Sizes
from bench.stack import Stack


@dataclass
class Bench:
    """One bench run in progress."""

    stack: Stack
    sizes: Sizes
    producers: Producers

    def say(self, text: str) -> None:
        """Progress, on stderr (stdout carries only the figures)."""
        print(f"bench: {text}", file=sys.stderr, flush=True)

    def sides(self, round_no: int) -> tuple[str, str]:
        """Alternate which side goes first, so drift on the machine hits both alike."""
        return ("bare", "ours") if round_no % 2 == 0 else ("ours", "bare")


def drain(b: Bench, label: str, side: str, jobs: int, **run: Any) -> tuple[float, str | None]:
    """Steady jobs/s of one drain of ``jobs`` jobs on ``side`` (``run``: more keywords of
    Producers.run, e.g. ``program``), and a note when some jobs did not succeed.

    A transient fault (a connection the mock closed) fails a bare task, which has no
    retries: up to 1 % of a drain may fail and is noted; more raises RuntimeError (the
    figure would measure failures, not work).
    """
    times, failed = b.producers.run(side, jobs, label, timeout=300, **run)
    if failed > jobs // 100:
        raise RuntimeError(f"({label}) {side}: {failed} jobs did not succeed")
    note = f"{label} {side}: {failed} of {jobs} jobs did not succeed" if failed else None
    return steady_rate(times), note


def drain_rates(b: Bench, label: str, jobs: int) -> tuple[dict[str, list[float]], list[str]]:
    """Steady jobs/s per round for each side, draining ``jobs`` jobs per side and round,
    and notes on jobs that did not succeed (see :func:`drain`).

    Shared by (a) and (b), which differ only in the mock's latency and the job count.
    """
    rates: dict[str, list[float]] = {"ours": [], "bare": []}
    notes = []
    for r in range(b.sizes.rounds):
        for side in b.sides(r):
            rate, note = drain(b, f"{label}{r}", side, jobs)
            rates[side].append(rate)
            notes += [note] if note else []
            b.say(f"({label}) round {r} {side}: {rate:.1f} jobs/s")
    return rates, notes
