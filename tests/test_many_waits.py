"""500 clients hold `wait` at once on one API instance; it stays live and every one gets its result.

Issue 18's API concurrency, as a test (not timed): a real fleet (Redis, the mock LLM
with 100 ms of latency, a worker, the API with the tests' 2 gunicorn workers and its
default evented worker class and wait caps). The worker first consumes only the batch
queue, so that the 500 interactive jobs the clients submit (each with ``wait: 60``)
cannot end and every request is held at the same time; the test sees all 500 held (the
API's ``dspy_api_waits_held`` gauge, summed over its processes), checks that `/health`,
`/ready` and new submissions are answered while they are held, then has the worker
consume the interactive queue too (Celery's remote control, ``add_consumer``). Each of
the 500 must then be answered ``200`` with its own job ``succeeded`` and its outputs:
below the default caps (3,072 held requests per process) no wait may be capped, and a
held request must not be dropped or time out.

The latencies are printed, not asserted (issue 18 asks for the bound in the bench).
"""

from __future__ import annotations

import asyncio
import os
import re
import resource
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.settings import ApiSettings
from dspy_fleet.broker.celery_config import make_celery
from dspy_fleet.settings import CommonSettings, load_settings
from tests.conftest import PY, TEST_ENV, OwnStack, poll

CLIENTS = 500
WAIT_SECONDS = 60  # the API's maximum: no client's wait runs out before the worker consumes
PROBES = 40
HELD = re.compile(r"^dspy_api_waits_held (\S+)$", re.M)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OwnStack]:
    """Redis, the mock LLM (100 ms per call), the API, and a worker on the batch queue only
    (warmed up by one batch job)."""
    stack = OwnStack(tmp_path_factory.mktemp("many-waits"), env=dict(TEST_ENV))
    try:
        stack.start_redis()
        stack.start_mock_llm().set_faults(latency_ms=100)
        stack.start_worker(DSPY_FLEET_QUEUES="batch")
        api = stack.start_api()
        body = {"input": "warm up", "priority": "batch", "wait": 30}
        assert httpx.post(api.url + "/v1/predict", json=body, timeout=60).status_code == 200
        yield stack
    finally:
        stack.stop()


def consume_interactive(redis_url: str) -> None:
    """Have the fleet's workers consume the interactive queue too (Celery remote control)."""
    app = make_celery(load_settings(CommonSettings, redis_url=redis_url))
    replies = app.control.add_consumer("interactive", reply=True, timeout=10)
    assert replies and all("ok" in r for reply in replies for r in reply.values()), replies


def held(client: httpx.Client) -> float:
    """Requests the API holds right now, over all its processes (from /metrics)."""
    match = HELD.search(client.get("/metrics").text)
    assert match, "dspy_api_waits_held is not exported"
    return float(match[1])


async def probe(client: httpx.AsyncClient, method: str, path: str) -> tuple[float, httpx.Response]:
    """One request on a new connection (the kernel spreads those over the processes)."""
    body = {"input": f"extra {uuid.uuid4().hex}", "wait": 0} if method == "POST" else None
    started = time.perf_counter()
    resp = await client.request(method, path, json=body)
    return time.perf_counter() - started, resp


def test_500_held_waits_leave_the_api_live_and_each_gets_its_result(fleet: OwnStack) -> None:
    assert fleet.api is not None
    url = fleet.api.url
    tag = uuid.uuid4().hex[:8]
    marks: dict[str, float] = {"start": time.monotonic()}

    async def scenario(metrics: httpx.Client) -> tuple[list[httpx.Response], dict[str, list]]:
        # One connection per request, all open at once: each held one takes an API slot.
        limits = httpx.Limits(max_connections=CLIENTS + 1, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=WAIT_SECONDS + 30,
                                     limits=limits) as client:  # fmt: skip
            waits = [
                asyncio.create_task(client.post(
                    "/v1/predict", json={"input": f"many {tag} {i}", "wait": WAIT_SECONDS}))
                for i in range(CLIENTS)
            ]  # fmt: skip
            # Every client is held at once (no worker consumes their queue: no job can end).
            await asyncio.to_thread(poll, lambda: held(metrics) == CLIENTS, 60, 0.25)
            marks["all held"] = time.monotonic()
            assert not any(t.done() for t in waits), [t.result() for t in waits if t.done()]

            seconds: dict[str, list] = {"/health": [], "/v1/predict": []}
            for i in range(PROBES):
                elapsed, resp = await probe(client, "GET", "/health")
                assert resp.status_code == 200, resp.text
                seconds["/health"].append(elapsed)
                if i % 4 == 0:
                    # New submissions are still taken (and queued) while the API holds 500.
                    elapsed, resp = await probe(client, "POST", "/v1/predict")
                    assert resp.status_code == 202, resp.text
                    seconds["/v1/predict"].append(elapsed)
                if i % 10 == 0:
                    # Readiness answers too: not ready, as no worker consumes interactive yet.
                    _, resp = await probe(client, "GET", "/ready")
                    assert resp.status_code == 503, resp.text
                    assert resp.json()["error"]["details"]["failing"] == ["workers"]
            assert held(metrics) == CLIENTS and not any(t.done() for t in waits)
            marks["probed"] = time.monotonic()

            await asyncio.to_thread(consume_interactive, fleet.redis_url)
            return list(await asyncio.gather(*waits)), seconds

    with httpx.Client(base_url=url, timeout=10) as metrics:
        answers, seconds = asyncio.run(scenario(metrics))
        marks["all answered"] = time.monotonic()
        poll(lambda: held(metrics) == 0, 10)
    print(", ".join(f"{name} at {t - marks['start']:.1f} s" for name, t in marks.items()))
    for path, values in seconds.items():
        p99 = statistics.quantiles(values, n=100, method="inclusive")[98]
        print(f"{path} while {CLIENTS} waits were held: p50 {statistics.median(values) * 1e3:.1f}"
              f" ms, p99 {p99 * 1e3:.1f} ms, max {max(values) * 1e3:.1f} ms"
              f" over {len(values)} requests")  # fmt: skip

    assert len(answers) == CLIENTS
    for i, resp in enumerate(answers):
        body = resp.json()
        assert resp.status_code == 200, (i, resp.status_code, body)
        assert "X-Wait-Capped" not in resp.headers
        assert body["status"] == "succeeded", body
        assert f"many {tag} {i}" in body["outputs"]["answer"], body["outputs"]
    assert len({resp.json()["id"] for resp in answers}) == CLIENTS


def run_gunicorn_conf(
    tmp_path: Path, limits: tuple[int, int], **env: str
) -> subprocess.CompletedProcess:
    """Load the API's gunicorn settings (what the master does first) under open-file
    ``limits`` (soft, hard); print the soft limit it leaves for the workers."""
    code = (
        "import resource, api.gunicorn_conf; print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    return subprocess.run(
        [PY, "-c", code], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path), **env},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, limits),
    )  # fmt: skip


def test_the_api_raises_its_open_file_limit_to_hold_its_connections(tmp_path: Path) -> None:
    needed = ApiSettings().fds_needed
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"this machine allows {hard} open files, fewer than the API's {needed}")
    done = run_gunicorn_conf(tmp_path, (1024, hard))
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) == needed
    # The thread pool needs no more than the usual limit.
    done = run_gunicorn_conf(tmp_path, (1024, hard), DSPY_FLEET_API_WORKER_CLASS="gthread")
    assert done.returncode == 0 and int(done.stdout.split()[-1]) == 1024, done.stderr[-2000:]


def test_the_api_refuses_connections_the_system_cannot_give_it(tmp_path: Path) -> None:
    done = run_gunicorn_conf(tmp_path, (1024, 2048), DSPY_FLEET_API_CONNECTIONS="4096")
    assert done.returncode != 0
    assert "DSPY_FLEET_API_CONNECTIONS (4096) needs 4416 open files per API process, but the " \
           "limit is 2048 (ulimit -Hn)" in done.stderr, done.stderr[-2000:]  # fmt: skip
    done = run_gunicorn_conf(tmp_path, (1024, 2048), DSPY_FLEET_API_CONNECTIONS="1500")
    assert done.returncode == 0 and int(done.stdout.split()[-1]) == 1500 + 64 + 256, done.stderr
