"""Variant assignment and cache keys: pure functions shared by the API and the worker."""

from __future__ import annotations

from typing import Any

from dspy_fleet.contract import PredictFields
from dspy_fleet.fleet_config import FleetConfig
from dspy_fleet.plan import Plan, ProgramInfo, plan_request
from dspy_fleet.routing import assignment_point, cache_key, choose_variant

CONFIG = FleetConfig.model_validate({
    "default_model": "m",
    "models": {"m": {"litellm_model": "openai/a"}, "m-b": {"litellm_model": "openai/b"}},
    "programs": {
        "qa": {"signature": "question -> answer"},
        "shared": {"signature": "question -> answer", "cache_scope": "global"},
        "ab": {"signature": "question -> answer",
               "variants": {"A": {"weight": 70}, "B": {"weight": 30, "model": "m-b"}}},
    },
})  # fmt: skip
QUESTION = ProgramInfo(input_fields=("question",), version="v1")


def resolve(config: FleetConfig, program: str, *, model: str | None, variant: str | None,
            inputs: dict[str, Any], params: dict[str, Any]) -> Plan:  # fmt: skip
    """The plan of a request with these fields, where the program takes a question."""
    request = PredictFields(program=program, model=model, variant=variant, inputs=inputs,
                            parameters=params)  # fmt: skip
    return plan_request(config, request, lambda _name: QUESTION)


def test_split_70_30_over_1000_inputs() -> None:
    prog = CONFIG.programs["ab"]
    picks = [choose_variant(prog, assignment_point("ab", {"question": f"q{i}"}, {}))
             for i in range(1000)]  # fmt: skip
    share_a = picks.count("A") / len(picks)
    assert 0.65 <= share_a <= 0.75, share_a
    assert set(picks) == {"A", "B"}


def test_same_input_same_variant_and_model() -> None:
    for i in range(50):
        inputs = {"question": f"stable {i}"}
        first = resolve(CONFIG, "ab", model=None, variant=None, inputs=inputs, params={})
        again = resolve(CONFIG, "ab", model=None, variant=None, inputs=dict(inputs), params={})
        assert first == again
        assert first.model == ("m-b" if first.variant == "B" else "m")


def test_forced_variant_and_explicit_model_win() -> None:
    route = resolve(CONFIG, "ab", model=None, variant="B", inputs={"question": "x"}, params={})
    assert (route.variant, route.model) == ("B", "m-b")
    route = resolve(CONFIG, "ab", model="m", variant="B", inputs={"question": "x"}, params={})
    assert route.model == "m"
    assert resolve(CONFIG, "qa", model=None, variant=None, inputs={"question": "x"},
                   params={}).variant is None  # fmt: skip


def test_cache_key_depends_on_what_determines_the_answer() -> None:
    base = cache_key("qa", "v1", "m", {"question": "x", "context": "c"}, {"temperature": 0})
    assert base == cache_key("qa", "v1", "m", {"context": "c", "question": "x"}, {"temperature": 0})
    for other in (
        cache_key("qa", "v2", "m", {"question": "x", "context": "c"}, {"temperature": 0}),
        cache_key("qa", "v1", "m-b", {"question": "x", "context": "c"}, {"temperature": 0}),
        cache_key("qa", "v1", "m", {"question": "y", "context": "c"}, {"temperature": 0}),
        cache_key("qa", "v1", "m", {"question": "x", "context": "c"}, {"temperature": 1}),
        cache_key("rag", "v1", "m", {"question": "x", "context": "c"}, {"temperature": 0}),
    ):
        assert other != base


def test_cache_key_of_a_tenant_scoped_program_is_the_tenants_own() -> None:
    inputs = {"question": "x"}
    shared = cache_key("qa", "v1", "m", inputs, {})
    mine, theirs = (cache_key("qa", "v1", "m", inputs, {}, owner) for owner in ("a", "b"))
    assert len({shared, mine, theirs}) == 3

    def key(program: str, tenant: str) -> str | None:
        request = PredictFields(program=program, inputs=inputs)
        plan = plan_request(CONFIG, request, lambda _name: QUESTION, tenant=tenant)
        # A fallback model's key keeps the scope of the planned model's.
        owner = tenant if program == "qa" else None
        assert plan.key_for("m-b") == cache_key(program, "v1", "m-b", inputs, {}, owner)
        return plan.cache_key

    # `tenant` is the default scope: two tenants never share an entry ...
    assert key("qa", "a") == mine and key("qa", "b") == theirs
    assert CONFIG.programs["qa"].cache_scope == "tenant"
    # ... and `global` shares one between every tenant.
    assert key("shared", "a") == key("shared", "b") == cache_key("shared", "v1", "m", inputs, {})
