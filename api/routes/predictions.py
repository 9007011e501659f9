"""POST /v1/predict, GET /v1/predictions/<id> and DELETE /v1/predictions/<id> (cancel)."""

from __future__ import annotations

import logging
import time
from typing import Any

from flask import Blueprint, Response, g, jsonify, request
from pydantic import ValidationError

from api.auth import visible
from api.errors import BadRequest, Conflict, NotFound, ValidationFailed
from api.services import CacheHit, services
from api.views import job_view
from api.waiter import JobWaiter
from worker.contract import DEFAULT_TENANT, PredictRequest, build_message, field_errors
from worker.jobs import TERMINAL
from worker.routing import Route, bind_inputs, cache_key, resolve

log = logging.getLogger("dspy_fleet.api")
bp = Blueprint("predictions", __name__, url_prefix="/v1")


def _json_body() -> Any:
    body = request.get_json(force=True, silent=True)
    if body is None:
        raise BadRequest("request body is not valid JSON")
    return body


def _schema_errors(exc: ValidationError) -> ValidationFailed:
    errors = field_errors(exc)
    fields = ", ".join(sorted({e["field"] for e in errors}))
    return ValidationFailed(f"invalid request: check {fields}", details={"errors": errors})


def _plan(req: PredictRequest) -> tuple[Route, str | None]:
    """Resolve program, variant and model (404 for unknown names) and, when possible, the
    cache key. Input fields are checked here when a worker has published the program."""
    svc = services()
    cfg = svc.config
    program = req.program or cfg.default_program
    if program not in cfg.programs:
        raise NotFound(f"unknown program {program!r}", code="unknown_program",
                       details={"programs": sorted(cfg.programs)})  # fmt: skip
    variants = cfg.programs[program].variants
    if req.variant is not None and req.variant not in variants:
        raise NotFound(f"program {program!r} has no variant {req.variant!r}",
                       code="unknown_variant", details={"variants": sorted(variants)})  # fmt: skip
    if req.model is not None and req.model not in cfg.models:
        raise NotFound(f"unknown model {req.model!r}", code="unknown_model",
                       details={"models": sorted(cfg.models)})  # fmt: skip
    entry = svc.catalog.get(program)
    inputs = req.inputs
    if entry is not None:
        inputs = bind_inputs(entry["input_fields"], req.input, req.inputs)
        if inputs is None:
            fields = entry["input_fields"]
            raise ValidationFailed(
                f"program {program!r} takes inputs {', '.join(fields)}"
                + ("" if req.input is None else "; send them by name in 'inputs'"),
                details={"input_fields": fields, "errors": [
                    {"field": "inputs" if req.input is None else "input",
                     "message": f"expected fields: {', '.join(fields)}"}]},
            )  # fmt: skip
    params = req.parameters.effective()
    route = resolve(cfg, program, model=req.model, variant=req.variant, inputs=inputs,
                    params=params)  # fmt: skip
    key = None
    if req.use_cache and entry is not None and inputs is not None:
        arm = entry["variants"].get(route.variant) if route.variant else entry
        if arm and arm.get("version"):
            key = cache_key(program, arm["version"], route.model, inputs, params)
    return route, key


def _waiter() -> JobWaiter:
    svc = services()
    waiter = getattr(svc, "waiter", None)
    if waiter is None:
        waiter = svc.waiter = JobWaiter(svc.redis, svc.store)
    return waiter


def _answer(job: dict[str, Any], wait: float) -> tuple[Response, int]:
    if wait > 0 and job.get("status") not in TERMINAL:
        job = _waiter().wait(job["job_id"], wait) or job
    view = job_view(job)
    status = 200 if job.get("status") in TERMINAL else 202
    resp = jsonify(view)
    if status == 202:
        resp.headers["Location"] = view["status_url"]
    return resp, status


@bp.post("/predict")
def predict() -> tuple[Response, int]:
    """Submit one prediction; 202 queued, or 200 when cached or finished within ``wait``."""
    started = time.perf_counter()
    try:
        req = PredictRequest.model_validate(_json_body())
    except ValidationError as exc:
        raise _schema_errors(exc) from None
    route, key = _plan(req)
    svc = services()
    tenant = g.get("tenant") or DEFAULT_TENANT
    fixed = req.model_copy(update={"program": route.program, "model": route.model,
                                   "variant": route.variant})  # fmt: skip
    message = build_message(fixed, tenant=tenant)
    record = {"program": route.program, "model": route.model, "variant": route.variant,
              "tenant": tenant, "request_id": req.request_id, "queue": req.priority,
              "created_at": message.submitted_at}  # fmt: skip
    outcome = svc.submit(message, record, request_id=g.get("request_id"), cache_key=key)
    if isinstance(outcome, CacheHit):
        job = svc.serve_cached(message, record, outcome.entry, started=started)
        _log_fields(job, route, "answered from cache without queueing", cache="l2")
        return _answer(job, min(req.wait, svc.settings.max_wait_seconds))
    job, created = outcome
    _log_fields(job, route, "job enqueued" if created else "idempotent replay of an existing job")
    return _answer(job, min(req.wait, svc.settings.max_wait_seconds))


def _log_fields(job: dict[str, Any], route: Route, outcome: str, **more: Any) -> None:
    """What the request's one access-log line says about the job (api/middleware.py):
    one line per request, not two, on the hot path."""
    g.log_fields = {"job_id": job["job_id"], "program": route.program, "model": route.model,
                    "variant": route.variant, "status": job.get("status"), "outcome": outcome,
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
        raise ValidationFailed(
            f"wait must be a number of seconds from 0 to {limit:g}",
            details={"errors": [{"field": "wait", "message": "out of range"}]},
        )
    job = services().store.get(job_id)
    if job is None or not visible(job.get("tenant")):
        # Another tenant's job is indistinguishable from one that does not exist.
        raise NotFound(f"no prediction with id {job_id!r}")
    resp, _ = _answer(job, wait)
    return resp, 200


@bp.delete("/predictions/<job_id>")
def cancel_prediction(job_id: str) -> Response:
    """Cancel a job that is still queued (or waiting to retry); 409 once it runs or ended."""
    from api.batches import cancel_job

    svc = services()
    job = svc.store.get(job_id)
    if job is None or not visible(job.get("tenant")):
        raise NotFound(f"no prediction with id {job_id!r}")
    outcome = cancel_job(svc.redis, svc.settings.job_ttl_seconds, job_id)
    if outcome == "missing":
        raise NotFound(f"no prediction with id {job_id!r}")
    if outcome != "cancelled":
        # A running job is not interrupted (a thread cannot be, and its tokens are spent).
        raise Conflict(
            f"prediction {job_id!r} is {outcome} and can no longer be cancelled",
            code="not_cancellable",
            details={"status": outcome},
        )
    log.info("job cancelled", extra={"job_id": job_id, "status": "cancelled"})
    return jsonify(job_view(svc.store.get(job_id) or {**job, "status": "cancelled"}))
