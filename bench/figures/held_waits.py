"""(i) Our API while 2,000 clients hold ``wait`` (issue 18): `/health` p99 and the submission
rate, against the same API idle.

Measured last, in phase 2 (no worker runs): every held job stays queued, so all the
clients are held at once for as long as the figure takes (the API's ``dspy_api_waits_held``
gauge says when they are). Idle first, then with the clients held: `/health` latency over
sequential requests, each on a new connection, and ``POST /v1/predict`` (no wait) under wrk
as in (c). Then the held jobs are cancelled through the API (``DELETE``), which ends each
held request with its job's end (``200``; ``202`` if its wait ran out first); a client that
got no HTTP answer, or another status, counts as dropped.
The clients are raw asyncio connections in one thread, so the load costs the bench little.
"""

from __future__ import annotations

import asyncio
import json
import re
import resource
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import redis

from bench.context import Bench
from bench.figures.enqueue_rate import BODY, purge_queues
from bench.load import request_rate
from bench.report import Figure

HOLDERS = {"smoke": 100, "quick": 2000, "full": 2000}
HEALTH_PROBES = 200
WAIT_SECONDS = 60  # the API's maximum; the figure ends them sooner by cancelling their jobs
HELD = re.compile(r"^dspy_api_waits_held (\S+)$", re.M)


class Holders:
    """``n`` clients, each on its own connection, holding ``POST /v1/predict`` with ``wait``;
    run on an asyncio loop in a thread. ``answers`` collects each one's HTTP status (0: the
    connection ended without an answer)."""

    def __init__(self, url: str, n: int, tag: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.n, self.tag = n, tag
        self.answers: list[int] = []
        self.thread = threading.Thread(target=lambda: asyncio.run(self._all()), daemon=True)

    def start(self) -> Holders:
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)

    async def _all(self) -> None:
        await asyncio.gather(*(self._one(i) for i in range(self.n)))

    async def _one(self, i: int) -> None:
        body = json.dumps({"input": f"held {self.tag} {i}", "request_id": f"{self.tag}-{i}",
                           "wait": WAIT_SECONDS}).encode()  # fmt: skip
        status = 0
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
            writer.write(
                f"POST /v1/predict HTTP/1.1\r\nHost: {self.host}\r\nConnection: close\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await asyncio.wait_for(reader.readline(), WAIT_SECONDS + 30)
            status = int(head.split()[1]) if head.startswith(b"HTTP/1.1 ") else 0
            writer.close()
        except (TimeoutError, OSError, ValueError, IndexError):
            status = 0
        self.answers.append(status)


def held(client: httpx.Client) -> float:
    """Requests our API holds right now (all its processes)."""
    match = HELD.search(client.get("/metrics").text)
    return float(match[1]) if match else float("nan")


def health_latencies(url: str) -> list[float]:
    """Seconds each of HEALTH_PROBES sequential GET /health took, each on a new connection."""
    out = []
    with httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        for _ in range(HEALTH_PROBES):
            started = time.perf_counter()
            resp = client.get(url + "/health")
            out.append(time.perf_counter() - started)
            if resp.status_code != 200:
                raise RuntimeError(f"(i) /health answered {resp.status_code}")
            time.sleep(0.005)
    return out


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def cancel_held(url: str, redis_url: str, tag: str) -> int:
    """Cancel the holders' queued jobs (request ids ``<tag>-<i>``) through the API; how many
    were cancelled."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    keys = list(client.scan_iter("dspy_fleet:job:*", count=1000))
    ids = []
    for start in range(0, len(keys), 1000):
        pipe = client.pipeline(transaction=False)
        for key in keys[start : start + 1000]:
            pipe.hmget(key, "status", "request_id")
        chunk = keys[start : start + 1000]
        for key, (status, request_id) in zip(chunk, pipe.execute(), strict=True):
            if status == "queued" and (request_id or "").startswith(f"{tag}-"):
                ids.append(key.rsplit(":", 1)[1])
    client.close()
    with httpx.Client(base_url=url, timeout=30) as http, ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda job_id: http.delete(f"/v1/predictions/{job_id}").status_code,
                              ids))  # fmt: skip
    return codes.count(200)


def _enqueue_rate(b: Bench, url: str) -> float:
    rate = request_rate(url + "/v1/predict", method="POST", body=BODY,
                        seconds=b.sizes.http_seconds)  # fmt: skip
    if rate.bad:
        raise RuntimeError(f"(i) {rate.bad} of {rate.requests} submissions failed")
    purge_queues(b.stack.ours_redis)
    return rate.per_second


def measure(b: Bench, mode: str) -> list[Figure]:
    """/health p99 and the submission rate of our API, idle and while ``HOLDERS`` wait."""
    n = HOLDERS[mode]
    url = b.stack.urls["ours"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1024), hard))
    idle_health = health_latencies(url)
    idle_rate = _enqueue_rate(b, url)
    b.say(f"(i) idle: /health p99 {p99(idle_health) * 1e3:.1f} ms, {idle_rate:.0f} submissions/s")

    tag = f"held-{time.time_ns()}"
    holders = Holders(url, n, tag).start()
    with httpx.Client(base_url=url, timeout=30) as metrics:
        deadline = time.monotonic() + 120
        while held(metrics) < n and time.monotonic() < deadline and not holders.answers:
            time.sleep(0.25)
        held_now = held(metrics)
        if held_now < n:
            raise RuntimeError(f"(i) only {held_now:.0f} of {n} clients held (answers: "
                               f"{sorted(set(holders.answers))})")  # fmt: skip
        busy_health = health_latencies(url)
        busy_rate = _enqueue_rate(b, url)
        still_held = held(metrics)
    b.say(f"(i) {n} held: /health p99 {p99(busy_health) * 1e3:.1f} ms, "
          f"{busy_rate:.0f} submissions/s")  # fmt: skip
    cancelled = cancel_held(url, b.stack.ours_redis, tag)
    holders.join(WAIT_SECONDS + 40)
    ended = holders.answers.count(200)  # with their cancelled job
    ran_out = holders.answers.count(202)  # their wait ran out first (a slow machine)
    dropped = n - ended - ran_out  # no HTTP answer, or an error status
    notes = [f"{n} clients held (gauge {held_now:.0f}, {still_held:.0f} after the measurements);"
             f" ended by cancelling {cancelled} jobs: {ended} answered 200 with the job's end,"
             f" {ran_out} 202 when their {WAIT_SECONDS} s ran out first, {dropped} dropped",
             f"/health p50 idle {statistics.median(idle_health) * 1e3:.1f} ms, "
             f"held {statistics.median(busy_health) * 1e3:.1f} ms "
             f"({HEALTH_PROBES} sequential requests each, a new connection each)"]  # fmt: skip
    health_ms, idle_ms = p99(busy_health) * 1e3, p99(idle_health) * 1e3
    return [
        Figure("i_held_waits_health_p99", health_ms, "ms", idle_ms, f"ms same API idle ({n} held)",
               "<= 100 ms, none dropped", health_ms <= 100 and dropped == 0, notes),
        Figure("i_held_waits_enqueue_rate", busy_rate, "req/s", idle_rate,
               f"req/s same API idle ({n} held)", "ratio >= 0.80", busy_rate >= 0.8 * idle_rate,
               ["wrk, 32 connections, POST /v1/predict without wait"]),
    ]  # fmt: skip
