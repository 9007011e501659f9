"""One call of a DSPy program through an LM, with its token usage, whatever the outcome."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from dspy.utils.usage_tracker import track_usage

from worker.dspy_env import dspy
from worker.errors import FleetError, JobError, JobTimeoutError, OutputParseError
from worker.lm import map_provider_error


@dataclass
class Usage:
    """Tokens spent by one call, filled in even when the call fails."""

    input_tokens: int = 0
    output_tokens: int = 0
    by_model: dict[str, dict[str, int]] = field(default_factory=dict)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def call_program(
    module: dspy.Module, lm: dspy.LM, inputs: dict[str, Any], params: dict[str, Any], usage: Usage
) -> dict[str, Any]:
    """Run ``module(**inputs)`` on ``lm``; return JSON-safe outputs; raise a JobError on failure.

    ``usage`` is updated before any error propagates: tokens spent are counted
    even when the program then fails (e.g. the answer does not parse).
    """
    if params:
        lm = lm.copy(**params)
    try:
        with dspy.context(lm=lm, track_usage=True), track_usage() as tracker:
            try:
                prediction = module(**inputs)
            finally:
                for usage_entry in tracker.get_total_tokens().values():
                    usage.input_tokens += int(usage_entry.get("prompt_tokens") or 0)
                    usage.output_tokens += int(usage_entry.get("completion_tokens") or 0)
    except Exception as exc:
        raise as_job_error(exc) from exc
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
