"""``python -m bench [--quick|--smoke]``: measure every figure against its baseline.

stdout carries one line per figure, ``name: value (baseline: value, ratio: r, target: t)``,
then notes and a summary (lines starting with ``#``); progress goes to stderr.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time

from bench.context import Bench
from bench.figures import (
    added_latency,
    cache_hits,
    coalescing,
    dead_receiver,
    enqueue_rate,
    fast_fail,
    held_waits,
    interactive_tail,
    io_concurrency,
    memory,
    scale_out,
    trace_cost,
    unit_costs,
    worker_throughput,
)
from bench.producers import Producers
from bench.report import MODES, Figure, parse_options, print_report
from bench.stack import Stack, start_stack
from dspy_fleet.devtools.procs import wait_until

WARMUP_JOBS = 64


def machine() -> list[str]:
    """What the numbers were measured on."""
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True,
                                   text=True, check=False).stdout.split()[2:3]  # fmt: skip
    load = os.getloadavg()
    return [
        f"cpus: {os.cpu_count()} ({platform.processor() or platform.machine()}), "
        f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"python {platform.python_version()}, redis-server {''.join(redis_version) or '?'}",
    ]


def start(b_stack: Stack) -> None:
    """Workers and APIs of both sides, started together."""
    b_stack.start_workers()
    b_stack.start_apis()
    b_stack.wait_apis()


def warm_up(b: Bench) -> None:
    """Both workers answer jobs (imports done, LM clients built, thread pools started)."""
    for side in ("ours", "bare"):
        child = b.stack.children[f"{side}-worker"]
        wait_until(child.alive, 1, f"{side} worker", child.proc)
        _, failed = b.producers.run(side, WARMUP_JOBS, "warm-up", timeout=120)
        if failed:
            raise RuntimeError(f"{side} worker: {failed} warm-up jobs did not succeed "
                               f"(logs in {b.stack.workdir})")  # fmt: skip


# Figures that `--only` can run alone (they need only the running workers).
ALONE = {"a": worker_throughput.measure, "j": dead_receiver.measure, "l": trace_cost.measure,
         "m": interactive_tail.measure, "n": scale_out.measure}  # fmt: skip


def run(mode: str, only: str | None = None) -> list[Figure]:
    """Start everything, measure every figure (``only``: that one, see ALONE), stop
    everything."""
    sizes = MODES[mode]
    stack = start_stack()
    producers: Producers | None = None
    try:
        start(stack)
        producers = Producers(stack.ours_redis, stack.bare_redis)
        b = Bench(stack, sizes, producers)
        b.say(f"mode {mode}; services up; logs in {stack.workdir}")
        warm_up(b)
        if only is not None:
            return ALONE[only](b)
        figures: list[Figure] = []
        # Phase 1, workers running: throughput, latency, coalescing, fast-fail.
        figures += worker_throughput.measure(b)
        figures += io_concurrency.measure(b)
        figures += scale_out.measure(b)
        figures += added_latency.measure(b)
        figures += coalescing.measure(b)
        figures += fast_fail.measure(b)
        figures += dead_receiver.measure(b)
        figures += unit_costs.measure(b)
        figures += trace_cost.measure(b)
        figures += interactive_tail.measure(b)
        cache_hits.seed(b)
        figures += memory.worker(b)
        # Phase 2, workers stopped: the APIs' request rates, with no consumer taking CPU.
        stack.stop("ours-worker", "bare-worker")
        figures += enqueue_rate.measure(b)
        figures += cache_hits.measure(b)
        figures += memory.api(b)
        # Last: thousands of held requests would raise the APIs' peak RSS of (g).
        figures += held_waits.measure(b, mode)
        return sorted(figures, key=lambda f: f.name)
    finally:
        if producers is not None:
            producers.close()
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    """Parse the mode, run, print."""
    mode, only = parse_options("python -m bench", __doc__, argv, alone=sorted(ALONE))
    header = machine()
    started = time.monotonic()
    figures = run(mode, only)
    print_report(figures, f"mode: {mode}, {time.monotonic() - started:.0f} s; " + "; ".join(header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
