"""worker/dspy_env.py's patches of DSPy: the memo of its model metadata (the same answers,
looked up once), and the job callback dispatcher on every LM."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from worker.dspy_env import dspy  # applies the patches

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


def test_every_lm_in_the_process_carries_the_job_callback_dispatcher_once() -> None:
    """However an LM comes to be (built, copied, deep-copied, unpickled, loaded from a saved
    state, a BaseLM subclass), it passes its calls on to the running job's callbacks, once."""
    import pickle

    from dspy.clients.base_lm import BaseLM

    from worker.dspy_env import LMCallbacks, carries_job_callbacks

    class OwnLM(BaseLM):
        def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
            raise NotImplementedError

    built = dspy.LM("openai/stub", api_base="http://127.0.0.1:9/v1", api_key="unused")
    made = [
        built,
        built.copy(temperature=0.5),
        copy.deepcopy(built),
        pickle.loads(pickle.dumps(built)),
        dspy.LM.load_state(built.dump_state()),
        OwnLM("own"),
        dspy.LM("openai/stub", callbacks=[dspy.utils.callback.BaseCallback()]),
    ]
    for lm in made:
        assert carries_job_callbacks(lm), lm
        assert sum(isinstance(c, LMCallbacks) for c in lm.callbacks) == 1, lm.callbacks
