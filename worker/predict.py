"""One call of a DSPy program through an LM, with its token usage, whatever the outcome."""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from dspy.utils.callback import BaseCallback
from dspy.utils.usage_tracker import UsageTracker

from dspy_fleet.contract import reserved_inputs
from dspy_fleet.errors import (
    FleetError,
    JobError,
    JobTimeoutError,
    MessageValidationError,
    OutputParseError,
    ProviderError,
    ProviderRequestError,
)
from worker.dspy_env import JOB_LM_CALLBACKS, carries_job_callbacks, dspy
from worker.faults import map_provider_error
from worker.programs import program_inputs
from worker.traces import CURRENT as CURRENT_TRACE

log = logging.getLogger("dspy_fleet.worker")


def _plus(total: int | None, count: Any) -> int | None:
    """``total + count``, or None (unknown) once any call did not report the count.

    Zero counts as not reported: every call has a prompt and an answer, and LiteLLM
    fills in 0 for an answer that came without ``usage`` (checked: absent or null)."""
    if total is None or isinstance(count, bool) or not isinstance(count, int) or count <= 0:
        return None
    return total + count


@dataclass
class Usage:
    """Tokens spent by one job's LM calls, filled in even when a call fails.

    A count is None when any call's answer did not report it (no ``usage``, or a
    partial one): unknown is never billed as zero."""

    input_tokens: int | None = 0
    output_tokens: int | None = 0
    calls: int = 0

    def add_call(self, reported: Mapping[str, Any]) -> None:
        """Count one LM call from the ``usage`` its answer carried (maybe empty)."""
        self.calls += 1
        self.input_tokens = _plus(self.input_tokens, reported.get("prompt_tokens"))
        self.output_tokens = _plus(self.output_tokens, reported.get("completion_tokens"))

    @property
    def missing(self) -> bool:
        """Whether the provider left a count unreported."""
        return self.input_tokens is None or self.output_tokens is None

    @property
    def total_tokens(self) -> int | None:
        """Input plus output tokens so far; None once a count went unreported."""
        if self.input_tokens is None or self.output_tokens is None:
            return None
        return self.input_tokens + self.output_tokens


class _CallTracker(UsageTracker):
    """DSPy's usage tracker, which drops empty usage; this one sees every call."""

    def __init__(self, usage: Usage) -> None:
        super().__init__()
        self.usage = usage

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        """Count the call (DSPy calls this once per uncached LM answer), then track it."""
        self.usage.add_call(usage_entry)
        super().add_usage(lm, usage_entry)


# Told of each provider call's outcome: (ok, n), n counting the job's LM calls from 1.
OnAnswer = Callable[[bool, int], None]
# Turns a provider error into what the fleet knows it to mean (e.g. a gateway's cooldown
# answer into the refusal the gateway cooled down for), before the outcome is judged.
Explain = Callable[[JobError], JobError]


class _ProviderOutcomes(BaseCallback):
    """Hears each LM call end at the provider boundary: as the call returns or raises,
    before DSPy's adapter parses anything (DSPy's callbacks wrap ``BaseLM.__call__``,
    whatever the engine; the adapter's JSON fallback is a second call, heard too).

    The breaker judges "in a row" in the order outcomes are recorded: recorded here,
    that is the order the provider answered, not the order the workers got round to
    them (a fault raises at once while a success is parsed first)."""

    def __init__(self, on_answer: OnAnswer | None, explain: Explain | None) -> None:
        super().__init__()
        self.on_answer = on_answer
        self.explain = explain
        self.calls = 0
        self.error: JobError | None = None  # the last provider error heard, as explained
        # DSPy logs and swallows whatever a callback raises: our time limit, arriving
        # while the outcome is being recorded, is kept and raised after the program.
        self.interrupted: SoftTimeLimitExceeded | None = None

    def on_lm_end(self, call_id: str, outputs: Any, exception: BaseException | None = None) -> None:
        """Report the call: any answer is ok, a provider fault is not; anything else
        (our time limit, a bug) says nothing about the provider and is not reported.

        A refusal (a bad request, rejected credentials) is the provider answering, so ok:
        it says the request or the key is wrong, not that the provider is unwell."""
        try:
            error = None if exception is None else as_job_error(exception)
            if error is not None:
                if not isinstance(error, ProviderError | ProviderRequestError):
                    return
                if self.explain is not None:
                    error = self.explain(error)
                self.error = error
                if isinstance(error, ProviderError) and error.status_code == 429:
                    # The provider pacing us, not failing: the pacer hears of it instead
                    # (worker/resilience.py), so a 429 storm is never a breaker fault storm.
                    return
            self.calls += 1
            if self.on_answer is not None:
                self.on_answer(not isinstance(error, ProviderError), self.calls)
        except SoftTimeLimitExceeded as exc:
            self.interrupted = exc


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# The inputs each program declares, computed once per module object (the registry keeps
# its modules for the process's life).
_declared: weakref.WeakKeyDictionary[dspy.Module, frozenset[str]] = weakref.WeakKeyDictionary()


def check_inputs(module: dspy.Module, inputs: Mapping[str, Any]) -> None:
    """Refuse, before any provider call, inputs that DSPy could take as call settings.

    Only the program's declared input fields may reach ``module(**inputs)``, and none of
    them is a name DSPy reserves (the registry refuses such programs): a ``config`` or ``lm``
    keyword can never reach a forward that takes ``**kwargs``. Values stay values: DSPy
    formats them into the prompt and never reads settings from them."""
    declared = _declared.get(module)
    if declared is None:
        declared = _declared[module] = frozenset(program_inputs(module))
    reserved = reserved_inputs(inputs)
    unexpected = sorted(set(inputs) - declared)
    if reserved or unexpected:
        raise MessageValidationError(
            "inputs carry names the program does not take as input fields",
            details={"reserved": reserved, "unexpected": unexpected,
                     "input_fields": sorted(declared)},
        )  # fmt: skip


def call_program(
    module: dspy.Module,
    lm: dspy.LM,
    inputs: dict[str, Any],
    params: dict[str, Any],
    usage: Usage,
    on_answer: OnAnswer | None = None,
    explain: Explain | None = None,
) -> dict[str, Any]:
    """Run ``module(**inputs)`` on ``lm``; return JSON-safe outputs; raise a JobError on failure.

    ``usage`` is updated as each LM call answers: tokens spent are counted even when
    the program then fails (e.g. the answer does not parse). ``on_answer`` is told each
    LM call's outcome (ok, or a provider fault) the moment the provider answered, after
    ``explain`` turned a provider error into what it means; the job fails with that.
    """
    check_inputs(module, inputs)
    if params:
        lm = lm.copy(**params)
    before = usage.missing
    settings: dict[str, Any] = {"lm": lm, "track_usage": True,
                                "usage_tracker": _CallTracker(usage)}  # fmt: skip
    outcomes = None
    heard: list[BaseCallback] = []
    if on_answer is not None or explain is not None:
        outcomes = _ProviderOutcomes(on_answer, explain)
        heard.append(outcomes)
    if (recorder := CURRENT_TRACE.get()) is not None:
        heard.append(recorder)  # this job's trace (worker/traces.py): its LM calls
    if heard and carries_job_callbacks(lm):
        # Heard by the dispatcher every LM of the process carries (worker/dspy_env.py),
        # not by DSPy around every module and adapter call too.
        settings[JOB_LM_CALLBACKS] = tuple(heard)
    elif heard:
        settings["callbacks"] = [*dspy.settings.get("callbacks", []), *heard]
    try:
        with dspy.context(**settings):
            prediction = module(**inputs)
        if outcomes is not None and outcomes.interrupted is not None:
            raise outcomes.interrupted
    except Exception as exc:
        error = as_job_error(exc)
        if (
            outcomes is not None
            and outcomes.error is not None
            and isinstance(error, ProviderError | ProviderRequestError)
        ):
            error = outcomes.error  # the provider error that ended the program, explained
        raise error from exc
    finally:
        if usage.missing and not before:
            log.warning(
                "the provider did not report token usage; tokens and cost_usd are null",
                extra={"usage_missing": True, "input_tokens": usage.input_tokens,
                       "output_tokens": usage.output_tokens},
            )  # fmt: skip
    return _json_safe(prediction.toDict())


def as_job_error(exc: BaseException) -> JobError:
    """Our error for anything a program call raised."""
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, SoftTimeLimitExceeded):
        return JobTimeoutError("job ran past its soft time limit")
    if isinstance(exc, Exception):
        mapped = map_provider_error(exc)
        if mapped is not None:
            return mapped
        if type(exc).__name__ == "AdapterParseError":
            return OutputParseError(
                "the model's answer did not match the program's output fields",
                details={"lm_response": str(getattr(exc, "lm_response", ""))[:2000]},
            )
        if isinstance(exc, FleetError):
            return JobError(exc.message, details=exc.details)
    return JobError(f"internal error: {type(exc).__name__}: {str(exc)[:300]}")
