"""The stack's Python services (mock LLM, Celery worker, API) as processes, and their handles.

Flask, Celery and DSPy run only in the children: nothing here imports them.
"""

from __future__ import annotations

import json
import signal
import sys
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import redis

from dspy_fleet.devtools.procs import Child, free_port, http_ok, wait_until
from dspy_fleet.store import connection

PY = sys.executable
# A cold worker imports Celery and DSPy (seconds on a busy 2-core machine); a mock LLM
# is a stdlib HTTP server.
WORKER_TIMEOUT = 60.0
API_TIMEOUT = 60.0
MOCK_TIMEOUT = 30.0
# What a worker or API gets to stop by itself after SIGTERM (a worker's warm shutdown waits
# for its running jobs) before SIGKILL ends it.
STOP_TIMEOUT = 15.0
HEARTBEATS_KEY = "dspy_fleet:workers"


def cli(*args: str) -> list[str]:
    """argv of a `dspy-fleet` subcommand run by this interpreter."""
    return [PY, "-m", "dspy_fleet.cli.main", *args]


def service_env(redis_url: str, mock_url: str, **extra: str) -> dict[str, str]:
    """Environment of a worker or API process pointed at this Redis and mock LLM."""
    return {
        "DSPY_FLEET_REDIS_URL": redis_url,
        "DSPY_FLEET_MOCK_LLM_URL": mock_url,
        "DSPY_FLEET_LOG_LEVEL": "INFO",
        **extra,
    }


@dataclass
class Service:
    """A started process of the stack: its child, log, environment and URLs."""

    child: Child
    log_path: Path
    url: str = ""  # HTTP base, for processes that serve one
    env: dict[str, str] = field(default_factory=dict)
    metrics_url: str = ""  # its Prometheus endpoint, when it has one
    ready: Callable[[], bool] | None = field(default=None, repr=False)
    timeout: float = 60.0
    # How to start it again (restart after a kill), with the same log and environment.
    argv: list[str] = field(default_factory=list, repr=False)
    cwd: Path | None = None

    @property
    def name(self) -> str:
        """Its name in the stack (also its log file's stem)."""
        return self.child.name

    @property
    def pid(self) -> int:
        """The process's pid (also its process group id)."""
        return self.child.pid

    @property
    def proc(self) -> Any:
        """The underlying Popen."""
        return self.child.proc

    def alive(self) -> bool:
        """True while the process runs."""
        return self.child.alive()

    def wait_ready(self, timeout: float | None = None) -> Service:
        """Block until it is ready (its health endpoint, or a worker's heartbeat); a process
        that died or never got ready is stopped, so a failed start leaves nothing behind."""
        if self.ready is not None:
            try:
                wait_until(self.ready, timeout or self.timeout, self.name, self.child.proc)
            except (RuntimeError, TimeoutError):
                self.child.stop()
                raise
        return self

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Send ``sig`` (kill -9 by default) to its process group and reap it."""
        self.child.signal(sig)
        return self.child.proc.wait(timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then SIGKILL what is left after ``timeout`` seconds; returns the exit code."""
        return self.child.stop(timeout)

    def metrics(self) -> str:
        """Its /metrics page, as Prometheus text."""
        if not self.metrics_url:
            raise RuntimeError(f"{self.name} serves no metrics")
        resp = httpx.get(self.metrics_url, timeout=10)
        resp.raise_for_status()
        return resp.text

    def log_lines(self) -> list[dict[str, Any]]:
        """Its JSON log lines (non-JSON lines, e.g. Celery's banner, are skipped)."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out


def wait_all_ready(*svcs: Service) -> None:
    """Wait until every service is ready. Started with ``wait=False``, they import side by
    side; if one exits or is not ready in time, all are stopped and its error is raised."""
    try:
        for svc in svcs:
            svc.wait_ready()
    except BaseException:
        stop_all(*svcs)
        raise


def stop_all(*svcs: Service, timeout: float = STOP_TIMEOUT) -> None:
    """Stop the services side by side: each gets SIGTERM, and SIGKILL if it still runs
    ``timeout`` seconds later."""
    if svcs:
        with ThreadPoolExecutor(len(svcs)) as pool:
            list(pool.map(lambda svc: svc.stop(timeout), svcs))


@dataclass
class MockLLM:
    """The mock LLM server process and the calls that read and steer it."""

    url: str  # .../v1, what LiteLLM gets as api_base
    base: str
    child: Child

    def stats(self) -> dict[str, Any]:
        """Its request counters."""
        return httpx.get(f"{self.base}/_mock/stats", timeout=5).json()

    def reset_stats(self) -> None:
        """Zero the counters (injected faults stay)."""
        httpx.post(f"{self.base}/_mock/reset", timeout=5).raise_for_status()

    def reset(self) -> None:
        """Zero the counters and clear injected faults."""
        self.reset_stats()
        self.set_faults(latency_ms=0, error_rate=0, fail_next=0, hang_rate=0)

    def set_faults(self, **faults: Any) -> None:
        """Change fault injection (latency, error rate, ...) at run time."""
        httpx.put(f"{self.base}/_mock/faults", json=faults, timeout=5).raise_for_status()

    def stop(self) -> int | None:
        """Stop the server."""
        return self.child.stop()


def start_mock_llm(
    log_path: Path,
    *,
    port: int | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> MockLLM:
    """Start the project's OpenAI-compatible mock LLM and wait for its /health."""
    port = port or free_port()
    argv = [PY, "-m", "dspy_fleet.devtools.mock_llm", "--port", str(port)]
    child = Child(log_path.stem, argv, env=env, log_path=log_path, cwd=cwd)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(http_ok(base + "/health"), MOCK_TIMEOUT, "mock LLM", child.proc)
    except (RuntimeError, TimeoutError):
        child.stop()
        raise
    return MockLLM(url=base + "/v1", base=base, child=child)


def start_worker(
    redis_url: str,
    mock_url: str,
    log_path: Path,
    *,
    app: str | None = None,
    args: Sequence[str] = (),
    wait: bool = True,
    cwd: Path | None = None,
    **env: str,
) -> Service:
    """Start `dspy-fleet worker` (or ``celery -A app worker *args``); by default wait until
    it consumes, i.e. its own heartbeat is in Redis (another app's worker has none)."""
    env = service_env(redis_url, mock_url, **{"DSPY_FLEET_METRICS_PORT": str(free_port()), **env})
    # Celery node names must be unique per broker (heartbeats and Flower key on them).
    node = f"{log_path.stem}-{uuid.uuid4().hex[:6]}"
    if app is None:
        argv = cli("worker", *args, "--hostname", f"{node}@%h")
    else:
        argv = [PY, "-m", "celery", "-A", app, "worker", *args, "--hostname", f"{node}@%h"]
    child = Child(log_path.stem, argv, env=env, log_path=log_path, cwd=cwd)
    metrics_url = f"http://127.0.0.1:{env['DSPY_FLEET_METRICS_PORT']}/metrics" if not app else ""
    svc = Service(
        child=child,
        log_path=log_path,
        env=env,
        metrics_url=metrics_url,
        ready=_heartbeat(redis_url, node + "@", env.get("DSPY_FLEET_SENTINEL_PASSWORD"))
        if app is None
        else None,
        timeout=WORKER_TIMEOUT,
        argv=argv,
        cwd=cwd,
    )
    return svc.wait_ready() if wait else svc


def _heartbeat(
    redis_url: str, prefix: str, sentinel_password: str | None = None
) -> Callable[[], bool]:
    client = connection.redis_client(
        redis_url, sentinel_password=sentinel_password, decode_responses=True, socket_timeout=2
    )

    def beating() -> bool:  # this worker's own heartbeat, not another one's
        try:
            names = cast(list[str], client.zrange(HEARTBEATS_KEY, 0, -1))
            return any(n.startswith(prefix) for n in names)
        except redis.RedisError:
            return False

    return beating


def start_api(
    redis_url: str,
    mock_url: str,
    log_path: Path,
    *,
    port: int | None = None,
    app: str | None = None,
    wait: bool = True,
    cwd: Path | None = None,
    **env: str,
) -> Service:
    """Start `dspy-fleet api` (or gunicorn serving ``app`` with the API's gunicorn settings)
    on a free port; by default wait for /health."""
    port = port or free_port()
    env = service_env(redis_url, mock_url, DSPY_FLEET_API_PORT=str(port), **env)
    if app is None:
        argv = cli("api")
    else:
        argv = [PY, "-m", "gunicorn", "-c", "python:api.gunicorn_conf", app]
    child = Child(log_path.stem, argv, env=env, log_path=log_path, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    svc = Service(
        child=child,
        log_path=log_path,
        url=url,
        env=env,
        metrics_url=url + "/metrics" if app is None else "",
        ready=http_ok(url + "/health"),
        timeout=API_TIMEOUT,
        argv=argv,
        cwd=cwd,
    )
    return svc.wait_ready() if wait else svc
