"""(e) Added latency: submit with ``wait`` at a steady 50 req/s, minus the mock LLM's latency.

Baseline: the same through the bare stack (a Flask endpoint that sends the bare task and
waits for its result on the backend's pub/sub).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx

from bench.context import Bench
from bench.load import paced, percentile
from bench.report import Figure, median, spread

MOCK_MS = 50
RATE = 50.0


def _ours(url: str, tag: str) -> Callable[[httpx.Client, int], bool]:
    def call(client: httpx.Client, i: int) -> bool:
        resp = client.post(url + "/v1/predict", json={"input": f"latency {i} {tag}", "wait": 10})
        return resp.status_code == 200 and resp.json().get("status") == "succeeded"

    return call


def _bare(url: str, tag: str) -> Callable[[httpx.Client, int], bool]:
    def call(client: httpx.Client, i: int) -> bool:
        resp = client.post(url + "/wait", json={"input": f"latency {i} {tag}", "wait": 10})
        return resp.status_code == 200 and resp.json().get("status") == "SUCCESS"

    return call


def measure(b: Bench) -> list[Figure]:
    """p50 and p99 of end-to-end latency minus the mock's; each side paced at 50 req/s."""
    b.stack.mock(latency_ms=MOCK_MS)
    p50: dict[str, list[float]] = {"ours": [], "bare": []}
    p99: dict[str, list[float]] = {"ours": [], "bare": []}
    try:
        for r in range(b.sizes.rounds):
            for side in b.sides(r):
                tag = uuid.uuid4().hex[:8]
                make = _ours if side == "ours" else _bare
                lat, failed = paced(make(b.stack.urls[side], tag), rate=RATE,
                                    count=b.sizes.latency_requests, timeout=30)  # fmt: skip
                if failed:
                    raise RuntimeError(f"(e) {side}: {failed} requests did not succeed")
                added = [ms - MOCK_MS for ms in lat]
                p50[side].append(percentile(added, 50))
                p99[side].append(percentile(added, 99))
                b.say(f"(e) round {r} {side}: p50 {p50[side][-1]:.1f} ms, "
                      f"p99 {p99[side][-1]:.1f} ms")  # fmt: skip
    finally:
        b.stack.mock(latency_ms=0)
    o50, o99 = median(p50["ours"]), median(p99["ours"])
    b50, b99 = median(p50["bare"]), median(p99["bare"])
    base = "ms bare Flask+Celery"
    # Issue 18's targets: at most 2 ms (p50) and 5 ms (p99) above the bare stack's.
    return [
        Figure("e_added_latency_p50", o50, "ms", b50, base, "<= bare + 2 ms", o50 <= b50 + 2,
               [spread("ours p50", p50["ours"]), spread("bare p50", p50["bare"])]),
        Figure("e_added_latency_p99", o99, "ms", b99, base, "<= bare + 5 ms", o99 <= b99 + 5,
               [spread("ours p99", p99["ours"]), spread("bare p99", p99["bare"])]),
    ]  # fmt: skip
