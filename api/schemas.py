"""Pydantic models of the API's responses, the source of the OpenAPI document and the SDK's types.

Request bodies come from the job contract (``PredictRequest``) and the producer
(``BatchItem``); these describe what comes back. They allow extra fields so that
adding an optional field to a response never breaks an older client.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from worker.contract import PredictRequest
from worker.producer import BatchItem

JobStatus = Literal["queued", "running", "retrying", "succeeded", "failed", "cancelled"]
BatchStatus = Literal["in_progress", "completed", "failed", "cancelling", "cancelled"]

__all__ = ["BatchItem", "PredictRequest"]


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
    """The cost record of a job (SPEC §3): tokens, USD and whether the cache served it."""

    model: str | None = None
    provider_model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    cached: bool = False
    latency_ms: float | None = None
    attempts: int | None = None
    variant: str | None = None


class Prediction(_Open):
    """A prediction job as GET /v1/predictions/<id> shows it."""

    id: str
    status: JobStatus
    program: str | None = None
    model: str | None = None
    variant: str | None = None
    created_at: str | None = None
    request_id: str | None = None
    queue: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    attempts: int | None = None
    retry_in_seconds: float | None = None
    requested_model: str | None = None
    outputs: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    cost: Cost | None = None
    cached: bool = False
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
    status_url: str
    results_url: str


class BatchCreated(Batch):
    """The answer to POST /v1/batches: the batch plus the items that were rejected."""

    errors: list[BatchItemError] = Field(default_factory=list)


class BatchResultLine(_Open):
    """One NDJSON line of GET /v1/batches/<id>/results (one per item that has ended)."""

    custom_id: str | None
    index: int
    id: str | None = Field(description="The item's job id (null for invalid items).")
    status: Literal["succeeded", "failed", "cancelled"]
    outputs: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    cost: Cost | None = None
