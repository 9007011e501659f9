"""Each provider call's outcome is heard at the provider boundary (issue 13, class 2).

The breaker judges "N faults in a row" in the order outcomes are recorded, so the
worker records each one as the LM call returns or raises, before DSPy's adapter parses
the answer. These run ``call_program`` (DSPy, the project's ModelPool) in-process
against a small stub provider of the test's own, over real HTTP, on both engines.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dspy_fleet.errors import (
    GatewayCooldownError,
    OutputParseError,
    ProviderAuthError,
    ProviderBillingError,
    ProviderError,
    ProviderRequestError,
    ProviderTimeoutError,
)
from dspy_fleet.fleet_config import load_fleet_config
from tests.stub_provider import (
    CHAT_ANSWER,
    INVALID_KEY,
    Reply,
    StubProvider,
    completion,
    error,
    proxy_auth_error,
    proxy_cooldown,
    rate_limited,
    stub_provider,
)

# Answers of a provider behind a gateway (issue 19 item 7), by route: the answer, the error
# the job must fail with (and its code), and whether the call is a provider fault.
GATEWAY: dict[str, tuple[Reply, type[Exception], str, bool]] = {
    "proxy-401": (proxy_auth_error(), ProviderAuthError, "provider_auth_error", False),
    # The proxy keeps the upstream's type; only the status and LiteLLM's class name say auth.
    "proxy-401-typed": (proxy_auth_error("invalid_request_error"), ProviderAuthError,
                        "provider_auth_error", False),
    "openai-401": (error(401, "Incorrect API key provided", "invalid_request_error",
                         "invalid_api_key"), ProviderAuthError, "provider_auth_error", False),
    "anthropic-403": (error(403, "not allowed", "permission_error"), ProviderAuthError,
                      "provider_auth_error", False),
    "auth-in-429": (error(429, "Incorrect API key", "authentication_error", "429"),
                    ProviderAuthError, "provider_auth_error", False),
    "auth-in-500": (error(500, INVALID_KEY, None, "500"), ProviderAuthError,
                    "provider_auth_error", False),
    "cooldown-after-401": (proxy_cooldown([(401, INVALID_KEY)]), ProviderAuthError,
                           "provider_auth_error", False),
    "cooldown-after-401-and-429": (
        proxy_cooldown([(401, INVALID_KEY), (429, "litellm.RateLimitError: slow down")]),
        ProviderError, "provider_error", True),
    "cooldown-unexplained": (proxy_cooldown(), GatewayCooldownError, "provider_error", True),
    "quota-in-429": (error(429, "You exceeded your current quota", "insufficient_quota",
                           "insufficient_quota"), ProviderBillingError,
                     "provider_billing_error", False),
    "context-in-500": (error(500, "litellm.ContextWindowExceededError: maximum context "
                                  "length is 8192 tokens", None, "500"),
                       ProviderRequestError, "provider_bad_request", False),
    "rate-limited": (rate_limited(2), ProviderError, "provider_error", True),
    "overloaded": (error(503, "overloaded", "server_error", "server_error"), ProviderError,
                   "provider_error", True),
}  # fmt: skip


def _respond(route: str, nth: int, request: dict[str, Any]) -> Reply:
    """The route says how the stub answers: ok (a chat-format answer), fail (503), bad
    (400), garbled (text no adapter parses), json (text the chat adapter cannot parse,
    JSON the second time)."""
    if route in GATEWAY:
        return GATEWAY[route][0]
    if route == "fail":
        return error(503, "stub 503", "stub", 503)
    if route == "bad":
        return error(400, "stub 400", "stub", 400)
    if route == "hang":
        time.sleep(3)  # past the model's timeout
    if route == "garbled" or (route == "json" and nth % 2 == 1):
        return completion("no fields here")
    if route == "json":
        return completion(json.dumps({"answer": "forty-two"}))
    return completion(CHAT_ANSWER)


@pytest.fixture(scope="module")
def stub() -> Iterator[StubProvider]:
    with stub_provider(_respond) as provider:
        yield provider


def _run(stub: StubProvider, tmp_path: Path, engine: str, mode: str, *, timeout: float = 10,
         api_base: str | None = None, module: Any = None) -> tuple[Any, list[Any]]:  # fmt: skip
    """call_program on a model of ``engine`` at /``mode``; (outputs or the error, outcomes).

    ``module``: the program (default a ``question -> answer`` Predict)."""
    import dspy

    from worker.lm import ModelPool, _native
    from worker.predict import Usage, call_program

    (tmp_path / "fleet.yaml").write_text(f"""
default_model: m
models:
  m: {{litellm_model: openai/stub, engine: {engine}, api_base: "{api_base or stub.base(mode)}",
      timeout: {timeout}}}
programs:
  qa: {{signature: "question -> answer"}}
""")
    lm = ModelPool(load_fleet_config(tmp_path / "fleet.yaml")).get("m")
    # "auto" must really be DSPy's own engine here, or both runs would test LiteLLM.
    assert _native(lm) is (engine != "litellm")
    heard: list[tuple[bool, int]] = []
    module = module or dspy.Predict("question -> answer")
    try:
        result: Any = call_program(module, lm, {"question": "q"}, {}, Usage(),
                                   on_answer=lambda ok, n: heard.append((ok, n)))  # fmt: skip
    except Exception as exc:  # the job's error is part of what is checked
        result = exc
    return result, heard


@pytest.mark.parametrize("engine", ["litellm", "lm15"])
def test_each_provider_call_is_heard_once_with_its_outcome(
    stub: StubProvider, tmp_path: Path, engine: str
) -> None:
    out, heard = _run(stub, tmp_path, engine, "ok")
    assert out == {"answer": "forty-two"} and heard == [(True, 1)]

    failed, heard = _run(stub, tmp_path, engine, "fail")
    assert isinstance(failed, ProviderError) and failed.status_code == 503
    assert heard == [(False, 1)]  # a provider fault

    rejected, heard = _run(stub, tmp_path, engine, "bad")
    assert isinstance(rejected, ProviderRequestError)
    assert heard == [(True, 1)]  # a 400 is the provider answering: it is up

    # The chat adapter cannot parse the answer; DSPy's JSON fallback calls again: two
    # provider calls, both answered, both heard (before any parsing, so the job's parse
    # failure is no provider fault).
    garbled, heard = _run(stub, tmp_path, engine, "garbled")
    assert isinstance(garbled, OutputParseError)
    assert heard == [(True, 1), (True, 2)]

    before = stub.calls.get("json", 0)
    out, heard = _run(stub, tmp_path, engine, "json")
    assert out == {"answer": "forty-two"}
    assert heard == [(True, 1), (True, 2)] and stub.calls["json"] - before == 2


@pytest.mark.parametrize("engine", ["litellm", "auto"])
def test_a_gateway_s_answer_is_classified_by_its_first_lasting_cause(
    stub: StubProvider, tmp_path: Path, engine: str
) -> None:
    """The cause is read from the body and the provider's own error type, through the
    gateway's status: a refusal is no fault and not retried; a rate limit or an outage is."""
    for route, (_, cls, code, fault) in GATEWAY.items():
        failed, heard = _run(stub, tmp_path, engine, route)
        assert type(failed) is cls and failed.code == code, (route, failed)
        if isinstance(failed, ProviderError) and failed.status_code == 429:
            # A rate limit is pacing news (dspy_fleet/store/pacing.py), never a breaker
            # outcome: the breaker hears nothing of it.
            assert heard == [], route
        else:
            assert heard == [(not fault, 1)], route
        assert failed.retryable is fault, route
    cooled = _run(stub, tmp_path, engine, "cooldown-after-401")[0]
    assert "Incorrect API key" in cooled.message and cooled.details["gateway_cooldown"]
    unexplained = _run(stub, tmp_path, engine, "cooldown-unexplained")[0]
    assert unexplained.retry_after == 5.0  # the proxy's Retry-After: the cooldown left
    assert _run(stub, tmp_path, engine, "rate-limited")[0].retry_after == 2.0
    wrapped = _run(stub, tmp_path, engine, "auth-in-429")[0]
    assert "the gateway answered 429" in wrapped.message


@pytest.mark.parametrize("engine", ["litellm", "auto"])
def test_timeouts_and_unreachable_providers_are_faults_on_both_engines(
    stub: StubProvider, tmp_path: Path, engine: str
) -> None:
    hung, heard = _run(stub, tmp_path, engine, "hang", timeout=0.5)
    assert type(hung) is ProviderTimeoutError and hung.retryable, hung
    assert heard == [(False, 1)]
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    unreachable, heard = _run(stub, tmp_path, engine, "none",
                              api_base=f"http://127.0.0.1:{closed}/v1")  # fmt: skip
    assert type(unreachable) is ProviderError and unreachable.retryable, unreachable
    assert heard == [(False, 1)]


def test_the_outcome_is_heard_before_the_adapter_parses(stub: StubProvider, tmp_path: Path) -> None:
    import dspy

    from worker.lm import ModelPool
    from worker.predict import Usage, call_program

    (tmp_path / "fleet.yaml").write_text(f"""
default_model: m
models:
  m: {{litellm_model: openai/stub, api_base: "{stub.base("ok")}", timeout: 10}}
programs:
  qa: {{signature: "question -> answer"}}
""")
    lm = ModelPool(load_fleet_config(tmp_path / "fleet.yaml")).get("m")
    events: list[str] = []

    class Parse(dspy.utils.callback.BaseCallback):
        def on_adapter_parse_start(self, call_id: str, instance: Any, inputs: Any) -> None:
            events.append("parse")

    with dspy.context(callbacks=[Parse()]):
        call_program(dspy.Predict("question -> answer"), lm, {"question": "q"}, {}, Usage(),
                     on_answer=lambda ok, n: events.append(f"answer {ok}"))  # fmt: skip
    # The program's own callbacks still run beside ours.
    assert events == ["answer True", "parse"]


def _probe() -> Any:
    """A ``question -> answer`` program that notes how many callbacks DSPy's settings hold
    as it runs (``settings_callbacks``); it asks ``questions`` at once through DSPy's
    Parallel, or hands its predictor ``call_lm`` at call time. (A function: dspy is imported
    in the tests, after the worker's patches.)"""
    import dspy

    class Probe(dspy.Module):
        def __init__(self, questions: int = 1, call_lm: Any = None) -> None:
            super().__init__()
            self.predict = dspy.Predict("question -> answer")
            self.questions = questions
            self.call_lm = call_lm
            self.settings_callbacks: list[int] = []

        def forward(self, question: str) -> Any:
            self.settings_callbacks.append(len(dspy.settings.get("callbacks") or []))
            if self.call_lm is not None:
                return self.predict(question=question, lm=self.call_lm)
            if self.questions == 1:
                return self.predict(question=question)
            examples = [dspy.Example(question=f"{question} {i}").with_inputs("question")
                        for i in range(self.questions)]  # fmt: skip
            answers = self.predict.batch(examples, num_threads=self.questions)
            return dspy.Prediction(answer=" / ".join(a.answer for a in answers))

    return Probe


@pytest.mark.parametrize("engine", ["litellm", "auto"])
def test_a_job_s_callbacks_hear_every_lm_call_without_riding_on_every_module_call(
    stub: StubProvider, tmp_path: Path, engine: str
) -> None:
    """The job's callbacks are heard through the dispatcher every LM carries
    (worker/dspy_env.py, LMCallbacks), not from DSPy's settings, so DSPy does not run them
    around every module and adapter call. They still hear every LM call: in DSPy's Parallel
    threads, on a predictor's own LM, on an LM passed at call time; and a job whose LM lacks
    the dispatcher falls back to DSPy's settings."""
    import dspy

    Probe = _probe()

    def failing_lm() -> Any:  # not built by the fleet's ModelPool
        return dspy.LM("openai/stub", api_base=stub.base("fail"), api_key="unused",
                       cache=False, num_retries=0)  # fmt: skip

    one = Probe()
    out, heard = _run(stub, tmp_path, engine, "ok", module=one)
    assert out == {"answer": "forty-two"} and heard == [(True, 1)]
    assert one.settings_callbacks == [0]  # nothing of the job's in DSPy's settings

    threads = Probe(questions=3)
    out, heard = _run(stub, tmp_path, engine, "ok", module=threads)
    assert out == {"answer": " / ".join(["forty-two"] * 3)}
    assert sorted(heard) == [(True, 1), (True, 2), (True, 3)]  # each thread's call heard
    assert threads.settings_callbacks == [0]

    own = Probe()  # a predictor that brings its own LM
    own.predict.lm = failing_lm()
    at_call = Probe(call_lm=failing_lm())  # an LM handed over at call time
    for program in (own, at_call):
        failed, heard = _run(stub, tmp_path, engine, "ok", module=program)
        assert isinstance(failed, ProviderError) and failed.status_code == 503
        assert heard == [(False, 1)]  # the other LM's call, heard
        assert program.settings_callbacks == [0]


def test_a_job_on_an_lm_without_the_dispatcher_is_heard_through_dspy_s_settings(
    stub: StubProvider, tmp_path: Path
) -> None:
    import dspy

    from worker.dspy_env import carries_job_callbacks
    from worker.predict import Usage, call_program

    lm = dspy.LM("openai/stub", api_base=stub.base("ok"), api_key="unused", cache=False,
                 num_retries=0)  # fmt: skip
    lm.callbacks.clear()  # as an LM whose class skipped BaseLM.__init__ would be
    assert not carries_job_callbacks(lm)
    probe = _probe()()
    heard: list[tuple[bool, int]] = []
    out = call_program(probe, lm, {"question": "q"}, {}, Usage(),
                       on_answer=lambda ok, n: heard.append((ok, n)))  # fmt: skip
    assert out == {"answer": "forty-two"} and heard == [(True, 1)]
    assert probe.settings_callbacks == [1]
