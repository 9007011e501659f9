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
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from celery import Celery

from dspy_fleet.broker.backends import PUBLISH_ERRORS, Broker, broker_for, is_amqp
from dspy_fleet.broker.celery_config import make_celery, send_job
from dspy_fleet.contract import (
    DEFAULT_TENANT,
    TERMINAL_STATUSES,
    BatchItem,
    JobMessage,
    PredictFields,
    Priority,
    build_message,
    new_job_id,
)
from dspy_fleet.errors import IdempotencyKeyReusedError
from dspy_fleet.settings import CommonSettings, load_settings
from dspy_fleet.store import connection
from dspy_fleet.store.jobs import JobStore, decode, job_record

# Messages per Redis pipeline: large enough to amortise round trips, small enough
# that a failed flush loses little and memory stays flat for huge inputs.
CHUNK_SIZE = 500

# A batch's idempotency key -> the fingerprint of the items first sent with it.
IDEMPOTENCY_PREFIX = "dspy_fleet:idempotency:"
_BATCH_NAMESPACE = uuid.UUID("6f1d3c1e-3b9a-4f2e-9a51-2b7f0c6d8e41")

log = logging.getLogger("dspy_fleet.producer")


class ProducerError(Exception):
    """Redis refused (part of) a push. ``job_ids`` (= ``rejected``) were not recorded and will
    not run; ``accepted`` were recorded and will run; ``unknown`` could not be told apart
    (the connection broke mid-write): resubmitting with the same idempotency key settles them."""

    def __init__(
        self,
        message: str,
        job_ids: Sequence[str],
        *,
        accepted: Sequence[str] = (),
        unknown: Sequence[str] = (),
        batch_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.job_ids = list(job_ids)
        self.accepted = list(accepted)
        self.unknown = list(unknown)
        self.batch_id = batch_id

    @property
    def rejected(self) -> list[str]:
        """The job ids Redis refused to record: they will not run."""
        return self.job_ids


@dataclass
class PushResult:
    """What a push did with each message, in order."""

    job_ids: list[str]
    # Recorded by this push (False: it existed already, or was not accepted).
    created: list[bool]
    # Recorded now or by an earlier push: these run (and bill) exactly once.
    accepted: list[str] = field(default_factory=list)
    # Redis refused the record: these will not run.
    rejected: list[str] = field(default_factory=list)
    # The connection broke mid-write and the records could not be read back.
    unknown: list[str] = field(default_factory=list)
    # Recorded but not published (the recovery sweep publishes them).
    unpublished: int = 0

    @property
    def complete(self) -> bool:
        """Every message was accepted."""
        return not self.rejected and not self.unknown


def batch_id_for(tenant: str, idempotency_key: str) -> str:
    """The batch id an idempotency key names (per tenant): the same key, the same batch."""
    return "batch_" + uuid.uuid5(_BATCH_NAMESPACE, f"{tenant}\x00{idempotency_key}").hex


def item_job_id(tenant: str, batch_id: str, name: str) -> str:
    """The job id of a batch item without a request_id: derived from its batch and name
    (custom_id), so the same key and item always name the same job."""
    return new_job_id(tenant, f"{batch_id}\x00{name}")


def fingerprint(items: Sequence[Any]) -> str:
    """A digest of a batch's items (order included), to recognise a retry of the same batch."""
    canonical = json.dumps(list(items), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def claim_idempotency_key(
    client: redis.Redis, batch_id: str, digest: str, ttl_seconds: int
) -> bool:
    """Bind ``batch_id``'s key to the items' ``digest``; True the first time, False for a retry
    of the same items. IdempotencyKeyReusedError when the key was sent with other items."""
    key = IDEMPOTENCY_PREFIX + batch_id
    for _ in range(3):
        if client.set(key, digest, nx=True, ex=ttl_seconds):
            return True
        stored = client.get(key)
        if stored is None:
            continue  # expired between the two commands: claim it again
        if stored != digest:
            raise IdempotencyKeyReusedError(
                "this idempotency key was already used for a batch with different items; "
                "send the same items to retry that batch, or use a new key",
                details={"batch_id": batch_id},
            )
        return False
    return False


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

    def __init__(
        self, celery: Celery, client: redis.Redis, ttl_seconds: int, *,
        recovery_after: float = 0.0, broker: Broker | None = None,
    ) -> None:  # fmt: skip
        # kombu buffers publishes in a pipeline only when redis-py will not retry a
        # pipeline on timeout (a retried pipeline could push messages twice), so this
        # publisher's connections do not retry; the publish itself fails loudly instead.
        options = dict(celery.conf.broker_transport_options or {})
        options["retry_on_timeout"] = False
        celery.conf.broker_transport_options = options
        self.celery = celery
        self.client = client
        # Marks confirmed publishes for the due sweep (a no-op with the Redis transport).
        # Given by callers that hold the settings: Celery's broker_url of a
        # redis+sentinel:// broker is kombu's translation, not the fleet's URL.
        self.broker = broker or broker_for(str(celery.conf.broker_url))
        # Redis: a queue is a list that the push creates, no declaration needed per message.
        # RabbitMQ drops (and still confirms) a message to an exchange no queue is bound to
        # yet, e.g. on a fresh vhost before any worker started: let Celery declare the
        # queue (once per connection; it caches what it declared).
        amqp = is_amqp(str(celery.conf.broker_url))
        self._declare: dict[str, Any] = {} if amqp else {"declare": []}
        self.ttl = ttl_seconds
        self.recovery_after = recovery_after  # RECOVERY_AFTER_SECONDS, for the due-time index

    def push(
        self, messages: Sequence[JobMessage], *, request_id: str | None = None,
        record_extra: Mapping[str, Any] | None = None,
    ) -> PushResult:  # fmt: skip
        """Record and enqueue each job once, pipelined; never raises for Redis or the broker.
        ``record_extra`` are fields added to every job's record (a batch's id, for its
        webhook; the API's root URL, for the links of the webhook bodies).

        A job id that already existed is an idempotent replay: accepted, not enqueued again.
        Once recorded, a job is accepted even if its publish fails (its record holds the
        message and the recovery sweep publishes it). If Redis refuses records, the push
        stops: the refused and the later messages are ``rejected`` (never recorded, they
        will not run), unless the connection broke mid-write and the records cannot be read
        back (``unknown``)."""
        result = PushResult(job_ids=[m.job_id for m in messages], created=[])
        for start in range(0, len(messages), CHUNK_SIZE):
            chunk = messages[start : start + CHUNK_SIZE]
            if result.rejected or result.unknown:
                result.created += [False] * len(chunk)
                result.rejected += [m.job_id for m in chunk]
                continue
            self._push_chunk(chunk, request_id, result, record_extra or {})
        return result

    def _push_chunk(
        self, chunk: Sequence[JobMessage], request_id: str | None, result: PushResult,
        extra: Mapping[str, Any],
    ) -> None:  # fmt: skip
        states = self._record(chunk, extra)
        for msg, state in zip(chunk, states, strict=True):
            result.created.append(state == "created")
            if state in ("created", "exists"):
                result.accepted.append(msg.job_id)
            elif state == "rejected":
                result.rejected.append(msg.job_id)
            else:
                result.unknown.append(msg.job_id)
        fresh = [m for m, state in zip(chunk, states, strict=True) if state == "created"]
        if fresh and not self._publish(fresh, request_id):
            result.unpublished += len(fresh)

    def _record(self, chunk: Sequence[JobMessage], extra: Mapping[str, Any]) -> list[str]:
        """Each job's record: 'created', 'exists', 'rejected' (Redis refused it) or 'unknown'."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                store = JobStore(pipe, self.ttl, recovery_after=self.recovery_after)
                for msg in chunk:
                    # The message copy lets the due sweep republish a lost message;
                    # program/model stay unset until a worker plans the job, unless the
                    # producer (or the API, which plans first) named them.
                    store.create(
                        msg.job_id,
                        {**job_record(msg), **extra},
                        message=msg.model_dump(mode="json", exclude_none=True),
                    )
                # Per command: a create script either wrote the whole record or nothing
                # (OOM, READONLY), so each reply says exactly whether its job is accepted.
                replies = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            log.warning("the connection broke while recording %d jobs: %s", len(chunk), exc)
            return self._read_back(chunk)
        states = []
        for reply in replies:
            if isinstance(reply, Exception):
                states.append("rejected")
            else:
                states.append("created" if reply else "exists")
        refused = states.count("rejected")
        if refused:
            error = next(r for r in replies if isinstance(r, Exception))
            log.warning("Redis refused %d of %d job records: %s", refused, len(chunk), error)
        return states

    def _read_back(self, chunk: Sequence[JobMessage]) -> list[str]:
        """After a broken connection: which records exist ('exists'), which not ('rejected');
        all 'unknown' if Redis cannot be read either."""
        try:
            with self.client.pipeline(transaction=False) as pipe:
                for msg in chunk:
                    pipe.exists(JobStore.key(msg.job_id))
                found = pipe.execute()
        except redis.RedisError:
            return ["unknown"] * len(chunk)
        # A record written just now but not published is published by the recovery sweep.
        return ["exists" if n else "rejected" for n in found]

    def _publish(self, fresh: Sequence[JobMessage], request_id: str | None) -> bool:
        """Publish recorded jobs in one pipeline; False (logged) if the broker refused."""
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
                        **self._declare,
                    )
        except PUBLISH_ERRORS as exc:
            # KombuError covers BatchPublishError (a failed pipeline flush: some messages
            # may have reached the queue) and OperationalError. The records (with their
            # messages) are stored: the jobs are accepted, and the workers' due sweep
            # publishes what did not reach the queue; a message published twice runs once.
            log.warning(
                "%d jobs recorded but not (all) published (%s: %s); "
                "the recovery sweep will publish them",
                len(fresh),
                type(exc).__name__,
                exc,
            )
            return False
        try:
            self.broker.mark_published(self.client, [m.job_id for m in fresh])
        except redis.RedisError as exc:
            # Unmarked jobs are published once more by the due sweep: duplicates, harmless.
            log.warning("could not mark %d published jobs: %s", len(fresh), exc)
        return True


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
        self.redis = connection.redis_client(
            settings.redis_url, sentinel_password=settings.sentinel_secret,
            decode_responses=True, **settings.redis_timeouts,
        )  # fmt: skip
        self.store = JobStore(self.redis, settings.job_ttl_seconds,
                              recovery_after=settings.recovery_after_seconds)  # fmt: skip
        self.publisher = Publisher(
            make_celery(settings, publisher=True), self.redis, settings.job_ttl_seconds,
            recovery_after=settings.recovery_after_seconds,
            broker=broker_for(settings.broker, sentinel_password=settings.sentinel_secret),
        )  # fmt: skip

    def _message(
        self,
        item: PredictFields | Mapping[str, Any],
        priority: Priority,
        batch: tuple[str, str] | None = None,
    ) -> JobMessage:
        """The v1 message of one item; with ``batch`` (batch id, item name) and no request_id
        of its own, its job id derives from the batch and the item's name."""
        if isinstance(item, BatchItem):
            item = item.model_dump(exclude={"custom_id"})
        if isinstance(item, PredictFields):
            fields = item
            if "priority" not in item.model_fields_set:
                fields = item.model_copy(update={"priority": priority})
        else:
            data = {k: v for k, v in item.items() if k != "custom_id"}
            fields = PredictFields.model_validate({"priority": priority, **data})
        job_id = None
        if batch is not None and fields.request_id is None:
            job_id = item_job_id(self.tenant, *batch)
        return build_message(fields, tenant=self.tenant, job_id=job_id)

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
        idempotency_key: str | None = None,
    ) -> list[str]:
        """Validate every item first (pydantic ValidationError before anything is pushed), then
        push them all, pipelined; returns the job ids in order. An item's own ``priority``
        wins over ``priority`` (default: the batch lane). ``request_id`` is a trace id for the
        workers' logs; an item's ``request_id`` field is its idempotency key.

        With ``idempotency_key``, each item's job id derives from (tenant, key, its
        ``custom_id`` or else its position): calling again with the same key and items names
        the same jobs, so nothing runs or bills twice and what was missing is added. The
        same key with other items raises IdempotencyKeyReusedError (nothing pushed).

        If Redis refuses part of the push, ProducerError says exactly which job ids were
        ``accepted`` (they run) and ``rejected`` (they do not); a broker that refuses the
        publish is not an error (recorded jobs are published by the recovery sweep)."""
        items = list(items)
        batch_id = None
        if idempotency_key is not None:
            batch_id = batch_id_for(self.tenant, idempotency_key)
            names = [_item_name(item, index) for index, item in enumerate(items)]
            if len(set(names)) != len(names):
                raise ValueError("custom_id values must be unique within one submit_many call")
            messages = [
                self._message(item, priority, (batch_id, name))
                for item, name in zip(items, names, strict=True)
            ]
            digest = fingerprint(
                [[name, _fingerprint_view(m)] for name, m in zip(names, messages, strict=True)]
            )
            try:
                claim_idempotency_key(self.redis, batch_id, digest, self.settings.job_ttl_seconds)
            except redis.RedisError as exc:
                ids = [m.job_id for m in messages]
                raise ProducerError(
                    f"Redis refused the batch: {exc}", ids, batch_id=batch_id
                ) from exc
        else:
            messages = [self._message(item, priority) for item in items]
        result = self.publisher.push(messages, request_id=request_id)
        if not result.complete:
            raise ProducerError(
                f"Redis refused {len(result.rejected) + len(result.unknown)} of "
                f"{len(messages)} jobs; {len(result.accepted)} were accepted and will run",
                result.rejected,
                accepted=result.accepted,
                unknown=result.unknown,
                batch_id=batch_id,
            )
        return result.job_ids

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
            pending = [j for j in pending if (jobs[j] or {}).get("status") not in TERMINAL_STATUSES]
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


def _item_name(item: PredictFields | Mapping[str, Any], index: int) -> str:
    """An item's name within its batch: its custom_id, else its position."""
    custom_id = getattr(item, "custom_id", None)
    if custom_id is None and isinstance(item, Mapping):
        custom_id = item.get("custom_id")
    return str(custom_id) if custom_id is not None else f"#{index}"


def _fingerprint_view(msg: JobMessage) -> dict[str, Any]:
    """What an item asks for, without what changes between two sends of it."""
    return msg.model_dump(mode="json", exclude={"job_id", "submitted_at"})


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
    idempotency_key: str | None = None,
) -> list[str]:
    """Push many jobs, pipelined, with a short-lived producer; returns their job ids
    (see Producer.submit_many for ``idempotency_key``)."""
    with Producer(redis_url=redis_url, tenant=tenant) as producer:
        return producer.submit_many(items, priority=priority, idempotency_key=idempotency_key)
