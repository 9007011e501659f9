"""worker/dspy_env.py's memo of DSPy's model metadata: the same answers, looked up once."""

from __future__ import annotations

import pytest

from worker.dspy_env import dspy  # noqa: F401 - applies the patches

from dspy.clients import capabilities, costs, model_metadata  # isort: skip

ORIGINAL = model_metadata.model_info.__wrapped__

CASES = [
    ("openai", "gpt-4o-mini", None),  # in the table
    ("openai", "mock-gpt", None),  # not in it: the whole table is scanned
    ("anthropic", "claude-3-5-sonnet-latest", None),
    ("openai-chat", "gpt-4o", None),  # a provider read through another's namespace
    ("openai", "gpt-4o", ("openai",)),  # a declared provider's namespaces
    ("openai", "gpt-4o", ()),  # no namespace: nothing
]


def test_every_caller_in_dspy_gets_the_memoized_lookup() -> None:
    patched = model_metadata.model_info
    assert getattr(patched, "_dspy_fleet_memo", False)
    assert costs.model_info is patched and capabilities.model_info is patched


@pytest.mark.parametrize(("provider", "model", "namespaces"), CASES)
def test_the_memo_answers_as_dspy_does(provider: str, model: str, namespaces: tuple | None) -> None:
    expected = ORIGINAL(provider, model, namespaces=namespaces)
    for _ in range(2):  # the first answer is computed, the second remembered
        assert model_metadata.model_info(provider, model, namespaces=namespaces) == expected


def test_each_caller_gets_its_own_copy() -> None:
    first = model_metadata.model_info("openai", "gpt-4o-mini")
    assert first["input_cost_per_token"] > 0
    first["input_cost_per_token"] = -1.0
    first.clear()
    assert model_metadata.model_info("openai", "gpt-4o-mini") == ORIGINAL("openai", "gpt-4o-mini")


def test_an_unknown_model_is_scanned_once() -> None:
    model = "never-seen-model-for-the-memo-test"
    before = model_metadata.model_info.cache_info()
    for _ in range(5):
        assert model_metadata.model_info("openai", model) == {}
    after = model_metadata.model_info.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 4)
