"""Workers die: SIGKILL three times mid-run, and SIGTERM (warm shutdown). No job is lost."""

from __future__ import annotations

import json
import signal
import time

from kombu.transport.redis import Channel

from dspy_fleet.broker.celery_config import celery_config
from dspy_fleet.settings import CommonSettings
from tests.chaos.conftest import FAST_REDELIVERY, ChaosStack, assert_billed_once, post_many

# 2,000 with duplicates and slow calls too is tests/chaos/test_exactly_once.py; here the
# jobs come through the API, and 600 are enough for three kills mid-run.
JOBS = 600


def test_600_jobs_survive_three_worker_kills(chaos: ChaosStack) -> None:
    chaos.mock.set_faults(latency_ms=30)
    chaos.start_api()
    bodies = [{"input": f"kill {i}: What is {i}+1?", "use_cache": False, "priority": "batch"}
              for i in range(JOBS)]  # fmt: skip
    t0 = time.monotonic()
    responses = post_many(chaos.api.url, bodies)
    assert all(r.status_code == 202 for r in responses)
    ids = [r.json()["id"] for r in responses]
    print(f"\naccepted {JOBS} jobs in {time.monotonic() - t0:.1f} s")

    worker = chaos.start_worker()
    t0 = time.monotonic()
    for fraction in (0.2, 0.45, 0.7):
        chaos.wait_succeeded(ids, fraction * JOBS)
        worker.child.signal(signal.SIGKILL)  # the whole process, threads and all
        worker.child.proc.wait(10)
        print(f"killed the worker at {fraction:.0%} ({time.monotonic() - t0:.1f} s)")
        worker = chaos.start_worker()
    final = chaos.wait_all(ids, timeout=240)
    elapsed = time.monotonic() - t0
    done = sum(s == "succeeded" for s in final.values())
    calls = chaos.mock.stats()["chat_completions"]
    print(
        f"{done}/{JOBS} succeeded in {elapsed:.1f} s after 3 kills; {calls} LM calls "
        f"({calls - JOBS} calls repeated for jobs that were running when killed)"
    )
    recovered = sum(w.log_path.read_text().count("republished a job whose message was lost")
                    for w in chaos.workers)  # fmt: skip
    print(f"messages lost by the broker and republished by the recovery sweep: {recovered}")
    assert done == JOBS, {s: list(final.values()).count(s) for s in set(final.values())}
    assert calls >= JOBS
    records = chaos.records(ids)
    assert_billed_once(records, chaos.costs())
    assert all(r["cost"]["attempts"] == 1 for r in records)


def test_sigterm_finishes_in_flight_jobs_and_loses_none(chaos: ChaosStack) -> None:
    chaos.mock.set_faults(latency_ms=1500)
    with chaos.together():
        chaos.start_api()
        worker = chaos.start_worker(DSPY_FLEET_CONCURRENCY="16")
    bodies = [{"input": f"term {i}", "use_cache": False} for i in range(100)]
    ids = [r.json()["id"] for r in post_many(chaos.api.url, bodies)]
    while sum(s == "running" for s in chaos.statuses(ids).values()) < 10:
        time.sleep(0.05)
    t0 = time.monotonic()
    worker.child.signal(signal.SIGTERM)
    code = worker.child.proc.wait(60)
    stopped_after = time.monotonic() - t0
    at_stop = chaos.statuses(ids)
    running = sum(s == "running" for s in at_stop.values())
    finished = sum(s == "succeeded" for s in at_stop.values())
    print(
        f"\nwarm shutdown took {stopped_after:.1f} s (exit {code}); {finished} jobs finished, "
        f"{running} left running, the rest back in the queue"
    )
    assert running == 0  # in-flight jobs finished before the worker exited
    chaos.mock.set_faults(latency_ms=0)
    chaos.start_worker()
    final = chaos.wait_all(ids, timeout=120)
    assert all(s == "succeeded" for s in final.values()), final
    calls = chaos.mock.stats()["chat_completions"]
    print(f"100/100 succeeded; {calls} LM calls (no job ran twice)")
    assert calls == 100
    assert_billed_once(chaos.records(ids), chaos.costs())


def test_a_job_whose_message_never_reached_the_broker_is_recovered(chaos: ChaosStack) -> None:
    """The API recorded the job, then died before publishing it (or the broker lost it)."""
    from dspy_fleet.contract import PredictFields, build_message
    from dspy_fleet.store.jobs import JobStore

    with chaos.together():
        chaos.start_api()
        chaos.start_worker()
    message = build_message(PredictFields(input="What is 20+22?", program="qa", model="mock"))
    record = {"program": "qa", "model": "mock", "tenant": "anonymous", "queue": "interactive",
              "created_at": message.submitted_at}  # fmt: skip
    store = JobStore(chaos.redis, 3600)
    assert store.create(message.job_id, record, message=message.model_dump(mode="json"))
    t0 = time.monotonic()
    final = chaos.wait_all([message.job_id], timeout=60)
    print(f"\nlost message republished and done after {time.monotonic() - t0:.1f} s")
    assert final[message.job_id] == "succeeded"
    assert store.get(message.job_id)["outputs"] == {"answer": "42"}


def test_a_worker_killed_inside_a_restore_pass_stalls_redelivery_only_briefly(
    chaos: ChaosStack,
) -> None:
    """A worker SIGKILLed while it held kombu's restore lock (``unacked_mutex``) leaves the
    lock to expire on its own; until then no worker restores the messages dead workers had
    taken. Built here exactly as such a death leaves Redis: jobs taken off the queue into
    kombu's unacked records, long enough ago to be due, and the lock held with the expiry
    our workers set. With kombu's default (300 s) these jobs waited 5 minutes."""
    chaos.start_api()
    bodies = [{"input": f"restore {i}", "use_cache": False, "priority": "batch"} for i in range(5)]
    ids = [r.json()["id"] for r in post_many(chaos.api.url, bodies)]
    r = chaos.redis
    # No worker yet: the jobs' messages wait in the queue; move them where a worker that
    # took them and died leaves them (kombu's QoS.append).
    visibility = int(FAST_REDELIVERY["DSPY_FLEET_VISIBILITY_TIMEOUT_SECONDS"])
    for _ in ids:
        payload = json.loads(r.rpop("batch"))
        tag = payload["properties"]["delivery_tag"]
        info = payload["properties"]["delivery_info"]
        r.hset(
            Channel.unacked_key, tag, json.dumps([payload, info["exchange"], info["routing_key"]])
        )
        r.zadd(Channel.unacked_index_key, {tag: time.time() - visibility - 1})
    assert r.llen("batch") == 0
    settings = CommonSettings(
        redis_url=chaos.redis_url,
        restore_sweep_seconds=int(FAST_REDELIVERY["DSPY_FLEET_RESTORE_SWEEP_SECONDS"]),
    )
    transport = celery_config(settings)["broker_transport_options"]
    expire = transport.get("unacked_mutex_expire", Channel.unacked_mutex_expire)
    # What the dead holder's redis-py Lock left: its token, with the lock's expiry.
    assert r.set(Channel.unacked_mutex_key, "a-killed-worker", px=int(expire * 1000), nx=True)
    t0 = time.monotonic()
    chaos.start_worker()
    final = chaos.wait_all(ids, timeout=60)
    took = time.monotonic() - t0
    print(f"\nrestore lock held {expire} s: the dead worker's 5 jobs ended {took:.1f} s later")
    assert all(s == "succeeded" for s in final.values()), final
    assert chaos.mock.stats()["chat_completions"] == 5
