"""Fixtures that start the real services: a private Redis, the mock LLM, a Celery worker, the API.

Every service runs as its own process on a free port, exactly as in production
(minus the container), started by the one stack builder (dspy_fleet/devtools/stack.py)
and stopped when the session ends.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

# Set before anything imports dspy/litellm in the test process (unit tests do).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="dspy-fleet-test-dspy-"))

from dspy_fleet.devtools import services  # noqa: E402
from dspy_fleet.devtools.redis import RedisServer  # noqa: E402

# These are re-exported for the test modules.
from dspy_fleet.devtools.services import (  # noqa: E402, F401
    PY,
    MockLLM,
    Service,
    start_worker,
    wait_all_ready,
)
from dspy_fleet.devtools.stack import Stack  # noqa: E402

# Every API in the tests runs 2 gunicorn workers: the metrics tests count both.
TEST_ENV = {"DSPY_FLEET_API_WORKERS": "2"}
# How long a test's worker or API gets after SIGTERM before SIGKILL, when its fixture stops
# it (tests that test shutdown send their own signals). An idle worker's warm shutdown
# takes a second or two; a busy one waits for its running jobs (a call the mock holds for a
# minute, say), which nothing checks once the test is over: 5 s, not `dev`'s 15 s.
STOP_TIMEOUT = 5.0


def start_api(redis_url: str, mock_url: str, log_path: Path, **env: str) -> Service:
    """`dspy-fleet api` with the tests' settings on a free port, answering /health."""
    return services.start_api(redis_url, mock_url, log_path, **{**TEST_ENV, **env})


def stop_all(*svcs: Service) -> None:
    """Stop a test's services side by side, each SIGKILLed if still running after
    STOP_TIMEOUT."""
    services.stop_all(*svcs, timeout=STOP_TIMEOUT)


class OwnStack(Stack):
    """A stack a test module builds for itself, on the session's mock LLM; stop() gives its
    workers and APIs STOP_TIMEOUT."""

    def __init__(self, workdir: Path | None = None, **options: Any) -> None:
        super().__init__(workdir, **{"stop_timeout": STOP_TIMEOUT, **options})

    @property
    def dir(self) -> Path:
        """Where its processes log."""
        return self.workdir

    @property
    def mock(self) -> MockLLM:
        """The (shared) mock LLM its workers call."""
        assert self.mock_llm is not None, "use_mock_llm() first"
        return self.mock_llm


def api_keys_setting(keys: Mapping[str, str], admins: Iterable[str] = ()) -> str:
    """DSPY_FLEET_API_KEYS for ``keys`` (tenant -> plaintext key), hashed as the API keeps
    them; the tenants in ``admins`` get the admin role."""
    from api.auth import hash_key  # the API's own hashing, imported only where keys are used

    role = {t: ":admin" for t in admins}
    return ",".join(f"{t}:{hash_key(k)}{role.get(t, '')}" for t, k in keys.items())


@contextmanager
def running_fleet(
    base: Path,
    *,
    config: str | None = None,
    keys: Mapping[str, str] | None = None,
    admins: Iterable[str] = (),
    mock: MockLLM | None = None,
    mock_latency_ms: int | None = None,
    workers: int = 1,
    **env: str,
) -> Iterator[OwnStack]:
    """A module's own fleet in ``base``: Redis, a mock LLM (its own, with ``mock_latency_ms``,
    unless ``mock`` is shared), ``workers`` workers and an API started side by side, all
    stopped after. ``config`` is written as the models file; ``keys`` (tenant -> key) become
    the API keys; ``env`` is added to every process's environment."""
    settings = {**TEST_ENV, **env}
    if config is not None:
        (base / "fleet.yaml").write_text(config)
        settings["DSPY_FLEET_CONFIG"] = str(base / "fleet.yaml")
    if keys is not None:
        settings["DSPY_FLEET_API_KEYS"] = api_keys_setting(keys, admins)
    with OwnStack(base, env=settings) as stack:
        stack.start_redis()
        if mock is not None:
            stack.use_mock_llm(mock)
        elif mock_latency_ms is not None:
            stack.start_mock_llm().set_faults(latency_ms=mock_latency_ms)
        else:
            stack.start_mock_llm()
        with stack.together():
            stack.start_workers(workers)
            stack.start_api()
        yield stack


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the service processes write their logs (kept for debugging failures)."""
    return tmp_path_factory.mktemp("service-logs")


@pytest.fixture(scope="session")
def session_stack(logs_dir: Path) -> Iterator[Stack]:
    """The session's fleet; the fixtures below start its pieces on first use."""
    stack = Stack(logs_dir, env=TEST_ENV, stop_timeout=STOP_TIMEOUT)
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def redis_server(session_stack: Stack) -> RedisServer:
    """A private redis-server on a free port."""
    return session_stack.start_redis()


@pytest.fixture(scope="session")
def mock_llm(session_stack: Stack) -> MockLLM:
    """The project's OpenAI-compatible mock LLM server, as a separate process."""
    return session_stack.start_mock_llm()


@pytest.fixture(scope="session")
def worker(session_stack: Stack, redis_server: RedisServer, mock_llm: MockLLM) -> Service:
    """A real Celery worker process (threads pool) consuming both queues."""
    return session_stack.start_worker("worker")


@pytest.fixture(scope="session")
def api(session_stack: Stack, redis_server: RedisServer, mock_llm: MockLLM) -> Service:
    """The API under gunicorn (2 workers), as a separate process."""
    return session_stack.start_api("api")


@pytest.fixture
def api_client(api: Service, worker: Service) -> Iterator[httpx.Client]:
    """An HTTP client for the running API, with a worker behind it."""
    with httpx.Client(base_url=api.url, timeout=30) as client:
        yield client


def poll(check: Callable[[], Any], timeout: float = 20, interval: float = 0.05) -> Any:
    """Call ``check`` until it returns something truthy; fail with its last value."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 20) -> dict[str, Any]:
    """Poll GET /v1/predictions/<id> until the job ends; return its body."""

    def done() -> dict[str, Any] | None:
        body = client.get(f"/v1/predictions/{job_id}").json()
        return body if body.get("status") in ("succeeded", "failed", "cancelled") else None

    return poll(done, timeout)
