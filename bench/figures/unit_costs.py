"""(k) What one cache-miss job costs each part: Redis commands, Redis CPU, API CPU, worker CPU.

Each side gets ``jobs`` jobs with distinct inputs (so every one is a cache miss and, on our
side, a cache write), submitted through its API by 16 client threads (ours: ``POST
/v1/predict`` answered 202; bare: ``POST /enqueue``), and run by its worker with the mock at
0 ms. A side is measured from its first request to its last completion:

- Redis commands from ``INFO commandstats`` (every command the server executed, whoever sent
  it) and Redis CPU from ``INFO cpu``;
- the API's CPU (gunicorn master and workers) and the worker's, from ``/proc/<pid>/stat``.

What the same processes do when no job runs (heartbeats, recovery and restore sweeps, metric
refreshes, the other side's idle traffic) is measured in an idle window just before, and its
rate times the run's length is subtracted, so the figures are per job. The baseline is the
bare stack (``send_task`` and a task that makes the same DSPy call), measured the same way.
This is the input of the capacity model in the README's Performance section.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from bench.context import Bench
from bench.report import Figure, median, spread
from dspy_fleet.devtools.procs import child_pids

TICKS = os.sysconf("SC_CLK_TCK")
IDLE_SECONDS = 3.0
CLIENTS = 16
TOP_COMMANDS = 8  # how many commands the notes break the count down into
REDIS_MISS_TARGET = 15  # issue 18: Redis commands per cache-miss job
MONITOR_JOBS = 50  # jobs per side watched under MONITOR (it slows Redis: not in the timed runs)


@dataclass
class Reading:
    """Counters at one moment: Redis commands by name, Redis CPU seconds, process CPU seconds."""

    at: float
    commands: Counter[str]
    redis_cpu: float
    cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class Usage:
    """What a side used per job, idle activity subtracted."""

    commands: float
    redis_cpu_ms: float
    api_cpu_ms: float
    worker_cpu_ms: float
    top: list[tuple[str, float]]


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process and its direct children (gunicorn's workers)."""
    total = 0.0
    for p in (pid, *child_pids(pid)):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a child that ended while we looked
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (proc(5))
    return total


def read(client: redis.Redis, pids: dict[str, int]) -> Reading:
    """Redis's command counts and CPU, and each named process's CPU, now."""
    stats = client.info("commandstats")
    cpu = client.info("cpu")
    commands = Counter(
        {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
    )
    return Reading(time.monotonic(), commands,
                   float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
                   {name: process_cpu(pid) for name, pid in pids.items()})  # fmt: skip


def per_job(idle: tuple[Reading, Reading], run: tuple[Reading, Reading], jobs: int) -> Usage:
    """The run's deltas minus the idle rate over the run's length, divided by ``jobs``."""
    scale = (run[1].at - run[0].at) / (idle[1].at - idle[0].at)

    def net(before: float, after: float, idle_before: float, idle_after: float) -> float:
        return ((after - before) - scale * (idle_after - idle_before)) / jobs

    names = set(run[1].commands) | set(idle[1].commands)
    by_command = {
        n: net(run[0].commands[n], run[1].commands[n], idle[0].commands[n], idle[1].commands[n])
        for n in names
    }
    top = sorted(by_command.items(), key=lambda kv: -kv[1])[:TOP_COMMANDS]
    return Usage(
        commands=sum(by_command.values()),
        redis_cpu_ms=1000 * net(run[0].redis_cpu, run[1].redis_cpu,
                                idle[0].redis_cpu, idle[1].redis_cpu),
        api_cpu_ms=1000 * net(run[0].cpu["api"], run[1].cpu["api"],
                              idle[0].cpu["api"], idle[1].cpu["api"]),
        worker_cpu_ms=1000 * net(run[0].cpu["worker"], run[1].cpu["worker"],
                                 idle[0].cpu["worker"], idle[1].cpu["worker"]),
        top=top,
    )  # fmt: skip


def submit(b: Bench, side: str, jobs: int, tag: str) -> list[str]:
    """Post ``jobs`` distinct questions to a side's API from ``CLIENTS`` threads; their ids."""
    url = b.stack.urls[side] + ("/v1/predict" if side == "ours" else "/enqueue")
    questions = [f"What is {i} times {i}? ({tag} {uuid.uuid4().hex[:8]})" for i in range(jobs)]
    with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=CLIENTS)) as http:

        def post(question: str) -> str:
            resp = http.post(url, json={"input": question})
            if resp.status_code != 202:
                raise RuntimeError(f"(k) {side}: expected 202, got {resp.status_code} "
                                   f"{resp.text[:200]}")  # fmt: skip
            return str(resp.json()["id"])

        with ThreadPoolExecutor(CLIENTS) as pool:
            return list(pool.map(post, questions))


def measure_side(b: Bench, client: redis.Redis, side: str, jobs: int, tag: str) -> Usage:
    """One side's per-job usage: an idle window, then ``jobs`` jobs end to end."""
    pids = {"api": b.stack.children[f"{side}-api"].pid,
            "worker": b.stack.children[f"{side}-worker"].pid}  # fmt: skip
    idle_start = read(client, pids)
    time.sleep(IDLE_SECONDS)
    idle_end = read(client, pids)
    start = read(client, pids)
    ids = submit(b, side, jobs, tag)
    done = b.producers.completions.wait(ids, timeout=300)
    failed = jobs - sum(1 for _, status in done if status == "SUCCESS")
    if failed > jobs // 100:
        raise RuntimeError(f"(k) {side}: {failed} of {jobs} jobs did not succeed")
    end = read(client, pids)
    return per_job((idle_start, idle_end), (start, end), jobs)


class Monitor:
    """Commands Redis executes, counted from ``MONITOR``: sent by clients (round trips,
    pipelined or not) and run inside Lua scripts, apart."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.counts: Counter[str] = Counter()
        self.on = threading.Event()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        with self.client.monitor() as monitor:
            for line in monitor.listen():
                if self.stopped.is_set():
                    return
                if self.on.is_set():
                    self.counts["lua" if line.get("client_type") == "lua" else "client"] += 1

    def window(self, work: Callable[[], object]) -> tuple[Counter[str], float]:
        """Counts while ``work()`` runs, and its length in seconds."""
        self.counts = Counter()
        started = time.monotonic()
        self.on.set()
        work()
        time.sleep(0.3)  # the last commands reach the monitor
        self.on.clear()
        return Counter(self.counts), time.monotonic() - started

    def close(self) -> None:
        """Stop listening (one more command wakes the listener)."""
        self.stopped.set()
        poke = redis.Redis.from_url(self.url)
        poke.ping()
        poke.close()
        self.thread.join(5)
        self.client.close()


def round_trips(b: Bench, side: str) -> tuple[float, float]:
    """Client commands and in-script commands per job, from ``MONITOR``, idle subtracted."""
    monitor = Monitor(b.stack.ours_redis)
    try:
        time.sleep(0.5)
        idle, idle_s = monitor.window(lambda: time.sleep(IDLE_SECONDS))

        def work() -> None:
            ids = submit(b, side, MONITOR_JOBS, "kmon")
            b.producers.completions.wait(ids, timeout=120)

        busy, busy_s = monitor.window(work)
    finally:
        monitor.close()
    scale = busy_s / idle_s

    def net(kind: str) -> float:
        return (busy[kind] - scale * idle[kind]) / MONITOR_JOBS

    return net("client"), net("lua")


def measure(b: Bench) -> list[Figure]:
    """Redis commands, Redis CPU and API + worker CPU per cache-miss job, ours and bare."""
    b.stack.mock(latency_ms=0)
    jobs = max(100, b.sizes.worker_jobs // 2)
    client = redis.Redis.from_url(b.stack.ours_redis, decode_responses=True)
    usage: dict[str, list[Usage]] = {"ours": [], "bare": []}
    try:
        for r in range(b.sizes.rounds):
            for side in b.sides(r):
                usage[side].append(measure_side(b, client, side, jobs, f"k{r}"))
                u = usage[side][-1]
                b.say(f"(k) round {r} {side}: {u.commands:.1f} Redis commands/job, "
                      f"CPU ms/job: Redis {u.redis_cpu_ms:.2f}, API {u.api_cpu_ms:.2f}, "
                      f"worker {u.worker_cpu_ms:.2f}")  # fmt: skip
        trips = {side: round_trips(b, side) for side in ("ours", "bare")}
    finally:
        client.close()
    b.say(f"(k) per job under MONITOR: ours {trips['ours'][0]:.1f} sent + {trips['ours'][1]:.1f} "
          f"in scripts, bare {trips['bare'][0]:.1f} + {trips['bare'][1]:.1f}")  # fmt: skip

    def med(side: str, attr: str) -> float:
        return median([getattr(u, attr) for u in usage[side]])

    def series(side: str, attr: str) -> list[float]:
        return [getattr(u, attr) for u in usage[side]]

    last = usage["ours"][-1]
    breakdown = ", ".join(f"{name} {n:.1f}" for name, n in last.top)
    ours_cmds, bare_cmds = med("ours", "commands"), med("bare", "commands")
    ours_cpu = med("ours", "api_cpu_ms") + med("ours", "worker_cpu_ms")
    bare_cpu = med("bare", "api_cpu_ms") + med("bare", "worker_cpu_ms")
    jobs_note = f"{jobs} jobs per side and round, submitted through each side's API"
    sent = trips["ours"][0]
    return [
        Figure("k_redis_commands_sent_per_job", sent, "commands", trips["bare"][0],
               "commands bare", f"<= {REDIS_MISS_TARGET}", sent <= REDIS_MISS_TARGET,
               [f"{MONITOR_JOBS} jobs per side under MONITOR: commands that clients sent "
                f"(each a round trip unless pipelined); inside Lua scripts ours ran "
                f"{trips['ours'][1]:.1f} more per job, bare {trips['bare'][1]:.1f}"]),
        Figure("k_redis_commands_per_job", ours_cmds, "commands", bare_cmds,
               "commands bare", "measured", None,
               [jobs_note, "every command Redis executed, those inside Lua scripts included",
                f"ours by command (last round): {breakdown}",
                spread("ours", series("ours", "commands")),
                spread("bare", series("bare", "commands"))]),
        Figure("k_redis_cpu_ms_per_job", med("ours", "redis_cpu_ms"), "ms",
               med("bare", "redis_cpu_ms"), "ms bare", "measured", None,
               [spread("ours", series("ours", "redis_cpu_ms")),
                spread("bare", series("bare", "redis_cpu_ms"))]),
        Figure("k_cpu_ms_per_job", ours_cpu, "ms API + worker", bare_cpu,
               "ms bare API + worker", "measured", None,
               [f"ours API {med('ours', 'api_cpu_ms'):.2f} ms + worker "
                f"{med('ours', 'worker_cpu_ms'):.2f} ms; bare API "
                f"{med('bare', 'api_cpu_ms'):.2f} ms + worker "
                f"{med('bare', 'worker_cpu_ms'):.2f} ms",
                spread("ours worker", series("ours", "worker_cpu_ms")),
                spread("ours API", series("ours", "api_cpu_ms"))]),
    ]  # fmt: skip
