"""The provider fails 100% under load, then recovers: the breaker limits the damage."""

from __future__ import annotations

import statistics
import time
from collections import Counter

import httpx

from tests.chaos.conftest import ChaosStack, post_many

CONFIG = """
default_model: mock
models:
  mock: {litellm_model: openai/mock-gpt, api_base: "${DSPY_FLEET_MOCK_LLM_URL}", max_retries: 1,
         timeout: 3,
         input_price_per_1k: 0.001, output_price_per_1k: 0.002,
         breaker: {failure_threshold: 5, recovery_seconds: 3, half_open_max_calls: 2,
                   success_threshold: 2}}
programs:
  qa: {signature: "question -> answer"}
"""


def test_500_requests_through_a_provider_outage(chaos: ChaosStack) -> None:
    (chaos.dir / "fleet.yaml").write_text(CONFIG)
    # 16 clients hold waits at once: threads enough that the wait cap holds them all.
    chaos.env.update(DSPY_FLEET_CONFIG=str(chaos.dir / "fleet.yaml"),
                     DSPY_FLEET_RETRY_BACKOFF_SECONDS="0.05",
                     DSPY_FLEET_API_THREADS="32")  # fmt: skip
    with chaos.together():
        chaos.start_worker()
        api = chaos.start_api()
    chaos.mock.set_faults(error_rate=1.0, error_status=503)
    bodies = [{"input": f"outage {i}", "use_cache": False, "wait": 30} for i in range(500)]
    t0 = time.monotonic()
    answers = [r.json() for r in post_many(api.url, bodies, threads=16)]
    took = time.monotonic() - t0
    calls = chaos.mock.stats()["chat_completions"]
    codes = Counter(a.get("error", {}).get("code", a["status"]) for a in answers)
    print(
        f"\noutage: 500 requests answered in {took:.1f} s: {dict(codes)}; "
        f"the provider saw {calls} calls"
    )
    assert all(a["status"] == "failed" for a in answers)  # a terminal answer for every one
    assert set(codes) <= {"circuit_open", "provider_error"}
    assert codes["circuit_open"] >= 450
    # Threshold (5) + one retry each + a few in flight when it opened: nowhere near 500.
    assert calls <= 40

    chaos.mock.set_faults(error_rate=0.0)
    time.sleep(3.5)  # the breaker's recovery timeout
    t0 = time.monotonic()
    with httpx.Client(base_url=api.url, timeout=30) as client:
        probes = [
            client.post(
                "/v1/predict", json={"input": f"after {i}", "use_cache": False, "wait": 20}
            ).json()
            for i in range(3)
        ]
        state = client.get("/ready").json()["components"]["breakers"]["states"]["mock"]
    assert all(p["status"] == "succeeded" for p in probes), probes
    assert state == "closed"
    after = [r.json() for r in post_many(api.url, [{"input": f"back {i}", "use_cache": False,
                                                    "wait": 30} for i in range(100)])]  # fmt: skip
    lat = [a["cost"]["latency_ms"] for a in after]
    print(
        f"recovered: breaker closed {time.monotonic() - t0:.1f} s after the provider came "
        f"back; 100/100 then succeeded (worker latency p50 {statistics.median(lat):.0f} ms)"
    )
    assert all(a["status"] == "succeeded" for a in after)
