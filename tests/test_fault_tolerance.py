"""Provider faults: fleet-shared breakers, retries through Celery, fallbacks, timeouts.

Two real workers (A consumes `interactive`, B consumes `batch`) share one Redis,
so a breaker opened by what A saw must make B fail fast.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from dspy_fleet.devtools.redis import RedisServer
from tests.conftest import (
    MockLLM,
    Service,
    poll,
    start_api,
    start_worker,
    stop_all,
    wait_all_ready,
)
from tests.test_cache_and_costs import metric_value

# Run alone by `make test`: a hung call's bounds in seconds are asserted.
pytestmark = pytest.mark.serial

# Every model below points at the mock LLM, priced alike unless it says otherwise.
BASE = (
    'api_base: "${DSPY_FLEET_MOCK_LLM_URL}", input_price_per_1k: 0.001, output_price_per_1k: 0.002'
)
CONFIG = f"""
default_model: mock
models:
  mock: {{litellm_model: openai/mock-gpt, {BASE}}}
  fragile: {{litellm_model: openai/fragile, max_retries: 0,
            breaker: {{failure_threshold: 3, recovery_seconds: 300}}, {BASE}}}
  flaky: {{litellm_model: openai/flaky, max_retries: 0,
          breaker: {{failure_threshold: 3, recovery_seconds: 2, half_open_max_calls: 2,
                    success_threshold: 2}}, {BASE}}}
  retrying: {{litellm_model: openai/retrying, max_retries: 3, {BASE}}}
  retrying_litellm: {{litellm_model: openai/retrying_litellm, engine: litellm, max_retries: 3,
                     {BASE}}}
  primary: {{litellm_model: openai/primary, max_retries: 0, fallbacks: [backup],
            breaker: {{failure_threshold: 2, recovery_seconds: 300}},
            lm_kwargs: {{extra_headers: {{X-Mock-Status: "503"}}}}, {BASE}}}
  backup: {{litellm_model: openai/backup, api_base: "${{DSPY_FLEET_MOCK_LLM_URL}}",
           input_price_per_1k: 0.005, output_price_per_1k: 0.01}}
  strict: {{litellm_model: openai/strict, breaker: {{failure_threshold: 3}},
           lm_kwargs: {{extra_headers: {{X-Mock-Status: "400"}}}}, {BASE}}}
  slow: {{litellm_model: openai/slow, timeout: 1.5, max_retries: 0,
         lm_kwargs: {{extra_headers: {{X-Mock-Hang-Seconds: "30"}}}}, {BASE}}}
programs:
  qa: {{signature: "question -> answer"}}
"""


@dataclass
class Fleet:
    """Redis, two workers on different queues, one API."""

    redis_server: RedisServer
    worker_a: Service
    worker_b: Service
    api: Service

    def http(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.api.url, timeout=timeout)

    def predict(self, model: str, *, queue: str = "interactive", wait: float = 20,
                text: str | None = None) -> dict[str, Any]:  # fmt: skip
        body = {"input": text or f"q {uuid.uuid4().hex}", "model": model, "wait": wait,
                "use_cache": False, "priority": queue}  # fmt: skip
        with self.http() as client:
            return client.post("/v1/predict", json=body).json()

    def breaker(self, model: str) -> str:
        with self.http() as client:
            body = client.get("/ready").json()
        components = body.get("components") or body["error"]["details"]["components"]
        return components["breakers"]["states"][model]


@pytest.fixture(scope="module")
def fleet(mock_llm: MockLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base: Path = tmp_path_factory.mktemp("fault-fleet")
    (base / "fleet.yaml").write_text(CONFIG)
    env = {
        "DSPY_FLEET_CONFIG": str(base / "fleet.yaml"),
        "DSPY_FLEET_RETRY_BACKOFF_SECONDS": "0.05",
    }
    redis_server = RedisServer(log_path=base / "redis.log").start()
    url = redis_server.url
    # Started side by side, each then waited for.
    a = start_worker(url, mock_llm.url, base / "worker-a.log", DSPY_FLEET_QUEUES="interactive",
                     wait=False, **env)  # fmt: skip
    b = start_worker(url, mock_llm.url, base / "worker-b.log", DSPY_FLEET_QUEUES="batch",
                     wait=False, **env)  # fmt: skip
    api = start_api(url, mock_llm.url, base / "api.log", wait=False, **env)
    try:
        wait_all_ready(a, b, api)
    except BaseException:
        redis_server.stop()
        raise
    yield Fleet(redis_server, a, b, api)
    stop_all(api, a, b)
    redis_server.stop()


@pytest.fixture
def mock(mock_llm: MockLLM) -> Iterator[MockLLM]:
    mock_llm.reset()
    yield mock_llm
    mock_llm.reset()


def calls(mock: MockLLM, model: str) -> int:
    return mock.stats()["by_model"].get(model, 0)


def test_breaker_opened_through_a_makes_b_fail_fast(fleet: Fleet, mock: MockLLM) -> None:
    mock.set_faults(error_rate=1.0, error_status=500)
    for _ in range(3):  # worker A sees the failures
        failed = fleet.predict("fragile", queue="interactive")
        assert failed["status"] == "failed" and failed["error"]["code"] == "provider_error"
    assert calls(mock, "fragile") == 3
    assert fleet.breaker("fragile") == "open"

    fast = fleet.predict("fragile", queue="batch")  # worker B never called the provider
    assert fast["status"] == "failed"
    assert fast["error"]["code"] == "circuit_open"
    assert 0 < fast["error"]["details"]["retry_after"] <= 300
    assert calls(mock, "fragile") == 3
    # The fleet's state, as its one exporter (the API) reads it from Redis.
    text = httpx.get(f"{fleet.api.url}/metrics", timeout=10).text
    assert metric_value(text, "dspy_circuit_breaker_state", model="fragile") == 1

    # Fast-fail latency, submit to failed result, through HTTP with wait.
    latencies = []
    with fleet.http() as client:
        for i in range(100):
            queue = "batch" if i % 2 else "interactive"
            t0 = time.perf_counter()
            body = client.post(
                "/v1/predict",
                json={"input": f"ff {i}", "model": "fragile", "wait": 10, "priority": queue},
            ).json()
            latencies.append((time.perf_counter() - t0) * 1000)
            assert body["error"]["code"] == "circuit_open"
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(
        f"fast-fail latency over 100 requests: p50 {statistics.median(latencies):.1f} ms, "
        f"p99 {p99:.1f} ms"
    )
    # The p99 < 50 ms target is measured by bench/ (timed assertions flake on shared
    # machines); here the latency is printed and the behaviour asserted.
    assert calls(mock, "fragile") == 3


def test_half_open_admits_only_its_probes_then_closes(fleet: Fleet, mock: MockLLM) -> None:
    mock.set_faults(error_rate=1.0, error_status=503)
    for _ in range(3):
        assert fleet.predict("flaky")["error"]["code"] == "provider_error"
    assert fleet.breaker("flaky") == "open"
    mock.set_faults(error_rate=0.0, latency_ms=400)
    time.sleep(2.2)  # the recovery timeout
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        out = fleet.predict("flaky", queue="batch" if i % 2 else "interactive")
        with lock:
            results.append(out)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r["status"] == "succeeded"]
    refused = [r for r in results if r.get("error", {}).get("code") == "circuit_open"]
    assert len(ok) == 2 and len(refused) == 4, results  # half_open_max_calls: 2
    assert calls(mock, "flaky") == 3 + 2
    assert fleet.breaker("flaky") == "closed"  # success_threshold: 2
    mock.set_faults(latency_ms=0)
    assert all(fleet.predict("flaky")["status"] == "succeeded" for _ in range(3))


# The models above run on DSPy's own engine (the default) unless they set lm_kwargs it does
# not take (extra_headers: LiteLLM then); the retry tests run on both engines.
RETRYING = ["retrying", "retrying_litellm"]


@pytest.mark.parametrize("model", RETRYING)
def test_429_retry_after_is_honoured_through_celery(
    fleet: Fleet, mock: MockLLM, model: str
) -> None:
    # A 429 is the provider pacing us: the job waits (status throttled, no attempt spent)
    # until its Retry-After, then runs at the slower pace (dspy_fleet/store/pacing.py).
    mock.set_faults(fail_next=1, error_status=429, retry_after=2)
    with fleet.http() as client:
        job = client.post(
            "/v1/predict",
            json={"input": f"r {uuid.uuid4().hex}", "model": model, "use_cache": False},
        ).json()
        waiting = poll(lambda: (b := client.get(f"/v1/predictions/{job['id']}").json())
                       ["status"] == "throttled" and b, timeout=5)  # fmt: skip
        assert waiting["attempts"] == 1 and waiting["throttle_reason"] == "rate_limited"
        assert waiting["throttled_until"]
        done = client.get(f"/v1/predictions/{job['id']}", params={"wait": 20}).json()
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert "error" not in done and "throttled_until" not in done
    recent = [r for r in mock.stats()["recent"] if r["model"] == model]
    assert [r["status"] for r in recent] == [429, 200]
    gap = recent[1]["time"] - recent[0]["time"]
    print(f"429 with Retry-After: 2 -> retried {gap:.2f} s later")
    assert gap >= 2.0


@pytest.mark.parametrize("model", RETRYING)
def test_transient_errors_retry_with_backoff_until_success(
    fleet: Fleet, mock: MockLLM, model: str
) -> None:
    mock.set_faults(fail_next=2, error_status=503)
    done = fleet.predict(model)
    assert done["status"] == "succeeded" and done["attempts"] == 3
    assert done["cost"]["attempts"] == 3
    mock.set_faults(error_rate=1.0, error_status=500)
    failed = fleet.predict(model, wait=30)
    assert failed["status"] == "failed" and failed["attempts"] == 4  # 1 + max_retries
    assert failed["error"]["details"]["attempts"] == 4


def test_fallback_serves_and_is_billed(fleet: Fleet, mock: MockLLM) -> None:
    before = httpx.get(fleet.api.url + "/costs", timeout=10).json()["by_model"]
    served = [fleet.predict("primary") for _ in range(4)]
    assert all(s["status"] == "succeeded" for s in served), served
    for s in served:
        assert s["model"] == "backup" and s["requested_model"] == "primary"
        assert s["cost"]["model"] == "backup" and s["cost"]["provider_model"] == "openai/backup"
        assert s["cost"]["cost_usd"] == pytest.approx(
            s["cost"]["input_tokens"] * 0.005e-3 + s["cost"]["output_tokens"] * 0.01e-3
        )
    # Two primary failures opened its breaker; after that only the fallback is called.
    assert calls(mock, "primary") == 2 and calls(mock, "backup") == 4
    assert fleet.breaker("primary") == "open"
    after = httpx.get(fleet.api.url + "/costs", timeout=10).json()["by_model"]
    billed = after["backup"]["requests"] - before.get("backup", {}).get("requests", 0)
    assert billed == 4
    assert after.get("primary", {}).get("requests", 0) == before.get("primary", {}).get(
        "requests", 0
    )


def test_bad_requests_never_trip_the_breaker(fleet: Fleet, mock: MockLLM) -> None:
    with fleet.http() as client:
        for i in range(100):  # the provider answers 400: our request's fault, not its
            body = {"input": f"bad {i}", "model": "strict", "use_cache": False}
            client.post("/v1/predict", json={**body, "priority": "batch" if i % 2 else
                                             "interactive"})  # fmt: skip
        last = client.post("/v1/predict", json={"input": "bad last", "model": "strict",
                                                "wait": 20}).json()  # fmt: skip
    assert last["error"]["code"] == "provider_bad_request"
    poll(lambda: calls(mock, "strict") >= 101, timeout=30)
    assert fleet.breaker("strict") == "closed"


def test_a_hung_provider_times_out_while_other_slots_serve(fleet: Fleet, mock: MockLLM) -> None:
    with fleet.http() as client:
        t0 = time.perf_counter()
        hung = client.post("/v1/predict", json={"input": "hang", "model": "slow",
                                                "use_cache": False}).json()  # fmt: skip
        # Meanwhile the same worker keeps answering other requests.
        quick = [client.post("/v1/predict", json={"input": f"What is {i}+1?", "wait": 10,
                                                  "use_cache": False}).json()
                 for i in range(5)]  # fmt: skip
        assert all(q["status"] == "succeeded" for q in quick)
        assert time.perf_counter() - t0 < 1.5
        done = client.get(f"/v1/predictions/{hung['id']}", params={"wait": 20}).json()
    elapsed = time.perf_counter() - t0
    assert done["status"] == "failed" and done["error"]["code"] == "provider_timeout"
    print(f"hung provider ended after {elapsed:.2f} s (model timeout 1.5 s)")
    assert 1.4 <= elapsed < 6
