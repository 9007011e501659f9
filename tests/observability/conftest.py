"""Fixtures for the observability tests: operators' tools (Flower, celery-exporter,
promtool), scraping, and fleets on their own Redis database so counts are exact.
"""

from __future__ import annotations

import base64
import itertools
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dspy_fleet.broker.celery_config import make_celery
from dspy_fleet.contract import TASK_NAME
from dspy_fleet.devtools.procs import child_pids, free_port
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.devtools.services import cli
from dspy_fleet.devtools.stack import Stack
from dspy_fleet.settings import CommonSettings
from tests.conftest import MockLLM, Service

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

    service: Service

    @property
    def url(self) -> str:
        return self.service.url

    def log(self) -> str:
        """Its output so far (for assertion messages)."""
        return self.service.log_path.read_text(errors="replace")[-3000:]


def start_flower(stack: Stack, redis_url: str, mock_url: str) -> Tool:
    """`dspy-fleet flower` with basic auth, watching ``redis_url``'s broker, in ``stack``."""
    port = free_port()
    user, password = FLOWER_AUTH
    env = {
        "DSPY_FLEET_REDIS_URL": redis_url,
        "DSPY_FLEET_MOCK_LLM_URL": mock_url,
        "DSPY_FLEET_FLOWER_BASIC_AUTH": f"{user}:{password}",
    }
    svc = stack.start_process(
        "flower", cli("flower", "--port", str(port)), url=f"http://127.0.0.1:{port}",
        health_path="/healthcheck", env=env,
    )  # fmt: skip
    return Tool(svc)


@pytest.fixture(scope="session")
def flower(session_stack: Stack, redis_server: RedisServer, mock_llm: MockLLM) -> Tool:
    """`dspy-fleet flower` with basic auth, watching the session's broker."""
    return start_flower(session_stack, redis_server.url, mock_llm.url)


def basic_auth_header(user: str, password: str) -> dict[str, str]:
    """An Authorization header for HTTP basic auth."""
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def start_celery_exporter(stack: Stack, python: str, broker_url: str) -> Tool:
    """Dani Hodovic's celery-exporter run by ``python`` (.venv-exporter's), watching
    ``broker_url``, in ``stack``."""
    port = free_port()
    argv = [
        python,
        "-c",
        "from src.cli import cli; cli()",
        f"--broker-url={broker_url}",
        "--host=127.0.0.1",  # it listens on 0.0.0.0 otherwise
        f"--port={port}",
        # Without this its celery_queue_length waits until a worker reports the queue.
        "--queues=interactive,batch",
    ]
    # Its own venv only: none of our packages on its path.
    env = {"PYTHONPATH": "", "VIRTUAL_ENV": str(Path(python).parents[1])}
    svc = stack.start_process(
        "celery-exporter", argv, url=f"http://127.0.0.1:{port}", env=env, cwd=Path("/")
    )
    return Tool(svc)


@pytest.fixture(scope="session")
def celery_exporter(exporter_python: str, session_stack: Stack, redis_server: RedisServer) -> Tool:
    """Dani Hodovic's celery-exporter from .venv-exporter, watching the session's broker."""
    return start_celery_exporter(session_stack, exporter_python, redis_server.url)


# Pids whose parent is a given pid (prefork pool children, gunicorn workers).
children_of = child_pids


def worker_metrics_url(worker: Service) -> str:
    """Where a worker serves its metrics (and /health)."""
    return worker.metrics_url.removesuffix("/metrics")
