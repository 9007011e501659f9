"""Load generation against 127.0.0.1: wrk for request rates, small bounded Python clients else.

Every loop here is bounded in time and in count.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

# BENCH_NO_WRK=1 forces the Python client (what runs where wrk cannot be installed).
WRK = None if os.environ.get("BENCH_NO_WRK") else shutil.which("wrk")
_LUA = """wrk.method = "{method}"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""


@dataclass
class Rate:
    """A closed-loop request rate and how many answers were not 2xx."""

    per_second: float
    requests: int
    bad: int
    tool: str


def request_rate(url: str, *, method: str = "GET", body: dict[str, Any] | None = None,
                 seconds: float, connections: int = 32) -> Rate:  # fmt: skip
    """Requests per second that ``url`` sustains for ``seconds`` (wrk when installed)."""
    if WRK:
        return _wrk(url, method, body, seconds, connections)
    return _python_rate(url, method, body, seconds, min(connections, 16))


def _wrk(url: str, method: str, body: dict[str, Any] | None, seconds: float,
         connections: int) -> Rate:  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(_LUA.format(method=method, body=json.dumps(body or {})))
    try:
        out = subprocess.run(
            [WRK, "-t2", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s",
             "-s", script.name, url],
            capture_output=True, text=True, timeout=seconds + 60, check=True,
        ).stdout  # fmt: skip
    finally:
        Path(script.name).unlink()
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    n_bad = int(bad.group(1)) if bad else 0
    if errors:
        n_bad += sum(int(g) for g in errors.groups())
    return Rate(rate, total, n_bad, "wrk")


def _python_rate(url: str, method: str, body: dict[str, Any] | None, seconds: float,
                 threads: int) -> Rate:  # fmt: skip
    counts = [0] * threads
    bad = [0] * threads
    deadline = time.monotonic() + seconds

    def loop(i: int) -> None:
        with httpx.Client(timeout=10) as client:
            while time.monotonic() < deadline:
                resp = client.request(method, url, json=body)
                counts[i] += 1
                bad[i] += not resp.is_success

    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(loop, range(threads)))
    elapsed = time.monotonic() - started
    return Rate(sum(counts) / elapsed, sum(counts), sum(bad), "python")


def paced(call: Callable[[httpx.Client, int], bool], *, rate: float, count: int,
          timeout: float) -> tuple[list[float], int]:  # fmt: skip
    """Start ``count`` calls at a steady ``rate`` per second (open loop, each on its own
    thread); return their latencies in ms and how many calls returned False."""
    latencies: list[float] = []
    failed = [0]
    lock = threading.Lock()

    def one(client: httpx.Client, i: int) -> None:
        t0 = time.perf_counter()
        ok = call(client, i)
        ms = (time.perf_counter() - t0) * 1000
        with lock:
            latencies.append(ms)
            failed[0] += not ok

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with httpx.Client(timeout=timeout, limits=limits) as client, ThreadPoolExecutor(64) as pool:
        start = time.perf_counter()
        for i in range(count):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, client, i)
    return latencies, failed[0]


def concurrent(call: Callable[[httpx.Client, int], Any], n: int, timeout: float) -> list[Any]:
    """``n`` calls released together (a barrier), each on its own thread."""
    barrier = threading.Barrier(n)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)

    def one(client: httpx.Client, i: int) -> Any:
        barrier.wait(timeout)
        return call(client, i)

    with httpx.Client(timeout=timeout, limits=limits) as client, ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda i: one(client, i), range(n)))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values, inclusive method."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q) - 1]


class Completions:
    """Times at which Celery results were stored, seen on the result backend's pub/sub.

    The Redis result backend publishes every result it stores on the result's key; both
    our worker and the bare one store theirs there, so one listener times both alike.
    """

    def __init__(self, redis_url: str) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.pubsub = self.client.pubsub()
        self.pubsub.psubscribe("celery-task-meta-*")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # confirmed before anything is sent
            msg = self.pubsub.get_message(timeout=1)
            if msg and msg["type"] == "psubscribe":
                break
        self.done: dict[str, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            msg = self.pubsub.get_message(timeout=0.2)
            if not msg or msg["type"] != "pmessage":
                continue
            status = json.loads(msg["data"]).get("status")
            if status in ("SUCCESS", "FAILURE"):
                task_id = msg["channel"].decode()[len("celery-task-meta-") :]
                self.done.setdefault(task_id, (time.perf_counter(), status))

    def wait(self, ids: list[str], timeout: float) -> list[tuple[float, str]]:
        """(time, status) of each id once all ended, or of those that ended by ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(i in self.done for i in ids):
            time.sleep(0.05)
        return [self.done[i] for i in ids if i in self.done]

    def close(self) -> None:
        """Stop listening."""
        self._stop.set()
        self._thread.join(2)
        self.pubsub.close()
        self.client.close()


def steady_rate(times: list[float]) -> float:
    """Completions per second between the 10th and the 90th percentile of completions,
    leaving out the ramp-up and the tail."""
    ordered = sorted(times)
    lo, hi = int(len(ordered) * 0.1), int(len(ordered) * 0.9) - 1
    if hi <= lo or ordered[hi] <= ordered[lo]:
        return 0.0
    return (hi - lo) / (ordered[hi] - ordered[lo])
