"""500 event streams held open by one API process, while `/health` answers within 100 ms (p99).

Issue 17's concurrency bound for Server-Sent Events, asserted: a real Redis, the mock LLM
and the API with ONE gunicorn process (its default evented worker; keep-alive comments
every 2 s, not the default 15 s, so that the probes overlap keep-alive rounds: 250 a
second); no worker, so the 50 submitted jobs stay queued and no stream can end. 500
clients (10 per job, one asyncio httpx client, so the test needs no thread per stream)
each open ``GET /v1/predictions/<id>/events`` and read its first event (``queued``); the
API's ``dspy_api_event_streams_open`` gauge must read 500. Then 200 ``/health`` requests,
each on a new connection, 10 ms apart: p99 <= 100 ms. Then the jobs are cancelled, and
every one of the 500 streams must get its ``result`` (cancelled), in order after its
``queued``, and end; the gauge returns to 0.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import re
import statistics
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import TEST_ENV, OwnStack, poll

JOBS = 50
STREAMS_PER_JOB = 10
STREAMS = JOBS * STREAMS_PER_JOB
PROBES = 200
P99_BOUND_S = 0.100
OPEN = re.compile(r"^dspy_api_event_streams_open (\S+)$", re.M)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnStack]:
    env = {**TEST_ENV, "DSPY_FLEET_API_WORKERS": "1", "DSPY_FLEET_EVENTS_KEEPALIVE_SECONDS": "2"}
    stack = OwnStack(tmp_path_factory.mktemp("event-streams-load"), env=env)
    try:
        stack.start_redis()
        stack.start_mock_llm()
        stack.start_api()
        yield stack
    finally:
        stack.stop()


def streams_open(client: httpx.Client) -> float:
    match = OPEN.search(client.get("/metrics").text)
    assert match, "dspy_api_event_streams_open is not exported"
    return float(match[1])


async def follow(client: httpx.AsyncClient, job_id: str, first: asyncio.Event) -> list[dict]:
    """Read one stream to its end: its events' data, in order; ``first`` set at the first."""
    events: list[dict] = []
    async with client.stream("GET", f"/v1/predictions/{job_id}/events") as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                first.set()
    return events


def health_seconds(url: str, count: int, gap: float = 0.01) -> list[float]:
    """``count`` GET /health, ``gap`` seconds apart, each on a new connection (http.client:
    next to nothing of the client's own time is counted), from connect to the body read."""
    host, port = url.removeprefix("http://").split(":")
    out = []
    for _ in range(count):
        started = time.perf_counter()
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            conn.request("GET", "/health")
            resp = conn.getresponse()
            resp.read()
        finally:
            conn.close()
        out.append(time.perf_counter() - started)
        assert resp.status == 200
        time.sleep(gap)
    return out


@pytest.mark.serial
def test_500_streams_on_one_api_process_keep_health_under_100ms_p99(fleet: OwnStack) -> None:
    assert fleet.api is not None
    url = fleet.api.url
    marks = {"start": time.monotonic()}
    with httpx.Client(base_url=url, timeout=30) as sync:
        job_ids = []
        for i in range(JOBS):
            resp = sync.post("/v1/predict", json={"input": f"streamed {i}", "use_cache": False})
            assert resp.status_code == 202, resp.text
            job_ids.append(resp.json()["id"])

        async def scenario() -> tuple[list[list[dict]], list[float], list[float]]:
            idle = await asyncio.to_thread(health_seconds, url, 50)
            limits = httpx.Limits(max_connections=STREAMS + 10, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
                firsts = [asyncio.Event() for _ in range(STREAMS)]
                tasks = [
                    asyncio.create_task(follow(client, job_ids[i % JOBS], firsts[i]))
                    for i in range(STREAMS)
                ]
                await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 30)
                count = await asyncio.to_thread(streams_open, sync)
                assert count == STREAMS, count
                marks["all open"] = time.monotonic()
                # From a thread: the event loop reading 500 streams does not delay the timing.
                held = await asyncio.to_thread(health_seconds, url, PROBES)
                marks["probed"] = time.monotonic()
                assert not any(t.done() for t in tasks)
                for job_id in job_ids:
                    resp = await client.delete(f"/v1/predictions/{job_id}")
                    assert resp.status_code == 200, resp.text
                results = await asyncio.wait_for(asyncio.gather(*tasks), 30)
                marks["all ended"] = time.monotonic()
            return results, idle, held

        marks["submitted"] = time.monotonic()
        results, idle, held = asyncio.run(scenario())
        poll(lambda: streams_open(sync) == 0, 10)

    def p99(values: list[float]) -> float:
        return statistics.quantiles(values, n=100, method="inclusive")[98]

    print(f"/health idle: p50 {statistics.median(idle) * 1e3:.1f} ms, p99 {p99(idle) * 1e3:.1f} ms;"
          f" with {STREAMS} streams open on one process: p50 {statistics.median(held) * 1e3:.1f}"
          f" ms, p99 {p99(held) * 1e3:.1f} ms, max {max(held) * 1e3:.1f} ms"
          f" over {len(held)} requests")  # fmt: skip
    print(", ".join(f"{name} at {t - marks['start']:.1f} s" for name, t in marks.items()))
    for i, events in enumerate(results):
        assert [e["status"] for e in events] == ["queued", "cancelled"], (i, events)
        assert events[-1]["id"] == job_ids[i % JOBS]
    assert p99(held) <= P99_BOUND_S
