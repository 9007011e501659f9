"""Everything that depends on which broker carries the jobs, behind one interface.

Redis stays the job store, cache and result backend whatever the broker; what differs
is how one asks the broker a few questions, answered here by :class:`RedisBroker`
(kombu's Redis transport: lists and an ``unacked`` hash) and :class:`AmqpBroker`
(RabbitMQ through py-amqp: quorum queues, publisher confirms):

- ``queue_lengths()``: messages waiting per queue (``dspy_queue_length``);
- ``ping()``: a real round-trip to the broker (``/ready``);
- ``held(client, jobs)``: which of these queued jobs the broker still holds, waiting or
  delivered and unacknowledged (the due sweep republishes only the others);
- ``mark_published(client, job_ids)``: what a confirmed publish leaves behind for ``held``;
- ``PUBLISH_ERRORS``: every error of a publish that means "the broker did not take it"
  (503 broker_unavailable, never 500).

:func:`broker_for` picks one by the URL's scheme and refuses any other scheme with a
ConfigError, so a typo or an unsupported transport (``sqs://``) stops start-up instead of
running with recovery that cannot see the queues.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlsplit

import amqp.exceptions
import redis
from kombu import Connection
from kombu.exceptions import KombuError

from dspy_fleet.contract import QUEUES
from dspy_fleet.errors import ConfigError
from dspy_fleet.settings import AMQP_BROKER_SCHEMES, BROKER_SCHEMES
from dspy_fleet.store import connection
from dspy_fleet.store.jobs import KEY_PREFIX

log = logging.getLogger("dspy_fleet.broker")


# A publish that failed for any of these did not reach the broker (or was not confirmed):
# the job stays recorded and the due sweep publishes it later. kombu's OperationalError is
# a KombuError; py-amqp raises its own AMQPError for a refused vhost or login
# (NotAllowed, AccessRefused: not connection errors to kombu, so not wrapped by it).
PUBLISH_ERRORS: tuple[type[Exception], ...] = (
    KombuError,
    amqp.exceptions.AMQPError,
    redis.RedisError,
    OSError,
)

# Job hash field set once the broker confirmed the job's message (AMQP only); the due
# sweep's take script clears it whenever the job goes back to queued for a new publish.
PUBLISHED_FIELD = "published"

UNACKED_KEY = "unacked"  # kombu's Redis transport: delivery tag -> [message, exchange, key]
# kombu's Redis transport keeps one list per priority step: "queue", "queue\x06\x163", ...
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)


class Waiting(NamedTuple):
    """A queued job the due sweep asks about: its id, queue and when it was (re)published
    (``enqueued_at``, Unix seconds on Redis's clock; None if unknown)."""

    job_id: str
    queue: str
    enqueued_at: float | None


class Broker(Protocol):
    """The broker-specific questions (see the module docstring)."""

    url: str

    def queue_lengths(self, queues: Sequence[str] = QUEUES) -> dict[str, int]:
        """Messages waiting (not delivered) per queue. Raises one of PUBLISH_ERRORS."""
        ...

    def ping(self) -> float:
        """One round-trip to the broker; returns its latency in ms. Raises one of
        PUBLISH_ERRORS when the broker is unreachable or refuses us."""
        ...

    def held(self, client: redis.Redis, jobs: Sequence[Waiting]) -> set[str]:
        """The ids among ``jobs`` whose message the broker still holds (waiting, or
        delivered and unacknowledged): those are not lost. Raises redis.RedisError."""
        ...

    def mark_published(self, client: redis.Redis, job_ids: Sequence[str]) -> None:
        """Record that the broker confirmed these jobs' messages (for ``held``).
        Raises redis.RedisError."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased ("" if none)."""
    return urlsplit(url).scheme.lower()


def is_amqp(url: str) -> bool:
    """Whether ``url`` names a RabbitMQ (AMQP 0-9-1) broker."""
    return scheme_of(url) in AMQP_BROKER_SCHEMES


def check_broker_url(url: str) -> None:
    """Raise ConfigError unless ``url``'s scheme is one the fleet supports."""
    scheme = scheme_of(url)
    if scheme not in BROKER_SCHEMES:
        named = f"{scheme}://" if scheme else repr(url)
        supported = ", ".join(s + "://" for s in BROKER_SCHEMES)
        raise ConfigError(
            f"DSPY_FLEET_BROKER_URL: unsupported broker scheme {named}; supported: {supported}"
        )


def broker_for(url: str, *, timeout: float = 1.0, sentinel_password: str | None = None) -> Broker:
    """The Broker for ``url``: RedisBroker (redis+sentinel:// too, with the Sentinels'
    ``sentinel_password``) or AmqpBroker. ``timeout`` (s) bounds each connect and
    round-trip. Raises ConfigError for an unsupported scheme."""
    check_broker_url(url)
    if is_amqp(url):
        return AmqpBroker(url, timeout=timeout)
    return RedisBroker(url, timeout=timeout, sentinel_password=sentinel_password)


# -- Redis ------------------------------------------------------------------------------


class _Empty:
    """The queue has no message waiting at all."""


EMPTY = _Empty()


class RedisBroker:
    """kombu's Redis transport: a queue is a list per priority step, delivered messages sit
    in the ``unacked`` hash until acknowledged (restored after the visibility timeout)."""

    def __init__(self, url: str, *, timeout: float = 1.0,
                 sentinel_password: str | None = None) -> None:  # fmt: skip
        self.url = url
        # No connection until a first command.
        self.client = connection.redis_client(
            url, sentinel_password=sentinel_password, socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )  # fmt: skip

    def queue_lengths(self, queues: Sequence[str] = QUEUES) -> dict[str, int]:
        """One pipelined round-trip of LLENs over every priority list."""
        pipe = self.client.pipeline(transaction=False)
        for queue in queues:
            for key in queue_keys(queue):
                pipe.llen(key)
        lengths = pipe.execute()
        per = len(PRIORITY_STEPS)
        return {q: int(sum(lengths[i * per : (i + 1) * per])) for i, q in enumerate(queues)}

    def ping(self) -> float:
        t0 = time.perf_counter()
        self.client.ping()
        return (time.perf_counter() - t0) * 1e3

    def held(self, client: redis.Redis, jobs: Sequence[Waiting]) -> set[str]:
        """The FIFO watermark check (no queue scan): if the oldest message still waiting in
        a job's queue was published after this job's, this job's message was consumed; then
        it is held only if a worker holds it unacknowledged. ``client`` is the broker's
        Redis too (the Redis transport keeps its lists next to the job store)."""
        marks = oldest_waiting(client, sorted({j.queue for j in jobs}))
        unacked: set[str] | None = None
        out = set()
        for job in jobs:
            mark = marks[job.queue]
            consumed = mark is EMPTY or (
                isinstance(mark, float) and job.enqueued_at is not None and mark > job.enqueued_at
            )
            if not consumed:
                out.add(job.job_id)
                continue
            if unacked is None:
                unacked = ids_unacked(client)
            if job.job_id in unacked:
                out.add(job.job_id)
        return out

    def mark_published(self, client: redis.Redis, job_ids: Sequence[str]) -> None:
        """Nothing: the Redis transport's lists are read directly."""

    def close(self) -> None:
        self.client.close()


def queue_keys(queue: str) -> list[str]:
    """The Redis list keys that hold ``queue``'s waiting messages."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def oldest_waiting(client: redis.Redis, queues: Sequence[str]) -> dict[str, float | _Empty | None]:
    """Per queue: when its oldest waiting message was published (its job's ``enqueued_at``),
    EMPTY if no message waits, None if that cannot be told (a message without a job record).

    O(1) per queue: LINDEX -1 of each of kombu's priority lists (FIFO: LPUSH, BRPOP)."""
    names = [(q, key) for q in queues for key in queue_keys(q)]
    pipe = client.pipeline(transaction=False)
    for _, name in names:
        pipe.lindex(name, -1)
    heads = [(q, _task_id(raw) if raw is not None else "") for (q, _), raw in
             zip(names, pipe.execute(), strict=True)]  # fmt: skip
    pipe = client.pipeline(transaction=False)
    for _, task_id in heads:
        if task_id:
            pipe.hget(KEY_PREFIX + task_id, "enqueued_at")
    times = iter(pipe.execute())
    marks: dict[str, float | _Empty | None] = {q: EMPTY for q in queues}
    for queue, task_id in heads:
        if task_id == "":
            continue  # this priority list is empty
        enqueued = next(times) if task_id else None
        current = marks[queue]
        if enqueued is None or current is None:
            marks[queue] = None
        else:
            value = float(enqueued)
            marks[queue] = value if current is EMPTY else min(value, current)  # type: ignore[type-var]
    return marks


def _task_id(raw: Any) -> str | None:
    """The task id (= job id) of a kombu message in a Redis list, None if unreadable."""
    try:
        msg = json.loads(raw)
        return str(msg["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return None


def ids_unacked(client: redis.Redis) -> set[str]:
    """Task ids of the messages workers hold unacknowledged (prefetched or running)."""
    ids = set()
    for raw in client.hvals(UNACKED_KEY):
        try:
            ids.add(json.loads(raw)[0]["headers"]["id"])
        except (ValueError, KeyError, IndexError, TypeError):
            continue
    return ids


# -- AMQP (RabbitMQ) ----------------------------------------------------------------------

# Set PUBLISHED_FIELD only on a job that still exists and is still queued: a job that
# already ran (a fast worker beat our HSET) or expired must not grow a stray field/key.
# KEYS: job hashes. ARGV: the field, the status queued.
_MARK = """
for _, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'status') == ARGV[2] then redis.call('HSET', key, ARGV[1], '1') end
end
return 0
"""


class AmqpBroker:
    """RabbitMQ: durable quorum queues, persistent messages, publisher confirms.

    RabbitMQ redelivers by itself every message whose consumer's channel closes before the
    ack (a killed worker), and a confirmed message is on a quorum of disk: once confirmed,
    a job's message is not lost while it waits, however long. So a queued job is held iff
    its publish was confirmed (``PUBLISHED_FIELD`` on its record); one recorded whose
    publish failed or was never made (an API that died in between, a broker outage) is
    the lost kind, and the due sweep publishes it.
    """

    def __init__(self, url: str, *, timeout: float = 1.0) -> None:
        self.url = url
        self.timeout = timeout
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def _channel(self) -> Any:
        if self._conn is None:
            self._conn = Connection(self.url, connect_timeout=self.timeout,
                                    transport_options={"read_timeout": self.timeout,
                                                       "write_timeout": self.timeout})  # fmt: skip
        return self._conn.default_channel

    def _reset(self) -> None:
        if self._conn is not None:
            # A broken connection's close fails too; there is nothing to keep.
            with contextlib.suppress(Exception):
                self._conn.release()
            self._conn = None

    def queue_lengths(self, queues: Sequence[str] = QUEUES) -> dict[str, int]:
        """A passive queue.declare per queue: its message_count (ready messages, not those
        delivered and unacknowledged). A queue not declared yet (no worker ever started)
        counts 0."""
        out = {}
        with self._lock:
            for queue in queues:
                try:
                    _, count, _ = self._channel().queue_declare(queue=queue, passive=True)
                except amqp.exceptions.NotFound:
                    # The broker closed the channel with the 404: take a fresh one next.
                    self._reset()
                    count = 0
                except BaseException:
                    self._reset()
                    raise
                out[queue] = int(count)
        return out

    def ping(self) -> float:
        """A passive declare of the first queue (a round-trip on a live channel)."""
        t0 = time.perf_counter()
        self.queue_lengths(QUEUES[:1])
        return (time.perf_counter() - t0) * 1e3

    def held(self, client: redis.Redis, jobs: Sequence[Waiting]) -> set[str]:
        """Jobs whose publish was confirmed (see the class docstring)."""
        pipe = client.pipeline(transaction=False)
        for job in jobs:
            pipe.hexists(KEY_PREFIX + job.job_id, PUBLISHED_FIELD)
        return {j.job_id for j, seen in zip(jobs, pipe.execute(), strict=True) if seen}

    def mark_published(self, client: redis.Redis, job_ids: Sequence[str]) -> None:
        if job_ids:
            client.register_script(_MARK)(keys=[KEY_PREFIX + i for i in job_ids],
                                          args=[PUBLISHED_FIELD, "queued"])  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._reset()
