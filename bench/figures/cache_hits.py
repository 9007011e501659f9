"""(d) Cache hits served by the API (200 ``cached: true``, no queue) vs a bare Redis GET."""

from __future__ import annotations

import json

import httpx
import redis

from bench.context import Bench
from bench.load import request_rate
from bench.report import Figure, median, spread
from dspy_fleet.contract import DEFAULT_TENANT
from dspy_fleet.routing import cache_key
from dspy_fleet.store.cache import l2_key
from dspy_fleet.store.catalog import CATALOG_KEY

QUESTION = "What is the answer to the cached question?"
BODY = {"input": QUESTION}


def seed(b: Bench) -> None:
    """Answer QUESTION once through the worker (filling L2), and give the bare app's Redis the
    same entry under its key, so both serve the same bytes. Needs a running worker."""
    url = b.stack.urls["ours"] + "/v1/predict"
    body = httpx.post(url, json={**BODY, "wait": 20}, timeout=30).json()
    if body.get("status") != "succeeded":
        raise RuntimeError(f"(d) could not seed the cache: {body}")
    ours = redis.Redis.from_url(b.stack.ours_redis, decode_responses=True)
    qa = json.loads(ours.hget(CATALOG_KEY, "qa") or "{}")
    inputs = {qa["input_fields"][0]: QUESTION}
    # The bench's API runs open: every job is the default tenant's (qa is tenant-scoped).
    key = cache_key("qa", qa["version"], "mock", inputs, {}, DEFAULT_TENANT)
    entry = ours.get(l2_key(key))
    if entry is None:
        raise RuntimeError("(d) the L2 entry is not where the cache key says")
    redis.Redis.from_url(b.stack.bare_redis).set("bench:cached", entry)
    ours.close()


def _check(b: Bench, side: str) -> str:
    if side == "bare":
        url = b.stack.urls["bare"] + "/get"
        if "outputs" not in httpx.get(url, timeout=10).json():
            raise RuntimeError("(d) bare: the seeded entry is missing")
        return url
    url = b.stack.urls["ours"] + "/v1/predict"
    resp = httpx.post(url, json=BODY, timeout=10)
    if resp.status_code != 200 or resp.json().get("cached") is not True:
        raise RuntimeError(f"(d) ours: expected 200 cached, got {resp.status_code} {resp.text}")
    return url


def measure(b: Bench) -> list[Figure]:
    """Requests/s of cache hits vs of one Redis GET, under wrk (32 connections)."""
    rates: dict[str, list[float]] = {"ours": [], "bare": []}
    for r in range(b.sizes.rounds):
        for side in b.sides(r):
            url = _check(b, side)
            method, body = ("POST", BODY) if side == "ours" else ("GET", None)
            rate = request_rate(url, method=method, body=body, seconds=b.sizes.http_seconds)
            if rate.bad:
                raise RuntimeError(f"(d) {side}: {rate.bad} of {rate.requests} requests failed")
            rates[side].append(rate.per_second)
            b.say(f"(d) round {r} {side}: {rate.per_second:.0f} req/s ({rate.tool})")
    ours, bare = median(rates["ours"]), median(rates["bare"])
    return [
        Figure("d_cache_hit_rate", ours, "req/s", bare, "req/s bare Flask Redis GET",
               "ratio >= 0.6", ours >= 0.6 * bare,
               [spread("ours", rates["ours"]), spread("bare", rates["bare"])])
    ]  # fmt: skip
