"""The Celery task: takes the JSON message, hands it to the runner. Keep it thin."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.exceptions import Reject
from kombu.exceptions import OperationalError

from worker.celery_app import app, get_runtime
from worker.contract import TASK_NAME
from worker.errors import JobFailed, RetryJob
from worker.runner import execute

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
            attempt=self.request.retries + 1,
            queue=(self.request.delivery_info or {}).get("routing_key"),
        )
    except JobFailed as exc:
        error = exc.error
    except RetryJob as exc:
        # A new message with a countdown: this worker slot is free while it waits.
        try:
            raise self.retry(countdown=exc.countdown, exc=exc, max_retries=None) from None
        except (redis.RedisError, OperationalError) as infra:
            raise _give_back(infra) from None
    except (redis.RedisError, OperationalError) as infra:
        raise _give_back(infra) from None
    # Raised afresh, outside the except block, so its traceback is this frame alone.
    # Celery builds a billiard ExceptionInfo of every failure (a copy of each frame's
    # code positions) and formats its traceback; through the runner's frames each failed
    # job left ~230 KB of worker RSS behind for good, from here ~110 KB, near a bare
    # Celery task's ~85 KB (bench figure h's note; README, Performance).
    raise JobFailed(error)


def _give_back(exc: Exception) -> Reject:
    """Redis failed under the job (not the job's fault): hand its message back, don't ack it.

    Acknowledging here would lose the job while its record still says "running".
    A requeue that cannot reach Redis leaves the message unacknowledged, and Redis
    redelivers it after the visibility timeout; either way the job runs again.
    """
    log.warning("Redis failed during a job; handing the message back: %s", exc)
    return Reject(str(exc), requeue=True)
