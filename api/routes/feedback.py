"""Feedback on predictions and the A/B report of a program's variants.

POST/GET /v1/predictions/<id>/feedback and GET /v1/programs/<name>/report. The samples
live in Redis (dspy_fleet/store/feedback.py); the statistics are dspy_fleet/abtest.py's,
whose scipy/statsmodels imports happen on the first report, not at start.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from pydantic import ValidationError

from api import metrics
from api.auth import visible
from api.routes.predictions import _json_body, _schema_errors
from api.services import services
from dspy_fleet.contract import utcnow
from dspy_fleet.errors import (
    NotFoundError,
    NotSucceededError,
    RequestValidationError,
    UnknownProgramError,
)
from dspy_fleet.fleet_config import TraceConfig
from dspy_fleet.schemas import FeedbackRequest
from dspy_fleet.store.feedback import KEEP_DAYS, FeedbackStore

log = logging.getLogger("dspy_fleet.api")
bp = Blueprint("feedback", __name__, url_prefix="/v1")
DEFAULT_REPORT_DAYS = 7
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")


def _store() -> FeedbackStore:
    return services().feedback


def _visible_job(job_id: str) -> dict[str, Any]:
    job = services().store.get(job_id)
    if job is None or not visible(job.get("tenant")):
        # Another tenant's job is indistinguishable from one that does not exist.
        raise NotFoundError(f"no prediction with id {job_id!r}")
    return job


@bp.post("/predictions/<job_id>/feedback")
def post_feedback(job_id: str) -> tuple[Response, int]:
    """Store one source's feedback on a succeeded prediction: 201 new, 200 replaced."""
    try:
        req = FeedbackRequest.model_validate(_json_body())
    except ValidationError as exc:
        raise _schema_errors(exc) from None
    job = _visible_job(job_id)
    program = job.get("program") or ""
    doc = {"prediction_id": job_id, **req.model_dump(exclude_none=True),
           "program": program, "variant": job.get("variant") or "none",
           "created_at": utcnow().isoformat().replace("+00:00", "Z")}  # fmt: skip
    cfg = services().config.programs.get(program)
    tracing = cfg.traces if cfg is not None else TraceConfig()
    posted = _store().post(job_id, program, req.source, doc,
                           trace_ttl_seconds=int(tracing.ttl_days * 86400),
                           trace_cap=tracing.max_traces)  # fmt: skip
    if posted.status == "missing":
        raise NotFoundError(f"no prediction with id {job_id!r}")
    if posted.status != "ok":
        raise NotSucceededError(
            f"prediction {job_id!r} is {posted.status}: only a succeeded prediction takes feedback",
            details={"status": posted.status},
        )
    variant = posted.variant or "none"
    metrics.FEEDBACK.labels(program, variant).inc()
    metrics.FEEDBACK_SCORE.labels(program, variant).observe(req.score)
    outcome = "feedback replaced" if posted.replaced else "feedback stored"
    g.log_fields = {"job_id": job_id, "program": program, "variant": variant, "outcome": outcome}
    return jsonify({**doc, "replaced": posted.replaced}), 200 if posted.replaced else 201


@bp.get("/predictions/<job_id>/feedback")
def get_feedback(job_id: str) -> Response:
    """Every source's feedback on the prediction (the caller's own predictions only)."""
    job = _visible_job(job_id)
    return jsonify({"prediction_id": job_id, "feedback": _store().of_job(job)})


def _since(raw: str | None) -> datetime:
    now = datetime.now(UTC)
    if raw is None:
        return now - timedelta(days=DEFAULT_REPORT_DAYS)
    return max(parse_time(raw), now - timedelta(days=KEEP_DAYS))


def parse_time(raw: str) -> datetime:
    """A ``since`` query parameter: a date (midnight UTC) or an ISO 8601 time (UTC when it
    names no zone); RequestValidationError (422) otherwise."""
    try:
        if len(raw) == 10:
            value = datetime.combine(date.fromisoformat(raw), datetime.min.time(), UTC)
        else:
            value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
    except ValueError:
        raise RequestValidationError(
            "since must be a date (2026-01-31) or an ISO 8601 time (2026-01-31T12:00:00Z)",
            details={"errors": [{"field": "since", "message": "expected ISO 8601"}]},
        ) from None
    return value


def name_param(name: str) -> str | None:
    raw = request.args.get(name)
    if raw is not None and not (0 < len(raw) <= 64 and set(raw) <= _NAME_CHARS):
        raise RequestValidationError(
            f"{name} must be a name of 1 to 64 letters, digits or _ . : -",
            details={"errors": [{"field": name, "message": "invalid name"}]},
        )
    return raw


@bp.get("/programs/<program>/report")
def report(program: str) -> Response:
    """The program's A/B report over jobs finished since ``since`` (default: 7 days);
    a tenant's own jobs and feedback only, an admin's: everyone's."""
    from dspy_fleet import abtest  # scipy/statsmodels: on the first report only

    svc = services()
    cfg = svc.config.programs.get(program)
    if cfg is None:
        raise UnknownProgramError(f"unknown program {program!r}",
                                  details={"program": program})  # fmt: skip
    since = _since(request.args.get("since"))
    control = name_param("control")
    source = name_param("source")
    version = name_param("version")
    known = sorted(cfg.variants) or ["none"]
    if control is not None and control not in known:
        raise RequestValidationError(
            f"control: program {program!r} has no variant {control!r}",
            details={"errors": [{"field": "control", "message": "unknown variant"}]},
        )
    outcomes, scores = _store().samples(program, since.timestamp(),
                                        tenant=g.get("tenant_filter"), source=source,
                                        version=version)  # fmt: skip
    body = abtest.report(outcomes, scores, control=control, known=known)
    return jsonify({"program": program, "since": since.isoformat().replace("+00:00", "Z"),
                    "until": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                    "source": source, "version": version, **body})  # fmt: skip
