"""Run one job: validate the message, call the DSPy program, record the outcome.

Plain functions over a :class:`Runtime`, so they are testable without Celery;
``worker.tasks`` is the thin Celery wrapper around :func:`execute`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from pydantic import ValidationError

from worker import metrics
from worker.contract import JobMessage, utcnow
from worker.cost import CostRecord, cost_usd, price_for
from worker.dspy_env import dspy
from worker.errors import (
    FleetError,
    JobError,
    JobFailed,
    JobTimeoutError,
    MessageValidationError,
    OutputParseError,
)
from worker.jobs import TERMINAL
from worker.lm import map_provider_error
from worker.logs import log_context
from worker.runtime import Runtime

log = logging.getLogger("dspy_fleet.worker")


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _validation_error(exc: ValidationError) -> MessageValidationError:
    errors = [
        {"field": ".".join(str(p) for p in e["loc"]) or "(message)", "message": e["msg"]}
        for e in exc.errors(include_url=False, include_input=False)
    ]
    return MessageValidationError(
        "job message does not match contract v1", details={"errors": errors}
    )


def _stored_outcome(job: dict[str, Any]) -> dict[str, Any]:
    """The result of a job that already ended (a redelivered or replayed message)."""
    if job["status"] == "succeeded":
        return _envelope(job)
    raise JobFailed(job.get("error") or {"code": job["status"], "message": f"job {job['status']}"})


def _envelope(job: dict[str, Any]) -> dict[str, Any]:
    keys = ("job_id", "status", "program", "model", "variant", "outputs", "cost", "finished_at")
    return {"v": 1, **{k: job.get(k) for k in keys}}


def execute(
    rt: Runtime,
    raw: dict[str, Any],
    *,
    task_id: str,
    request_id: str | None,
    attempt: int = 1,
    queue: str | None = None,
) -> dict[str, Any]:
    """Run the job in ``raw`` (the message kwargs); return its envelope or raise JobFailed."""
    job_id = raw.get("job_id") if isinstance(raw.get("job_id"), str) else task_id
    with log_context(job_id=job_id, request_id=request_id, tenant=raw.get("tenant")):
        try:
            msg = JobMessage.model_validate(raw)
        except ValidationError as exc:
            err = _validation_error(exc)
            log.warning("rejected malformed job message", extra={"status": "failed"})
            rt.store.start(job_id, {"created_at": utcnow()}, {"status": "running"})
            _finish_failed(rt, job_id, err, cost=None, labels=("unknown", "unknown", "none"))
            raise JobFailed(err.to_dict()) from None
        return _run(rt, msg, attempt=attempt, queue=queue or msg.priority)


def _run(rt: Runtime, msg: JobMessage, *, attempt: int, queue: str) -> dict[str, Any]:
    program_name = msg.program or rt.config.default_program
    alias = rt.config.model_for(program_name, msg.model)
    variant = msg.variant
    meta = {
        "created_at": msg.submitted_at,
        "program": program_name,
        "model": alias,
        "tenant": msg.tenant,
        "request_id": msg.request_id,
        "queue": queue,
    }
    prev = rt.store.start(
        msg.job_id, meta, {"status": "running", "started_at": utcnow(), "attempts": attempt}
    )
    if prev in TERMINAL:
        log.info("job already finished; not running it again", extra={"status": prev})
        job = rt.store.get(msg.job_id)
        assert job is not None
        return _stored_outcome(job)

    labels = (program_name, alias, variant or "none")
    with log_context(program=program_name, model=alias, variant=variant):
        started = time.perf_counter()
        tokens = {"input": 0, "output": 0}
        metrics.ACTIVE.inc()
        try:
            program = rt.registry.get(program_name)
            inputs = program.bind_inputs(msg.input, msg.inputs)
            lm = rt.models.get(alias)
            params = msg.parameters.effective()
            if params:
                lm = lm.copy(**params)
            with dspy.context(lm=lm, track_usage=True), _usage() as tracker:
                try:
                    prediction = program.module(**inputs)
                finally:
                    tokens = _token_totals(tracker)
            outputs = _json_safe(prediction.toDict())
        except BaseException as exc:  # noqa: BLE001 - every failure must be recorded
            err = _as_job_error(exc)
            cost = _cost(rt, alias, tokens, started, attempt, variant)
            _finish_failed(rt, msg.job_id, err, cost=cost, labels=labels)
            if not isinstance(exc, Exception):
                raise
            raise JobFailed(err.to_dict()) from None
        finally:
            metrics.ACTIVE.dec()
        cost = _cost(rt, alias, tokens, started, attempt, variant)
        fields = {
            "status": "succeeded",
            "outputs": outputs,
            "cost": cost.to_dict(),
            "finished_at": utcnow(),
        }
        rt.store.finish(msg.job_id, fields)
        _observe(labels, "succeeded", cost)
        log.info(
            "prediction succeeded",
            extra={
                "status": "succeeded",
                "latency_ms": cost.latency_ms,
                "cache": "miss",
                "input_tokens": cost.input_tokens,
                "output_tokens": cost.output_tokens,
                "cost_usd": cost.cost_usd,
            },
        )
        return _envelope({**meta, **fields, "job_id": msg.job_id, "variant": variant})


def _usage():
    from dspy.utils.usage_tracker import track_usage

    return track_usage()


def _token_totals(tracker: Any) -> dict[str, int]:
    totals = {"input": 0, "output": 0}
    for usage in tracker.get_total_tokens().values():
        totals["input"] += int(usage.get("prompt_tokens") or 0)
        totals["output"] += int(usage.get("completion_tokens") or 0)
    return totals


def _cost(
    rt: Runtime,
    alias: str,
    tokens: dict[str, int],
    started: float,
    attempt: int,
    variant: str | None,
) -> CostRecord:
    cfg = rt.config.models.get(alias)
    price = price_for(cfg) if cfg else None
    if price is None and (tokens["input"] or tokens["output"]):
        log.warning("no price known for model; cost_usd is null", extra={"model": alias})
    return CostRecord(
        model=alias,
        provider_model=cfg.litellm_model if cfg else alias,
        input_tokens=tokens["input"],
        output_tokens=tokens["output"],
        cost_usd=cost_usd(price, tokens["input"], tokens["output"]),
        cached=False,
        latency_ms=round((time.perf_counter() - started) * 1000, 2),
        attempts=attempt,
        variant=variant,
    )


def _as_job_error(exc: BaseException) -> JobError:
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
    log.error("unexpected error while running a job", exc_info=exc)
    return JobError(f"internal error: {type(exc).__name__}")


def _finish_failed(
    rt: Runtime,
    job_id: str,
    err: JobError,
    *,
    cost: CostRecord | None,
    labels: tuple[str, str, str],
) -> None:
    fields = {
        "status": "failed",
        "error": err.to_dict(),
        "finished_at": utcnow(),
        "cost": cost.to_dict() if cost else None,
    }
    rt.store.finish(job_id, fields)
    metrics.ERRORS.labels(labels[1], err.code).inc()
    _observe(labels, "failed", cost)
    log.warning(
        "prediction failed: %s",
        err.message,
        extra={
            "status": "failed",
            "error_code": err.code,
            "latency_ms": cost.latency_ms if cost else None,
        },
    )


def _observe(labels: tuple[str, str, str], status: str, cost: CostRecord | None) -> None:
    program, model, variant = labels
    metrics.PREDICTIONS.labels(program, model, variant, status).inc()
    if cost is None:
        return
    metrics.PREDICTION_DURATION.labels(program, model).observe(cost.latency_ms / 1000)
    metrics.TOKENS.labels(model, "input").inc(cost.input_tokens)
    metrics.TOKENS.labels(model, "output").inc(cost.output_tokens)
    if cost.cost_usd:
        metrics.COST.labels(model, variant).inc(cost.cost_usd)
