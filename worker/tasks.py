"""The Celery task: takes the JSON message, hands it to the runner. Keep it thin."""

from __future__ import annotations

from typing import Any

from worker.celery_app import app, get_runtime
from worker.contract import TASK_NAME
from worker.errors import JobFailed, RetryJob
from worker.runner import execute


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
    except RetryJob as exc:
        # A new message with a countdown: this worker slot is free while it waits.
        raise self.retry(countdown=exc.countdown, exc=exc, max_retries=None) from None
