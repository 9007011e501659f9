"""Serve a planned job despite a failing provider: breaker, retries, fallbacks, cache.

Order of resort: the cache; the primary model (if its breaker allows); a retry of
the whole job, scheduled in the due-time index, for a transient fault; then each fallback model;
then a clear error (``circuit_open`` or the provider's).

Every provider call first asks the tenant's budget (dspy_fleet/store/quotas.py), then
takes its turn at the model's provider limits (fleet-wide
pacing, dspy_fleet/store/pacing.py): a short wait is slept here, a longer one hands the
job back (``Throttled``) without spending an attempt. A provider 429 is pacing news, not
a fault: it slows the model down for the whole fleet and hands the job back for its new
turn; it is never retried as an attempt, never sent to a fallback, never a breaker fault.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import redis

from dspy_fleet.contract import JobMessage, utcnow
from dspy_fleet.errors import (
    CircuitOpenError,
    JobError,
    ProviderError,
    RetryJob,
    Throttled,
)
from dspy_fleet.plan import Plan
from dspy_fleet.store.breakers import Decision
from dspy_fleet.store.pacing import Admission
from worker import metrics
from worker.predict import OnAnswer, Usage, call_program
from worker.programs import LoadedProgram
from worker.runtime import Runtime

log = logging.getLogger("dspy_fleet.worker")


@dataclass(frozen=True)
class Served:
    """An answer and who gave it."""

    entry: dict[str, Any]
    source: str  # "l1", "l2", "coalesced" or "computed"
    model: str  # the alias that actually served (a fallback, maybe)


def serve(rt: Runtime, plan: Plan, program: LoadedProgram, msg: JobMessage, usage: Usage,
          attempt: int, decision: Decision | None = None) -> Served:  # fmt: skip
    """The job's answer; raises RetryJob (retry later) or a JobError (give up).

    ``program`` is the plan's loaded program state; ``decision`` is the primary model's
    breaker, asked already (as the job started)."""
    primary = plan.model
    try:
        return _serve_with(rt, plan, program, msg, primary, usage, decision)
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
            served = _serve_with(rt, plan, program, msg, fallback, usage)
        except (CircuitOpenError, ProviderError) as exc:
            log.warning("fallback %s could not serve either: %s", fallback, exc.code)
            continue
        log.warning("served by fallback model %s instead of %s (%s)", fallback, primary,
                    reason.code, extra={"model": fallback})  # fmt: skip
        return served
    reason.details = {**reason.details, "models_tried": tried, "attempts": attempt}
    raise reason


def _serve_with(rt: Runtime, plan: Plan, program: LoadedProgram, msg: JobMessage, model: str,
                usage: Usage, asked: Decision | None = None) -> Served:  # fmt: skip
    def compute() -> dict[str, Any]:
        decision = asked
        ended = False  # the admission's flight, ended by the first outcome recorded
        try:
            # The tenant's budget first: a job whose tenant ran out while it waited fails
            # here (budget_exhausted), before the breaker, the pacer or the provider hear of
            # it. Its reservation is turned into spend by the finish script, or dropped when
            # the job goes back to wait or retry (worker/runner.py); it lapses after the
            # time limit.
            rt.quotas.reserve(msg.tenant, msg.job_id, model, rt.settings.time_limit)
            decision = asked or rt.breakers.allow(model)
            if not decision.allowed:
                raise CircuitOpenError(model, decision.retry_after)
            admitted = decision

            def answered(ok: bool, nth: int) -> None:
                # Recorded as each provider call returns or raises, before DSPy parses it,
                # and numbered by the record script: "N in a row" is in the order the
                # provider answered (as far as the worker sees it), not the order jobs were
                # admitted. The admission counted the job's first call into the rate window
                # and into the calls in flight; not others. A success recorded while this
                # call was in flight breaks a run (`seen`).
                nonlocal ended
                rt.breakers.record(model, ok, uncounted=nth > 1 or not admitted.counted,
                                   seen=admitted.oks,
                                   admitted=0 if ended else admitted.call)  # fmt: skip
                ended = True

            return _call_provider(rt, plan, program, msg, model, usage, answered)
        finally:
            if decision is not None and decision.counted and not ended:
                # Throttled, out of budget, a 429 or a crash before any answer: this
                # admission never reached the provider's verdict; it is not in flight.
                rt.breakers.release(model, decision.call)

    if not msg.use_cache:
        return Served(compute(), "computed", model)
    ttl = msg.cache_ttl or rt.settings.cache_ttl_seconds
    entry, source = rt.cache.get_or_compute(plan.key_for(model), ttl, msg.job_id, compute)
    return Served(entry, source, model)


def _call_provider(rt: Runtime, plan: Plan, program: LoadedProgram, msg: JobMessage,
                   model: str, usage: Usage, answered: OnAnswer) -> dict[str, Any]:  # fmt: skip
    """The call itself, once the breaker admitted it: the pacer's turn, the program run
    (each LM call's outcome told to ``answered``), the usage settled; the cache entry."""
    inputs = plan.inputs
    assert inputs is not None  # a worker knows its programs' fields: its plans bind inputs
    admission = take_turn(rt, model, msg)
    calls, spent = usage.calls, usage.total_tokens
    accepted = True  # by the provider: anything but a 429

    def explained(error: JobError) -> JobError:
        # A gateway's cooldown answer read as the refusal that caused it (issue 19.7).
        return rt.causes.explain(model, error)

    try:
        outputs = call_program(program.module, rt.models.get(model), inputs, plan.params,
                               usage, on_answer=answered, explain=explained)  # fmt: skip
    except ProviderError as exc:
        if exc.status_code == 429:
            accepted = False
            rate_limited(rt, model, exc)
        metrics.ERRORS.labels(model, exc.code).inc()
        raise
    finally:
        settle(rt, model, msg.job_id, admission, usage, calls, spent, accepted)
    rt.causes.settle(model)
    # The job that computed it: if that job's result is lost before it is recorded,
    # its rerun finds this entry and is billed for the call (worker/runner.py).
    # Tokens are None when the provider did not report them: a hit then saves "unknown".
    return {"outputs": outputs, "model": model, "program_version": program.version,
            "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
            "job_id": msg.job_id, "created_at": utcnow().isoformat()}  # fmt: skip


def take_turn(rt: Runtime, model: str, msg: JobMessage) -> Admission:
    """The job's turn at ``model``'s provider limits: admitted now, after a short sleep
    (at most PACING_INLINE_WAIT_SECONDS at a time, twice that in all), or Throttled to
    come back when its turn is near. A Redis failure raises: the job is handed back,
    never sent to the provider unpaced."""
    s = rt.settings
    hold = rt.config.models[model].timeout + 5  # its concurrency place outlives the call
    slept = 0.0
    while True:
        admission = rt.pacer.acquire(model, msg.job_id, interactive=msg.priority == "interactive",
                                     hold_seconds=hold)  # fmt: skip
        if admission.admitted:
            return admission
        if (
            admission.wait > s.pacing_inline_wait_seconds
            or slept >= 2 * s.pacing_inline_wait_seconds
        ):
            raise Throttled(admission.wait, admission.why)
        time.sleep(admission.wait)
        slept += admission.wait


def rate_limited(rt: Runtime, model: str, exc: ProviderError) -> None:
    """A provider 429: slow ``model`` down fleet-wide and hand the job back for its new
    turn (raises Throttled). Not a breaker fault, not an attempt."""
    metrics.PROVIDER_429.labels(model).inc()
    try:
        for c in rt.pacer.cut(model, exc.retry_after):
            if c.cut:
                rate_changed(model, c.scope, c.before, c.rpm, "cut after a provider 429")
    except redis.RedisError as err:
        log.warning("could not record a provider 429 in the pacing state: %s", err)
    # Back after Retry-After (at least a moment), then it books its turn at the new rate.
    raise Throttled(max(exc.retry_after or 0.0, 0.25), "rate_limited", exc)


def settle(rt: Runtime, model: str, job_id: str, admission: Admission, usage: Usage,
           calls: int, spent: int | None, accepted: bool) -> None:  # fmt: skip
    """Tell the pacer what the call really cost (requests, reported tokens) and give its
    concurrency place back; a Redis failure here only leaves the estimate standing."""
    made = max(1, usage.calls - calls)
    now = usage.total_tokens
    tokens = None if now is None or spent is None else now - spent
    try:
        changes = rt.pacer.settle(model, job_id, admission, requests=made, tokens=tokens,
                                  accepted=accepted)  # fmt: skip
    except redis.RedisError as exc:
        log.warning("could not settle a provider call's pacing charge: %s", exc)
        return
    for c in changes:
        why = "climbs back" if c.after > c.before > 0 else "changes"
        rate_changed(model, c.scope, c.before, c.after, why)


def rate_changed(model: str, scope: str, before: float, after: float, why: str) -> None:
    """The one log line of a change of a scope's effective limit, fleet-wide (the pacer's
    script tells one worker per change: dspy_fleet/store/pacing.py, news)."""
    log.info(
        "effective rate limit of %s %s: %s -> %s requests/min", scope, why,
        _rpm(before), _rpm(after),
        extra={"model": model, "scope": scope, "rpm_before": round(before, 1) or None,
               "rpm_after": round(after, 1) or None},
    )  # fmt: skip


def _rpm(rate: float) -> str:
    return f"{rate:.1f}" if rate > 0 else "unlimited"


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
