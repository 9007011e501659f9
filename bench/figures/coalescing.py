"""(f) Coalescing: 100 identical concurrent requests make 1 LM call (bare stack: 100)."""

from __future__ import annotations

import time
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
            # Over the API's wait cap a request is answered at once (202, X-Wait-Capped):
            # poll it to its end, as the SDK does; the figure counts LM calls, not waits.
            status_url, deadline = resp.headers.get("Location"), time.monotonic() + 30
            while (resp.status_code in (200, 202) and status_url
                   and resp.json().get("status") in ("queued", "running", "retrying")
                   and time.monotonic() < deadline):  # fmt: skip
                time.sleep(float(resp.headers.get("Retry-After", "0.2")))
                resp = client.get(status_url)
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
