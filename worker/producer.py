"""Direct producers: push contract-v1 jobs straight onto the broker, pipelined.

``submit`` / ``submit_many`` record each job in the job store (queued) and publish
its ``dspy_fleet.predict`` message, many at a time through kombu's publish batches
(one Redis pipeline per chunk instead of a round trip per message). Results are
read back from the same job store the HTTP API reads, so a job pushed here can
be polled with ``GET /v1/predictions/<id>`` too. Never import dspy or flask here:
the API and ``dspy-fleet submit --direct`` share this module.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from pydantic import Field, StringConstraints

from worker.celery_config import make_celery, send_job
from worker.contract import (
    DEFAULT_TENANT,
    JobMessage,
    PredictFields,
    Priority,
    build_message,
)
from worker.jobs import TERMINAL, JobStore, decode
from worker.settings import CommonSettings, load_settings

# Messages per Redis pipeline: large enough to amortise round trips, small enough
# that a failed flush loses little and memory stays flat for huge inputs.
CHUNK_SIZE = 500

CustomId = Annotated[str, StringConstraints(min_length=1, max_length=128)]


log = logging.getLogger("dspy_fleet.producer")


class BatchItem(PredictFields):
    """One item of a batch (HTTP or ``dspy-fleet submit``): ``custom_id`` plus predict fields."""

    custom_id: CustomId = Field(description="The caller's key for this item, unique per batch.")
    priority: Priority = Field(default="batch", description="Batch items default to 'batch'.")


class ProducerError(Exception):
    """The broker refused (part of) a push; the listed jobs were not accepted."""

    def __init__(self, message: str, job_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.job_ids = list(job_ids)


def job_record(message: JobMessage) -> dict[str, Any]:
    """The job-store fields of a queued job (program/model stay unset until a worker resolves
    them, unless the producer named them)."""
    return {
        "program": message.program,
        "model": message.model,
        "variant": message.variant,
        "tenant": message.tenant,
        "request_id": message.request_id,
        "queue": message.priority,
        "created_at": message.submitted_at,
    }


def stable_request_id(item: Mapping[str, Any]) -> str:
    """An idempotency key from an item's content (custom_id included): resubmitting the same
    item (a resumed run) names the same job instead of calling the model again."""
    canonical = json.dumps(item, sort_keys=True, separators=(",", ":"), default=str)
    return "submit:" + hashlib.sha256(canonical.encode()).hexdigest()[:40]


def result_line(
    custom_id: str | None, job: Mapping[str, Any] | None, **extra: Any
) -> dict[str, Any]:
    """One line of a results file: keyed by custom_id, the job's outcome when it ended."""
    line: dict[str, Any] = {"custom_id": custom_id, **extra}
    if job is None:
        return line
    line["id"] = job.get("job_id")
    line["status"] = job.get("status")
    for key in ("outputs", "error", "cost"):
        if job.get(key) is not None:
            line[key] = job[key]
    return line


class Publisher:
    """Records and publishes prepared job messages in pipelined chunks."""

    def __init__(self, celery: Celery, client: redis.Redis, ttl_seconds: int) -> None:
        # kombu buffers publishes in a pipeline only when redis-py will not retry a
        # pipeline on timeout (a retried pipeline could push messages twice), so this
        # publisher's connections do not retry; the publish itself fails loudly instead.
        options = dict(celery.conf.broker_transport_options or {})
        options["retry_on_timeout"] = False
        celery.conf.broker_transport_options = options
        self.celery = celery
        self.client = client
        self.ttl = ttl_seconds

    def push(self, messages: Sequence[JobMessage], *, request_id: str | None = None) -> list[bool]:
        """Record and enqueue each job once; False for a job id that already existed (an
        idempotent replay: it is not enqueued again). Raises ProducerError if Redis refused
        the records (then nothing of that chunk was accepted); once recorded, a job is
        accepted even if its publish fails (the recovery sweep publishes it)."""
        created: list[bool] = []
        for start in range(0, len(messages), CHUNK_SIZE):
            created += self._push_chunk(messages[start : start + CHUNK_SIZE], request_id)
        return created

    def _push_chunk(self, chunk: Sequence[JobMessage], request_id: str | None) -> list[bool]:
        try:
            with self.client.pipeline(transaction=False) as pipe:
                store = JobStore(pipe, self.ttl)  # type: ignore[arg-type]
                for msg in chunk:
                    # The message copy lets the recovery sweep republish a lost message.
                    store.create(
                        msg.job_id,
                        job_record(msg),
                        message=msg.model_dump(mode="json", exclude_none=True),
                    )
                created = [bool(r) for r in pipe.execute()]
        except redis.RedisError as exc:
            raise ProducerError(f"Redis refused the job records: {exc}", []) from exc
        fresh = [m for m, new in zip(chunk, created, strict=True) if new]
        if not fresh:
            return created
        try:
            with (
                self.celery.producer_or_acquire() as producer,
                producer.batch(max_size=4 * len(fresh) + 8),
            ):
                for msg in fresh:
                    send_job(
                        self.celery,
                        msg.model_dump(mode="json", exclude_none=True),
                        job_id=msg.job_id,
                        queue=msg.priority,
                        request_id=request_id,
                        producer=producer,
                        # The anonymous exchange needs no queue declaration per message.
                        declare=[],
                    )
        except (OperationalError, redis.RedisError, OSError) as exc:
            # The records (with their messages) are stored: the jobs are accepted, and the
            # workers' recovery sweep publishes what did not reach the queue.
            log.warning(
                "%d jobs recorded but not published (%s); the recovery sweep will publish them",
                len(fresh),
                exc,
            )
        return created


class Producer:
    """Push jobs onto the fleet's broker without the HTTP API, and read their outcomes."""

    def __init__(
        self,
        settings: CommonSettings | None = None,
        *,
        redis_url: str | None = None,
        tenant: str = DEFAULT_TENANT,
    ) -> None:
        if settings is None:
            overrides = {"redis_url": redis_url} if redis_url else {}
            settings = load_settings(CommonSettings, **overrides)
        self.settings = settings
        self.tenant = tenant
        self.redis = redis.Redis.from_url(settings.redis_url, decode_responses=True)
        self.store = JobStore(self.redis, settings.job_ttl_seconds)
        self.publisher = Publisher(
            make_celery(settings, publisher=True), self.redis, settings.job_ttl_seconds
        )

    def _message(self, item: PredictFields | Mapping[str, Any], priority: Priority) -> JobMessage:
        if isinstance(item, BatchItem):
            item = item.model_dump(exclude={"custom_id"})
        if isinstance(item, PredictFields):
            fields = item
            if "priority" not in item.model_fields_set:
                fields = item.model_copy(update={"priority": priority})
        else:
            data = {k: v for k, v in item.items() if k != "custom_id"}
            fields = PredictFields.model_validate({"priority": priority, **data})
        return build_message(fields, tenant=self.tenant)

    def submit(
        self,
        item: PredictFields | Mapping[str, Any],
        *,
        priority: Priority = "interactive",
        request_id: str | None = None,
    ) -> str:
        """Push one job (default queue interactive); returns its job id."""
        return self.submit_many([item], priority=priority, request_id=request_id)[0]

    def submit_many(
        self,
        items: Iterable[PredictFields | Mapping[str, Any]],
        *,
        priority: Priority = "batch",
        request_id: str | None = None,
    ) -> list[str]:
        """Validate every item first (pydantic ValidationError before anything is pushed), then
        push them all, pipelined; returns the job ids in order. An item's own ``priority``
        wins over ``priority`` (default: the batch lane). ``request_id`` is a trace id for the
        workers' logs; an item's ``request_id`` field is its idempotency key."""
        messages = [self._message(item, priority) for item in items]
        self.publisher.push(messages, request_id=request_id)
        return [m.job_id for m in messages]

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job record (as GET /v1/predictions shows it, before formatting), or None."""
        return self.store.get(job_id)

    def get_many(self, job_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Job records in one pipelined round trip."""
        return read_jobs(self.redis, job_ids)

    def wait_many(
        self, job_ids: Sequence[str], timeout: float = 60.0, interval: float = 0.2
    ) -> list[dict[str, Any] | None]:
        """Poll until every job ended or ``timeout`` passed; returns the records as they stand."""
        deadline = time.monotonic() + timeout
        jobs: dict[str, dict[str, Any] | None] = dict.fromkeys(job_ids)
        pending = list(job_ids)
        while True:
            for job_id, job in zip(pending, self.get_many(pending), strict=True):
                jobs[job_id] = job
            pending = [j for j in pending if (jobs[j] or {}).get("status") not in TERMINAL]
            if not pending or time.monotonic() >= deadline:
                return [jobs[j] for j in job_ids]
            time.sleep(interval)

    def wait(self, job_id: str, timeout: float = 60.0) -> dict[str, Any] | None:
        """The job once it ended, or as it stands after ``timeout``."""
        return self.wait_many([job_id], timeout)[0]

    def close(self) -> None:
        """Release the broker and Redis connections."""
        self.publisher.celery.close()
        self.redis.close()

    def __enter__(self) -> Producer:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def read_jobs(client: redis.Redis, job_ids: Sequence[str]) -> list[dict[str, Any] | None]:
    """Job records in one pipelined round trip (None for unknown or expired ids)."""
    with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hgetall(JobStore.key(job_id))
        raws = pipe.execute()
    return [
        {"job_id": job_id, **decode(raw)} if raw else None
        for job_id, raw in zip(job_ids, raws, strict=True)
    ]


def submit(
    item: PredictFields | Mapping[str, Any],
    *,
    redis_url: str | None = None,
    tenant: str = DEFAULT_TENANT,
    priority: Priority = "interactive",
) -> str:
    """Push one job with a short-lived producer; returns its job id."""
    with Producer(redis_url=redis_url, tenant=tenant) as producer:
        return producer.submit(item, priority=priority)


def submit_many(
    items: Iterable[PredictFields | Mapping[str, Any]],
    *,
    redis_url: str | None = None,
    tenant: str = DEFAULT_TENANT,
    priority: Priority = "batch",
) -> list[str]:
    """Push many jobs, pipelined, with a short-lived producer; returns their job ids."""
    with Producer(redis_url=redis_url, tenant=tenant) as producer:
        return producer.submit_many(items, priority=priority)
