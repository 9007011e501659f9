"""Every error dspy-fleet raises on purpose: one small hierarchy, each error knows its code.

An error carries what every layer needs to report it: its ``code`` (snake_case, the
contract clients match on), ``http_status`` (what the API answers with), whether it is
``retryable``, ``details`` and, where it applies, ``retry_after`` (which becomes a
``Retry-After`` header). The API renders the base class in one handler (api/errors.py),
so a new error is a new leaf here and nothing else.

Categories:
- ``RequestError`` (4xx): the request itself is wrong or not allowed.
- ``ServiceUnavailableError`` (503): a dependency is down; nothing was accepted.
- ``JobError``: a job could not produce a prediction; it fails with the error's code.
- ``ClientError``: what the SDK (dspy_fleet.client) raises, carrying the service's code.

No flask, redis or celery here: the SDK and both processes import this module.
"""

from __future__ import annotations

import math
from typing import Any


class FleetError(Exception):
    """Base of every error dspy-fleet raises on purpose."""

    code = "internal_error"
    http_status = 500
    retryable = False
    retry_after: float | None = None  # seconds; a class default or set per instance

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if retry_after is not None:
            self.retry_after = retry_after

    @property
    def headers(self) -> dict[str, str]:
        """The HTTP response headers this error implies (Retry-After when it has one)."""
        if self.retry_after is None:
            return {}
        # Retry-After takes whole seconds; rounding up never invites a retry too early.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}

    def to_dict(self) -> dict[str, Any]:
        """The error as it appears in a job result and in the API's error body."""
        return {"code": self.code, "message": self.message, "details": self.details}


class ConfigError(FleetError):
    """The settings or the models/programs file are invalid; the message names the key."""

    code = "config_error"


# -- request errors (4xx) --------------------------------------------------------------------


class RequestError(FleetError):
    """The request is wrong or not allowed; sending it again unchanged will not help."""

    code = "bad_request"
    http_status = 400


class InvalidJsonError(RequestError):
    """The request body cannot be read at all (e.g. malformed JSON)."""

    code = "invalid_json"


class UnauthorizedError(RequestError):
    """No API key, or a key that matches no configured hash."""

    code = "unauthorized"
    http_status = 401

    @property
    def headers(self) -> dict[str, str]:
        """Tells the client which scheme to authenticate with (RFC 9110 §11.6.1)."""
        return {**super().headers, "WWW-Authenticate": "Bearer"}


class ForbiddenError(RequestError):
    """A valid key without the rights for this endpoint (e.g. admin-only)."""

    code = "forbidden"
    http_status = 403


class NotFoundError(RequestError):
    """Unknown id or route (or another tenant's, which is indistinguishable)."""

    code = "not_found"
    http_status = 404


class ConflictError(RequestError):
    """The request clashes with the resource's state."""

    code = "conflict"
    http_status = 409


class NotCancellableError(ConflictError):
    """The job already runs or has ended, so it can no longer be cancelled."""

    code = "not_cancellable"


class NotSucceededError(ConflictError):
    """Feedback on a prediction that has not succeeded (queued, running, failed, cancelled):
    there is no answer to judge."""

    code = "not_succeeded"


class PayloadTooLargeError(RequestError):
    """The request body is over the configured limit."""

    code = "payload_too_large"
    http_status = 413


class RequestValidationError(RequestError):
    """The request is readable but breaks the schema; ``details.errors`` names the fields."""

    code = "validation_error"
    http_status = 422


class EmptyBatchError(RequestValidationError):
    """A batch without a single item."""

    code = "empty_batch"


class TooManyItemsError(RequestValidationError):
    """A batch over the configured item limit."""

    code = "too_many_items"


class IdempotencyKeyReusedError(RequestValidationError):
    """A batch's idempotency key was sent again with different items (IETF
    draft-ietf-httpapi-idempotency-key-header: a reused key with another payload is 422)."""

    code = "idempotency_key_reused"


class CallbackUrlRefusedError(RequestValidationError):
    """A callback URL points where the fleet must not send requests (loopback, private,
    link-local, metadata, ...) and the operator did not allow-list it (SSRF guard)."""

    code = "callback_url_refused"


class RateLimitedError(RequestError):
    """Too many requests: slow down and retry after ``retry_after`` seconds."""

    code = "rate_limited"
    http_status = 429
    retryable = True


class QuotaExceededError(RateLimitedError):
    """The tenant used up a quota or budget (``details.quota`` names it): nothing was
    queued; ``retry_after`` is the time until that quota's UTC day or month resets."""

    code = "quota_exceeded"
    retryable = False  # not before the reset: the client should not retry in a loop


# -- service unavailable (503) ---------------------------------------------------------------


class ServiceUnavailableError(FleetError):
    """A dependency is down; the request was not accepted, retry shortly."""

    code = "service_unavailable"
    http_status = 503
    retryable = True
    retry_after = 1.0  # outages we answer this way are short (a restart, a failover)


class RedisUnavailableError(ServiceUnavailableError):
    """Redis (the job store or result store) is unreachable or refused the command."""

    code = "redis_unavailable"


class ReplicationUnconfirmedError(ServiceUnavailableError):
    """Fewer replicas than DSPY_FLEET_ACCEPT_MIN_REPLICAS confirmed an accepted job in time;
    the job is recorded on the master and may still run (``details.job_id``)."""

    code = "replication_unconfirmed"


class BrokerUnavailableError(ServiceUnavailableError):
    """The broker refused to publish the job's message."""

    code = "broker_unavailable"


class NotReadyError(ServiceUnavailableError):
    """Readiness failed; ``details.failing`` names the components."""

    code = "not_ready"


# -- job errors ------------------------------------------------------------------------------


class JobError(FleetError):
    """A job could not produce a prediction; the job fails with this error's code."""

    # What the API answered for any of these before the hierarchy was one: the job's
    # input cannot be processed. Leaves with a clearer HTTP meaning say so.
    http_status = 422


class MessageValidationError(JobError):
    """A job message (from the API or a direct producer) does not match the contract."""

    code = "validation_error"


class UnknownProgramError(NotFoundError, JobError):
    """The request or job names a program that is not in the registry."""

    code = "unknown_program"


class UnknownModelError(NotFoundError, JobError):
    """The request or job names a model alias that is not configured."""

    code = "unknown_model"


class UnknownVariantError(NotFoundError, JobError):
    """The request or job forces a variant the program does not have."""

    code = "unknown_variant"


class ProviderError(JobError):
    """The LLM provider failed (5xx, 429, connection error or timeout)."""

    code = "provider_error"
    http_status = 502
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message, details=details, retry_after=retry_after)
        self.status_code = status_code  # the provider's HTTP status, not ours


class ProviderRateLimitedError(ProviderError):
    """The provider kept answering 429 (rate limit) after the fleet slowed down for it:
    the job drew more 429s than DSPY_FLEET_MAX_RATE_LIMITED and was given up."""

    code = "provider_rate_limited"
    http_status = 429


class ProviderTimeoutError(ProviderError):
    """The provider did not answer within the model's timeout."""

    code = "provider_timeout"
    http_status = 504


class GatewayCooldownError(ProviderError):
    """A gateway (a LiteLLM proxy) answered that every deployment of the model is cooling
    down, without saying why: a transient fault unless the fleet knows the cause."""


class CircuitOpenError(JobError):
    """The model's circuit breaker is open (and no fallback could serve): failed fast."""

    code = "circuit_open"
    http_status = 503

    def __init__(self, model: str, retry_after: float) -> None:
        super().__init__(
            f"model {model!r} is failing; its circuit breaker is open",
            details={"model": model, "retry_after": round(retry_after, 3)},
            retry_after=retry_after,
        )
        self.model = model


class ProviderRequestError(JobError):
    """The provider rejected the request itself (4xx other than 429): retrying will not help.

    Also a non-transient cause that a gateway forwarded inside a 429 or a 5xx (e.g. a
    context-length error). The provider answered, so it is no fault against the breaker."""

    code = "provider_bad_request"
    http_status = 502


class ProviderAuthError(ProviderRequestError):
    """The provider (or a gateway in front of it) refused the credentials: fix the key."""

    code = "provider_auth_error"


class ProviderBillingError(ProviderRequestError):
    """The provider refused for billing or quota (e.g. OpenAI's insufficient_quota, a 429)."""

    code = "provider_billing_error"


class BudgetExhaustedError(JobError):
    """The job's tenant used up its tokens-per-day or USD-per-month budget while the job
    waited: failed before any provider call, billed nothing (``details.quota`` names it)."""

    code = "budget_exhausted"
    http_status = 429


class OutputParseError(JobError):
    """The model answered, but not in the shape the program's signature asks for."""

    code = "output_parse_error"
    http_status = 502


class JobTimeoutError(JobError):
    """The job ran past its soft time limit."""

    code = "job_timeout"
    http_status = 504


# -- the SDK's errors ------------------------------------------------------------------------


class ClientError(FleetError):
    """An error the SDK saw: the service's error answer, or the transport failing.

    Its ``code`` is the service's (or the SDK's own, e.g. ``connection_error``) and
    ``http_status``/``status`` the answer's status (None when nothing was answered).
    The SDK's classes (dspy_fleet.client) derive from this one.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, details=details, retry_after=retry_after)
        self.args = (f"{code}: {message}",)  # str(exc) names the code, as the SDK always did
        self.code = code
        self.http_status = status  # type: ignore[assignment]
        self.request_id = request_id

    @property
    def status(self) -> int | None:
        """The HTTP status the service answered with (None for a transport failure)."""
        return self.http_status


# -- signals (not errors of the service) -----------------------------------------------------


class RetryJob(Exception):  # noqa: N818 - a signal to the task, not an error of the job
    """Ask the runner to retry the job in ``countdown`` seconds: it is scheduled in the due-time
    index (worker/recovery.py), not as a Celery countdown message, and the slot is freed."""

    def __init__(self, countdown: float, error: JobError) -> None:
        super().__init__(error.message)
        self.countdown = countdown
        self.error = error


class Throttled(Exception):  # noqa: N818 - a signal to the runner, not an error of the job
    """The job's model is at its provider limit (or the provider just answered 429): the
    runner hands the job to the due-time index to come back in ``wait`` seconds, status
    ``throttled``, without spending an attempt (dspy_fleet/store/pacing.py)."""

    def __init__(self, wait: float, why: str, error: JobError | None = None) -> None:
        super().__init__(f"throttled ({why}) for {wait:.2f}s")
        self.wait = wait
        self.why = why  # 'booked', 'queued', 'concurrency', 'retry_after' or 'rate_limited' (a 429)
        self.error = error  # the provider's 429, when that is why


class JobFailed(Exception):  # noqa: N818 - Celery shows the class name; "JobFailed" reads right there
    """Raised out of the Celery task so the broker, Flower and exporters record a failure.

    Its single argument is the JSON-safe error dict, so producers reading the
    Celery result backend get the same code and message as the HTTP API shows.
    """

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error)
        self.error = error
