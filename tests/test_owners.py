"""Each shared shape has one owner, and nothing else can drift from it: the job statuses (also
in the job store's Lua scripts), the cost record and its OpenAPI schema, the job record."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from typing import get_args

import pytest
import redis

from dspy_fleet import schemas
from dspy_fleet.contract import (
    JOB_STATUSES,
    TERMINAL_STATUSES,
    JobStatus,
    PredictFields,
    build_message,
)
from dspy_fleet.cost import CostRecord, Price
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.fleet_config import ModelConfig
from dspy_fleet.store import jobs
from dspy_fleet.store.jobs import JobStore, job_record


def test_lua_scripts_take_the_terminal_statuses_from_the_owner() -> None:
    sources = [
        jobs._START,
        jobs._START_THEN,
        jobs._CREATE,
        jobs._FINISH,
        jobs._CREATE_UNLESS_CACHED,
        jobs._WATCH_JOB,
    ]
    (declared,) = re.findall(r"local TERMINAL = \{(.*?)\}", jobs._START)
    assert {name.split("=")[0].strip() for name in declared.split(",")} == TERMINAL_STATUSES
    # No script names a status by itself: each goes through the TERMINAL set.
    for source in sources:
        quoted = set(re.findall(r"'(\w+)'", source))
        assert not quoted & set(JOB_STATUSES), quoted & set(JOB_STATUSES)


def test_status_types_are_the_owners() -> None:
    assert get_args(schemas.Prediction.model_fields["status"].annotation) == JOB_STATUSES
    assert get_args(JobStatus) == JOB_STATUSES
    assert set(get_args(schemas.BatchResultLine.model_fields["status"].annotation)) == (
        TERMINAL_STATUSES
    )
    assert set(JOB_STATUSES) > TERMINAL_STATUSES


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[JobStore]:
    """A job store on a private Redis."""
    server = RedisServer(log_path=tmp_path_factory.mktemp("owners") / "redis.log").start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    yield JobStore(client, ttl_seconds=60)
    client.close()
    server.stop()


@pytest.mark.parametrize("status", JOB_STATUSES)
def test_start_never_reopens_a_job_that_ended(store: JobStore, status: str) -> None:
    job_id = f"owners-{status}"
    store.client.hset(store.key(job_id), mapping={"status": status})
    prev = store.start(job_id, {"program": "qa"}, {"status": "running"}).prev
    assert prev == status
    after = store.get(job_id)["status"]  # type: ignore[index]
    assert after == (status if status in TERMINAL_STATUSES else "running")


def test_cost_schema_has_every_cost_record_field() -> None:
    record = {f.name for f in dataclasses.fields(CostRecord)}
    documented = set(schemas.Cost.model_fields)
    assert record == documented
    props = schemas.Cost.model_json_schema()["properties"]
    assert {"saved_input_tokens", "saved_output_tokens", "saved_cost_usd"} <= set(props)


def test_a_cache_hit_costs_nothing_and_says_what_it_saved() -> None:
    cfg = ModelConfig(litellm_model="openai/x")
    hit = CostRecord.cache_hit(
        "x", cfg, {"input_tokens": 1000, "output_tokens": 10}, price=Price(1e-6, 2e-6),
        latency_ms=1.5, attempts=0, variant="A",
    )  # fmt: skip
    assert (hit.cost_usd, hit.cached, hit.input_tokens, hit.output_tokens) == (0.0, True, 0, 0)
    assert (hit.saved_input_tokens, hit.saved_output_tokens) == (1000, 10)
    assert hit.saved_cost_usd == pytest.approx(1000e-6 + 20e-6)
    unpriced = CostRecord.cache_hit(
        "x", cfg, {}, price=None, latency_ms=1, attempts=1, variant=None
    )
    assert unpriced.saved_cost_usd is None and unpriced.saved_input_tokens == 0
    schemas.Cost.model_validate(hit.to_dict())


def test_job_record_is_built_from_the_message() -> None:
    msg = build_message(PredictFields(input="x", request_id="r1", priority="batch"), tenant="t")
    assert job_record(msg) == {
        "program": None, "model": None, "variant": None, "tenant": "t", "request_id": "r1",
        "queue": "batch", "created_at": msg.submitted_at, "callback_url": None,
    }  # fmt: skip
    routed = job_record(msg, program="qa", model="m", variant="A", queue="interactive")
    assert (routed["program"], routed["model"], routed["variant"], routed["queue"]) == (
        "qa", "m", "A", "interactive",
    )  # fmt: skip
