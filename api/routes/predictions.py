"""POST /v1/predict, GET /v1/predictions/<id> and DELETE /v1/predictions/<id> (cancel)."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from pydantic import ValidationError

from api.auth import visible
from api.body import check_depth
from api.limits import POLL_AGAIN_SECONDS, wait_limiter
from api.services import CacheHit, services
from api.views import job_view
from api.waiter import JobWaiter
from dspy_fleet.contract import (
    DEFAULT_TENANT,
    TERMINAL_STATUSES,
    PredictFields,
    PredictRequest,
    build_message,
    field_errors,
)
from dspy_fleet.errors import (
    InvalidJsonError,
    NotCancellableError,
    NotFoundError,
    RequestValidationError,
)
from dspy_fleet.fleet_config import FleetConfig
from dspy_fleet.plan import Plan, catalog_lookup, plan_request
from dspy_fleet.store.catalog import CatalogReader
from dspy_fleet.store.jobs import job_record
from dspy_fleet.webhooks.urls import check_url

log = logging.getLogger("dspy_fleet.api")
bp = Blueprint("predictions", __name__, url_prefix="/v1")


def _json_body() -> Any:
    check_depth(request.get_data())  # before any parser recurses into it
    body = request.get_json(force=True, silent=True)
    if body is None:
        raise InvalidJsonError("request body is not valid JSON")
    return body


def _schema_errors(exc: ValidationError) -> RequestValidationError:
    errors = field_errors(exc)
    fields = ", ".join(sorted({e["field"] for e in errors}))
    return RequestValidationError(f"invalid request: check {fields}", details={"errors": errors})


def plan_for(config: FleetConfig, catalog: CatalogReader, req: PredictFields, tenant: str) -> Plan:
    """The request's plan, by the rules the worker runs it by (dspy_fleet.plan); input
    fields are checked once a worker has published the program. Unknown program, model
    or variant: 404 (their errors carry it), with the worker's code, message and details."""
    return plan_request(config, req, catalog_lookup(catalog), tenant=tenant)


def check_callback(url: str | None) -> None:
    """422 callback_url_refused unless ``url`` (when given) may be called back (SSRF guard
    without DNS: the worker resolves and checks again when it delivers)."""
    if url is not None:
        check_url(url, services().callback_allow)


def _plan(req: PredictFields) -> Plan:
    svc = services()
    return plan_for(svc.config, svc.catalog, req, g.get("tenant") or DEFAULT_TENANT)


def _waiter() -> JobWaiter:
    svc = services()
    if svc.waiter is None:
        svc.waiter = JobWaiter(svc.redis, svc.store)
    return svc.waiter


def _answer(job: dict[str, Any], wait: float) -> tuple[Response, int]:
    capped = None
    if wait > 0 and job.get("status") not in TERMINAL_STATUSES:
        # A held request holds one of the process's slots (a connection under gevent, a
        # thread under gthread): over its tenant's (or the total) cap it is answered at
        # once, as if wait were 0 (api/limits.py says why not 429).
        with wait_limiter().slot(g.get("tenant") or DEFAULT_TENANT) as capped:
            if capped is None:
                job = _waiter().wait(job["job_id"], wait) or job
    view = job_view(job)
    status = 200 if job.get("status") in TERMINAL_STATUSES else 202
    resp = jsonify(view)
    if status == 202:
        resp.headers["Location"] = view["status_url"]
    if capped is not None:
        resp.headers["X-Wait-Capped"] = capped
        resp.headers["Retry-After"] = str(POLL_AGAIN_SECONDS)
    return resp, status


@bp.post("/predict")
def predict() -> tuple[Response, int]:
    """Submit one prediction; 202 queued, or 200 when cached or finished within ``wait``."""
    started = time.perf_counter()
    try:
        req = PredictRequest.model_validate(_json_body())
    except ValidationError as exc:
        raise _schema_errors(exc) from None
    check_callback(req.callback_url)
    plan = _plan(req)
    svc = services()
    tenant = g.get("tenant") or DEFAULT_TENANT
    # The message carries the plan's program, model and variant: the worker's own plan
    # of it then agrees with this one by construction.
    message = build_message(plan.routed(req), tenant=tenant)
    record = job_record(message)
    if message.callback_url is not None:
        # The webhook body's links are built on the root this client reached us at.
        record["api_url"] = request.url_root
    # The tenant's quotas before anything is queued (429 quota_exceeded); a replay of an
    # accepted request is not a new one, and a refused record was never accepted.
    counted = svc.admit(tenant)
    try:
        outcome = svc.submit(message, record, request_id=g.get("request_id"),
                             cache_key=plan.cache_key)  # fmt: skip
    except Exception:
        svc.refund(counted)
        raise
    if not isinstance(outcome, CacheHit) and not outcome[1]:
        svc.refund(counted)
    if isinstance(outcome, CacheHit):
        # A cache key exists only for a known version: the one whose answer this is.
        record["program_version"] = plan.version
        job = svc.serve_cached(message, record, outcome.entry, started=started)
        _log_fields(job, plan, "answered from cache without queueing", cache="l2")
        return _answer(job, min(req.wait, svc.settings.max_wait_seconds))
    job, created = outcome
    _log_fields(job, plan, "job enqueued" if created else "idempotent replay of an existing job")
    return _answer(job, min(req.wait, svc.settings.max_wait_seconds))


def _log_fields(job: dict[str, Any], plan: Plan, outcome: str, **more: Any) -> None:
    """What the request's one access-log line says about the job (api/middleware.py):
    one line per request, not two, on the hot path."""
    g.log_fields = {"job_id": job["job_id"], "program": plan.program, "model": plan.model,
                    "variant": plan.variant, "status": job.get("status"), "outcome": outcome,
                    **more}  # fmt: skip


@bp.get("/predictions/<job_id>")
def get_prediction(job_id: str) -> tuple[Response, int] | Response:
    """The job's status and, once it ended, its outputs or error and cost."""
    raw_wait = request.args.get("wait", "0")
    try:
        wait = float(raw_wait)
    except ValueError:
        wait = -1.0
    limit = services().settings.max_wait_seconds
    if not 0 <= wait <= limit:
        raise RequestValidationError(
            f"wait must be a number of seconds from 0 to {limit:g}",
            details={"errors": [{"field": "wait", "message": "out of range"}]},
        )
    job = services().store.get(job_id)
    if job is None or not visible(job.get("tenant")):
        # Another tenant's job is indistinguishable from one that does not exist.
        raise NotFoundError(f"no prediction with id {job_id!r}")
    resp, _ = _answer(job, wait)
    return resp, 200


@bp.delete("/predictions/<job_id>")
def cancel_prediction(job_id: str) -> Response:
    """Cancel a job that is still queued (or waiting to retry); 409 once it runs or ended."""
    from api.batches import cancel_job

    svc = services()
    job = svc.store.get(job_id)
    if job is None or not visible(job.get("tenant")):
        raise NotFoundError(f"no prediction with id {job_id!r}")
    outcome = cancel_job(svc.redis, svc.settings.job_ttl_seconds, job_id)
    if outcome == "missing":
        raise NotFoundError(f"no prediction with id {job_id!r}")
    if outcome != "cancelled":
        # A running job is not interrupted (a thread cannot be, and its tokens are spent).
        raise NotCancellableError(
            f"prediction {job_id!r} is {outcome} and can no longer be cancelled",
            details={"status": outcome},
        )
    log.info("job cancelled", extra={"job_id": job_id, "status": "cancelled"})
    return jsonify(job_view(svc.store.get(job_id) or {**job, "status": "cancelled"}))
