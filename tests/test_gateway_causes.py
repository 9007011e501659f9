"""Behind an LLM gateway, a refusal is shown as itself, not as the gateway's 429 (issue 19.7).

A LiteLLM proxy that gets a 401 from the provider forwards it, then cools the deployment
down and answers ``429 No deployments available for selected model`` to the calls that
follow. Counted as provider faults, those 429s opened the breaker and every job failed
``circuit_open``: the cause, the key, was never shown. Now the job fails
``provider_auth_error`` (not retried, no fault against the breaker) and says why, and the
ordinary rate limits beside it keep their retries.

A real stack (Redis, a worker, the API) calls a stub that answers as such a proxy does
(tests/stub_provider.py), on both DSPy engines.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from dspy_fleet.store.breakers import PREFIX as BREAKER_PREFIX
from tests.conftest import TEST_ENV, MockLLM, OwnStack, Service, poll
from tests.stub_provider import (
    INVALID_KEY,
    Reply,
    StubProvider,
    completion,
    prompt_text,
    proxy_auth_error,
    proxy_cooldown,
    rate_limited,
)
from tests.test_cache_and_costs import metric_value

ENGINES = ["litellm", "auto"]
MARKER = re.compile(r"\[(auth|busy|wait)-(\d+)\]")


class Gateway:
    """How the stub answers, by route ``<scenario>-<engine>``.

    auth: the provider refuses the key; the proxy forwards the 401, then answers every later
    call with its cooldown 429 (today's message: deployment ids only, no reason).
    heal: the 401, a cooldown, then the key is fixed: an answer, another cooldown (this one
    for a reason the fleet did not see), and answers again.
    mix: by the marker in the question: ``[auth-N]`` meets a cooldown whose message lists
    the 401 that caused it (the form older LiteLLM versions send); ``[busy-N]`` and
    ``[wait-N]`` meet an ordinary rate limit (without, and with ``Retry-After: 1``) the
    first time, and an answer the second."""

    def __init__(self) -> None:
        self.seen: Counter[tuple[str, str]] = Counter()
        self.lock = threading.Lock()

    def __call__(self, route: str, nth: int, request: dict[str, Any]) -> Reply:
        scenario = route.split("-", 1)[0]
        if scenario == "auth":
            return proxy_auth_error() if nth == 1 else proxy_cooldown()
        if scenario == "heal":
            script = {1: proxy_auth_error(), 2: proxy_cooldown(seconds=1),
                      4: proxy_cooldown(seconds=1)}  # fmt: skip
            return script.get(nth) or completion()
        found = MARKER.search(prompt_text(request))
        assert found is not None, "every question of the mix carries a marker"
        kind = found.group(1)
        if kind == "auth":
            return proxy_cooldown([(401, INVALID_KEY)])
        with self.lock:
            self.seen[route, found.group(0)] += 1
            first = self.seen[route, found.group(0)] == 1
        if first:
            return rate_limited(1 if kind == "wait" else None)
        return completion()


def _config(stub: StubProvider) -> str:
    models = []
    for engine in ENGINES:
        # A threshold of 3: if the cooldown 429s counted as faults, the 4th job would
        # already fail circuit_open.
        models.append(
            f"  auth_{engine}: {{litellm_model: openai/gpt-4o-mini, engine: {engine}, "
            f'api_base: "{stub.base("auth-" + engine)}", timeout: 10, max_retries: 3, '
            "breaker: {failure_threshold: 3, recovery_seconds: 300}}"
        )
        models.append(
            f"  heal_{engine}: {{litellm_model: openai/gpt-4o-mini, engine: {engine}, "
            f'api_base: "{stub.base("heal-" + engine)}", timeout: 10, max_retries: 3}}'
        )
        # Ordinary 429s are pacing news, never breaker faults; the thresholds are out of
        # reach anyway, so that only classification is tested here. Each of the stub's
        # 429s cuts the pace (one per job, whatever the rate), so a configured limit keeps
        # the floor under it: never below a tenth of 6,000/min.
        models.append(
            f"  mix_{engine}: {{litellm_model: openai/gpt-4o-mini, engine: {engine}, "
            f'api_base: "{stub.base("mix-" + engine)}", timeout: 10, max_retries: 2, '
            "rpm: 6000, breaker: {failure_threshold: 1000, min_calls: 100000}}"
        )
    return (
        "default_model: auth_litellm\nmodels:\n" + "\n".join(models) + "\n"
        'programs:\n  qa: {signature: "question -> answer"}\n'
    )


@dataclass
class Fleet:
    stack: OwnStack
    stub: StubProvider
    worker: Service
    api: Service

    def breaker(self, model: str) -> str:
        body = httpx.get(self.api.url + "/ready", timeout=10).json()
        components = body.get("components") or body["error"]["details"]["components"]
        return str(components["breakers"]["states"][model])

    def errors(self, model: str, error_type: str) -> float:
        return metric_value(self.worker.metrics(), "dspy_errors_total", model=model,
                            error_type=error_type)  # fmt: skip

    def provider_429s(self, model: str) -> float:
        return metric_value(self.worker.metrics(), "dspy_rate_limit_provider_429_total",
                            model=model)  # fmt: skip

    def faults_recorded(self, model: str) -> int:
        """Provider faults the model's breaker counted in its rate window (every bucket)."""
        client = redis.Redis.from_url(self.stack.redis_url, decode_responses=True)
        keys = client.keys(f"{BREAKER_PREFIX}{model}:w:*")
        return sum(int(client.hget(k, "failures") or 0) for k in keys)


@pytest.fixture(scope="module")
def fleet(mock_llm: MockLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("gateway")
    stub = StubProvider(Gateway())
    (base / "fleet.yaml").write_text(_config(stub))
    env = {**TEST_ENV, "DSPY_FLEET_CONFIG": str(base / "fleet.yaml"),
           "DSPY_FLEET_RETRY_BACKOFF_SECONDS": "0.05"}  # fmt: skip
    stack = OwnStack(base, env=env)
    stack.use_mock_llm(mock_llm)
    stack.start_redis()
    worker = stack.start_worker("worker")
    api = stack.start_api("api")
    yield Fleet(stack, stub, worker, api)
    stack.stop()
    stub.stop()


def _predict(url: str, model: str, text: str) -> dict[str, Any]:
    body = {"input": text, "model": model, "use_cache": False, "wait": 30}
    with httpx.Client(base_url=url, timeout=60) as http:
        return http.post("/v1/predict", json=body).json()


@pytest.mark.parametrize("engine", ENGINES)
def test_an_auth_error_behind_a_gateway_fails_fast_with_its_cause_and_no_breaker_trip(
    fleet: Fleet, engine: str
) -> None:
    model, route = f"auth_{engine}", f"auth-{engine}"
    first = _predict(fleet.api.url, model, f"who am I? {uuid.uuid4().hex}")
    assert first["status"] == "failed", first
    assert first["error"]["code"] == "provider_auth_error"
    assert "Incorrect API key" in first["error"]["message"]
    assert first["cost"]["attempts"] == 1

    # The proxy now cools the deployment down and answers 429 to every call; each job must
    # still fail with the refusal behind it, at once.
    texts = [f"and now? {i} {uuid.uuid4().hex}" for i in range(30)]
    with ThreadPoolExecutor(6) as pool:
        later = list(pool.map(lambda t: _predict(fleet.api.url, model, t), texts))
    codes = Counter(job["error"]["code"] for job in later if job["status"] == "failed")
    print(f"\n{engine}: after the 401, {len(later)} jobs ended {dict(codes)}")
    assert codes == {"provider_auth_error": len(later)}, later[:2]
    for job in later:
        error = job["error"]
        assert error["details"]["gateway_cooldown"] is True
        assert error["details"]["status_code"] == 429
        assert "Incorrect API key" in error["message"] and "429" in error["message"]
        assert job["cost"]["attempts"] == 1  # not retried
    assert fleet.stub.calls[route] == 1 + len(later)  # one provider call per job
    assert fleet.breaker(model) == "closed"
    assert fleet.faults_recorded(model) == 0
    assert fleet.errors(model, "provider_auth_error") == 1 + len(later)
    for other in ("provider_error", "circuit_open", "rate_limited"):
        assert fleet.errors(model, other) == 0, other


@pytest.mark.parametrize("engine", ENGINES)
def test_once_the_provider_answers_again_a_cooldown_is_no_longer_blamed_on_the_key(
    fleet: Fleet, engine: str
) -> None:
    model, route = f"heal_{engine}", f"heal-{engine}"
    jobs = [_predict(fleet.api.url, model, f"heal {i} {uuid.uuid4().hex}") for i in range(4)]
    outcomes = [(j["status"], (j.get("error") or {}).get("code"), j["cost"]["attempts"])
                for j in jobs]  # fmt: skip
    assert outcomes == [
        ("failed", "provider_auth_error", 1),  # the 401
        ("failed", "provider_auth_error", 1),  # the cooldown it caused
        ("succeeded", None, 1),  # the key was fixed: the memory of the 401 is dropped
        ("succeeded", None, 1),  # a cooldown for another reason: paced, then served
    ], jobs
    assert fleet.stub.calls[route] == 5


# The burst runs on the default engine only: per-call classification is tested on both
# engines above and in test_provider_outcomes; a second burst cost the suite ~40 s.
@pytest.mark.parametrize("engine", ["auto"])
def test_a_burst_mixing_auth_cooldowns_and_rate_limits_classifies_each_job(
    fleet: Fleet, engine: str
) -> None:
    model, route = f"mix_{engine}", f"mix-{engine}"
    kinds = ["auth", "busy", "wait"]
    items = [{"custom_id": f"{kinds[i % 3]}-{i}", "model": model, "use_cache": False,
              "input": f"[{kinds[i % 3]}-{i}] What is {i}+1?"} for i in range(120)]  # fmt: skip
    with httpx.Client(base_url=fleet.api.url, timeout=60) as http:
        created = http.post("/v1/batches", json=items)
        assert created.status_code == 202, created.text
        batch_id = created.json()["id"]

        def ended() -> dict[str, Any] | None:
            body = http.get(f"/v1/batches/{batch_id}").json()
            return body if body["counts"]["pending"] == 0 else None

        counts = poll(ended, timeout=120, interval=0.5)["counts"]
        lines = [line for line in http.get(f"/v1/batches/{batch_id}/results").iter_lines()
                 if line]  # fmt: skip
    results = {r["custom_id"]: r for r in map(json.loads, lines)}
    print(f"\n{engine}: {counts}")
    assert counts["succeeded"] == 80 and counts["failed"] == 40, counts
    for custom_id, result in results.items():
        kind = custom_id.split("-")[0]
        if kind == "auth":
            assert result["status"] == "failed", result
            assert result["error"]["code"] == "provider_auth_error", result
            assert "Incorrect API key" in result["error"]["message"]
            assert result["cost"]["attempts"] == 1
        else:  # an ordinary rate limit: paced (after Retry-After when given), then served,
            # with no attempt spent on the 429
            assert result["status"] == "succeeded", result
            assert result["cost"]["attempts"] == 1
    assert len(results) == 120
    calls = fleet.stub.calls[route]
    assert calls == 40 + 2 * 80, calls  # one call per auth job, two per rate-limited one
    # The breaker counted neither the 80 rate limits (pacing news, not faults) nor the 40
    # refusals; the 429s are counted where pacing counts them.
    assert fleet.faults_recorded(model) == 0
    assert fleet.errors(model, "provider_auth_error") == 40
    assert fleet.errors(model, "provider_error") == 0
    assert fleet.provider_429s(model) == 80
