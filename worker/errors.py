"""Errors of the worker and the job contract: one small hierarchy, each error knows its code."""

from __future__ import annotations

from typing import Any


class FleetError(Exception):
    """Base of every error dspy-fleet raises on purpose."""

    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        """The error as it appears in a job result and in the API's error body."""
        return {"code": self.code, "message": self.message, "details": self.details}


class ConfigError(FleetError):
    """The settings or the models/programs file are invalid; the message names the key."""

    code = "config_error"


class JobError(FleetError):
    """A job could not produce a prediction; the job fails with this error's code."""


class MessageValidationError(JobError):
    """A job message (from the API or a direct producer) does not match the contract."""

    code = "validation_error"


class UnknownProgramError(JobError):
    """The job names a program that is not in the registry."""

    code = "unknown_program"


class UnknownModelError(JobError):
    """The job names a model alias that is not configured."""

    code = "unknown_model"


class UnknownVariantError(JobError):
    """The job forces a variant the program does not have."""

    code = "unknown_variant"


class ProviderError(JobError):
    """The LLM provider failed (5xx, 429, connection error or timeout)."""

    code = "provider_error"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, details=details)
        self.status_code = status_code
        self.retry_after = retry_after


class ProviderTimeoutError(ProviderError):
    """The provider did not answer within the model's timeout."""

    code = "provider_timeout"


class CircuitOpenError(JobError):
    """The model's circuit breaker is open (and no fallback could serve): failed fast."""

    code = "circuit_open"

    def __init__(self, model: str, retry_after: float) -> None:
        super().__init__(
            f"model {model!r} is failing; its circuit breaker is open",
            details={"model": model, "retry_after": round(retry_after, 3)},
        )
        self.model = model
        self.retry_after = retry_after


class RetryJob(Exception):  # noqa: N818 - a signal to the task, not an error of the job
    """Ask the Celery task to retry the job after ``countdown`` seconds (the slot is freed)."""

    def __init__(self, countdown: float, error: JobError) -> None:
        super().__init__(error.message)
        self.countdown = countdown
        self.error = error


class ProviderRequestError(JobError):
    """The provider rejected the request itself (4xx other than 429): retrying will not help."""

    code = "provider_bad_request"


class OutputParseError(JobError):
    """The model answered, but not in the shape the program's signature asks for."""

    code = "output_parse_error"


class JobTimeoutError(JobError):
    """The job ran past its soft time limit."""

    code = "job_timeout"


class JobFailed(Exception):  # noqa: N818 - Celery shows the class name; "JobFailed" reads right there
    """Raised out of the Celery task so the broker, Flower and exporters record a failure.

    Its single argument is the JSON-safe error dict, so producers reading the
    Celery result backend get the same code and message as the HTTP API shows.
    """

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error)
        self.error = error
