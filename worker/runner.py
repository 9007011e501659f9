"""Run one job: validate the message, plan it, answer from cache or the model, record it.

Plain functions over a :class:`Runtime`, so they are testable without Celery;
``worker.tasks`` is the thin Celery wrapper around :func:`execute`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from pydantic import ValidationError

from worker import ledger, metrics
from worker.breaker import Decision
from worker.contract import JobMessage, field_errors, utcnow
from worker.cost import CostRecord, cost_usd, price_for
from worker.errors import (
    JobError,
    JobFailed,
    MessageValidationError,
    ProviderError,
    RetryJob,
    UnknownVariantError,
)
from worker.jobs import TERMINAL
from worker.logs import log_context
from worker.predict import Usage, as_job_error
from worker.programs import LoadedProgram
from worker.resilience import serve
from worker.routing import Route, cache_key, resolve
from worker.runtime import Runtime

log = logging.getLogger("dspy_fleet.worker")


@dataclass(frozen=True)
class Plan:
    """Everything decided about a job before any model is called."""

    route: Route
    program: LoadedProgram
    inputs: dict[str, Any]
    params: dict[str, Any]
    key: str


def _validation_error(exc: ValidationError) -> MessageValidationError:
    return MessageValidationError(
        "job message does not match contract v1",
        details={"errors": field_errors(exc, root="(message)")},
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
            _finish_failed(rt, job_id, err, cost=None, dims=None)
            raise JobFailed(err.to_dict()) from None
        return _run(rt, msg, attempt=attempt, queue=queue or msg.priority)


def make_plan(rt: Runtime, msg: JobMessage) -> Plan:
    """Resolve program, variant, model, inputs and cache key; JobError if any is invalid."""
    name = msg.program or rt.config.default_program
    base = rt.registry.get(name)
    inputs = base.bind_inputs(msg.input, msg.inputs)
    params = msg.parameters.effective()
    variants = rt.config.programs[name].variants
    if msg.variant is not None and msg.variant not in variants:
        raise UnknownVariantError(
            f"program {name!r} has no variant {msg.variant!r}",
            details={"variants": sorted(variants)},
        )
    route = resolve(rt.config, name, model=msg.model, variant=msg.variant, inputs=inputs,
                    params=params)  # fmt: skip
    rt.models.model_config(route.model)  # UnknownModelError before anything runs
    program = rt.registry.get(name, route.variant)
    key = cache_key(name, program.version, route.model, inputs, params)
    return Plan(route=route, program=program, inputs=inputs, params=params, key=key)


def _run(rt: Runtime, msg: JobMessage, *, attempt: int, queue: str) -> dict[str, Any]:
    program_name = msg.program or rt.config.default_program
    plan: Plan | None = None
    error: JobError | None = None
    try:
        plan = make_plan(rt, msg)
    except JobError as exc:
        error = exc
    route = plan.route if plan else None
    meta = {
        "created_at": msg.submitted_at,
        "program": program_name,
        "model": route.model if route else msg.model or rt.config.model_for(program_name, None),
        "variant": route.variant if route else msg.variant,
        "tenant": msg.tenant,
        "request_id": msg.request_id,
        "queue": queue,
    }
    # Without the cache, the job calls its model at once: its breaker is asked in the
    # same round trip that claims the job (one fewer per job on the hot path).
    ask = rt.breakers.allow_call(plan.route.model) if plan and not msg.use_cache else None
    prev, reply = rt.store.start(
        msg.job_id,
        meta,
        {"status": "running", "started_at": utcnow(), "attempts": attempt},
        then=ask,
    )
    if prev in TERMINAL:
        log.info("job already finished; not running it again", extra={"status": prev})
        job = rt.store.get(msg.job_id)
        assert job is not None
        return _stored_outcome(job)
    with log_context(program=meta["program"], model=meta["model"], variant=meta["variant"]):
        if plan is None:
            assert error is not None
            _finish_failed(rt, msg.job_id, error, cost=None, dims=None)
            raise JobFailed(error.to_dict())
        decision = rt.breakers.decide(plan.route.model, reply) if reply is not None else None
        return _predict(rt, msg, plan, attempt, meta, decision)


def _predict(rt: Runtime, msg: JobMessage, plan: Plan, attempt: int, meta: dict[str, Any],
             decision: Decision | None) -> dict[str, Any]:  # fmt: skip
    usage = Usage()
    started = time.perf_counter()
    metrics.ACTIVE.inc()
    try:
        served = serve(rt, plan, msg, usage, attempt, decision)
    except RetryJob as retry:
        rt.store.update(msg.job_id, {"status": "retrying", "attempts": attempt,
                                     "error": retry.error.to_dict(),
                                     "retry_in_seconds": retry.countdown})  # fmt: skip
        log.warning(
            "transient provider error; retrying in %.2fs (attempt %d)",
            retry.countdown,
            attempt,
            extra={"status": "retrying", "error_code": retry.error.code},
        )
        raise
    except redis.RedisError:
        raise  # our infrastructure failed, not the job: the task hands the message back
    except Exception as exc:
        err = as_job_error(exc)
        route = plan.route
        dims = (route.model, route.variant or "none", route.program, msg.tenant)
        cost = _cost(rt, route.model, route.variant, usage, started, attempt, entry=None)
        _finish_failed(rt, msg.job_id, err, cost=cost, dims=dims)
        raise JobFailed(err.to_dict()) from None
    # Anything else (SystemExit on a hard shutdown) is not the job's fault: the job is
    # left unfinished so that its redelivered message runs it again.
    finally:
        metrics.ACTIVE.dec()
    model = served.model  # a fallback, maybe: the model that served is the one billed
    cached = served.source != "computed"
    cost = _cost(rt, model, plan.route.variant, usage, started, attempt,
                 entry=served.entry if cached else None)  # fmt: skip
    fields: dict[str, Any] = {"status": "succeeded", "outputs": served.entry["outputs"],
                              "cost": cost.to_dict(), "finished_at": utcnow(), "model": model,
                              "attempts": attempt}  # fmt: skip
    if model != plan.route.model:
        fields["requested_model"] = plan.route.model
    dims = (model, plan.route.variant or "none", plan.route.program, msg.tenant)
    earlier = _finish(rt, msg.job_id, fields, dims)
    if earlier is not None:
        return earlier
    log.info(
        "prediction succeeded",
        extra={"status": "succeeded", "model": model, "latency_ms": cost.latency_ms,
               "cache": served.source if cached else "miss", "input_tokens": cost.input_tokens,
               "output_tokens": cost.output_tokens, "cost_usd": cost.cost_usd},
    )  # fmt: skip
    return _envelope({**meta, **fields, "job_id": msg.job_id})


def _cost(rt: Runtime, model: str, variant: str | None, usage: Usage, started: float,
          attempt: int, entry: dict[str, Any] | None) -> CostRecord:  # fmt: skip
    """The job's cost record; ``entry`` is the cache entry when the answer was not computed."""
    cfg = rt.config.models[model]
    latency = round((time.perf_counter() - started) * 1000, 2)
    price = price_for(cfg)
    record = CostRecord(
        model=model, provider_model=cfg.litellm_model, input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens, cost_usd=None, cached=entry is not None,
        latency_ms=latency, attempts=attempt, variant=variant,
    )  # fmt: skip
    if entry is not None:
        record.saved_input_tokens = int(entry.get("input_tokens") or 0)
        record.saved_output_tokens = int(entry.get("output_tokens") or 0)
        record.cost_usd = 0.0
        record.saved_cost_usd = cost_usd(price, record.saved_input_tokens,
                                         record.saved_output_tokens)  # fmt: skip
        return record
    record.cost_usd = cost_usd(price, usage.input_tokens, usage.output_tokens)
    if record.cost_usd is None and (usage.input_tokens or usage.output_tokens):
        log.warning("no price known for this model; cost_usd is null", extra={"cost_usd": None})
    return record


def _finish(rt: Runtime, job_id: str, fields: dict[str, Any],
            dims: tuple[str, str, str, str]) -> dict[str, Any] | None:  # fmt: skip
    """Finish a succeeded job once; if a concurrent copy finished it first, return that."""
    cost = CostRecord(**fields["cost"])
    bill = ledger.make_bill(fields["cost"], status="succeeded", dims=dims, day=utcnow().date())
    if not rt.store.finish(job_id, fields, bill=bill):
        log.warning("job was finished by another delivery; keeping that result")
        job = rt.store.get(job_id)
        assert job is not None
        return _stored_outcome(job)
    _observe(dims, "succeeded", cost)
    return None


def _finish_failed(rt: Runtime, job_id: str, err: JobError, *, cost: CostRecord | None,
                   dims: tuple[str, str, str, str] | None) -> None:  # fmt: skip
    fields = {"status": "failed", "error": err.to_dict(), "finished_at": utcnow(),
              "cost": cost.to_dict() if cost else None}  # fmt: skip
    bill = None
    if dims and cost:
        bill = ledger.make_bill(fields["cost"], status="failed", dims=dims, day=utcnow().date())
    if not rt.store.finish(job_id, fields, bill=bill):
        log.warning("job was finished by another delivery; this failure is not recorded")
        return
    labels = dims or ("unknown", "none", "unknown", "")
    if not isinstance(err, ProviderError):  # provider faults were counted as they happened
        metrics.ERRORS.labels(labels[0], err.code).inc()
    _observe(labels, "failed", cost)
    log.warning(
        "prediction failed: %s", err.message,
        extra={"status": "failed", "error_code": err.code,
               "latency_ms": cost.latency_ms if cost else None},
    )  # fmt: skip


def _observe(dims: tuple[str, str, str, str], status: str, cost: CostRecord | None) -> None:
    model, variant, program, _tenant = dims
    metrics.PREDICTIONS.labels(program, model, variant, status).inc()
    if cost is None:
        return
    metrics.PREDICTION_DURATION.labels(program, model).observe(cost.latency_ms / 1000)
    metrics.TOKENS.labels(model, "input").inc(cost.input_tokens)
    metrics.TOKENS.labels(model, "output").inc(cost.output_tokens)
    if cost.cost_usd:
        metrics.COST.labels(model, variant).inc(cost.cost_usd)
