"""The Celery task: takes the JSON message, hands it to the runner. Keep it thin."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.exceptions import Ignore, Reject
from kombu.exceptions import OperationalError

from dspy_fleet.broker.celery_config import CALLBACK_TASK
from dspy_fleet.contract import TASK_NAME
from dspy_fleet.errors import JobFailed
from worker.celery_app import app, get_runtime, get_webhooks
from worker.runner import LeftToOthers, execute
from worker.webhooks import deliver

log = logging.getLogger("dspy_fleet.worker")


# JobFailed is an expected outcome (logged by the runner with its code), not a crash:
# Celery records the failure without a traceback.
@app.task(name=TASK_NAME, bind=True, throws=(JobFailed,))
def predict(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Run one prediction job (message contract v1 in ``kwargs``)."""
    if args:
        # Positional arguments are not part of the contract; let the runner
        # reject the message as a validation error instead of crashing here.
        kwargs = {**kwargs, "__positional_args__": list(args)}
    try:
        return execute(
            get_runtime(),
            kwargs,
            task_id=self.request.id,
            request_id=self.request.get("request_id"),
            queue=(self.request.delivery_info or {}).get("routing_key"),
        )
    except JobFailed as exc:
        error = exc.error
    except LeftToOthers:
        # The job is another delivery's (its lease owner's), or waits in the due-time index
        # for a retry: this message is done with. Acknowledged, and no result is stored
        # under the job's task id (the job has not ended).
        raise Ignore() from None
    except (redis.RedisError, OperationalError) as infra:
        raise _give_back(infra) from None
    # Raised afresh, outside the except block, so its traceback is this frame alone.
    # Celery builds a billiard ExceptionInfo of every failure (a copy of each frame's
    # code positions) and formats its traceback; through the runner's frames each failed
    # job left ~230 KB of worker RSS behind for good, from here ~110 KB, near a bare
    # Celery task's ~85 KB (bench figure h's note; README, Performance).
    raise JobFailed(error)


@app.task(name=CALLBACK_TASK, ignore_result=True)
def deliver_callback(member: str, attempt: int) -> str:
    """One attempt of one webhook (worker/webhooks.py): "job:<id>" or "batch:<id>"."""
    try:
        return deliver(get_webhooks(), member, int(attempt))
    except redis.RedisError as exc:
        # Nothing is lost: the callback stays due in Redis and the sweep publishes it again.
        log.warning("Redis failed during a webhook delivery; the sweep retries it: %s", exc)
        return "redis_error"


def _give_back(exc: Exception) -> Reject:
    """Redis failed under the job (not the job's fault): hand its message back, don't ack it.

    Acknowledging here would lose the job while its record still says "running".
    A requeue that cannot reach Redis leaves the message unacknowledged, and Redis
    redelivers it after the visibility timeout; either way the job runs again.
    """
    log.warning("Redis failed during a job; handing the message back: %s", exc)
    return Reject(str(exc), requeue=True)
