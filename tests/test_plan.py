"""The API and the worker plan a request by the same rules, and report a mistake the same way.

The API plans from the catalog the workers publish (read back through Redis, as in
production); the worker plans from its own program registry. For every request of
the table both must reach the same Plan, or raise the same error code, message and
details. The worker plans both the raw message (a direct producer's) and the message
the API routed (variant and model written in).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dspy_fleet.contract import PredictRequest, build_message
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.errors import FleetError
from dspy_fleet.fleet_config import FleetConfig
from dspy_fleet.plan import Plan, catalog_lookup, plan_request
from dspy_fleet.store import catalog
from dspy_fleet.store.catalog import CatalogReader
from worker.programs import ProgramRegistry


def _save_state(path: Path, instructions: str) -> None:
    import dspy

    program = dspy.Predict("question -> answer")
    program.signature = program.signature.with_instructions(instructions)
    program.save(str(path))


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> FleetConfig:
    """Programs with one and two inputs, and an A/B split whose arm B has its own model and
    saved state (so its cache keys differ)."""
    state = tmp_path_factory.mktemp("plan") / "b.json"
    _save_state(state, "Answer in one word.")
    return FleetConfig.model_validate({
        "default_model": "m",
        "models": {alias: {"litellm_model": f"openai/{alias}"} for alias in ("m", "m-b", "m-c")},
        "programs": {
            "qa": {"signature": "question -> answer"},
            "rag": {"signature": "context, question -> answer"},
            "ab": {"signature": "question -> answer", "model": "m-c",
                   "variants": {"A": {"weight": 70},
                                "B": {"weight": 30, "model": "m-b", "state": str(state)}}},
        },
    })  # fmt: skip


@pytest.fixture(scope="module")
def registry(config: FleetConfig) -> ProgramRegistry:
    """The worker's registry, built from the config as a worker builds it."""
    return ProgramRegistry(config)


@pytest.fixture(scope="module")
def published(
    registry: ProgramRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CatalogReader]:
    """The API's catalog reader, after the worker published its catalog to a private Redis."""
    server = RedisServer(log_path=tmp_path_factory.mktemp("plan-redis") / "redis.log").start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    catalog.publish(client, registry.catalog())
    yield CatalogReader(client, ttl_seconds=60)
    client.close()
    server.stop()


def _outcome(plan: Any) -> Plan | tuple[str, str, dict[str, Any]]:
    try:
        return plan()
    except FleetError as exc:
        return (exc.code, exc.message, exc.details)


PLANNED = [
    {"input": "What is 2+2?"},
    {"program": "qa", "inputs": {"question": "x"}, "parameters": {"temperature": 0.5}},
    {"program": "qa", "input": "x", "use_cache": False},
    {"program": "rag", "inputs": {"context": "c", "question": "q"}},
    *({"program": "ab", "input": f"question {i}"} for i in range(30)),
    {"program": "ab", "inputs": {"question": "question 3"}, "parameters": {"seed": 7}},
    {"program": "ab", "input": "x", "variant": "B"},
    {"program": "ab", "input": "x", "variant": "A"},
    {"program": "ab", "input": "x", "variant": "B", "model": "m"},
    {"program": "ab", "input": "x", "model": "m-b"},
]
REJECTED = [
    ({"program": "rag", "input": "x"}, "validation_error"),
    ({"program": "qa", "inputs": {"q": "x"}}, "validation_error"),
    ({"program": "rag", "inputs": {"question": "q"}}, "validation_error"),
    ({"program": "nope", "input": "x"}, "unknown_program"),
    ({"program": "ab", "input": "x", "variant": "C"}, "unknown_variant"),
    ({"input": "x", "model": "gpt-99"}, "unknown_model"),
    # Names are checked before inputs, in both processes.
    ({"program": "qa", "inputs": {"q": "x"}, "variant": "Z"}, "unknown_variant"),
    ({"program": "rag", "input": "x", "model": "gpt-99"}, "unknown_model"),
]


def _both(
    config: FleetConfig, registry: ProgramRegistry, published: CatalogReader, body: dict[str, Any]
) -> tuple[Any, Any]:
    req = PredictRequest.model_validate(body)
    # What api.routes.predictions.plan_for runs (it adds only the HTTP status: 404 for
    # unknown names); the API's metrics cannot share this process with the worker's.
    api = _outcome(lambda: plan_request(config, req, catalog_lookup(published)))
    raw = build_message(req, tenant="t")
    worker = _outcome(lambda: registry.plan(raw)[0])  # what worker.runner runs
    return api, worker


@pytest.mark.parametrize("body", PLANNED, ids=lambda b: str(b)[:60])
def test_api_and_worker_reach_the_same_plan(
    config: FleetConfig, registry: ProgramRegistry, published: CatalogReader, body: dict[str, Any]
) -> None:
    api, worker = _both(config, registry, published, body)
    assert isinstance(api, Plan), api
    assert api == worker
    # The worker also plans the message the API sent, with the variant and model written in.
    routed = build_message(api.routed(PredictRequest.model_validate(body)), tenant="t")
    assert registry.plan(routed)[0] == api
    assert (api.cache_key is None) == (body.get("use_cache") is False)


def test_variants_follow_the_model_rule(
    config: FleetConfig, registry: ProgramRegistry, published: CatalogReader
) -> None:
    plans = [_both(config, registry, published, b)[0] for b in PLANNED if b.get("program") == "ab"]
    assert {p.variant for p in plans} == {"A", "B"}
    for plan, body in zip(plans, [b for b in PLANNED if b.get("program") == "ab"], strict=True):
        # request model > variant's model > program's model > default
        expected = body.get("model") or ("m-b" if plan.variant == "B" else "m-c")
        assert plan.model == expected, (body, plan)
    a = next(p for p in plans if p.variant == "A")
    b = next(p for p in plans if p.variant == "B")
    assert a.version == registry.get("ab").version != b.version == registry.get("ab", "B").version


@pytest.mark.parametrize(("body", "code"), REJECTED, ids=lambda x: str(x)[:60])
def test_api_and_worker_reject_a_mistake_alike(
    config: FleetConfig,
    registry: ProgramRegistry,
    published: CatalogReader,
    body: dict[str, Any],
    code: str,
) -> None:
    api, worker = _both(config, registry, published, body)
    assert isinstance(api, tuple), api
    assert api[0] == code
    assert api == worker
