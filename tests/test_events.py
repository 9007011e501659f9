"""Event streams (Server-Sent Events): every status change, in order, resumable, tenant-checked.

A real fleet: Redis, the mock LLM, three APIs (the second closes its streams after 1.5 s, to
make clients resume; the third holds one request open at most), and a worker that is started
only inside the first test, after that test's client is connected, so that the client sees
the job go from queued to running to succeeded live and not by luck of timing. The streams
are read with httpx and a small SSE reader written here (not the SDK's), except where the
SDK's ``iter_events`` is what is tested.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from api.auth import new_key
from dspy_fleet.client import FleetClient, NotFoundError
from tests.conftest import TEST_ENV, OwnStack, api_keys_setting, poll

KEYS = {"acme": new_key(), "globex": new_key()}
API_KEYS = api_keys_setting(KEYS)
SHORT_STREAM_SECONDS = 1.5


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnStack]:
    """Redis, the mock LLM and two APIs; no worker yet (the first test starts it)."""
    env = {**TEST_ENV, "DSPY_FLEET_API_KEYS": API_KEYS,
           "DSPY_FLEET_EVENTS_KEEPALIVE_SECONDS": "0.5",
           "DSPY_FLEET_RETRY_BACKOFF_SECONDS": "0.3"}  # fmt: skip
    stack = OwnStack(tmp_path_factory.mktemp("events"), env=env)
    try:
        stack.start_redis()
        stack.start_mock_llm()
        with stack.together():
            stack.start_api()
            stack.start_api("short", DSPY_FLEET_EVENTS_MAX_SECONDS=str(SHORT_STREAM_SECONDS))
            # One process that may hold one request open at a time.
            stack.start_api("capped", DSPY_FLEET_API_WORKERS="1", DSPY_FLEET_MAX_WAITS="1")
        yield stack
    finally:
        stack.stop()


def http(fleet: OwnStack, tenant: str = "acme", api: str = "api") -> httpx.Client:
    return httpx.Client(base_url=fleet.services[api].url, timeout=30,
                        headers={"Authorization": f"Bearer {KEYS[tenant]}"})  # fmt: skip


def worker_started(fleet: OwnStack) -> None:
    if not fleet.workers:
        fleet.start_worker()


def submit(client: httpx.Client, text: str) -> str:
    resp = client.post("/v1/predict", json={"input": text, "use_cache": False})
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


class Reader:
    """Reads one SSE response: its events (id, event, data) and its comment lines."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.comments: list[str] = []
        self.retry: list[str] = []

    def read(self, resp: httpx.Response, stop_after: int | None = None,
             lines: Iterator[str] | None = None) -> None:  # fmt: skip
        """Up to the result (or ``stop_after`` events); ``lines``: the response's line
        iterator, to read on later where an earlier call stopped."""
        block: dict[str, Any] = {}
        for line in lines or resp.iter_lines():
            if line.startswith(":"):
                self.comments.append(line)
            elif line.startswith("retry:"):
                self.retry.append(line[6:].strip())
            elif line == "":
                if "event" in block:
                    block["data"] = json.loads(block["data"])
                    self.events.append(block)
                    if block["event"] == "result" or len(self.events) == stop_after:
                        return
                block = {}
            else:
                name, _, value = line.partition(": ")
                block[name] = value


def stream(client: httpx.Client, path: str, last_id: str | None = None,
           stop_after: int | None = None) -> Reader:  # fmt: skip
    headers = {"Last-Event-ID": last_id} if last_id else {}
    reader = Reader()
    with client.stream("GET", path, headers=headers) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        reader.read(resp, stop_after)
    return reader


def statuses(reader: Reader) -> list[str]:
    return [e["data"]["status"] for e in reader.events]


def test_a_client_connected_before_the_job_runs_sees_every_status_and_the_result(
    fleet: OwnStack,
) -> None:
    assert not fleet.workers, "this test must run before any worker exists"
    with http(fleet) as client:
        job_id = submit(client, "What is 2+2?")
        reader = Reader()
        connected = threading.Event()

        def follow() -> None:
            with client.stream("GET", f"/v1/predictions/{job_id}/events") as resp:
                assert resp.status_code == 200
                connected.set()
                reader.read(resp)

        thread = threading.Thread(target=follow)
        thread.start()
        poll(lambda: reader.events, timeout=10)  # queued, read before any worker exists
        assert statuses(reader) == ["queued"]
        fleet.start_worker()
        thread.join(timeout=60)
        assert not thread.is_alive()
        got = client.get(f"/v1/predictions/{job_id}").json()
    assert statuses(reader) == ["queued", "running", "succeeded"]
    assert [e["event"] for e in reader.events] == ["status", "status", "result"]
    result = reader.events[-1]["data"]
    assert result == got and result["outputs"]["answer"]  # the same body as polling
    assert reader.events[1]["data"]["attempt"] == 1
    ids = [e["id"] for e in reader.events]
    assert ids == ["1", "2", "3"]
    # The worker took seconds to start: the stream said it was alive meanwhile.
    assert ": keep-alive" in reader.comments and reader.retry == ["1000"]


def test_a_retry_shows_and_a_reconnect_with_last_event_id_misses_and_repeats_nothing(
    fleet: OwnStack,
) -> None:
    worker_started(fleet)
    fleet.mock.set_faults(fail_next=1, error_status=503, latency_ms=300)
    try:
        with http(fleet) as client:
            job_id = submit(client, f"retried {uuid.uuid4().hex}")
            path = f"/v1/predictions/{job_id}/events"
            first = stream(client, path, stop_after=2)  # queued, running; then hang up
            time.sleep(0.5)  # the job moves on while nobody listens
            rest = stream(client, path, last_id=first.events[-1]["id"])
            whole = stream(client, path)  # the log from the start, after the job ended
    finally:
        fleet.mock.set_faults(fail_next=0, latency_ms=0)
    resumed = first.events + rest.events
    assert [e["id"] for e in resumed] == [e["id"] for e in whole.events]
    assert statuses(whole) == ["queued", "running", "retrying", "queued", "running", "succeeded"]
    retry = whole.events[2]["data"]
    assert retry["attempt"] == 1 and retry["error"]["code"] == "provider_error"
    assert retry["retry_in_seconds"] >= 0  # full jitter: may round to 0
    assert whole.events[4]["data"]["attempt"] == 2
    assert whole.events[-1]["data"]["attempts"] == 2
    # Resuming from any event gives exactly the ones after it.
    for k, event in enumerate(whole.events[:-1]):
        with http(fleet) as client:
            after = stream(client, path, last_id=event["id"])
        assert [e["id"] for e in after.events] == [e["id"] for e in whole.events[k + 1 :]]


def test_the_sdk_resumes_across_streams_the_server_closes(fleet: OwnStack) -> None:
    worker_started(fleet)
    fleet.mock.set_faults(latency_ms=int(SHORT_STREAM_SECONDS * 1000 * 2))
    try:
        with http(fleet) as client:
            job_id = submit(client, f"slow {uuid.uuid4().hex}")
        started = time.monotonic()
        api = fleet.services["short"].url
        with FleetClient(api, api_key=KEYS["acme"]) as sdk:
            events = list(sdk.iter_events(job_id))
        elapsed = time.monotonic() - started
    finally:
        fleet.mock.set_faults(latency_ms=0)
    # The call outlived at least one stream (each is closed after 1.5 s), yet every event
    # came once and in order.
    assert elapsed > SHORT_STREAM_SECONDS
    assert [e.data["status"] for e in events] == ["queued", "running", "succeeded"]
    assert [e.event for e in events] == ["status", "status", "result"]
    assert events[-1].data["outputs"]["answer"]


def test_streams_are_tenant_checked_and_errors_come_before_the_stream(fleet: OwnStack) -> None:
    worker_started(fleet)
    with http(fleet, "acme") as acme, http(fleet, "globex") as globex:
        job_id = submit(acme, "mine")
        for path in (f"/v1/predictions/{job_id}/events", "/v1/predictions/nope/events",
                     "/v1/batches/nope/events"):  # fmt: skip
            resp = globex.get(path) if "nope" not in path else acme.get(path)
            assert resp.status_code == 404, resp.text
            assert resp.json()["error"]["code"] == "not_found"
            assert resp.headers["content-type"].startswith("application/json")
        bad = acme.get(f"/v1/predictions/{job_id}/events", headers={"Last-Event-ID": "x"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"
        anon = httpx.get(f"{fleet.services['api'].url}/v1/predictions/{job_id}/events")
        assert anon.status_code == 401
        with (
            FleetClient(fleet.services["api"].url, api_key=KEYS["globex"]) as sdk,
            pytest.raises(NotFoundError),
        ):
            next(sdk.iter_events(job_id))
        # Its owner's stream works.
        assert statuses(stream(acme, f"/v1/predictions/{job_id}/events"))[-1] == "succeeded"


def test_a_batch_stream_reports_progress_then_the_batch(fleet: OwnStack) -> None:
    worker_started(fleet)
    fleet.mock.set_faults(latency_ms=800)
    try:
        with http(fleet) as client:
            items = [{"custom_id": f"c{i}", "input": f"batch {uuid.uuid4().hex}"}
                     for i in range(4)]  # fmt: skip
            items.append({"custom_id": "bad", "inputs": {"nope": 1}, "program": "missing"})
            created = client.post("/v1/batches", json=items)
            assert created.status_code == 202, created.text
            batch_id = created.json()["id"]
            path = f"/v1/batches/{batch_id}/events"
            reader = stream(client, path)
            final = client.get(f"/v1/batches/{batch_id}").json()
            again = stream(client, path, last_id=reader.events[0]["id"])
            with http(fleet, "globex") as other:
                assert other.get(path).status_code == 404
    finally:
        fleet.mock.set_faults(latency_ms=0)
    kinds = [e["event"] for e in reader.events]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"progress"}
    first = reader.events[0]["data"]["counts"]
    assert first["total"] == 5 and first["pending"] > 0  # the items take 0.8 s each
    ended = [e["data"]["counts"]["total"] - e["data"]["counts"]["pending"] for e in reader.events]
    assert ended == sorted(ended) and len(set(e["id"] for e in reader.events)) == len(kinds)
    result = reader.events[-1]["data"]
    assert result["status"] == "completed" == final["status"]
    assert result["counts"] == final["counts"] == {"total": 5, "succeeded": 4, "failed": 1,
                                                   "cancelled": 0, "pending": 0}  # fmt: skip
    # Resuming after the first snapshot: the ended batch's result, nothing older.
    assert [e["event"] for e in again.events] == ["result"]


def _lrange_calls(client: redis.Redis) -> int:
    """LRANGE commands Redis has run: a batch recount reads the batch's item list with them."""
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_lrange", {}).get("calls", 0))


def test_a_batch_stream_is_woken_by_its_items_ends_not_by_polling(fleet: OwnStack) -> None:
    # The items take 3 s at the provider: until then nothing in the batch can end, and an
    # open stream reads nothing (a poll every EVENTS_BATCH_POLL_SECONDS, 1 s, would have
    # recounted twice); then each item's end wakes it, and it sends the new counts.
    worker_started(fleet)
    fleet.mock.set_faults(latency_ms=3000)
    r = redis.Redis.from_url(fleet.redis_url)
    try:
        with http(fleet) as client:
            items = [{"custom_id": f"w{i}", "input": f"woken {uuid.uuid4().hex}"}
                     for i in range(2)]  # fmt: skip
            created = client.post("/v1/batches", json=items)
            assert created.status_code == 202, created.text
            path = f"/v1/batches/{created.json()['id']}/events"
            reader = Reader()
            with client.stream("GET", path) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()
                reader.read(resp, stop_after=1, lines=lines)  # the first snapshot
                before = _lrange_calls(r)
                time.sleep(2.0)  # no item can end before 3 s
                quiet_reads = _lrange_calls(r) - before
                reader.read(resp, lines=lines)  # on to the result
    finally:
        fleet.mock.set_faults(latency_ms=0)
        r.close()
    assert reader.events[0]["data"]["counts"]["pending"] == 2
    assert quiet_reads == 0
    assert reader.events[-1]["event"] == "result"
    assert reader.events[-1]["data"]["counts"]["succeeded"] == 2


def test_a_stream_over_the_cap_of_held_requests_is_refused_with_429(fleet: OwnStack) -> None:
    worker_started(fleet)
    fleet.mock.set_faults(latency_ms=2000)
    try:
        with http(fleet, api="capped") as client:
            job_id = submit(client, f"capped {uuid.uuid4().hex}")
            path = f"/v1/predictions/{job_id}/events"
            with client.stream("GET", path) as held:
                assert held.status_code == 200
                # Kept referenced: a dropped line iterator would close the connection.
                lines = held.iter_lines()
                assert next(lines) == "retry: 1000"  # open, and holding the one slot
                refused = client.get(path)
                assert refused.status_code == 429, refused.text
                assert refused.json()["error"]["code"] == "rate_limited"
                assert refused.headers["Retry-After"] == "1"
            # The closed stream gave its slot back (once the server saw it close).
            again = poll(lambda: (r := client.get(path)).status_code == 200 and r, timeout=10)
            assert "event: result" in again.text and '"status":"succeeded"' in again.text
    finally:
        fleet.mock.set_faults(latency_ms=0)
