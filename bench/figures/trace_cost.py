"""(l) What trace capture costs a worker: throughput with traces at the default rate and at
100 %, against the same worker with tracing off, in the same run (mock LLM at 0 ms, cache
off: the worst case, where a job is nothing but overhead).

Three programs of one signature differ only in their ``traces`` config (bench/stack.py):
``qa_untraced`` (off), ``qa`` (the defaults: 1 % kept, every other job's trace parked for
feedback) and ``qa_traced`` (100 % kept). Rounds alternate their order.

The notes also give the worker's CPU per job (``/proc``, the worker and its children, over
each drain) for each setting: on a shared machine far steadier than its throughput.
"""

from __future__ import annotations

from bench.context import Bench, drain
from bench.figures.unit_costs import process_cpu
from bench.report import Figure, median, spread

PROGRAMS = {"off": "qa_untraced", "default": "qa", "all": "qa_traced"}


def measure(b: Bench) -> list[Figure]:
    """Jobs per second of each tracing setting, each draining the same number of jobs."""
    b.stack.mock(latency_ms=0)
    for program in PROGRAMS.values():  # first calls of each program out of the way
        b.producers.run("ours", 64, f"l-warm-{program}", timeout=120, program=program)
    rates: dict[str, list[float]] = {k: [] for k in PROGRAMS}
    cpu_ms: dict[str, list[float]] = {k: [] for k in PROGRAMS}
    worker = b.stack.children["ours-worker"].pid
    notes: list[str] = []
    order = list(PROGRAMS)
    for r in range(b.sizes.rounds):
        for setting in order[r % 3 :] + order[: r % 3]:
            jobs = b.sizes.worker_jobs
            cpu = process_cpu(worker)
            rate, note = drain(b, f"l{r}{setting}", "ours", jobs, program=PROGRAMS[setting])
            cpu_ms[setting].append(1000 * (process_cpu(worker) - cpu) / jobs)
            rates[setting].append(rate)
            notes += [note] if note else []
            b.say(f"(l) round {r} traces {setting}: {rate:.1f} jobs/s")
    off, default, full = (median(rates[k]) for k in ("off", "default", "all"))
    spreads = [spread(f"traces {k}", v) for k, v in rates.items()]
    spreads += [spread(f"worker CPU ms/job, traces {k}", v) for k, v in cpu_ms.items()]
    return [
        Figure("l_trace_cost_default", default, "jobs/s", off, "jobs/s traces off",
               "ratio >= 0.98", default >= 0.98 * off, [*spreads, *notes]),
        Figure("l_trace_cost_all", full, "jobs/s", off, "jobs/s traces off",
               "ratio >= 0.90", full >= 0.90 * off, list(spreads)),
    ]  # fmt: skip
