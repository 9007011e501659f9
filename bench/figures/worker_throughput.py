"""(a) Worker throughput: mock LLM at 0 ms, cache off, ours vs a bare Celery task."""

from __future__ import annotations

from bench.context import Bench
from bench.load import steady_rate
from bench.report import Figure, median, spread


def measure(b: Bench) -> list[Figure]:
    """Jobs per second in steady state, each side draining the same number of jobs."""
    b.stack.mock(latency_ms=0)
    rates: dict[str, list[float]] = {"ours": [], "bare": []}
    for r in range(b.sizes.rounds):
        for side in b.sides(r):
            times, failed = b.producers.run(side, b.sizes.worker_jobs, f"a{r}", timeout=300)
            if failed:
                raise RuntimeError(f"(a) {side}: {failed} jobs did not succeed")
            rates[side].append(steady_rate(times))
            b.say(f"(a) round {r} {side}: {rates[side][-1]:.1f} jobs/s")
    ours, bare = median(rates["ours"]), median(rates["bare"])
    return [
        Figure("a_worker_throughput", ours, "jobs/s", bare, "jobs/s bare Celery task",
               "ratio >= 0.90", ours >= 0.90 * bare,
               [spread("ours", rates["ours"]), spread("bare", rates["bare"])])
    ]  # fmt: skip
