"""The broker interface (dspy_fleet/broker/backends.py) against a real Redis of the module's
own: what "held by the broker" means with RabbitMQ, and how the due sweep acts on it.

No RabbitMQ here: AmqpBroker.held and mark_published only read and write the job store.
tests/chaos/test_rabbitmq.py runs the same paths against a real node.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from dspy_fleet.broker.backends import PUBLISHED_FIELD, AmqpBroker, RedisBroker, broker_for
from dspy_fleet.contract import PredictFields, build_message
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.store.jobs import KEY_PREFIX, PENDING_KEY, JobStore
from worker.recovery import CONFIRM_SECONDS, Sweeper

RECOVERY_AFTER = 5.0


@pytest.fixture(scope="module")
def client() -> Iterator[redis.Redis]:
    server = RedisServer().start()
    yield redis.Redis.from_url(server.url, decode_responses=True)
    server.stop()


def _job(client: redis.Redis) -> str:
    message = build_message(PredictFields(input="What is 1+1?", program="qa", model="mock"))
    record = {"program": "qa", "model": "mock", "tenant": "anonymous", "queue": "interactive",
              "created_at": message.submitted_at}  # fmt: skip
    store = JobStore(client, 3600, recovery_after=RECOVERY_AFTER)
    assert store.create(message.job_id, record, message=message.model_dump(mode="json"))
    return message.job_id


def _due_now(client: redis.Redis, job_id: str, *, age: float = RECOVERY_AFTER + 1) -> None:
    """Make the job look accepted ``age`` seconds ago, and due in the index."""
    now = time.time()
    client.hset(KEY_PREFIX + job_id, "enqueued_at", f"{now - age:.6f}")
    client.zadd(PENDING_KEY, {job_id: now - 1})


class Published:
    def __init__(self) -> None:
        self.ids: list[str] = []

    def __call__(self, job_id: str, message: dict[str, Any], queue: str, rid: str | None) -> None:
        self.ids.append(job_id)


def test_the_factory_picks_by_scheme() -> None:
    assert isinstance(broker_for("amqp://guest:guest@127.0.0.1:1/v"), AmqpBroker)
    assert isinstance(broker_for("amqps://h/v"), AmqpBroker)
    assert isinstance(broker_for("redis://127.0.0.1:1/0"), RedisBroker)
    assert isinstance(broker_for("unix:///tmp/redis.sock"), RedisBroker)


def test_a_confirmed_publish_is_marked_only_on_a_job_still_queued(client: redis.Redis) -> None:
    broker = AmqpBroker("amqp://guest:guest@127.0.0.1:1/")
    queued, running = _job(client), _job(client)
    client.hset(KEY_PREFIX + running, "status", "running")  # a fast worker claimed it first
    gone = "00000000-0000-4000-8000-000000000000"
    broker.mark_published(client, [queued, running, gone])
    assert client.hget(KEY_PREFIX + queued, PUBLISHED_FIELD) == "1"
    assert client.hget(KEY_PREFIX + running, PUBLISHED_FIELD) is None
    assert not client.exists(KEY_PREFIX + gone)  # no stray record without a TTL


def test_with_rabbitmq_a_confirmed_job_that_waits_is_never_republished(
    client: redis.Redis,
) -> None:
    published = Published()
    broker = AmqpBroker("amqp://guest:guest@127.0.0.1:1/")
    sweeper = Sweeper(client, published, recovery_after=RECOVERY_AFTER, broker=broker)
    waiting, unconfirmed = _job(client), _job(client)
    broker.mark_published(client, [waiting])
    for job_id in (waiting, unconfirmed):
        _due_now(client, job_id, age=600)  # ten minutes in the queue
    sweeper.sweep()
    # The unconfirmed one is a suspect (looked at again CONFIRM_SECONDS later), the
    # confirmed one is re-scored a full RECOVERY_AFTER ahead.
    assert published.ids == []
    assert client.hget(KEY_PREFIX + unconfirmed, "suspect") == "1"
    assert client.hget(KEY_PREFIX + waiting, "suspect") is None
    assert client.zscore(PENDING_KEY, waiting) > time.time() + RECOVERY_AFTER - 1  # type: ignore[operator]
    time.sleep(CONFIRM_SECONDS + 0.1)
    sweeper.sweep()
    assert published.ids == [unconfirmed]  # the second look confirms it lost


def test_a_takeover_clears_the_mark_of_the_publish_it_replaces(client: redis.Redis) -> None:
    published = Published()
    broker = AmqpBroker("amqp://guest:guest@127.0.0.1:1/")
    sweeper = Sweeper(client, published, recovery_after=RECOVERY_AFTER, broker=broker)
    job_id = _job(client)
    broker.mark_published(client, [job_id])
    # Claimed by a worker that died: running, no lease, due.
    client.hset(KEY_PREFIX + job_id, "status", "running")
    client.zadd(PENDING_KEY, {job_id: time.time() - 1})
    sweeper.sweep()
    assert published.ids == [job_id]
    job = client.hgetall(KEY_PREFIX + job_id)
    # Queued again with no mark: until the republish is confirmed, it counts as not held.
    assert job["status"] == "queued" and PUBLISHED_FIELD not in job
    assert json.loads(job["message"])["job_id"] == job_id


def test_with_redis_a_job_whose_message_waits_in_its_list_is_held(client: redis.Redis) -> None:
    broker = RedisBroker("redis://127.0.0.1:1/0")  # held() reads the client it is given
    published = Published()
    sweeper = Sweeper(client, published, recovery_after=RECOVERY_AFTER, broker=broker)
    job_id = _job(client)
    _due_now(client, job_id)
    client.lpush("interactive", json.dumps({"headers": {"id": job_id}}))
    try:
        sweeper.sweep()
        time.sleep(CONFIRM_SECONDS + 0.1)
        _due_now(client, job_id)
        sweeper.sweep()
        assert published.ids == []
    finally:
        client.delete("interactive")
    _due_now(client, job_id)
    sweeper.sweep()
    time.sleep(CONFIRM_SECONDS + 0.1)
    sweeper.sweep()
    assert published.ids == [job_id]  # its message gone and no worker holds it: lost


def test_a_broker_error_in_a_beat_never_stops_the_heartbeat(client: redis.Redis) -> None:
    from kombu.exceptions import OperationalError

    from dspy_fleet.store.heartbeats import Heartbeat, live_workers

    beats: list[float] = []

    def on_beat() -> None:
        beats.append(time.monotonic())
        raise OperationalError("the broker went away")

    heartbeat = Heartbeat(client, "amqp-test-worker", {"queues": ["interactive"]}, 0.05,
                          on_beat=on_beat)  # fmt: skip
    heartbeat.start()
    try:
        time.sleep(0.4)
        assert len(beats) >= 4  # it kept beating after the first error
        assert "amqp-test-worker" in [w["hostname"] for w in live_workers(client, 1.0)]
    finally:
        heartbeat.stop()
