"""Pydantic models of the API's responses, the source of the OpenAPI document and the SDK's types.

Request bodies come from the job contract (``PredictRequest``) and the producer
(``BatchItem``); these describe what comes back. They allow extra fields so that
adding an optional field to a response never breaks an older client.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from dspy_fleet.contract import BatchItem, JobStatus, PredictRequest, TerminalStatus

BatchStatus = Literal["in_progress", "completed", "failed", "cancelling", "cancelled"]

__all__ = ["BatchItem", "JobStatus", "PredictRequest"]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorInfo(_Open):
    """What went wrong: a stable snake_case code, a sentence, and data about it."""

    code: str = Field(description="Stable snake_case code, e.g. validation_error, not_found.")
    message: str
    details: dict[str, Any] = Field(default_factory=dict)


class ApiErrorDetail(ErrorInfo):
    """The error object of an error response."""

    request_id: str | None = Field(default=None, description="The X-Request-ID of the request.")


class ErrorResponse(BaseModel):
    """The one body shape of every error the API answers with."""

    error: ApiErrorDetail


class Cost(_Open):
    """The cost record of a job (SPEC §3): tokens, USD and whether the cache served it.

    The same fields as ``dspy_fleet.cost.CostRecord``, which builds it (a test holds
    the two equal)."""

    model: str | None = None
    provider_model: str | None = None
    input_tokens: int | None = Field(
        default=0, description="Null when the provider did not report it (usage_missing)."
    )
    output_tokens: int | None = Field(
        default=0, description="Null when the provider did not report it (usage_missing)."
    )
    cost_usd: float | None = Field(
        default=None, description="Null when the price or a token count is unknown."
    )
    cached: bool = False
    latency_ms: float | None = None
    attempts: int | None = None
    variant: str | None = None
    saved_input_tokens: int | None = Field(
        default=0,
        description="On a cache hit: input tokens of the call it replaced (null: unknown).",
    )
    saved_output_tokens: int | None = Field(
        default=0,
        description="On a cache hit: output tokens of the call it replaced (null: unknown).",
    )
    saved_cost_usd: float | None = Field(
        default=0.0, description="On a cache hit: what the call it replaced cost (null: unknown)."
    )
    usage_missing: bool = Field(
        default=False,
        description="The provider did not report a token count: it is null, and so is cost_usd.",
    )


class CallbackState(_Open):
    """The webhook of a job or batch that has a callback_url (README, Webhooks)."""

    status: Literal["pending", "delivered", "failed"] = Field(
        description="pending until delivered (a 2xx answer) or failed (retry budget spent, "
        "or the URL or the tenant's signing secret can never work)."
    )
    attempts: int = Field(description="Delivery attempts started so far.")
    last_error: str | None = Field(
        default=None, description="What went wrong in the last failed attempt, if any."
    )


class Prediction(_Open):
    """A prediction job as GET /v1/predictions/<id> shows it."""

    id: str
    status: JobStatus
    program: str | None = None
    model: str | None = None
    variant: str | None = None
    program_version: str | None = Field(
        default=None,
        description="The version of the program state that ran the job (or whose cached "
        "answer it is), as GET /v1/programs shows it; set once a worker starts the job.",
    )
    created_at: str | None = None
    request_id: str | None = None
    queue: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int | None = None
    retry_in_seconds: float | None = None
    throttled_until: str | None = Field(
        default=None,
        description="Status throttled: when the job's turn at its model's provider limit "
        "is expected (UTC, ISO 8601).",
    )
    throttle_reason: str | None = Field(
        default=None,
        description="Why it waits: booked (its slot is held), queued (in line), "
        "concurrency, rate_limited (the provider answered it 429) or retry_after (the "
        "provider asked every call of its model to wait).",
    )
    requested_model: str | None = None
    outputs: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    cost: Cost | None = None
    cached: bool = False
    callback: CallbackState | None = Field(
        default=None, description="Only for a job submitted with a callback_url."
    )
    status_url: str


class BatchCounts(_Open):
    """How many items of a batch are in each state (total = the sum of the others)."""

    total: int
    succeeded: int
    failed: int = Field(description="Includes items that were invalid when submitted.")
    cancelled: int
    pending: int = Field(description="Queued, running or retrying.")


class BatchItemError(ErrorInfo):
    """An item rejected when the batch was submitted (it never ran)."""

    index: int = Field(description="Position of the item in the submission (0-based).")
    custom_id: str | None = None


class Batch(_Open):
    """A batch's status and counts."""

    id: str
    object: Literal["batch"] = "batch"
    status: BatchStatus
    counts: BatchCounts
    created_at: str | None = None
    cancelled_at: str | None = None
    callback: CallbackState | None = Field(
        default=None, description="Only for a batch submitted with a callback_url."
    )
    status_url: str
    results_url: str


class BatchCreated(Batch):
    """The answer to POST /v1/batches: the batch plus the items that were rejected."""

    errors: list[BatchItemError] = Field(default_factory=list)
    accepted: list[str] = Field(
        default_factory=list,
        description="custom_ids of the items recorded (now or by an earlier try with the same "
        "Idempotency-Key): each runs and bills exactly once.",
    )
    rejected: list[str] = Field(
        default_factory=list,
        description="custom_ids of valid items Redis refused to record: they will not run "
        "(resubmit with the same Idempotency-Key to add them).",
    )
    idempotency_key: str | None = None


class BatchResultLine(_Open):
    """One NDJSON line of GET /v1/batches/<id>/results (one per item that has ended)."""

    custom_id: str | None
    index: int
    id: str | None = Field(description="The item's job id (null for invalid items).")
    status: TerminalStatus
    outputs: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    cost: Cost | None = None


class QuotaUse(_Open):
    """One quota: what was used in its period, the limit, and when the period resets."""

    used: float | None = Field(
        description="Used this period (USD for money, a count otherwise); null: not counted "
        "(requests of a tenant without quotas)."
    )
    limit: float | None = Field(description="The configured limit; null: unlimited.")
    resets_at: str = Field(description="When the period ends (UTC midnight; ISO 8601).")


class Usage(_Open):
    """A tenant's consumption against its quotas and budget (UTC days and months, Redis's
    clock); spend is summed from the same cost records as GET /costs."""

    tenant: str
    as_of: str = Field(description="When it was read (ISO 8601, UTC).")
    requests_today: QuotaUse
    tokens_today: QuotaUse
    usd_this_month: QuotaUse


class UsageAll(_Open):
    """Every tenant's usage (admin, ``?all=true``): tenants with quotas or counters."""

    tenants: dict[str, Usage]


class UsageAnswer(RootModel[Usage | UsageAll]):
    """What GET /v1/usage answers: one tenant's usage, or every tenant's (``?all=true``)."""


class FeedbackRequest(BaseModel):
    """Body of POST /v1/predictions/<id>/feedback: one source's judgement of one prediction."""

    model_config = ConfigDict(extra="forbid")

    score: float = Field(
        strict=True,
        allow_inf_nan=False,
        ge=-1e12,
        le=1e12,
        description="The judgement: 0..1 by convention (1 best), or any number on your own "
        "scale (higher is better); the A/B report compares the variants' means.",
    )
    label: str | None = Field(default=None, max_length=200, description="e.g. 'good', 'wrong'.")
    comment: str | None = Field(default=None, max_length=4000)
    expected: dict[str, Any] | None = Field(
        default=None, description="The output fields the prediction should have given."
    )
    source: str = Field(
        default="default",
        min_length=1,
        max_length=64,
        pattern=r"^[\w.:-]+$",
        description="Who judges (a user, a judge program). One feedback per prediction and "
        "source: posting again from the same source replaces the earlier one.",
    )


class Feedback(_Open):
    """One source's stored feedback on a prediction."""

    prediction_id: str
    source: str
    score: float
    label: str | None = None
    comment: str | None = None
    expected: dict[str, Any] | None = None
    program: str | None = None
    variant: str | None = None
    created_at: str = Field(description="When this source (last) posted it, ISO 8601 UTC.")
    replaced: bool | None = Field(
        default=None, description="In the POST answer: this source had posted before."
    )


class FeedbackList(_Open):
    """GET /v1/predictions/<id>/feedback: every source's feedback on the prediction."""

    prediction_id: str
    feedback: list[Feedback]
