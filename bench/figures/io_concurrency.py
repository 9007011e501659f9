"""(b) I/O-bound concurrency: mock LLM at 200 ms, one worker process at concurrency 64."""

from __future__ import annotations

from bench.context import Bench, drain_rates
from bench.report import Figure, median, spread

LATENCY_MS = 200
CONCURRENCY = 64
IDEAL = CONCURRENCY / (LATENCY_MS / 1000)  # 320 jobs/s


def measure(b: Bench) -> list[Figure]:
    """Steady jobs/s against the ideal concurrency/latency; the bare task's rate is a note."""
    b.stack.mock(latency_ms=LATENCY_MS)
    try:
        rates, failures = drain_rates(b, "b", b.sizes.io_jobs)
    finally:
        b.stack.mock(latency_ms=0)
    ours, bare = median(rates["ours"]), median(rates["bare"])
    return [
        Figure("b_io_concurrency", ours, "jobs/s", IDEAL, "jobs/s ideal 64/0.2 s",
               "ratio >= 0.85", ours >= 0.85 * IDEAL,
               [f"bare Celery task, same settings: {bare:.0f} jobs/s "
                f"({bare / IDEAL:.2f} of ideal; ours/bare {ours / bare:.2f})",
                spread("ours", rates["ours"]), spread("bare", rates["bare"]), *failures])
    ]  # fmt: skip
