"""(c) API enqueue rate under gunicorn: POST /v1/predict vs a bare Flask ``send_task``.

Measured with no worker running, so that neither side's consumer takes CPU from the API.
"""

from __future__ import annotations

import httpx
import redis

from bench.context import Bench
from bench.load import request_rate
from bench.report import Figure, median, spread

BODY = {"input": "What is 2+2?"}  # every feature on: validation, catalog, L2 lookup (a miss)


def purge_queues(url: str) -> None:
    """Drop the queued messages (and nothing else) between runs."""
    client = redis.Redis.from_url(url)
    for pattern in ("interactive*", "batch*"):
        for key in client.scan_iter(pattern):
            client.delete(key)
    client.close()


def _check(b: Bench, side: str) -> str:
    url = b.stack.urls[side] + ("/v1/predict" if side == "ours" else "/enqueue")
    resp = httpx.post(url, json=BODY, timeout=10)
    if resp.status_code != 202:
        raise RuntimeError(f"(c) {side}: expected 202, got {resp.status_code} {resp.text[:200]}")
    return url


def measure(b: Bench) -> list[Figure]:
    """Requests/s each API sustains under wrk (closed loop, 32 connections)."""
    rates: dict[str, list[float]] = {"ours": [], "bare": []}
    tool = ""
    for r in range(b.sizes.rounds):
        for side in b.sides(r):
            url = _check(b, side)
            rate = request_rate(url, method="POST", body=BODY, seconds=b.sizes.http_seconds)
            if rate.bad:
                raise RuntimeError(f"(c) {side}: {rate.bad} of {rate.requests} requests failed")
            rates[side].append(rate.per_second)
            tool = rate.tool
            purge_queues(b.stack.ours_redis if side == "ours" else b.stack.bare_redis)
            b.say(f"(c) round {r} {side}: {rate.per_second:.0f} req/s ({rate.tool})")
    ours, bare = median(rates["ours"]), median(rates["bare"])
    return [
        Figure("c_api_enqueue_rate", ours, "req/s", bare, "req/s bare Flask send_task",
               "ratio >= 0.85", ours >= 0.85 * bare,
               [f"load: {tool}, 32 connections", spread("ours", rates["ours"]),
                spread("bare", rates["bare"])])
    ]  # fmt: skip
