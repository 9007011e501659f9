"""(f) Coalescing: 100 identical concurrent requests make 1 LM call (bare stack: 100)."""

from __future__ import annotations

import uuid

import httpx

from bench.context import Bench
from bench.load import concurrent
from bench.report import Figure

N = 100
MOCK_MS = 300  # long enough that the requests overlap the one call


def _lm_calls(b: Bench, side: str) -> tuple[int, int]:
    """(LM calls, requests that did not succeed) for N identical concurrent requests."""
    question = f"What is the capital of France? ({uuid.uuid4().hex[:8]})"
    url = b.stack.urls[side]

    def call(client: httpx.Client, _i: int) -> bool:
        if side == "ours":
            resp = client.post(url + "/v1/predict", json={"input": question, "wait": 30})
            return resp.status_code == 200 and resp.json().get("status") == "succeeded"
        resp = client.post(url + "/wait", json={"input": question, "wait": 30})
        return resp.status_code == 200 and resp.json().get("status") == "SUCCESS"

    b.stack.mock_reset()
    ok = concurrent(call, N, timeout=60)
    return int(b.stack.mock_stats()["chat_completions"]), N - sum(ok)


def measure(b: Bench) -> list[Figure]:
    """LM calls made for N identical requests sent at once through each API."""
    b.stack.mock(latency_ms=MOCK_MS)
    try:
        bare, bare_failed = _lm_calls(b, "bare")
        ours, ours_failed = _lm_calls(b, "ours")
    finally:
        b.stack.mock(latency_ms=0)
    if ours_failed or bare_failed:
        raise RuntimeError(f"(f) requests that did not succeed: ours {ours_failed}, "
                           f"bare {bare_failed}")  # fmt: skip
    b.say(f"(f) LM calls for {N} identical requests: ours {ours}, bare {bare}")
    return [
        Figure("f_coalescing", ours, "LM calls", bare, "LM calls bare stack",
               f"1 LM call for {N} requests", ours == 1)
    ]  # fmt: skip
