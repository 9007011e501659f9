"""The versioned job message contract (v1) shared by the API, the SDK and direct producers.

A job is a Celery message for task ``dspy_fleet.predict`` on queue ``interactive``
or ``batch`` whose ``kwargs`` are a :class:`JobMessage`; the Celery task id equals
``job_id``. Producers outside this repository rely on these field names: add
optional fields only, and bump ``v`` for anything else. Never import dspy here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

CONTRACT_VERSION: Literal[1] = 1
TASK_NAME = "dspy_fleet.predict"
QUEUES = ("interactive", "batch")
DEFAULT_TENANT = "anonymous"
# Namespace for job ids derived from idempotency keys: the same (tenant, request_id)
# always names the same job, whichever process computes it.
_JOB_NAMESPACE = uuid.UUID("5b7a4c1e-2f1d-4d8e-9a51-6a3f0f6c2b10")

Name = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[\w.:-]+$")]
FieldName = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z_]\w*$")
]
Priority = Literal["interactive", "batch"]

# Job statuses: the one owner of their names. The job store (and its Lua scripts), the
# producer, the API, the worker, the SDK and the OpenAPI schemas all take them from here.
ActiveStatus = Literal["queued", "running", "retrying", "throttled"]
TerminalStatus = Literal["succeeded", "failed", "cancelled"]
JobStatus = Literal[ActiveStatus, TerminalStatus]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
# A job in one of these has ended: it is never run again and its record is final.
TERMINAL_STATUSES: frozenset[str] = frozenset(get_args(TerminalStatus))
# The terminal statuses of a job that ran (a cancelled job never did): what the A/B
# report samples (dspy_fleet/store/feedback.py).
RAN_STATUSES: frozenset[str] = TERMINAL_STATUSES - {"cancelled"}
# Per-field size limit of inputs (characters); the body limit (413) caps the total.
MAX_FIELD_CHARS = 100_000
# Longest callback URL accepted (browsers and proxies commonly cap URLs near 2,048).
MAX_CALLBACK_URL_CHARS = 2048
# Keyword arguments DSPy takes as its own in a module or predictor call, not as signature
# fields: `config` becomes the call's LM settings (api_base, api_key, ...), `lm` the LM,
# `demos`/`signature` the prompt, `prediction` a provider option (`completions`, `self`,
# `instance` collide with named parameters and crash the call). An input field of one of
# these names would let a tenant steer the provider call, so no program may declare one
# and no message may carry one. Read from DSPy 3.4 (Predict._forward_preprocess and
# _forward_postprocess; the named parameters of Module.__call__ and of DSPy's callback
# wrapper); tests/test_reserved_inputs.py derives the set from the installed DSPy again.
RESERVED_INPUT_NAMES: frozenset[str] = frozenset(
    {"config", "lm", "demos", "signature", "new_signature", "prediction", "_trace",
     "completions", "self", "instance"}
)  # fmt: skip


def reserved_inputs(names: Iterable[str]) -> list[str]:
    """The names among ``names`` that DSPy would take as call settings (sorted)."""
    return sorted(set(names) & RESERVED_INPUT_NAMES)


def signature_input_names(signature: str) -> list[str]:
    """The input field names of a DSPy string signature ("a, b: list[str] -> c"), without
    importing DSPy: names before the arrow, split on top-level commas, types dropped."""
    left = signature.split("->", 1)[0]
    names, depth, start = [], 0, 0
    for i, ch in enumerate(left + ","):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            name = left[start:i].split(":", 1)[0].strip()
            if name:
                names.append(name)
            start = i + 1
    return names


class LMParameters(BaseModel):
    """The allow-list of LM keyword arguments a request may set."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1, le=32768)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[Annotated[str, StringConstraints(max_length=64)]] | None = Field(
        default=None, max_length=4
    )
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)

    def effective(self) -> dict[str, Any]:
        """Only the parameters that were set, for the LM call and the cache key."""
        return self.model_dump(exclude_none=True)


class PredictFields(BaseModel):
    """What a caller may ask of one prediction (HTTP body and queue message alike)."""

    # "Exactly one of input (a string) or inputs (an object)", said in JSON Schema too,
    # so the OpenAPI document describes what the API really accepts.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "oneOf": [
                {"required": ["input"], "properties": {"input": {"type": "string"}}},
                {"required": ["inputs"], "properties": {"inputs": {"type": "object"}}},
            ]
        },
    )

    request_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = Field(
        default=None, description="Idempotency key: the same key from a tenant is the same job."
    )
    program: Name | None = Field(default=None, description="Registered program; default qa.")
    model: Name | None = Field(default=None, description="Model alias from the config.")
    input: Annotated[str, StringConstraints(max_length=MAX_FIELD_CHARS)] | None = Field(
        default=None, description="Shorthand for a program with exactly one input field."
    )
    inputs: dict[FieldName, Any] | None = Field(
        default=None, description="The program's input fields by name.", max_length=64
    )
    parameters: LMParameters = Field(default_factory=LMParameters)
    use_cache: bool = True
    cache_ttl: int | None = Field(default=None, ge=1, le=30 * 86400)
    variant: Name | None = None
    priority: Priority = "interactive"
    callback_url: Annotated[str, StringConstraints(max_length=MAX_CALLBACK_URL_CHARS)] | None = (
        Field(
            default=None,
            description="http(s) URL the fleet POSTs the finished prediction to, signed "
            "(README, Webhooks). Refused (422) when it names a private, loopback, link-local "
            "or metadata address, unless the operator allow-lists it.",
        )
    )

    @field_validator("callback_url")
    @classmethod
    def _callback_url_form(cls, url: str | None) -> str | None:
        # Only the form here: where it may point (SSRF) is the API's and the worker's
        # check (dspy_fleet/webhooks/urls.py), with the operator's allow-list in hand.
        if url is not None:
            check_callback_form(url)
        return url

    @field_validator("inputs")
    @classmethod
    def _field_sizes(cls, inputs: dict[str, Any] | None) -> dict[str, Any] | None:
        # No program can declare these names (refused at start-up); refusing them here too
        # keeps any message that carries one from getting near a DSPy call.
        if reserved := reserved_inputs(inputs or ()):
            raise ValueError(
                f"inputs may not use {', '.join(reserved)}: DSPy reserves these names in a call"
            )
        for name, value in (inputs or {}).items():
            size = len(value) if isinstance(value, str) else len(json.dumps(value, default=str))
            if size > MAX_FIELD_CHARS:
                raise ValueError(
                    f"inputs.{name} is {size} characters; the limit is {MAX_FIELD_CHARS}"
                )
        return inputs

    @model_validator(mode="after")
    def _exactly_one_input_form(self) -> PredictFields:
        if (self.input is None) == (self.inputs is None):
            raise ValueError("give exactly one of 'input' (a string) or 'inputs' (an object)")
        return self


class PredictRequest(PredictFields):
    """Body of POST /v1/predict."""

    wait: float = Field(default=0, ge=0, le=60, description="Seconds to hold the request.")


CustomId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


class BatchItem(PredictFields):
    """One item of a batch (HTTP or ``dspy-fleet submit``): ``custom_id`` plus predict fields."""

    custom_id: CustomId = Field(description="The caller's key for this item, unique per batch.")
    priority: Priority = Field(default="batch", description="Batch items default to 'batch'.")


class JobMessage(PredictFields):
    """The kwargs of a ``dspy_fleet.predict`` message, version 1."""

    v: Literal[1] = Field(description="Contract version.")
    job_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    tenant: Name = DEFAULT_TENANT
    submitted_at: datetime = Field(description="ISO 8601 time the producer accepted the job.")


def check_callback_form(url: str) -> None:
    """ValueError unless ``url`` is an absolute http or https URL with a host name, at most
    MAX_CALLBACK_URL_CHARS long (the batch's query parameter has no pydantic field)."""
    if len(url) > MAX_CALLBACK_URL_CHARS:
        raise ValueError(f"callback_url is longer than {MAX_CALLBACK_URL_CHARS} characters")
    if any(ch.isspace() for ch in url):
        raise ValueError("callback_url may not contain whitespace")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"callback_url is not a URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("callback_url must be an http or https URL")
    if not parts.hostname:
        raise ValueError("callback_url has no host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("callback_url may not carry credentials (user:password@)")


def field_errors(exc: ValidationError, root: str = "(body)") -> list[dict[str, str]]:
    """A validation error as ``[{"field", "message"}]``, the shape every error body uses.

    Inputs are never echoed back: they may hold secrets.
    """
    return [
        {"field": ".".join(str(p) for p in e["loc"]) or root, "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]


def new_job_id(tenant: str, request_id: str | None) -> str:
    """A job id: derived from the idempotency key when there is one, random otherwise."""
    if request_id is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(_JOB_NAMESPACE, f"{tenant}\x00{request_id}"))


def utcnow() -> datetime:
    """Now, timezone-aware, in UTC."""
    return datetime.now(UTC)


def build_message(
    fields: PredictFields, *, tenant: str = DEFAULT_TENANT, job_id: str | None = None
) -> JobMessage:
    """The v1 message for a validated request."""
    data = fields.model_dump(exclude={"wait"}, exclude_none=False)
    return JobMessage(
        **data,
        v=CONTRACT_VERSION,
        job_id=job_id or new_job_id(tenant, fields.request_id),
        tenant=tenant,
        submitted_at=utcnow(),
    )
