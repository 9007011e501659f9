"""Issue 13, faults 4, 10 and 11: unknown usage is never billed as 0, a job served from
the cache entry it computed itself is billed for its call, and start-up refuses limits
the broker's redelivery window does not cover."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from api.settings import ApiSettings
from dspy_fleet.broker.celery_config import make_celery
from dspy_fleet.contract import TASK_NAME
from dspy_fleet.errors import ConfigError
from dspy_fleet.fleet_config import load_fleet_config
from dspy_fleet.settings import (
    DEFAULT_CONFIG_FILE,
    CommonSettings,
    WorkerSettings,
    check_redelivery_window,
    load_settings,
)
from dspy_fleet.store import ledger
from dspy_fleet.store.jobs import JobStore
from tests.conftest import TEST_ENV, MockLLM, OwnStack, poll
from tests.stub_provider import USAGE, Reply, StubProvider, absent, completion

# --- a provider that does not report usage ---------------------------------------------


def _usage_by_route(route: str, nth: int, request: dict[str, Any]) -> Reply:
    """The route says what ``usage`` the answer carries: absent (no key), null
    (``"usage": null``), partial (prompt tokens only), full (10 in, 5 out)."""
    usage = {"absent": absent(), "null": None, "partial": {"prompt_tokens": 12}}.get(route, USAGE)
    return completion(usage=usage)


ENGINES = ["auto", "litellm"]
KINDS = ["absent", "null", "partial"]


def _alias(name: str, engine: str) -> str:
    """The model alias of a case on an engine: the name itself on the default engine."""
    return name if engine == "auto" else f"{name}_{engine}"


def _stub_config(url: str) -> str:
    """A model per usage kind and engine, priced in the config; and a model per engine
    priced by no config (gpt-4o-mini: the bundled price table), answering full usage."""
    lines = []
    for engine in ENGINES:
        for kind in KINDS:
            lines.append(
                f'  "{_alias(kind, engine)}": {{litellm_model: openai/stub-{kind}, '
                f'engine: {engine}, api_base: "{url}/{kind}/v1", timeout: 10, '
                "input_price_per_1k: 0.001, output_price_per_1k: 0.002}"
            )
        lines.append(
            f'  "{_alias("table", engine)}": {{litellm_model: openai/gpt-4o-mini, '
            f'engine: {engine}, api_base: "{url}/full/v1", timeout: 10}}'
        )
    return (
        "default_model: absent\nmodels:\n" + "\n".join(lines) + "\n"
        'programs:\n  qa: {signature: "question -> answer"}\n'
    )


@pytest.fixture(scope="module")
def stub_stack(mock_llm: MockLLM, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    base = tmp_path_factory.mktemp("usage-stack")
    stub = StubProvider(_usage_by_route)
    (base / "fleet.yaml").write_text(_stub_config(stub.url))
    stack = OwnStack(base, env={**TEST_ENV, "DSPY_FLEET_CONFIG": str(base / "fleet.yaml")})
    stack.use_mock_llm(mock_llm)
    stack.start_redis()
    worker = stack.start_worker("worker")
    api = stack.start_api("api")
    yield stack, stub, worker, api
    stack.stop()
    stub.stop()


def _send(redis_url: str, **fields: Any) -> str:
    """Publish a job straight onto the queue, as a direct producer does."""
    producer = make_celery(CommonSettings(redis_url=redis_url))
    job_id = str(uuid.uuid4())
    message = {"v": 1, "job_id": job_id, "submitted_at": "2026-01-01T00:00:00Z", **fields}
    producer.send_task(TASK_NAME, kwargs=message, task_id=job_id, queue="interactive")
    return job_id


def _record(client: redis.Redis, job_id: str) -> dict[str, Any]:
    store = JobStore(client, 3600)
    return poll(lambda: (j := store.get(job_id)) and j["status"] == "succeeded" and j, 30)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", KINDS)
def test_answer_without_usage_is_null_flagged_and_counted_apart(
    stub_stack: Any, kind: str, engine: str
) -> None:
    stack, stub, worker, api = stub_stack
    model = _alias(kind, engine)
    question = f"What is the answer ({model}, {uuid.uuid4().hex[:6]})?"
    calls = stub.total
    with httpx.Client(base_url=api.url, timeout=60) as http:
        body = {"input": question, "model": model, "wait": 30}
        first = http.post("/v1/predict", json=body).json()
        assert first["status"] == "succeeded", first
        cost = first["cost"]
        assert cost["cached"] is False and cost["usage_missing"] is True
        assert cost["output_tokens"] is None and cost["cost_usd"] is None
        # A count the provider did report is kept; the one it did not is null, not 0.
        assert cost["input_tokens"] == (12 if kind == "partial" else None)
        assert stub.total == calls + 1

        # The same input again: the API answers from L2; a direct message, from the
        # worker's L1. Neither may claim a saving of 0 for a call whose cost is unknown.
        again = http.post("/v1/predict", json=body).json()
        client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        direct = _record(client, _send(stack.redis_url, input=question, model=model))["cost"]
        for hit in (again["cost"], direct):
            assert hit["cached"] is True and hit["cost_usd"] == 0.0
            assert hit["saved_cost_usd"] is None and hit["saved_output_tokens"] is None
            assert hit["saved_input_tokens"] == (12 if kind == "partial" else None)
        assert stub.total == calls + 1

        costs = http.get("/costs").json()["by_model"][model]  # each case has its own model
    assert costs["requests"] == 3 and costs["cached"] == 2
    assert costs["usage_missing"] == 1 and costs["unpriced"] == 0
    assert costs["saved_unknown"] == 2
    # Nothing guessed entered the totals: no cost, and only reported tokens.
    assert costs["cost_usd"] == 0
    assert costs["output_tokens"] == 0 and costs["saved_output_tokens"] == 0
    assert costs["input_tokens"] == (12 if kind == "partial" else 0)
    log = (stack.dir / "worker.log").read_text()
    assert "the provider did not report token usage" in log


@pytest.mark.parametrize("engine", ENGINES)
def test_a_model_priced_by_no_config_is_billed_from_the_bundled_table(
    stub_stack: Any, engine: str
) -> None:
    """Prices without litellm: gpt-4o-mini at $0.15/$0.60 per 1M tokens (LiteLLM's price
    map as DSPy bundles it), on both engines; DSPy's own engine really is the one used."""
    stack, stub, worker, api = stub_stack
    model = _alias("table", engine)
    with httpx.Client(base_url=api.url, timeout=60) as http:
        body = {"input": f"priced? {uuid.uuid4().hex}", "model": model, "wait": 30,
                "use_cache": False}  # fmt: skip
        done = http.post("/v1/predict", json=body).json()
    assert done["status"] == "succeeded", done
    cost = done["cost"]
    assert (cost["input_tokens"], cost["output_tokens"]) == (10, 5)
    assert cost["cost_usd"] == pytest.approx(10 * 0.15e-6 + 5 * 0.60e-6)
    ready = next(line for line in worker.log_lines() if line.get("message") == "worker ready")
    assert ready["engines"][model] == ("dspy" if engine == "auto" else "litellm"), ready


# --- fault 11: computed, paid, then Redis failed before the result was recorded ---------

RUNNER_CONFIG = """
default_model: mock
models:
  mock: {{litellm_model: openai/mock-gpt, api_base: "{url}", timeout: 10,
         input_price_per_1k: 0.00015, output_price_per_1k: 0.0006}}
programs:
  qa: {{signature: "question -> answer"}}
"""


@pytest.mark.parametrize("served_from", ["l1", "l2"])
def test_rerun_of_a_paid_but_unrecorded_job_is_billed_for_its_call(
    redis_server: Any, mock_llm: MockLLM, tmp_path: Path, served_from: str
) -> None:
    """The runner on a real Redis and the real mock LLM over HTTP; the one failure
    injected is the job's terminal write (``store.finish``) raising a Redis error, as
    when Redis goes away between the LM call and the finish. The rerun (the message
    handed back) finds the answer in L1 (same worker) or L2 (another, fresh worker)."""
    from worker.runner import execute
    from worker.runtime import build_runtime

    (tmp_path / "fleet.yaml").write_text(RUNNER_CONFIG.format(url=mock_llm.url))
    settings = load_settings(WorkerSettings, redis_url=redis_server.url,
                             config=tmp_path / "fleet.yaml")  # fmt: skip
    config = load_fleet_config(settings.config)
    rt = build_runtime(settings, config)
    tenant = f"rerun-{uuid.uuid4().hex[:8]}"
    job_id = str(uuid.uuid4())
    raw = {"v": 1, "job_id": job_id, "submitted_at": "2026-01-01T00:00:00Z", "tenant": tenant,
           "input": f"What is 20+22? ({tenant})"}  # fmt: skip
    calls = mock_llm.stats()["chat_completions"]

    finish = rt.store.finish
    failed = []

    def finish_fails_once(*args: Any, **kwargs: Any) -> bool:
        if not failed:
            failed.append(True)
            raise redis.ConnectionError("Redis went away before the job was recorded")
        return finish(*args, **kwargs)

    rt.store.finish = finish_fails_once  # type: ignore[method-assign]
    with pytest.raises(redis.ConnectionError):
        execute(rt, raw, task_id=job_id, request_id=None)
    assert mock_llm.stats()["chat_completions"] == calls + 1  # the provider was paid

    rerun_rt = rt if served_from == "l1" else build_runtime(settings, config)
    out = execute(rerun_rt, raw, task_id=job_id, request_id=None)
    assert mock_llm.stats()["chat_completions"] == calls + 1  # not paid twice
    cost = out["cost"]
    assert cost["cached"] is False, cost
    assert cost["input_tokens"] > 0 and cost["output_tokens"] > 0
    assert cost["cost_usd"] == pytest.approx(
        (cost["input_tokens"] * 0.00015 + cost["output_tokens"] * 0.0006) / 1000
    )
    # A later duplicate gets the stored outcome and bills nothing more.
    assert execute(rerun_rt, raw, task_id=job_id, request_id=None)["cost"] == cost
    today = datetime.now(UTC).date()
    billed = ledger.read_costs(rt.redis, today, today, tenant=tenant)["totals"]
    assert billed["requests"] == 1 and billed["succeeded"] == 1 and billed["cached"] == 0
    assert billed["input_tokens"] == cost["input_tokens"]
    assert billed["output_tokens"] == cost["output_tokens"]
    assert billed["cost_usd"] == pytest.approx(cost["cost_usd"], abs=1e-9)


# --- fault 10: the limits exactly-once depends on, checked at start-up in one place ------


def _worker(**env: Any) -> WorkerSettings:
    return load_settings(WorkerSettings, **env)


DEFAULT_CONFIG = load_fleet_config(DEFAULT_CONFIG_FILE)


def test_default_configuration_passes() -> None:
    check_redelivery_window(_worker(), DEFAULT_CONFIG)
    check_redelivery_window(load_settings(ApiSettings), DEFAULT_CONFIG)


def test_a_visibility_timeout_shorter_than_a_running_job_is_allowed() -> None:
    # With leases a redelivery of a running job is dropped: the 8 s window is legal.
    check_redelivery_window(
        _worker(visibility_timeout_seconds=8, coalesce_lock_seconds=60, lease_seconds=30),
        DEFAULT_CONFIG,
    )


# Each case: settings that break one rule, and what the error must name (one entry per
# "must exceed" it holds: the default config has two models).
BAD: dict[str, tuple[dict[str, Any], list[str]]] = {
    "job_ttl_vs_visibility": (
        {"job_ttl_seconds": 300, "callback_retry_seconds": 200},
        ["DSPY_FLEET_JOB_TTL_SECONDS=300 must exceed DSPY_FLEET_VISIBILITY_TIMEOUT_SECONDS"],
    ),
    "job_ttl_vs_retry_after": (
        {
            "job_ttl_seconds": 400,
            "visibility_timeout_seconds": 100,
            "retry_after_max_seconds": 500,
            "callback_retry_seconds": 200,
        },
        ["DSPY_FLEET_JOB_TTL_SECONDS=400 must exceed DSPY_FLEET_RETRY_AFTER_MAX_SECONDS=500"],
    ),  # fmt: skip
    "job_ttl_vs_backoff_cap": (
        {
            "job_ttl_seconds": 400,
            "visibility_timeout_seconds": 100,
            "retry_backoff_max_seconds": 450,
            "callback_retry_seconds": 200,
        },
        ["DSPY_FLEET_JOB_TTL_SECONDS=400 must exceed DSPY_FLEET_RETRY_BACKOFF_MAX_SECONDS=450"],
    ),  # fmt: skip
    "job_ttl_vs_recovery": (
        {
            "job_ttl_seconds": 400,
            "visibility_timeout_seconds": 100,
            "recovery_after_seconds": 600,
            "callback_retry_seconds": 200,
        },
        ["DSPY_FLEET_JOB_TTL_SECONDS=400 must exceed DSPY_FLEET_RECOVERY_AFTER_SECONDS=600"],
    ),  # fmt: skip
    # A webhook is retried for CALLBACK_RETRY_SECONDS: its job's record must still be there.
    "job_ttl_vs_callback_retry": (
        {"job_ttl_seconds": 400, "visibility_timeout_seconds": 100, "callback_retry_seconds": 500},
        ["DSPY_FLEET_JOB_TTL_SECONDS=400 must exceed DSPY_FLEET_CALLBACK_RETRY_SECONDS=500"],
    ),  # fmt: skip
    "model_timeout_vs_soft_limit": (
        {"soft_time_limit": 30, "time_limit": 40},
        [
            "DSPY_FLEET_SOFT_TIME_LIMIT=30 must exceed DSPY_FLEET_CONFIG models.mock.timeout=30",
            "DSPY_FLEET_SOFT_TIME_LIMIT=30 must exceed DSPY_FLEET_CONFIG "
            "models.gpt-4o-mini.timeout=30",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_start_up_refuses_limits_that_break_exactly_once(case: str) -> None:
    overrides, named = BAD[case]
    settings = _worker(**overrides)
    with pytest.raises(ConfigError) as info:
        check_redelivery_window(settings, DEFAULT_CONFIG)
    message = info.value.message
    for name in named:
        assert name in message, message
    # Exactly the broken rule, none of the others.
    assert message.count("must exceed") == len(named), message


def test_one_error_names_every_broken_limit() -> None:
    settings = _worker(job_ttl_seconds=60, visibility_timeout_seconds=100, soft_time_limit=20,
                       time_limit=25)  # fmt: skip
    with pytest.raises(ConfigError) as info:
        check_redelivery_window(settings, DEFAULT_CONFIG)
    message = info.value.message
    for name in ("DSPY_FLEET_JOB_TTL_SECONDS=60 must exceed "
                 "DSPY_FLEET_VISIBILITY_TIMEOUT_SECONDS=100",
                 "DSPY_FLEET_RETRY_AFTER_MAX_SECONDS=120",
                 "DSPY_FLEET_RECOVERY_AFTER_SECONDS=120",
                 "models.mock.timeout=30", "models.gpt-4o-mini.timeout=30"):  # fmt: skip
        assert name in message, message


def test_a_model_s_own_timeout_counts(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(
        "default_model: m\nmodels:\n  m: {litellm_model: openai/x, timeout: 200}\n"
        'programs:\n  qa: {signature: "question -> answer"}\n'
    )
    with pytest.raises(
        ConfigError, match=r"SOFT_TIME_LIMIT=120 must exceed .*models\.m\.timeout=200"
    ):
        check_redelivery_window(_worker(), load_fleet_config(path))


def test_the_api_checks_what_it_knows() -> None:
    """The API has no worker-only limits (retry waits); it checks the rest the same way."""
    check_redelivery_window(load_settings(ApiSettings, visibility_timeout_seconds=8),
                            DEFAULT_CONFIG)  # fmt: skip
    with pytest.raises(ConfigError, match="DSPY_FLEET_JOB_TTL_SECONDS=60"):
        check_redelivery_window(load_settings(ApiSettings, job_ttl_seconds=60), DEFAULT_CONFIG)
    short = load_settings(ApiSettings, time_limit=20, soft_time_limit=10)
    with pytest.raises(ConfigError, match=r"models\.mock\.timeout=30"):
        check_redelivery_window(short, DEFAULT_CONFIG)


@pytest.mark.parametrize("command", ["worker", "api"])
def test_cli_refuses_a_job_ttl_inside_the_visibility_timeout(command: str) -> None:
    env = {**os.environ, "DSPY_FLEET_JOB_TTL_SECONDS": "300"}
    env.pop("DSPY_FLEET_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "dspy_fleet.cli.main", command], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "DSPY_FLEET_JOB_TTL_SECONDS=300 must exceed DSPY_FLEET_VISIBILITY_TIMEOUT_SECONDS" in (
        proc.stderr
    )


def test_create_app_refuses_a_short_window() -> None:
    """gunicorn builds the API with create_app(): it checks too. (In a child process: this
    one may hold the worker's metrics, which clash with the API's.)"""
    code = (
        "from api import create_app\n"
        "create_app({'settings': {'job_ttl_seconds': 100}, 'keep_logging': True})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode != 0
    assert "ConfigError" in proc.stderr
    assert "DSPY_FLEET_JOB_TTL_SECONDS=100 must exceed DSPY_FLEET_VISIBILITY_TIMEOUT_SECONDS" in (
        proc.stderr
    )
