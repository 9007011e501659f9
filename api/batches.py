"""Batches: many predictions submitted at once, tracked together (OpenAI Batch API style).

The batch records themselves (metadata hash, item list, counts) are
dspy_fleet/store/batches.py, shared with the worker's webhook delivery; this module is
the API's machinery around them. Never import dspy here.
"""

from __future__ import annotations

import uuid

import redis
from flask import Flask, current_app

from api.settings import ApiSettings
from dspy_fleet.broker.backends import broker_for
from dspy_fleet.broker.celery_config import make_celery
from dspy_fleet.broker.producer import Publisher
from dspy_fleet.contract import utcnow
from dspy_fleet.store.batches import (  # noqa: F401  # re-exported for the routes and tests
    KEY_PREFIX,
    READ_CHUNK,
    BatchStore,
    item_line,
    item_status,
    summarize,
)
from dspy_fleet.store.jobs import JobStore

# A job cancelled while still queued; running jobs are left to finish (see cancel_job).
CANCELLABLE = frozenset({"queued", "retrying", "throttled"})


def new_batch_id() -> str:
    """A fresh batch id."""
    return "batch_" + uuid.uuid4().hex


def cancel_job(client: redis.Redis, ttl_seconds: int, job_id: str) -> str:
    """Cancel a job that is still queued (or waiting to retry); returns its status afterwards
    ('cancelled', or the status that prevented it, or 'missing').

    The check and the terminal write are one WATCH/MULTI transaction: if a worker starts the
    job in between, the transaction aborts and the job is reported running instead. The
    terminal write is JobStore.finish (finished marker, wake-up, no bill), so when the job's
    message is delivered later the worker sees a finished job and does not run it.
    """
    key = JobStore.key(job_id)
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(key)
                status = pipe.hget(key, "status")
                if status is None:
                    return "missing"
                if status not in CANCELLABLE:
                    return str(status)
                pipe.multi()
                fields = {
                    "status": "cancelled",
                    "finished_at": utcnow(),
                    "error": {
                        "code": "cancelled",
                        "message": "cancelled by the client",
                        "details": {"previous_status": status},
                    },
                }
                JobStore(pipe, ttl_seconds).finish(job_id, fields)
                (finished,) = pipe.execute()
                if finished:
                    return "cancelled"
                return str(client.hget(key, "status") or "missing")
            except redis.WatchError:
                continue  # the job changed under us (a worker took it): look again


class Batches:
    """The API's batch machinery: the store and a pipelined publisher of its jobs."""

    def __init__(self, settings: ApiSettings, client: redis.Redis) -> None:
        self.settings = settings
        self.store = BatchStore(client, settings.job_ttl_seconds)
        # Its own Celery app: the publisher turns off redis-py's retries so that kombu can
        # pipeline (the API's shared app keeps them for single publishes).
        self.publisher = Publisher(
            make_celery(settings, publisher=True), client, settings.job_ttl_seconds,
            recovery_after=settings.recovery_after_seconds,
            broker=broker_for(settings.broker, sentinel_password=settings.sentinel_secret),
        )  # fmt: skip


def init_app(app: Flask, settings: ApiSettings) -> None:
    """Attach the batch machinery (it shares the API's Redis client)."""
    client = app.extensions["dspy_fleet"].redis
    app.extensions["dspy_fleet_batches"] = Batches(settings, client)


def batches() -> Batches:
    """The batch machinery of the current app."""
    found: Batches = current_app.extensions["dspy_fleet_batches"]
    return found
