"""Fixtures for the observability tests: operators' tools (Flower, celery-exporter,
promtool), scraping, and fleets on their own Redis database so counts are exact.
"""

from __future__ import annotations

import base64
import itertools
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import PY, MockLLM, Service
from worker.celery_config import make_celery
from worker.contract import TASK_NAME
from worker.dev.procs import Child, free_port, http_ok, wait_until
from worker.dev.redis import RedisServer
from worker.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[2]
EXPORTER_PYTHON = ROOT / ".venv-exporter" / "bin" / "python"
FLOWER_AUTH = ("ops", "s3cret-flower")

# Databases 1..15 of the session's Redis: each private fleet gets one, so its
# queues, events and heartbeats are invisible to every other worker.
_databases = itertools.count(1)


def isolated_redis_url(server: RedisServer) -> str:
    """A URL of a Redis database no other test uses."""
    db = next(_databases)
    assert db < 16, "out of Redis databases"
    return f"redis://127.0.0.1:{server.port}/{db}"


def require_tool(path: str | Path | None, what: str, how: str) -> str:
    """The tool's path; skip with a clear message when missing, but fail under CI=true."""
    if path and Path(path).exists():
        return str(path)
    message = f"{what} not found; {how}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: required)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of promtool (Debian package `prometheus`; `make test` installs it)."""
    return require_tool(
        shutil.which("promtool"), "promtool", "run `make test-tools` (apt package prometheus)"
    )


@pytest.fixture(scope="session")
def exporter_python() -> str:
    """The interpreter of .venv-exporter, where celery-exporter is installed."""
    return require_tool(
        EXPORTER_PYTHON, "celery-exporter (.venv-exporter)", "run `make exporter-venv`"
    )


Samples = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> Samples:
    """GET a Prometheus endpoint and return its samples as (name, labels, value)."""
    resp = httpx.get(url, timeout=10)
    resp.raise_for_status()
    return [
        (s.name, dict(s.labels), s.value)
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    ]


def total(samples: Samples, metric: str, /, **labels: str) -> float:
    """Sum of the samples called ``metric`` whose labels include ``labels``."""
    return sum(
        value
        for sample, have, value in samples
        if sample == metric and all(have.get(k) == v for k, v in labels.items())
    )


def send_jobs(broker_url: str, count: int, *, queue: str = "interactive") -> list[Any]:
    """Publish ``count`` distinct valid jobs straight to the broker; return AsyncResults."""
    producer = make_celery(CommonSettings(redis_url=broker_url))
    results = []
    for i in range(count):
        job_id = str(uuid.uuid4())
        message = {
            "v": 1,
            "job_id": job_id,
            "submitted_at": "2026-01-01T00:00:00Z",
            "program": "qa",
            "input": f"What is {i}+{i}?",
            "use_cache": False,
        }
        results.append(producer.send_task(TASK_NAME, kwargs=message, task_id=job_id, queue=queue))
    return results


@dataclass
class Tool:
    """A started operator tool (Flower, celery-exporter)."""

    child: Child
    url: str
    log_path: Path

    def log(self) -> str:
        """Its output so far (for assertion messages)."""
        return self.log_path.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="session")
def flower(redis_server: RedisServer, mock_llm: MockLLM, logs_dir: Path) -> Iterator[Tool]:
    """`dspy-fleet flower` with basic auth, watching the session's broker."""
    port = free_port()
    user, password = FLOWER_AUTH
    env = {
        "DSPY_FLEET_REDIS_URL": redis_server.url,
        "DSPY_FLEET_MOCK_LLM_URL": mock_llm.url,
        "DSPY_FLEET_FLOWER_BASIC_AUTH": f"{user}:{password}",
    }
    log_path = logs_dir / "flower.log"
    child = Child(
        "flower",
        [PY, "-m", "worker.cli", "flower", "--port", str(port)],
        env=env,
        log_path=log_path,
    )
    url = f"http://127.0.0.1:{port}"
    wait_until(http_ok(url + "/healthcheck"), 60, "Flower", child.proc)
    yield Tool(child=child, url=url, log_path=log_path)
    child.stop()


def basic_auth_header(user: str, password: str) -> dict[str, str]:
    """An Authorization header for HTTP basic auth."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture(scope="session")
def celery_exporter(
    exporter_python: str, redis_server: RedisServer, logs_dir: Path
) -> Iterator[Tool]:
    """Dani Hodovic's celery-exporter from .venv-exporter, watching the session's broker."""
    port = free_port()
    log_path = logs_dir / "celery-exporter.log"
    argv = [
        exporter_python,
        "-c",
        "from src.cli import cli; cli()",
        f"--broker-url={redis_server.url}",
        "--host=127.0.0.1",  # it listens on 0.0.0.0 otherwise
        f"--port={port}",
        # Without this its celery_queue_length waits until a worker reports the queue.
        "--queues=interactive,batch",
    ]
    # Its own venv only: none of our packages on its path.
    env = {"PYTHONPATH": "", "VIRTUAL_ENV": str(Path(exporter_python).parents[1])}
    child = Child("celery-exporter", argv, env=env, log_path=log_path, cwd=Path("/"))
    url = f"http://127.0.0.1:{port}"
    wait_until(http_ok(url + "/health"), 60, "celery-exporter", child.proc)
    yield Tool(child=child, url=url, log_path=log_path)
    child.stop()


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (prefork pool children, gunicorn workers)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def worker_metrics_url(worker: Service) -> str:
    """Where a worker started by start_worker serves its metrics."""
    return f"http://127.0.0.1:{worker.env['DSPY_FLEET_METRICS_PORT']}"
