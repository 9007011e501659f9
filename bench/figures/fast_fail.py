"""(h) Fast-fail latency under an open breaker: submit to failed result with ``wait``.

Baseline: the bare stack round trip of a task that fails at once (``bare.fail``).
"""

from __future__ import annotations

import time
import uuid

import httpx

from bench.context import Bench
from bench.load import percentile
from bench.report import Figure, median, spread
from bench.stack import rss_kb

MODEL = "fragile"  # every call fails with a 500; its breaker opens after 3 (bench/stack.py)


def _open_breaker(client: httpx.Client) -> None:
    for i in range(3):
        body = client.post("/v1/predict", json={"input": f"trip {i} {uuid.uuid4().hex}",
                                                "model": MODEL, "wait": 10}).json()  # fmt: skip
        code = body.get("error", {}).get("code")
        if code == "circuit_open":
            return  # opened by an earlier round
        if code != "provider_error":
            raise RuntimeError(f"(h) expected a provider error while opening the breaker: {body}")


def _ours(b: Bench, n: int) -> list[float]:
    latencies = []
    with httpx.Client(base_url=b.stack.urls["ours"], timeout=30) as client:
        _open_breaker(client)
        for i in range(n):
            queue = "batch" if i % 2 else "interactive"
            t0 = time.perf_counter()
            resp = client.post("/v1/predict", json={"input": f"ff {i} {uuid.uuid4().hex}",
                                                    "model": MODEL, "wait": 10,
                                                    "priority": queue})  # fmt: skip
            latencies.append((time.perf_counter() - t0) * 1000)
            code = resp.json().get("error", {}).get("code")
            if code != "circuit_open":
                raise RuntimeError(f"(h) expected circuit_open, got {resp.status_code} {code}")
    return latencies


def _bare(b: Bench, n: int) -> list[float]:
    latencies = []
    with httpx.Client(base_url=b.stack.urls["bare"], timeout=30) as client:
        for i in range(n):
            t0 = time.perf_counter()
            resp = client.post("/wait", json={"input": f"ff {i}", "task": "bare.fail", "wait": 10})
            latencies.append((time.perf_counter() - t0) * 1000)
            if resp.json().get("status") != "FAILURE":
                raise RuntimeError(f"(h) bare: expected FAILURE, got {resp.text[:200]}")
    return latencies


def measure(b: Bench) -> list[Figure]:
    """p99 (and p50) over sequential requests, once the breaker is open."""
    p50: dict[str, list[float]] = {"ours": [], "bare": []}
    p99: dict[str, list[float]] = {"ours": [], "bare": []}
    grown = {"ours": 0, "bare": 0}  # worker RSS kB gained over the failed jobs
    for r in range(b.sizes.rounds):
        for side in b.sides(r):
            pid = b.stack.children[f"{side}-worker"].proc.pid
            before = rss_kb(pid)
            lat = (_ours if side == "ours" else _bare)(b, b.sizes.fast_fail_requests)
            grown[side] += rss_kb(pid) - before
            p50[side].append(percentile(lat, 50))
            p99[side].append(percentile(lat, 99))
            b.say(f"(h) round {r} {side}: p50 {p50[side][-1]:.1f} ms, p99 {p99[side][-1]:.1f} ms")
    ours = median(p99["ours"])
    failed = b.sizes.rounds * b.sizes.fast_fail_requests
    return [
        Figure("h_fast_fail_p99", ours, "ms", median(p99["bare"]),
               "ms bare Flask+Celery failing task", "< 50 ms", ours < 50,
               [f"p50: ours {median(p50['ours']):.1f} ms, bare {median(p50['bare']):.1f} ms",
                "worker RSS growth per failed job (never given back): "
                f"ours {grown['ours'] / failed:.0f} kB, bare {grown['bare'] / failed:.0f} kB",
                spread("ours p99", p99["ours"]), spread("bare p99", p99["bare"])])
    ]  # fmt: skip
