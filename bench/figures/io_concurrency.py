"""(b) I/O-bound concurrency: mock LLM at 200 ms, one worker process at concurrency 64.

The target is issue 18's: at least 0.90 of a bare Celery task making the same DSPy call.
The fraction of the ideal (64 calls in flight / 0.2 s = 320 jobs/s), the first round's
target (0.85), is a note: one process is bound by its GIL well below it (figure n).
"""

from __future__ import annotations

from bench.context import Bench, drain_rates
from bench.report import Figure, median, spread

LATENCY_MS = 200
CONCURRENCY = 64
IDEAL = CONCURRENCY / (LATENCY_MS / 1000)  # 320 jobs/s


def measure(b: Bench) -> list[Figure]:
    """Steady jobs/s against a bare Celery task's; the fraction of the ideal is a note."""
    b.stack.mock(latency_ms=LATENCY_MS)
    try:
        rates, failures = drain_rates(b, "b", b.sizes.io_jobs)
    finally:
        b.stack.mock(latency_ms=0)
    ours, bare = median(rates["ours"]), median(rates["bare"])
    return [
        Figure("b_io_concurrency", ours, "jobs/s", bare, "jobs/s bare Celery task",
               "ratio >= 0.90", ours >= 0.90 * bare,
               [f"of the ideal 64/0.2 s = {IDEAL:.0f} jobs/s: ours {ours / IDEAL:.2f}, "
                f"bare {bare / IDEAL:.2f}",
                spread("ours", rates["ours"]), spread("bare", rates["bare"]), *failures])
    ]  # fmt: skip
