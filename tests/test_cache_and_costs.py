"""Cache (L1, L2, API fast path), coalescing, cost aggregates, saved states and A/B variants.

Runs on a stack of its own (Redis, worker, API) with a config of its own, because
it stops and restarts the worker and rewrites a program's saved state.
"""

from __future__ import annotations

import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from dspy_fleet.broker.celery_config import make_celery
from dspy_fleet.contract import DEFAULT_TENANT, TASK_NAME
from dspy_fleet.devtools.procs import free_port
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.routing import cache_key
from dspy_fleet.settings import CommonSettings
from dspy_fleet.store.jobs import JobStore
from tests.conftest import (
    MockLLM,
    Service,
    poll,
    start_api,
    start_worker,
    stop_all,
    wait_all_ready,
    wait_for_job,
)

CONFIG = """
default_model: mock
# Timeouts of 1.5 s × 4 attempts: inside the 8 s visibility timeout below (start-up
# refuses a model that could outlast it).
models:
  mock: {litellm_model: openai/mock-gpt, api_base: "${DSPY_FLEET_MOCK_LLM_URL}", timeout: 1.5,
         input_price_per_1k: 0.00015, output_price_per_1k: 0.0006}
  mock-b: {litellm_model: openai/mock-gpt-b, api_base: "${DSPY_FLEET_MOCK_LLM_URL}", timeout: 1.5,
           input_price_per_1k: 0.001, output_price_per_1k: 0.002}
  # No price in config: gpt-4o-mini is priced from LiteLLM's map, the other one is unknown.
  mini: {litellm_model: openai/gpt-4o-mini, api_base: "${DSPY_FLEET_MOCK_LLM_URL}", timeout: 1.5}
  mystery: {litellm_model: openai/mystery-model-x, api_base: "${DSPY_FLEET_MOCK_LLM_URL}",
            timeout: 1.5}
programs:
  qa: {signature: "question -> answer"}
  pirate: {signature: "question -> answer", state: pirate.json}
  ab:
    signature: "question -> answer"
    variants:
      A: {weight: 70}
      B: {weight: 30, model: mock-b}
"""

# Short limits so a job killed with its worker is redelivered within seconds.
LIMITS = {
    "DSPY_FLEET_SOFT_TIME_LIMIT": "4",
    "DSPY_FLEET_TIME_LIMIT": "6",
    "DSPY_FLEET_VISIBILITY_TIMEOUT_SECONDS": "8",
    "DSPY_FLEET_RESTORE_SWEEP_SECONDS": "1",
    "DSPY_FLEET_RETRY_AFTER_MAX_SECONDS": "5",
    "DSPY_FLEET_RETRY_BACKOFF_MAX_SECONDS": "2",
    "DSPY_FLEET_COALESCE_LOCK_SECONDS": "5",
    "DSPY_FLEET_LEASE_SECONDS": "5",
    # The coalescing test holds 50 waits at once: threads enough that the wait cap
    # (threads minus a quarter, per API process) holds them all.
    "DSPY_FLEET_API_THREADS": "80",
}


def save_state(path: Path, instructions: str) -> None:
    """Write a program state the way users do: program.save(path) of an optimized Predict."""
    import dspy

    program = dspy.Predict("question -> answer")
    program.signature = program.signature.with_instructions(instructions)
    program.demos = [dspy.Example(question="Who are you?", answer="A pirate, arr.")]
    program.save(str(path))


@dataclass
class Stack:
    """This module's own services."""

    redis_server: RedisServer
    mock: MockLLM
    dir: Path
    worker: Service
    api: Service
    env: dict[str, str]

    @property
    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.api.url, timeout=60)

    @property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_server.url, decode_responses=True)

    def restart_worker(self) -> None:
        self.worker.child.stop()
        self.worker = start_worker(
            self.redis_server.url,
            self.mock.url,
            self.dir / f"worker-{uuid.uuid4().hex[:6]}.log",
            **self.env,
        )

    def worker_metric(self, name: str, **labels: str) -> float:
        port = self.worker.env["DSPY_FLEET_METRICS_PORT"]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        return metric_value(text, name, **labels)

    def api_metric(self, name: str, **labels: str) -> float:
        return metric_value(httpx.get(f"{self.api.url}/metrics", timeout=10).text, name, **labels)

    def send(self, **fields: Any) -> str:
        """Push a job straight onto the queue, as a direct producer does; returns its id."""
        producer = make_celery(CommonSettings(redis_url=self.redis_server.url))
        job_id = fields.pop("job_id", None) or str(uuid.uuid4())
        message = {"v": 1, "job_id": job_id, "submitted_at": "2026-01-01T00:00:00Z", **fields}
        producer.send_task(TASK_NAME, kwargs=message, task_id=job_id, queue="interactive")
        return job_id

    def record(self, job_id: str, timeout: float = 30) -> dict[str, Any]:
        """A job's record once it ended, read from Redis (any tenant's, unlike the API)."""
        store = JobStore(self.redis, 3600)

        def ended() -> dict[str, Any] | None:
            job = store.get(job_id)
            return job if job and job["status"] in ("succeeded", "failed") else None

        return poll(ended, timeout)

    def catalog_key(self, program: str, inputs: dict[str, Any], model: str = "mock") -> str:
        import json

        version = json.loads(self.redis.hget("dspy_fleet:programs", program))["version"]
        # Open mode: every job is the default tenant's, and programs are tenant-scoped.
        return cache_key(program, version, model, inputs, {}, DEFAULT_TENANT)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if not m:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


@pytest.fixture(scope="module")
def stack(mock_llm: MockLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("cache-stack")
    (base / "fleet.yaml").write_text(CONFIG)
    save_state(base / "pirate.json", "Answer like a pirate.")
    env = {"DSPY_FLEET_CONFIG": str(base / "fleet.yaml"), **LIMITS}
    redis_server = RedisServer(log_path=base / "redis.log").start()
    # Started side by side, each then waited for.
    worker = start_worker(redis_server.url, mock_llm.url, base / "worker.log", wait=False, **env)
    api = start_api(redis_server.url, mock_llm.url, base / "api.log", wait=False, **env)
    try:
        wait_all_ready(worker, api)
    except BaseException:
        redis_server.stop()
        raise
    s = Stack(redis_server, mock_llm, base, worker, api, env)
    yield s
    stop_all(s.api, s.worker)
    redis_server.stop()


@pytest.fixture
def mock(stack: Stack) -> MockLLM:
    stack.mock.reset()
    return stack.mock


def unique(text: str) -> str:
    return f"{text} [{uuid.uuid4().hex[:8]}]"


def test_api_answers_l2_hits_without_queueing(stack: Stack, mock: MockLLM) -> None:
    body = {"input": unique("What is 8+8?"), "wait": 20}
    first = stack.http.post("/v1/predict", json=body).json()
    assert first["status"] == "succeeded" and first["cached"] is False
    assert mock.stats()["chat_completions"] == 1

    again = stack.http.post("/v1/predict", json=body)
    assert again.status_code == 200
    hit = again.json()
    assert hit["cached"] is True and hit["id"] != first["id"]
    assert hit["outputs"] == first["outputs"]
    # The version whose answer it is: the one that ran the first job.
    assert hit["program_version"] == first["program_version"] is not None
    assert hit["cost"]["cost_usd"] == 0 and hit["cost"]["attempts"] == 0
    assert hit["cost"]["saved_input_tokens"] == first["cost"]["input_tokens"]
    assert hit["cost"]["saved_output_tokens"] == first["cost"]["output_tokens"]
    assert hit["cost"]["saved_cost_usd"] == pytest.approx(first["cost"]["cost_usd"])
    assert mock.stats()["chat_completions"] == 1
    assert stack.redis.llen("interactive") == 0

    # No worker at all: the cached answer is still served, while a new question waits.
    stack.worker.child.stop()
    try:
        assert stack.http.post("/v1/predict", json=body).json()["cached"] is True
        fresh = stack.http.post("/v1/predict", json={"input": unique("new"), "wait": 1})
        assert fresh.status_code == 202
    finally:
        stack.restart_worker()
    assert wait_for_job(stack.http, fresh.json()["id"])["status"] == "succeeded"


def test_corrupt_l2_entry_is_a_miss_for_the_api(stack: Stack, mock: MockLLM) -> None:
    question = unique("What is 9+9?")
    body = {"input": question, "wait": 20}
    assert stack.http.post("/v1/predict", json=body).json()["status"] == "succeeded"
    from dspy_fleet.store.cache import l2_key

    stack.redis.set(l2_key(stack.catalog_key("qa", {"question": question})), "{not json")
    errors = stack.api_metric("dspy_cache_operations_total", level="l2", operation="error")

    again = stack.http.post("/v1/predict", json=body)
    # Not answered by the API (attempts 0) but queued and run by the worker.
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "succeeded" and again.json()["cost"]["attempts"] == 1
    assert stack.api_metric("dspy_cache_operations_total", level="l2",
                            operation="error") == errors + 1  # fmt: skip


def test_worker_l1_then_l2(stack: Stack, mock: MockLLM) -> None:
    question = unique("What is 5*5?")
    l1_hits = stack.worker_metric("dspy_cache_operations_total", level="l1", operation="hit")
    first = wait_for_job(stack.http, stack.send(input=question))
    second = wait_for_job(stack.http, stack.send(input=question))
    assert first["cost"]["cached"] is False and second["cost"]["cached"] is True
    assert second["outputs"] == first["outputs"] == {"answer": "25"}
    assert stack.worker_metric("dspy_cache_operations_total", level="l1",
                               operation="hit") == l1_hits + 1  # fmt: skip
    stack.restart_worker()  # empty L1: the next one comes from Redis
    third = wait_for_job(stack.http, stack.send(input=question))
    assert third["cost"]["cached"] is True
    assert stack.worker_metric("dspy_cache_operations_total", level="l2", operation="hit") == 1
    assert mock.stats()["chat_completions"] == 1


def test_ttl_expiry_at_both_levels(stack: Stack, mock: MockLLM) -> None:
    question = unique("What is 2+3?")
    key = stack.catalog_key("qa", {"question": question})
    wait_for_job(stack.http, stack.send(input=question, cache_ttl=1))
    assert 0 < stack.redis.pttl(f"dspy_fleet:cache:{key}") <= 1000
    stack.redis.delete(f"dspy_fleet:cache:{key}")  # only L1 holds it now
    assert wait_for_job(stack.http, stack.send(input=question, cache_ttl=1))["cost"]["cached"]
    assert mock.stats()["chat_completions"] == 1
    time.sleep(1.2)  # L1's per-entry TTL is cache_ttl too
    assert not wait_for_job(stack.http, stack.send(input=question))["cost"]["cached"]
    assert mock.stats()["chat_completions"] == 2

    body = {"input": unique("What is 4+4?"), "wait": 20, "cache_ttl": 1}
    stack.http.post("/v1/predict", json=body)
    assert stack.http.post("/v1/predict", json=body).json()["cached"] is True
    time.sleep(1.2)  # the L2 entry is gone: the API no longer has it
    assert stack.http.post("/v1/predict", json={**body, "use_cache": True}).json()["cached"] in (
        False,
        True,
    )  # the worker may still hold it in L1 (different process)
    assert mock.stats()["chat_completions"] >= 3


def test_use_cache_false_bypasses_both_levels(stack: Stack, mock: MockLLM) -> None:
    body = {"input": unique("What is 7+1?"), "wait": 20, "use_cache": False}
    a = stack.http.post("/v1/predict", json=body).json()
    b = stack.http.post("/v1/predict", json=body).json()
    assert a["cached"] is False and b["cached"] is False
    assert mock.stats()["chat_completions"] == 2


def test_fifty_concurrent_identical_requests_make_one_call(stack: Stack, mock: MockLLM) -> None:
    mock.set_faults(latency_ms=500)
    body = {"input": unique("What is 9+9?"), "wait": 30}
    results: list[dict[str, Any]] = []
    lock = threading.Lock()

    def submit() -> None:
        with httpx.Client(base_url=stack.api.url, timeout=60) as client:
            out = client.post("/v1/predict", json=body).json()
        with lock:
            results.append(out)

    threads = [threading.Thread(target=submit) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 50
    assert all(r["status"] == "succeeded" for r in results), results
    assert {r["outputs"]["answer"] for r in results} == {"18"}
    assert len({r["id"] for r in results}) == 50
    assert mock.stats()["chat_completions"] == 1
    assert sum(not r["cached"] for r in results) == 1  # one leader, 49 coalesced or cached


def test_followers_of_a_dead_leader_take_over(stack: Stack, mock: MockLLM) -> None:
    question = unique("What is 6+6?")
    key = stack.catalog_key("qa", {"question": question})
    # A leader that died holding the lock: its TTL is all that bounds the wait.
    stack.redis.set(f"dspy_fleet:cache_lock:{key}", "dead-leader", px=2000)
    started = time.monotonic()
    done = stack.http.post("/v1/predict", json={"input": question, "wait": 30}).json()
    waited = time.monotonic() - started
    assert done["status"] == "succeeded" and done["outputs"]["answer"] == "12"
    assert 1.5 <= waited < 10, waited
    assert mock.stats()["chat_completions"] == 1


def test_costs_equal_the_sum_of_job_records(stack: Stack, mock: MockLLM) -> None:
    tenant = f"ledger-{uuid.uuid4().hex[:6]}"
    ids = []
    for i in range(12):  # repeats become cache hits: billed at 0 with saved tokens
        ids.append(stack.send(input=f"ledger {tenant} What is {i % 5}+1?", tenant=tenant))
    ids.append(stack.send(input=f"ledger {tenant} uncached", tenant=tenant, use_cache=False))
    for job_id in ids:
        stack.record(job_id)
    # Retries: two transient provider errors, then success on the third attempt.
    mock.set_faults(fail_next=2, error_status=503)
    retried = stack.send(input=f"ledger {tenant} retried", tenant=tenant, use_cache=False)
    assert stack.record(retried)["attempts"] == 3
    ids.append(retried)

    # Forced redelivery: the same message delivered again after the job finished.
    again = stack.send(input=f"ledger {tenant} What is 0+1?", tenant=tenant, job_id=ids[0])
    assert again == ids[0]
    # Redelivery after a crash: kill -9 the worker mid-call; Redis hands the unacked
    # message to the next worker once the visibility timeout (8 s here) has passed.
    mock.set_faults(latency_ms=2500)
    crashed = stack.send(input=f"ledger {tenant} crash", tenant=tenant, use_cache=False)
    poll(lambda: stack.redis.hget(f"dspy_fleet:job:{crashed}", "status") == "running", 10)
    time.sleep(0.5)
    stack.worker.child.signal(signal.SIGKILL)
    stack.worker.child.proc.wait(10)
    mock.set_faults(latency_ms=0)
    stack.restart_worker()
    redelivered = stack.record(crashed, timeout=60)
    assert redelivered["status"] == "succeeded"
    ids.append(crashed)
    # 5 distinct questions, the uncached one, 3 attempts of the retried one, the crashed
    # one twice (it was running when killed).
    assert mock.stats()["chat_completions"] >= 5 + 1 + 3 + 2

    time.sleep(1)  # let the duplicate delivery of ids[0] be consumed (and ignored)
    records = [stack.record(i)["cost"] for i in ids]
    costs = stack.http.get("/costs").json()["by_tenant"][tenant]
    assert costs["requests"] == len(ids) == 15
    assert costs["cached"] == sum(r["cached"] for r in records) == 7
    assert costs["input_tokens"] == sum(r["input_tokens"] for r in records)
    assert costs["output_tokens"] == sum(r["output_tokens"] for r in records)
    assert costs["saved_input_tokens"] == sum(r["saved_input_tokens"] for r in records)
    assert costs["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in records), abs=1e-9)
    assert costs["cost_usd"] > 0


def test_prices_from_litellm_map_or_unknown(stack: Stack) -> None:
    mini = stack.http.post("/v1/predict", json={"input": unique("hi"), "model": "mini",
                                                "wait": 20}).json()  # fmt: skip
    cost = mini["cost"]
    # LiteLLM's bundled map: gpt-4o-mini at $0.15 / $0.60 per million tokens.
    assert cost["cost_usd"] == pytest.approx(
        cost["input_tokens"] * 0.15e-6 + cost["output_tokens"] * 0.6e-6
    )
    tenant_costs = stack.http.get("/costs").json()["by_model"]
    unpriced_before = tenant_costs.get("mystery", {}).get("unpriced", 0)
    mystery = stack.http.post("/v1/predict", json={"input": unique("hi"), "model": "mystery",
                                                   "wait": 20}).json()  # fmt: skip
    assert mystery["status"] == "succeeded"
    assert mystery["cost"]["cost_usd"] is None  # unknown, never a silent 0
    assert mystery["cost"]["input_tokens"] > 0
    after = stack.http.get("/costs").json()["by_model"]["mystery"]
    assert after["unpriced"] == unpriced_before + 1
    warned = [
        line
        for line in stack.worker.log_lines()
        if line.get("job_id") == mystery["id"] and "no price" in line["message"]
    ]
    assert warned and warned[0]["level"] == "WARNING"


def test_saved_state_changes_outputs_and_invalidates_cache(stack: Stack, mock: MockLLM) -> None:
    question = unique("Where is the treasure?")
    plain = stack.http.post("/v1/predict", json={"input": question, "wait": 20}).json()
    pirate = stack.http.post("/v1/predict", json={"program": "pirate", "input": question,
                                                  "wait": 20}).json()  # fmt: skip
    assert plain["outputs"] != pirate["outputs"]
    programs = {p["name"]: p for p in stack.http.get("/v1/programs").json()["programs"]}
    old_version = programs["pirate"]["version"]
    assert programs["pirate"]["version"] != programs["qa"]["version"]
    cached = stack.http.post("/v1/predict", json={"program": "pirate", "input": question,
                                                  "wait": 20}).json()  # fmt: skip
    assert cached["cached"] is True
    calls = mock.stats()["chat_completions"]

    save_state(stack.dir / "pirate.json", "Answer like a very polite pirate.")
    stack.restart_worker()  # states load at worker start
    poll(lambda: stack.http.get("/v1/programs").json()["programs"][1]["version"] != old_version
         or None, timeout=10)  # fmt: skip
    time.sleep(2.5)  # the API's catalog copy is at most 2 s old
    fresh = stack.http.post("/v1/predict", json={"program": "pirate", "input": question,
                                                 "wait": 20}).json()  # fmt: skip
    assert fresh["cached"] is False
    assert fresh["outputs"] != pirate["outputs"]
    assert mock.stats()["chat_completions"] == calls + 1


def test_program_catalog(stack: Stack) -> None:
    body = stack.http.get("/v1/programs").json()
    programs = {p["name"]: p for p in body["programs"]}
    assert programs["qa"]["input_fields"] == ["question"]
    assert programs["qa"]["output_fields"] == ["answer"]
    assert [v["name"] for v in programs["ab"]["variants"]] == ["A", "B"]
    assert all(v["version"] for v in programs["ab"]["variants"])
    assert {m["name"] for m in body["models"]} == {"mock", "mock-b", "mini", "mystery"}
    bad = stack.http.post("/v1/predict", json={"program": "qa", "inputs": {"q": "x"}})
    assert bad.status_code == 422
    assert bad.json()["error"]["details"]["input_fields"] == ["question"]


def test_variant_split_over_1000_requests(stack: Stack, mock: MockLLM) -> None:
    run = uuid.uuid4().hex[:6]
    variants: dict[str, str] = {}
    with stack.http as client:
        for i in range(1000):
            body = {"program": "ab", "input": f"split {run} {i}", "priority": "batch"}
            resp = client.post("/v1/predict", json=body).json()
            variants[resp["id"]] = resp["variant"]
        share_a = list(variants.values()).count("A") / 1000
        assert 0.65 <= share_a <= 0.75, share_a
        # The same input always gets the same variant.
        for i in range(10):
            again = client.post("/v1/predict", json={"program": "ab", "input": f"split {run} {i}",
                                                     "use_cache": False}).json()  # fmt: skip
            first_id = list(variants)[i]
            assert again["variant"] == variants[first_id]
        last = wait_for_job(client, list(variants)[-1], timeout=120)
        assert last["variant"] in ("A", "B")
        b_job = next(j for j, v in variants.items() if v == "B")
        b_done = wait_for_job(client, b_job, timeout=60)
        assert b_done["model"] == "mock-b" and b_done["cost"]["variant"] == "B"
        by_variant = client.get("/costs").json()["by_variant"]
        assert by_variant["A"]["requests"] > by_variant["B"]["requests"] > 0
    assert stack.worker_metric("dspy_predictions_total", program="ab", variant="B") > 0


def test_cache_redis_down_is_a_miss(mock_llm: MockLLM, tmp_path: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    redis_server = RedisServer(log_path=tmp_path / "redis.log").start()
    env = {"DSPY_FLEET_CACHE_URL": dead}
    worker = start_worker(redis_server.url, mock_llm.url, tmp_path / "worker.log", wait=False,
                          **env)  # fmt: skip
    api = start_api(redis_server.url, mock_llm.url, tmp_path / "api.log", wait=False, **env)
    try:
        wait_all_ready(worker, api)
        with httpx.Client(base_url=api.url, timeout=60) as client:
            for _ in range(2):
                done = client.post("/v1/predict", json={"input": "What is 3+3?", "wait": 20})
                assert done.status_code == 200, done.text
                assert done.json()["outputs"]["answer"] == "6"
        port = worker.env["DSPY_FLEET_METRICS_PORT"]
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert metric_value(text, "dspy_cache_operations_total", operation="error") >= 2
    finally:
        stop_all(api, worker)
        redis_server.stop()
