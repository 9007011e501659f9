"""(j) Prediction throughput while every job's webhook goes to a dead receiver.

As (a) (mock at 0 ms, cache off, distinct inputs), our worker only, alternating rounds:
jobs without a callback_url (the baseline) and jobs whose callback_url is a port on
127.0.0.1 where nothing listens (allow-listed for the bench), so each job's callback is
attempted, refused and retried with backoff while the next jobs run. Afterwards the
callbacks still due are dropped, so their retries do not load the later figures.
"""

from __future__ import annotations

import socket

import redis

from bench.context import Bench
from bench.figures.unit_costs import process_cpu
from bench.load import steady_rate
from bench.report import Figure, median, spread
from dspy_fleet.store.jobs import CALLBACKS_KEY


def dead_url() -> str:
    """A URL on 127.0.0.1 whose port has no listener (a connection is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/dead"


def measure(b: Bench) -> list[Figure]:
    """Jobs per second with and without a dead receiver behind every job."""
    b.stack.mock(latency_ms=0)
    url = dead_url()
    jobs = b.sizes.worker_jobs
    rates: dict[str, list[float]] = {"dead": [], "none": []}
    cpu_ms: dict[str, list[float]] = {"dead": [], "none": []}  # worker CPU per job
    worker = b.stack.children["ours-worker"].pid
    notes: list[str] = []
    for r in range(b.sizes.rounds):
        for kind in ("none", "dead") if r % 2 == 0 else ("dead", "none"):
            cpu0 = process_cpu(worker)
            times, failed = b.producers.run(
                "ours", jobs, f"j{kind}{r}", timeout=300,
                callback_url=url if kind == "dead" else None,
            )  # fmt: skip
            if failed:
                notes.append(f"round {r} {kind}: {failed} of {jobs} jobs did not succeed")
            rates[kind].append(steady_rate(times))
            cpu_ms[kind].append(1000 * (process_cpu(worker) - cpu0) / jobs)
            b.say(f"(j) round {r} callbacks {kind}: {rates[kind][-1]:.1f} jobs/s")
    client = redis.Redis.from_url(b.stack.ours_redis)
    attempted = client.zcard(CALLBACKS_KEY)
    client.delete(CALLBACKS_KEY)  # no more retries into the figures that follow
    client.close()
    notes.append(f"{attempted} callbacks were still being retried at the end (dropped)")
    dead, none = median(rates["dead"]), median(rates["none"])
    return [
        Figure("j_dead_receiver_throughput", dead, "jobs/s", none,
               "jobs/s without callbacks", "ratio >= 0.95", dead >= 0.95 * none,
               [spread("dead receiver", rates["dead"]), spread("no callback", rates["none"]),
                f"worker CPU per job (less sensitive to the machine's load than a rate): "
                f"{median(cpu_ms['dead']):.2f} ms with a dead receiver, "
                f"{median(cpu_ms['none']):.2f} ms without",
                *notes])
    ]  # fmt: skip
