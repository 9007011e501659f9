"""Run one job: validate the message, plan it, answer from cache or the model, record it.

Plain functions over a :class:`Runtime`, so they are testable without Celery;
``worker.tasks`` is the thin Celery wrapper around :func:`execute`.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import redis
from pydantic import ValidationError

from dspy_fleet.contract import TERMINAL_STATUSES, JobMessage, field_errors, utcnow
from dspy_fleet.cost import CostRecord, cost_usd, entry_tokens, price_for
from dspy_fleet.errors import (
    JobError,
    JobFailed,
    MessageValidationError,
    ProviderError,
    ProviderRateLimitedError,
    RetryJob,
    Throttled,
)
from dspy_fleet.logs import log_context
from dspy_fleet.plan import Plan
from dspy_fleet.routing import pick_model
from dspy_fleet.store import ledger
from dspy_fleet.store.breakers import Decision
from dspy_fleet.store.jobs import job_record
from worker import metrics, traces
from worker.lm import bundled_price
from worker.predict import Usage, as_job_error
from worker.programs import LoadedProgram
from worker.resilience import serve
from worker.runtime import Runtime

log = logging.getLogger("dspy_fleet.worker")


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


class LeftToOthers(Exception):
    """This delivery does not end the job: its message is acknowledged and the job is left
    to its lease owner, or to the due sweep that publishes its retry."""


def execute(
    rt: Runtime,
    raw: dict[str, Any],
    *,
    task_id: str,
    request_id: str | None,
    queue: str | None = None,
) -> dict[str, Any]:
    """Run the job in ``raw`` (the message kwargs); return its envelope or raise JobFailed
    (it failed) or LeftToOthers (another delivery owns it, or it retries later)."""
    given = raw.get("job_id")
    job_id = given if isinstance(given, str) else task_id
    with log_context(job_id=job_id, request_id=request_id, tenant=raw.get("tenant")):
        try:
            msg = JobMessage.model_validate(raw)
        except ValidationError as exc:
            err = _validation_error(exc)
            log.warning("rejected malformed job message", extra={"status": "failed"})
            claim = rt.store.start(job_id, {"created_at": utcnow()}, {})
            if claim.token is not None:
                _finish_failed(rt, job_id, claim.token, err, cost=None, dims=None)
            raise JobFailed(err.to_dict()) from None
        return _run(rt, msg, queue=queue or msg.priority)


def _run(rt: Runtime, msg: JobMessage, *, queue: str) -> dict[str, Any]:
    planned: tuple[Plan, LoadedProgram] | None = None
    error: JobError | None = None
    try:
        planned = rt.registry.plan(msg, msg.tenant)
    except JobError as exc:
        error = exc
    if planned is not None:
        plan = planned[0]
        meta = job_record(msg, program=plan.program, model=plan.model, variant=plan.variant,
                          queue=queue)  # fmt: skip
    else:
        # A job that cannot run is still recorded under the names it gave, as far as they
        # resolve, by the same model rule as a plan.
        name = msg.program or rt.config.default_program
        meta = job_record(msg, program=name, queue=queue,
                          model=pick_model(rt.config, name, msg.model, msg.variant))  # fmt: skip
    # Without the cache, the job calls its model at once: its breaker is asked in the
    # same round trip that claims the job (one fewer per job on the hot path).
    ask = rt.breakers.allow_call(planned[0].model) if planned and not msg.use_cache else None
    # The version of the program state this delivery runs (GET /v1/programs shows the same).
    started: dict[str, Any] = {"started_at": utcnow()}
    if planned is not None:
        started["program_version"] = planned[1].version
    claim = rt.store.start(msg.job_id, meta, started, then=ask)
    if claim.prev in TERMINAL_STATUSES:
        log.info("job already finished; not running it again", extra={"status": claim.prev})
        job = rt.store.get(msg.job_id)
        assert job is not None
        return _stored_outcome(job)
    if claim.token is None:
        # Another delivery (a broker redelivery, a duplicate, a republish) runs the job
        # now: no provider call here. If that owner dies, its lease lapses and the due
        # sweep publishes the job again, from the record's copy of the message.
        rt.store.keep_message(msg.job_id, msg.model_dump(mode="json", exclude_none=True))
        log.info("job is running under another delivery's lease (%d ms left); leaving it to "
                 "its owner", claim.leased_ms or 0, extra={"status": "running"})  # fmt: skip
        raise LeftToOthers(msg.job_id)
    token = claim.token
    rt.leases.hold(msg.job_id, token)
    handed_back = True  # until the job ended, or was left to a retry or another owner
    try:
        with log_context(program=meta["program"], model=meta["model"], variant=meta["variant"]):
            if planned is None:
                assert error is not None
                _finish_failed(rt, msg.job_id, token, error, cost=None, dims=None)
                raise JobFailed(error.to_dict())
            plan, program = planned
            reply = claim.reply
            decision = rt.breakers.decide(plan.model, reply) if reply is not None else None
            outcome = _predict(rt, msg, plan, program, claim.attempt, token, meta, decision)
            handed_back = False
            return outcome
    except (JobFailed, LeftToOthers):
        handed_back = False
        raise
    finally:
        rt.leases.drop(msg.job_id)
        if handed_back:
            _release(rt, msg.job_id, token)


def _release(rt: Runtime, job_id: str, token: str) -> None:
    """Give the lease of a job handed back unfinished up, so that its redelivered message
    runs it at once; if Redis refuses, the lease lapses by itself (LEASE_SECONDS)."""
    try:
        rt.store.release(job_id, token)
    except redis.RedisError as exc:
        log.warning("could not release the lease of a job handed back; it lapses: %s", exc)


def _predict(rt: Runtime, msg: JobMessage, plan: Plan, program: LoadedProgram, attempt: int,
             token: str, meta: dict[str, Any],
             decision: Decision | None) -> dict[str, Any]:  # fmt: skip
    usage = Usage()
    started = time.perf_counter()
    recorder = traces.begin(rt.config.programs[plan.program].traces)
    traced = traces.CURRENT.set(recorder)

    def trace(status: str, model: str, outputs: dict[str, Any] | None, cached: bool,
              error_code: str | None = None) -> dict[str, str]:  # fmt: skip
        if recorder is None or not (recorder.sampled or status == "succeeded"):
            return {}  # only a succeeded job takes feedback: no failure waits for it
        return traces.fields(recorder, msg, plan, program, status=status, model=model,
                             outputs=outputs, cached=cached, error_code=error_code)  # fmt: skip

    metrics.ACTIVE.inc()
    try:
        served = serve(rt, plan, program, msg, usage, attempt, decision)
    except RetryJob as retry:
        _unreserve(rt, msg)
        _retry_later(rt, msg, token, attempt, retry)
        raise LeftToOthers(msg.job_id) from None
    except Throttled as turn:
        _unreserve(rt, msg)
        if _throttle_later(rt, msg, token, turn, plan.model):
            raise LeftToOthers(msg.job_id) from None
        err = _gave_up(rt, turn)
        dims = (plan.model, plan.variant or "none", plan.program, msg.tenant)
        cost = _cost(rt, plan.model, plan.variant, usage, started, attempt, entry=None)
        _finish_failed(rt, msg.job_id, token, err, cost=cost, dims=dims,
                       extra=trace("failed", plan.model, None, False, err.code))  # fmt: skip
        raise JobFailed(err.to_dict()) from None
    except redis.RedisError:
        raise  # our infrastructure failed, not the job: the task hands the message back
    except Exception as exc:
        err = as_job_error(exc)
        dims = (plan.model, plan.variant or "none", plan.program, msg.tenant)
        cost = _cost(rt, plan.model, plan.variant, usage, started, attempt, entry=None)
        _finish_failed(rt, msg.job_id, token, err, cost=cost, dims=dims,
                       extra=trace("failed", plan.model, None, False, err.code))  # fmt: skip
        raise JobFailed(err.to_dict()) from None
    # Anything else (SystemExit on a hard shutdown) is not the job's fault: the job is
    # left unfinished so that its redelivered message runs it again.
    finally:
        metrics.ACTIVE.dec()
        traces.CURRENT.reset(traced)
    model = served.model  # a fallback, maybe: the model that served is the one billed
    cached = served.source != "computed"
    # An entry this same job computed (a delivery that paid the provider, then failed to
    # record it) is that call, not a free hit: bill it once, now.
    own = cached and served.entry.get("job_id") == msg.job_id
    cost = _cost(rt, model, plan.variant, usage, started, attempt,
                 entry=served.entry if cached else None, own=own)  # fmt: skip
    fields: dict[str, Any] = {"status": "succeeded", "outputs": served.entry["outputs"],
                              "cost": cost.to_dict(), "finished_at": utcnow(), "model": model,
                              "attempts": attempt}  # fmt: skip
    if model != plan.model:
        fields["requested_model"] = plan.model
    fields.update(trace("succeeded", model, served.entry["outputs"], cached))
    dims = (model, plan.variant or "none", plan.program, msg.tenant)
    earlier = _finish(rt, msg.job_id, token, fields, dims)
    if earlier is not None:
        return earlier
    log.info(
        "prediction succeeded",
        extra={"status": "succeeded", "model": model, "latency_ms": cost.latency_ms,
               "cache": served.source if cached else "miss", "input_tokens": cost.input_tokens,
               "output_tokens": cost.output_tokens, "cost_usd": cost.cost_usd},
    )  # fmt: skip
    return _envelope({**meta, **fields, "job_id": msg.job_id})


def _unreserve(rt: Runtime, msg: JobMessage) -> None:
    """Drop the job's budget reservation: it goes back to wait or retry, and its next call
    reserves again. A Redis failure only leaves it to lapse (after the time limit)."""
    try:
        rt.quotas.release(msg.tenant, msg.job_id)
    except redis.RedisError as exc:
        log.warning("could not drop a job's budget reservation; it lapses: %s", exc)


def _retry_later(rt: Runtime, msg: JobMessage, token: str, attempt: int,
                 retry: RetryJob) -> None:  # fmt: skip
    """Hand the job to the due-time index for a retry ``retry.countdown`` seconds from now.

    Not a Celery countdown message: the broker would redeliver one that waits longer than
    the visibility timeout while the first copy still waits, and both would run."""
    fields = {"attempts": attempt, "error": retry.error.to_dict(),
              "retry_in_seconds": retry.countdown}  # fmt: skip
    message = msg.model_dump(mode="json", exclude_none=True)
    if not rt.store.retry_later(msg.job_id, token, retry.countdown, fields, message):
        log.warning("lost the job's lease before scheduling its retry; the new owner runs it")
        return
    # The cause in the line itself: a reset connection and a 503 call for different fixes.
    log.warning(
        "transient provider error; retrying in %.2fs (attempt %d): %s",
        retry.countdown,
        attempt,
        retry.error.message[:300],
        extra={"status": "retrying", "error_code": retry.error.code},
    )


def _throttle_later(rt: Runtime, msg: JobMessage, token: str, turn: Throttled,
                    model: str) -> bool:  # fmt: skip
    """Hand the job back until its turn at the model's provider limit (no attempt spent);
    False when it drew too many provider 429s (the caller fails it).

    Published by the due sweep a moment early (it runs every half second); the worker
    that takes it sleeps out the rest. Never further off than half the record's TTL:
    a job whose turn is further away comes back, keeps its place and asks again."""
    wait = min(turn.wait, rt.settings.job_ttl_seconds / 2)
    fields = {"throttled_until": utcnow() + timedelta(seconds=wait), "throttle_reason": turn.why}
    message = msg.model_dump(mode="json", exclude_none=True)
    rate_limited = turn.why == "rate_limited"
    handed = rt.store.throttle_later(msg.job_id, token, wait - min(wait, 0.5), fields, message,
                                     rate_limited=rate_limited,
                                     max_rate_limited=rt.settings.max_rate_limited)  # fmt: skip
    if handed == -2:
        return False
    metrics.THROTTLED.labels(model, turn.why).inc()
    if handed == 0:
        log.warning(
            "lost the job's lease before handing it back for its turn; the new owner runs it"
        )
    elif rate_limited:
        log.info("provider answered 429: the job waits for its turn at the slower pace (%.2fs)",
                 wait, extra={"status": "throttled"})  # fmt: skip
    else:
        log.debug("model at its provider limit: the job waits for its turn (%.2fs, %s)",
                  wait, turn.why, extra={"status": "throttled"})  # fmt: skip
    return True


def _gave_up(rt: Runtime, turn: Throttled) -> JobError:
    """The error of a job that drew more provider 429s than MAX_RATE_LIMITED."""
    cause = turn.error
    return ProviderRateLimitedError(
        f"the provider answered 429 (rate limit) {rt.settings.max_rate_limited + 1} times "
        "although the fleet slowed down for it; giving up (DSPY_FLEET_MAX_RATE_LIMITED)",
        status_code=429,
        retry_after=cause.retry_after if cause is not None else None,
        details={"status_code": 429, "rate_limited": rt.settings.max_rate_limited + 1},
    )


def _cost(rt: Runtime, model: str, variant: str | None, usage: Usage, started: float,
          attempt: int, entry: dict[str, Any] | None, own: bool = False) -> CostRecord:  # fmt: skip
    """The job's cost record; ``entry`` is the cache entry when the answer was not computed.

    ``own``: this job computed ``entry`` itself in an earlier delivery whose result was
    never recorded (Redis failed before the finish write): the call it paid is billed
    here, with the entry's tokens, plus whatever this delivery spent."""
    cfg = rt.config.models[model]
    latency = round((time.perf_counter() - started) * 1000, 2)
    price = price_for(cfg, bundled_price)
    if entry is not None and not own:
        return CostRecord.cache_hit(
            model, cfg, entry, price=price, latency_ms=latency, attempts=attempt,
            variant=variant, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
        )  # fmt: skip
    tokens_in, tokens_out = usage.input_tokens, usage.output_tokens
    if entry is not None:
        log.warning("served from a cache entry this job computed before its result was "
                    "recorded; billed as that call", extra={"cache": "own"})  # fmt: skip
        tokens_in = _sum(tokens_in, entry_tokens(entry, "input_tokens"))
        tokens_out = _sum(tokens_out, entry_tokens(entry, "output_tokens"))
    record = CostRecord(
        model=model, provider_model=cfg.litellm_model, input_tokens=tokens_in,
        output_tokens=tokens_out, cost_usd=None, cached=False,
        latency_ms=latency, attempts=attempt, variant=variant,
        usage_missing=tokens_in is None or tokens_out is None,
    )  # fmt: skip
    record.cost_usd = cost_usd(price, tokens_in, tokens_out)
    if price is None and (tokens_in or tokens_out):
        log.warning("no price known for this model; cost_usd is null", extra={"cost_usd": None})
    return record


def _sum(a: int | None, b: int | None) -> int | None:
    """Two token counts added; None when either is unknown."""
    return None if a is None or b is None else a + b


def _finish(rt: Runtime, job_id: str, token: str, fields: dict[str, Any],
            dims: tuple[str, str, str, str]) -> dict[str, Any] | None:  # fmt: skip
    """Finish a succeeded job once; if a concurrent copy finished it first, return that."""
    cost = CostRecord(**fields["cost"])
    bill = ledger.make_bill(fields["cost"], status="succeeded", dims=dims, day=utcnow().date())
    written = rt.store.finish(job_id, fields, bill=bill, token=token)
    if written < 0:
        _lost_lease()
    if not written:
        log.warning("job was finished by another delivery; keeping that result")
        job = rt.store.get(job_id)
        assert job is not None
        return _stored_outcome(job)
    _observe(dims, "succeeded", cost)
    return None


def _lost_lease() -> None:
    """Our lease was taken over (we paused, or were cut off from Redis, past its expiry):
    the new owner's outcome stands, and this one is neither written nor billed."""
    log.warning("lost the job's lease to another delivery; its outcome is not recorded here")
    raise LeftToOthers()


def _finish_failed(rt: Runtime, job_id: str, token: str, err: JobError, *,
                   cost: CostRecord | None, dims: tuple[str, str, str, str] | None,
                   extra: dict[str, str] | None = None) -> None:  # fmt: skip
    """Finish the job as failed; ``extra``: more fields for its record (its trace's)."""
    fields = {"status": "failed", "error": err.to_dict(), "finished_at": utcnow(),
              "cost": cost.to_dict() if cost else None, **(extra or {})}  # fmt: skip
    bill = None
    if dims and cost:
        bill = ledger.make_bill(cost.to_dict(), status="failed", dims=dims, day=utcnow().date())
    written = rt.store.finish(job_id, fields, bill=bill, token=token)
    if written < 0:
        _lost_lease()
    if not written:
        log.warning("job was finished by another delivery; this failure is not recorded")
        return
    labels = dims or ("unknown", "none", "unknown", "")
    if not isinstance(err, ProviderError):  # provider faults were counted as they happened
        metrics.ERRORS.labels(labels[0], err.code).inc()
    _observe(labels, "failed", cost)
    # The message may quote a provider's answer or an input: a payload, logged on opt-in only.
    log.warning(
        "prediction failed (%s)", err.code,
        extra={"status": "failed", "error_code": err.code, "error_message": err.message,
               "latency_ms": cost.latency_ms if cost else None},
    )  # fmt: skip


def _observe(dims: tuple[str, str, str, str], status: str, cost: CostRecord | None) -> None:
    model, variant, program, _tenant = dims
    metrics.PREDICTIONS.labels(program, model, variant, status).inc()
    if cost is None:
        return
    metrics.PREDICTION_DURATION.labels(program, model).observe(cost.latency_ms / 1000)
    # An unreported count adds nothing (it is counted apart in the ledger), never a guess.
    if cost.input_tokens:
        metrics.TOKENS.labels(model, "input").inc(cost.input_tokens)
    if cost.output_tokens:
        metrics.TOKENS.labels(model, "output").inc(cost.output_tokens)
    if cost.cost_usd:
        metrics.COST.labels(model, variant).inc(cost.cost_usd)
