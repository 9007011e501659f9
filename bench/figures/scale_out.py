"""(n) Scaling out: our jobs/s with one and with two worker processes, mock LLM at 200 ms.

As (b) (distinct inputs, cache off, put on the broker as a batch producer does), our side
only, rounds alternating which count goes first: the running ``ours-worker`` alone, then
with a second `dspy-fleet worker` (same settings: threads pool, concurrency 64) started for
the drain and stopped after it. One worker process is bound by its GIL (about one core,
bench.profile), so the rate should grow with a second process until the machine's cores
run out; the notes give the CPU the workers spent per job and the cores there were.
"""

from __future__ import annotations

import os

from bench.context import Bench, drain
from bench.figures.io_concurrency import LATENCY_MS
from bench.figures.unit_costs import process_cpu
from bench.report import Figure, median, spread

SECOND = "ours-worker-scale-out"


def measure(b: Bench) -> list[Figure]:
    """Median jobs/s with two worker processes against one."""
    b.stack.mock(latency_ms=LATENCY_MS)
    jobs = b.sizes.io_jobs
    rates: dict[int, list[float]] = {1: [], 2: []}
    cpu_ms: dict[int, list[float]] = {1: [], 2: []}
    notes: list[str] = []
    first = b.stack.children["ours-worker"].pid
    try:
        for r in range(b.sizes.rounds):
            for count in (1, 2) if r % 2 == 0 else (2, 1):
                pids = [first]
                if count == 2:
                    pids.append(b.stack.start_worker(SECOND, redis_url=b.stack.ours_redis).pid)
                try:
                    cpu0 = sum(process_cpu(p) for p in pids)
                    rate, note = drain(b, f"n{count}w{r}", "ours", jobs)
                    cpu_ms[count].append(1000 * (sum(process_cpu(p) for p in pids) - cpu0) / jobs)
                finally:
                    if count == 2:
                        b.stack.stop(SECOND)
                rates[count].append(rate)
                notes += [note] if note else []
                b.say(f"(n) round {r}, {count} worker process(es): {rate:.1f} jobs/s")
    finally:
        b.stack.mock(latency_ms=0)
    two, one = median(rates[2]), median(rates[1])
    return [
        Figure("n_scale_out_two_workers", two, "jobs/s", one, "jobs/s with one worker process",
               "ratio > 1", two > one,
               ["the rate should grow with the processes until the cores run out",
                spread("two worker processes", rates[2]), spread("one", rates[1]),
                f"worker CPU per job: {median(cpu_ms[1]):.2f} ms with one process, "
                f"{median(cpu_ms[2]):.2f} ms with two (both summed); {os.cpu_count()} CPUs "
                "shared with Redis, the mock LLM and the producer",
                *notes])
    ]  # fmt: skip
