"""The fleet paces itself to a provider's limit instead of collecting 429s.

A real fleet: Redis, two worker processes, the API, and the mock LLM enforcing a hard
limit of 600 requests/minute per model (a token bucket holding 1 s of it, answering
429 with Retry-After above it, as OpenAI does). Each scenario uses its own model name,
so the mock keeps a separate limit (and counts) for each.

- ``learned``: no ``rpm`` configured. The fleet learns the limit from the 429s.
- ``capped``: ``rpm: 600`` configured. The provider sees no 429 at all.

Sizes: ``DSPY_FLEET_TEST_PACING_JOBS`` jobs in the learned batch (default 600, one minute of the
limit, so that there is a steady state after the first 30 s; the issue's 3,000 is run
with ``DSPY_FLEET_TEST_PACING_JOBS=3000`` and its figures are in the README).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import httpx
import pytest
import redis

from dspy_fleet.devtools.latencies import Latencies
from dspy_fleet.store.breakers import PREFIX as BREAKER_PREFIX
from dspy_fleet.store.jobs import KEY_PREFIX
from tests.conftest import TEST_ENV, OwnStack, poll

# Run alone by `make test`: throughput against the provider's limit is asserted.
pytestmark = pytest.mark.serial

JOBS = int(os.environ.get("DSPY_FLEET_TEST_PACING_JOBS", "600"))
LIMIT_RPM = 600
WARMUP_SECONDS = 30.0  # the "after the first 30 s"

CONFIG = """
default_model: learned
models:
  learned: {litellm_model: openai/learned-gpt, api_base: "${DSPY_FLEET_MOCK_LLM_URL}",
            timeout: 10, fallbacks: [backup], input_price_per_1k: 0.001, output_price_per_1k: 0.002}
  capped: {litellm_model: openai/capped-gpt, api_base: "${DSPY_FLEET_MOCK_LLM_URL}",
           timeout: 10, rpm: 600, fallbacks: [backup],
           input_price_per_1k: 0.001, output_price_per_1k: 0.002}
  # A fallback on another model name: any call to it is a fallback the fleet made.
  backup: {litellm_model: openai/backup-gpt, api_base: "${DSPY_FLEET_MOCK_LLM_URL}",
           timeout: 10, input_price_per_1k: 0.01, output_price_per_1k: 0.02}
programs:
  qa: {signature: "question -> answer"}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnStack]:
    base = tmp_path_factory.mktemp("pacing")
    (base / "fleet.yaml").write_text(CONFIG)
    env = {**TEST_ENV, "DSPY_FLEET_CONFIG": str(base / "fleet.yaml"),
           "DSPY_FLEET_MAX_BATCH_ITEMS": str(max(JOBS, 10_000))}  # fmt: skip
    stack = OwnStack(base, env=env)
    try:
        stack.start_redis()
        stack.start_mock_llm().set_faults(latency_ms=50, rpm_limit=LIMIT_RPM)
        stack.start_workers(2)
        stack.start_api()
        yield stack
    finally:
        stack.stop()


@dataclass
class Run:
    """What one batch run measured."""

    started: float
    warm: dict[str, Any] = field(default_factory=dict)  # mock stats at WARMUP_SECONDS
    warm_at: float = 0.0
    end: dict[str, Any] = field(default_factory=dict)
    ended_at: float = 0.0
    breaker_states: set[str] = field(default_factory=set)
    lines: list[dict[str, Any]] = field(default_factory=list)
    models: set[str | None] = field(default_factory=set)  # the models that served the jobs


def per_model(stats: dict[str, Any], model: str) -> tuple[int, int]:
    """(calls, 429s) the mock answered for ``model``."""
    return stats["by_model"].get(model, 0), stats["rate_limited_by_model"].get(model, 0)


def run_batch(fleet: OwnStack, model: str, jobs: int, warmup: float) -> Run:
    """Submit ``jobs`` batch items on ``model``; watch its breaker; snapshot the mock's
    counters ``warmup`` seconds in; wait for the end."""
    assert fleet.api is not None
    items = [{"custom_id": f"{model}-{i}", "input": f"pace {i} {uuid.uuid4().hex[:8]}",
              "model": model} for i in range(jobs)]  # fmt: skip
    r = redis.Redis.from_url(fleet.redis_url, decode_responses=True)
    run = Run(started=time.monotonic())
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            run.breaker_states.add(r.hget(BREAKER_PREFIX + model, "state") or "closed")
            if not run.warm and time.monotonic() - run.started >= warmup:
                run.warm, run.warm_at = fleet.mock.stats(), time.time()
            done.wait(0.25)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with httpx.Client(base_url=fleet.api.url, timeout=120) as http:
        created = http.post("/v1/batches", json=items)
        assert created.status_code == 202, created.text
        batch_id = created.json()["id"]

        def ended() -> bool:
            return http.get(f"/v1/batches/{batch_id}").json()["counts"]["pending"] == 0

        poll(ended, timeout=jobs / (LIMIT_RPM / 60) * 2 + 90, interval=0.5)
        done.set()
        watcher.join(5)
        run.end = fleet.mock.stats()
        resp = http.get(f"/v1/batches/{batch_id}/results")
    run.lines = [json.loads(line) for line in resp.text.splitlines() if line]
    pipe = r.pipeline(transaction=False)
    for line in run.lines:
        pipe.hmget(KEY_PREFIX + line["id"], ["finished_at", "model"])
    records = pipe.execute()
    run.ended_at = max(_epoch(finished) for finished, _ in records if finished)
    run.models = {served for _, served in records}
    return run


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def check_every_job_served_by_its_model(run: Run, model: str, jobs: int) -> None:
    assert len(run.lines) == jobs
    failed = [line for line in run.lines if line["status"] != "succeeded"]
    assert not failed, failed[:3]
    assert run.models == {model}  # no fallback served any
    assert run.end["by_model"].get("backup-gpt", 0) == 0
    assert run.breaker_states <= {"closed"}, run.breaker_states


def steady_figures(run: Run, provider_model: str) -> tuple[float, float]:
    """(share of calls answered 429, accepted calls per second) after the warm-up."""
    assert run.warm, "the batch ended before its warm-up did"
    calls0, limited0 = per_model(run.warm, provider_model)
    calls1, limited1 = per_model(run.end, provider_model)
    calls, limited = calls1 - calls0, limited1 - limited0
    accepted_per_s = (calls - limited) / (run.ended_at - run.warm_at)
    return limited / max(calls, 1), accepted_per_s


def interactive_latencies(fleet: OwnStack, count: int, spacing: float) -> Latencies:
    """Seconds each of ``count`` interactive POST /v1/predict (wait) took, one at a time."""
    assert fleet.api is not None
    out = Latencies()
    with httpx.Client(base_url=fleet.api.url, timeout=60) as http:
        for i in range(count):
            body = {"input": f"interactive {i} {uuid.uuid4().hex}", "model": "capped", "wait": 30}
            started = time.perf_counter()
            resp = http.post("/v1/predict", json=body)
            took, answered = time.perf_counter() - started, time.time()
            job = resp.json()
            assert resp.status_code == 200 and job["status"] == "succeeded", resp.text
            out.add(took, job, answered)
            time.sleep(spacing)
    return out


# Half a minute of the limit: a configured rate needs no warm-up to show (its figures are
# taken after 3 s), and the second minute cost the suite 60 s.
CAPPED_JOBS = max(JOBS // 2, 100)


@dataclass
class Runs:
    """Both batches, one after the other (each on its own model and provider limit), and
    interactive requests on the capped model, at idle and during its batch."""

    learned: Run
    capped: Run
    idle: Latencies
    during: Latencies


@pytest.fixture(scope="module")
def runs(fleet: OwnStack) -> Runs:
    learned = run_batch(fleet, "learned", JOBS, WARMUP_SECONDS)
    interactive_latencies(fleet, 3, 0)  # warm-up: first calls load what later ones reuse
    idle = interactive_latencies(fleet, 20, 0.1)
    during = Latencies()

    def interactive_while_the_batch_runs() -> None:
        time.sleep(3)
        measured = interactive_latencies(fleet, 30, 0.5)
        during.extend_from(measured)

    probe = threading.Thread(target=interactive_while_the_batch_runs)
    probe.start()
    capped = run_batch(fleet, "capped", CAPPED_JOBS, 3.0)
    probe.join(120)
    return Runs(learned, capped, idle, during)


def test_without_a_configured_limit_the_fleet_learns_it(runs: Runs) -> None:
    run = runs.learned
    check_every_job_served_by_its_model(run, "learned", JOBS)
    share_429, rate = steady_figures(run, "learned-gpt")
    calls, limited = per_model(run.end, "learned-gpt")
    late = limited - per_model(run.warm, "learned-gpt")[1]
    print(f"learned: {JOBS} jobs in {run.ended_at - run.warm_at + WARMUP_SECONDS:.0f} s; "
          f"{limited} of {calls} calls answered 429 ({late} after the first "
          f"{WARMUP_SECONDS:.0f} s: {share_429:.2%}); steady {rate:.2f} calls/s "
          f"= {rate / (LIMIT_RPM / 60):.1%} of the limit")  # fmt: skip
    assert share_429 <= 0.02
    assert rate >= 0.9 * LIMIT_RPM / 60


def test_with_rpm_configured_the_provider_sees_no_429(runs: Runs) -> None:
    run = runs.capped
    check_every_job_served_by_its_model(run, "capped", CAPPED_JOBS)
    calls, limited = per_model(run.end, "capped-gpt")
    share_429, rate = steady_figures(run, "capped-gpt")
    print(f"capped: {CAPPED_JOBS} jobs; {limited} of {calls} calls answered 429; steady {rate:.2f} "
          f"calls/s = {rate / (LIMIT_RPM / 60):.1%} of the limit")  # fmt: skip
    # Printed, not asserted (a latency): bench figure (m) measures issue 15's p95 <= 2 x idle
    # as a ratio in one run. Inside the loaded suite a CI run measured 404 ms against 103 ms.
    print(f"interactive on the capped model, measured: p95 {runs.idle.p95() * 1000:.0f} ms "
          f"idle, {runs.during.p95() * 1000:.0f} ms during the batch; slowest idle: "
          f"{runs.idle.slowest()}; slowest during: {runs.during.slowest()}")  # fmt: skip
    assert limited == 0
    assert rate >= 0.9 * LIMIT_RPM / 60
