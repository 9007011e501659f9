"""The API's job waiter on a real Redis: woken by the finish script's notification, and by its
sweep when a notification is lost (a finish it never heard of, a subscriber cut off).

In-process waiters (threads; under gunicorn's gevent worker the same code runs on greenlets)
against a private redis-server, finished by the job store's own scripts.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from prometheus_client import REGISTRY

from api.waiter import JobWaiter
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.store.jobs import WAKE_PREFIX, JobStore, read_wake
from tests.conftest import poll

SUCCEEDED = {"status": "succeeded", "outputs": {"answer": "42"}}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    server = RedisServer(log_path=tmp_path_factory.mktemp("waiter") / "redis.log").start()
    conn = redis.Redis.from_url(server.url, decode_responses=True)
    yield conn
    conn.close()
    server.stop()


@pytest.fixture
def store(client: redis.Redis) -> JobStore:
    return JobStore(client, ttl_seconds=600)


@pytest.fixture
def waiters(client: redis.Redis, store: JobStore) -> Iterator[Callable[..., JobWaiter]]:
    """Makes waiters (one per simulated API process); stops their subscribers after the test."""
    made: list[JobWaiter] = []

    def make(**kwargs: Any) -> JobWaiter:
        made.append(JobWaiter(client, store, **kwargs))
        return made[-1]

    yield make
    for waiter in made:
        waiter.close(wait=False)
    for waiter in made:
        waiter.close()


def new_job(store: JobStore) -> str:
    job_id = f"waiter-{uuid.uuid4().hex}"
    assert store.create(job_id, {"program": "qa", "tenant": "t"})
    return job_id


def wakeups(source: str) -> float:
    return REGISTRY.get_sample_value("dspy_api_wait_wakeups_total", {"source": source}) or 0.0


class Waiting:
    """One ``JobWaiter.wait`` in a thread: its result and how long it took."""

    def __init__(self, waiter: JobWaiter, job_id: str, timeout: float) -> None:
        self.result: dict[str, Any] | None = None
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, args=(waiter, job_id, timeout))
        self.thread.start()

    def _run(self, waiter: JobWaiter, job_id: str, timeout: float) -> None:
        started = time.monotonic()
        self.result = waiter.wait(job_id, timeout)
        self.seconds = time.monotonic() - started

    def join(self) -> dict[str, Any] | None:
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()
        return self.result


def watched(client: redis.Redis, waiter: JobWaiter, job_id: str) -> bool:
    """Whether the waiter's process channel is in the job's wake set (its wait began)."""
    return bool(client.sismember(WAKE_PREFIX + job_id, waiter.channel))


def test_the_finish_script_wakes_every_process_waiting_for_the_job(
    client: redis.Redis, store: JobStore, waiters: Callable[..., JobWaiter]
) -> None:
    # Two API processes (each its own channel and subscriber) and two waiters in one of them.
    # No periodic sweep during the test: what wakes the waiters must be the notification.
    first, second = waiters(recheck_seconds=600), waiters(recheck_seconds=600)
    job_id = new_job(store)
    before = wakeups("notification")
    waits = [Waiting(first, job_id, 30), Waiting(first, job_id, 30), Waiting(second, job_id, 30)]
    poll(lambda: watched(client, first, job_id) and watched(client, second, job_id))
    poll(lambda: first.waiting == 1 and second.waiting == 1)
    # Both subscribed and past their first sweep (else that sweep could find the end first).
    poll(lambda: first.listening.is_set() and second.listening.is_set())
    assert store.finish(job_id, SUCCEEDED) == 1
    for w in waits:
        job = w.join()
        assert (
            job is not None and job["status"] == "succeeded" and job["outputs"] == {"answer": "42"}
        )
        assert w.seconds < 30  # woken, not timed out
    # One wake per process (the job, not each request), by notification; the set is gone.
    assert wakeups("notification") - before == 2
    assert not client.exists(WAKE_PREFIX + job_id)
    assert first.waiting == 0 and second.waiting == 0


def test_no_wake_set_for_a_job_nobody_waits_for_or_that_already_ended(
    client: redis.Redis, store: JobStore, waiters: Callable[..., JobWaiter]
) -> None:
    waiter = waiters()
    job_id = new_job(store)
    assert store.finish(job_id, SUCCEEDED) == 1
    assert not client.exists(WAKE_PREFIX + job_id)
    # A wait on an ended job answers at once and registers nothing.
    job = waiter.wait(job_id, 30)
    assert job is not None and job["status"] == "succeeded"
    assert not client.exists(WAKE_PREFIX + job_id)
    assert waiter.wait("no-such-job", 1) is None
    assert not client.exists(WAKE_PREFIX + "no-such-job")


def test_a_job_that_ended_without_a_notification_is_found_by_the_sweep(
    client: redis.Redis, store: JobStore, waiters: Callable[..., JobWaiter]
) -> None:
    waiter = waiters(recheck_seconds=0.3)
    job_id = new_job(store)
    before = wakeups("sweep")
    waiting = Waiting(waiter, job_id, 30)
    poll(lambda: watched(client, waiter, job_id))
    # Made terminal behind the scripts' back: no PUBLISH reaches the subscriber.
    client.hset(store.key(job_id), mapping={"status": "failed"})
    job = waiting.join()
    assert job is not None and job["status"] == "failed"
    assert waiting.seconds < 30  # the sweep found it; the wait did not run out
    assert wakeups("sweep") - before == 1
    print(f"found by the sweep (every 0.3 s) after {waiting.seconds:.2f} s")


def test_a_cut_off_subscriber_resubscribes_and_finds_what_ended_meanwhile(
    client: redis.Redis, store: JobStore, waiters: Callable[..., JobWaiter]
) -> None:
    # Sweeps only at (re)subscription: what wakes the waiter must be the resubscription's.
    waiter = waiters(recheck_seconds=600)
    job_id = new_job(store)
    before = wakeups("sweep")
    waiting = Waiting(waiter, job_id, 30)
    poll(lambda: watched(client, waiter, job_id))
    poll(lambda: client.pubsub_numsub(waiter.channel)[0][1] == 1 and waiter.listening.is_set())
    # Cut the subscriber off; the job ends while it reconnects (the notification is lost).
    assert client.client_kill_filter(_type="pubsub") >= 1
    assert store.finish(job_id, SUCCEEDED) == 1
    job = waiting.join()
    assert job is not None and job["status"] == "succeeded"
    assert waiting.seconds < 30
    assert wakeups("sweep") - before == 1
    assert client.pubsub_numsub(waiter.channel)[0][1] == 1  # listening again
    print(f"woken after the resubscription {waiting.seconds:.2f} s after the cut")


def test_a_wait_that_runs_out_answers_the_job_as_it_stands(
    client: redis.Redis, store: JobStore, waiters: Callable[..., JobWaiter]
) -> None:
    waiter = waiters()
    job_id = new_job(store)
    job = waiter.wait(job_id, 0.3)
    assert job is not None and job["status"] == "queued"
    assert waiter.waiting == 0
    # Its channel stays in the set until the job ends (a stale entry costs one PUBLISH).
    assert watched(client, waiter, job_id)
    assert client.ttl(WAKE_PREFIX + job_id) > 0
    assert store.finish(job_id, SUCCEEDED) == 1
    assert not client.exists(WAKE_PREFIX + job_id)


def hgetalls(client: redis.Redis) -> int:
    """Full record reads (``JobStore.get``) this Redis has served so far."""
    return int(client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))


def test_a_held_wait_sleeps_through_the_steps_an_event_stream_hears(
    client: redis.Redis, store: JobStore, waiters: Callable[..., JobWaiter]
) -> None:
    """Every step is published (``<status> <job id>``) for the event streams; a held
    ``wait`` only wants the end, so the job starting neither wakes it nor costs a read. A
    bare job id (an end; or a step, from a worker older than that format) wakes it: it reads
    the job and, the job still running, waits on."""
    waiter = waiters(recheck_seconds=600)  # no sweep during the test
    job_id = new_job(store)
    held = Waiting(waiter, job_id, 30)
    poll(lambda: watched(client, waiter, job_id) and waiter.listening.is_set())
    with waiter.notified(job_id) as stream:
        reads = hgetalls(client)
        claim = store.start(job_id, {}, {"started_at": "2026-12-01T00:00:00+00:00"})
        assert claim.token is not None
        assert stream.wait(10)  # the event stream heard "running"
        time.sleep(0.3)
        assert hgetalls(client) == reads  # the held wait did not wake to read it
        client.publish(waiter.channel, job_id)  # the old format: a bare job id
        poll(lambda: hgetalls(client) == reads + 1)  # it read the job, still running...
    assert held.thread.is_alive()  # ...and waits on
    assert store.finish(job_id, SUCCEEDED, token=claim.token) == 1
    job = held.join()
    assert job is not None and job["status"] == "succeeded" and held.seconds < 30
    assert hgetalls(client) == reads + 2  # one read for the end


def test_a_wake_message_names_the_job_and_its_status() -> None:
    assert read_wake("running abc") == ("abc", "running")
    assert read_wake("succeeded job with spaces") == ("job with spaces", "succeeded")
    assert read_wake("abc") == ("abc", None)  # a bare job id (older workers)
    assert read_wake("batch:b1") == ("batch:b1", None)
    assert read_wake("not-a-status abc") == ("not-a-status abc", None)


def test_a_step_is_published_with_its_status_and_an_end_as_the_bare_job_id(
    client: redis.Redis, store: JobStore, waiters: Callable[..., JobWaiter]
) -> None:
    """The end stays the bare id, which API processes from before the status was sent
    wake their waits on (a rolling upgrade with the workers first); and a job whose id reads
    like ``<status> <id>`` is still woken at its end, its id being one waited for."""
    channel = f"test-channel-{uuid.uuid4().hex}"
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    confirmed = pubsub.get_message(timeout=5)  # subscribed before anything is published
    assert confirmed is not None and confirmed["type"] == "subscribe"
    job_id = new_job(store)
    assert store.watch(job_id, channel, 30) is not None
    claim = store.start(job_id, {}, {"started_at": "2026-12-01T00:00:00+00:00"})
    assert store.finish(job_id, SUCCEEDED, token=claim.token) == 1
    heard: list[str] = []
    deadline = time.monotonic() + 5
    while len(heard) < 2 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.5)
        if message is not None:
            heard.append(message["data"])
    pubsub.close()
    assert heard == [f"running {job_id}", job_id]

    waiter = waiters(recheck_seconds=600)  # no sweep during the test
    odd = "running " + uuid.uuid4().hex
    assert store.create(odd, {"program": "qa", "tenant": "t"})
    held = Waiting(waiter, odd, 30)
    poll(lambda: watched(client, waiter, odd) and waiter.listening.is_set())
    assert store.finish(odd, SUCCEEDED) == 1
    job = held.join()
    assert job is not None and job["status"] == "succeeded" and held.seconds < 30
