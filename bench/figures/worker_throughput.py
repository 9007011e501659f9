"""(a) Worker throughput: mock LLM at 0 ms, cache off, ours vs a bare Celery task."""

from __future__ import annotations

from bench.context import Bench, drain_rates
from bench.report import Figure, median, spread


def measure(b: Bench) -> list[Figure]:
    """Jobs per second in steady state, each side draining the same number of jobs."""
    b.stack.mock(latency_ms=0)
    rates, failures = drain_rates(b, "a", b.sizes.worker_jobs)
    ours, bare = median(rates["ours"]), median(rates["bare"])
    return [
        Figure("a_worker_throughput", ours, "jobs/s", bare, "jobs/s bare Celery task",
               "ratio >= 0.95", ours >= 0.95 * bare,
               [spread("ours", rates["ours"]), spread("bare", rates["bare"]), *failures])
    ]  # fmt: skip
