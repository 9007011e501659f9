"""Serve a planned job despite a failing provider: breaker, retries, fallbacks, cache.

Order of resort: the cache; the primary model (if its breaker allows); a retry of
the whole job through Celery for a transient fault; then each fallback model;
then a clear error (``circuit_open`` or the provider's).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker import metrics
from worker.breaker import Decision
from worker.contract import JobMessage, utcnow
from worker.errors import CircuitOpenError, JobError, ProviderError, RetryJob
from worker.predict import Usage, call_program
from worker.routing import cache_key
from worker.runtime import Runtime

if TYPE_CHECKING:
    from worker.runner import Plan

log = logging.getLogger("dspy_fleet.worker")


@dataclass(frozen=True)
class Served:
    """An answer and who gave it."""

    entry: dict[str, Any]
    source: str  # "l1", "l2", "coalesced" or "computed"
    model: str  # the alias that actually served (a fallback, maybe)


def serve(rt: Runtime, plan: Plan, msg: JobMessage, usage: Usage, attempt: int,
          decision: Decision | None = None) -> Served:  # fmt: skip
    """The job's answer; raises RetryJob (retry later) or a JobError (give up).

    ``decision`` is the primary model's breaker, asked already (as the job started)."""
    primary = plan.route.model
    try:
        return _serve_with(rt, plan, msg, primary, usage, decision)
    except CircuitOpenError as exc:
        reason: JobError = exc
    except ProviderError as exc:
        if _may_retry(rt, primary, exc, attempt):
            raise RetryJob(_countdown(rt, attempt, exc), exc) from None
        reason = exc
    tried = [primary]
    for fallback in rt.config.models[primary].fallbacks:
        tried.append(fallback)
        try:
            served = _serve_with(rt, plan, msg, fallback, usage)
        except (CircuitOpenError, ProviderError) as exc:
            log.warning("fallback %s could not serve either: %s", fallback, exc.code)
            continue
        log.warning("served by fallback model %s instead of %s (%s)", fallback, primary,
                    reason.code, extra={"model": fallback})  # fmt: skip
        return served
    reason.details = {**reason.details, "models_tried": tried, "attempts": attempt}
    raise reason


def _serve_with(rt: Runtime, plan: Plan, msg: JobMessage, model: str, usage: Usage,
                asked: Decision | None = None) -> Served:  # fmt: skip
    key = plan.key if model == plan.route.model else cache_key(
        plan.route.program, plan.program.version, model, plan.inputs, plan.params
    )  # fmt: skip

    def compute() -> dict[str, Any]:
        decision = asked or rt.breakers.allow(model)
        if not decision.allowed:
            raise CircuitOpenError(model, decision.retry_after)
        try:
            outputs = call_program(plan.program.module, rt.models.get(model), plan.inputs,
                                   plan.params, usage)  # fmt: skip
        except ProviderError as exc:
            metrics.ERRORS.labels(model, exc.code).inc()
            rt.breakers.record(model, ok=False)
            raise
        except JobError:
            if decision.success_matters:  # the provider answered; the fault is ours
                rt.breakers.record(model, ok=True)
            raise
        if decision.success_matters:
            rt.breakers.record(model, ok=True)
        return {"outputs": outputs, "model": model, "program_version": plan.program.version,
                "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                "created_at": utcnow().isoformat()}  # fmt: skip

    if not msg.use_cache:
        return Served(compute(), "computed", model)
    ttl = msg.cache_ttl or rt.settings.cache_ttl_seconds
    entry, source = rt.cache.get_or_compute(key, ttl, msg.job_id, compute)
    return Served(entry, source, model)


def _may_retry(rt: Runtime, model: str, exc: ProviderError, attempt: int) -> bool:
    limit = rt.config.models[model].max_retries
    limit = rt.settings.max_retries if limit is None else limit
    if attempt > limit:
        return False
    return exc.retry_after is None or exc.retry_after <= rt.settings.retry_after_max_seconds


def _countdown(rt: Runtime, attempt: int, exc: ProviderError) -> float:
    """Exponential backoff with full jitter, never sooner than the provider's Retry-After."""
    s = rt.settings
    jitter = random.uniform(0, min(s.retry_backoff_max_seconds,
                                   s.retry_backoff_seconds * 2 ** (attempt - 1)))  # fmt: skip
    return round(max(exc.retry_after or 0.0, jitter), 3)
