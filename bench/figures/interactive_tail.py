"""(m) Interactive latency while a batch runs at the provider's limit (issue 15).

The model ``paced`` has ``rpm: 600`` in the models file and the mock LLM enforces the same
600 requests/minute (answering 429 above it) for the length of the figure; mock at 50 ms.
Sequential interactive ``POST /v1/predict`` (``wait``) requests to our API on that model,
cache off, first on the idle fleet (the baseline), then during a batch on the same model
submitted through ``POST /v1/batches`` and sized to outlast them. The figure is each set's
p95; the notes split the slowest requests into the job record's stages (queued → started →
finished → answered), and give the batch's throughput and the 429s the provider answered.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx

from bench.context import Bench
from bench.report import Figure
from dspy_fleet.devtools.latencies import Latencies

MODEL = "paced"
PROVIDER_MODEL = "paced-gpt"  # the mock's name for it (bench/stack.py)
RPM = 600
SPACING_SECONDS = 0.5  # between two interactive requests during the batch
LEAD_SECONDS = 3.0  # the batch runs this long before the first interactive request


def interactive(http: httpx.Client, count: int, spacing: float) -> Latencies:
    """``count`` interactive requests, one at a time, ``spacing`` s apart."""
    out = Latencies()
    for _ in range(count):
        body = {"input": f"interactive {uuid.uuid4().hex}", "model": MODEL, "wait": 30,
                "use_cache": False}  # fmt: skip
        started = time.perf_counter()
        resp = http.post("/v1/predict", json=body)
        took, answered = time.perf_counter() - started, time.time()
        job: dict[str, Any] = resp.json()
        if resp.status_code != 200 or job.get("status") != "succeeded":
            raise RuntimeError(f"(m) an interactive request failed: {resp.text[:300]}")
        out.add(took, job, answered)
        time.sleep(spacing)
    return out


def measure(b: Bench) -> list[Figure]:
    """p95 of interactive requests during a paced batch, against the same on the idle fleet."""
    count = b.sizes.interactive_requests
    # Long enough to outlast the interactive requests (about 0.6 s each with their spacing).
    jobs = int(RPM / 60 * (LEAD_SECONDS + count * (SPACING_SECONDS + 0.2) + 2))
    b.stack.mock(latency_ms=50, rpm_limit=RPM)
    before = b.stack.mock_stats()
    try:
        with httpx.Client(base_url=b.stack.urls["ours"], timeout=60) as http:
            interactive(http, 3, 0)  # warm-up: the model's first calls
            idle = interactive(http, count, 0.1)
            items = [{"custom_id": f"m{i}", "input": f"paced {i} {uuid.uuid4().hex}",
                      "model": MODEL, "use_cache": False} for i in range(jobs)]  # fmt: skip
            created = http.post("/v1/batches", json=items)
            if created.status_code != 202:
                raise RuntimeError(f"(m) the batch was refused: {created.text[:300]}")
            batch = created.json()["id"]
            started = time.monotonic()
            time.sleep(LEAD_SECONDS)
            during = interactive(http, count, SPACING_SECONDS)
            overlap = http.get(f"/v1/batches/{batch}").json()["counts"]["pending"] > 0
            while (counts := http.get(f"/v1/batches/{batch}").json()["counts"])["pending"]:
                if time.monotonic() - started > jobs / (RPM / 60) * 2 + 60:
                    raise RuntimeError(f"(m) the batch did not end: {counts}")
                time.sleep(0.5)
            elapsed = time.monotonic() - started
    finally:
        b.stack.mock(latency_ms=0, rpm_limit=0)
    after = b.stack.mock_stats()
    limited = after["rate_limited_by_model"].get(PROVIDER_MODEL, 0) - before[
        "rate_limited_by_model"
    ].get(PROVIDER_MODEL, 0)
    calls = after["by_model"].get(PROVIDER_MODEL, 0) - before["by_model"].get(PROVIDER_MODEL, 0)
    ours, idle_p95 = 1000 * during.p95(), 1000 * idle.p95()
    b.say(f"(m) interactive p95 {ours:.0f} ms during the batch, {idle_p95:.0f} ms idle")
    notes = [
        f"batch of {jobs} on {MODEL} (rpm {RPM}): {counts}, {jobs / elapsed:.2f} jobs/s; "
        f"provider: {calls} calls, {limited} answered 429"
        + ("" if overlap else "; the batch ended before the interactive requests did"),
        f"slowest idle: {idle.slowest()}",
        f"slowest during the batch: {during.slowest()}",
    ]
    return [
        Figure("m_interactive_p95_during_batch", ours, "ms", idle_p95, "ms idle",
               "ratio <= 2", ours <= 2 * idle_p95, notes),
    ]  # fmt: skip
