"""Start and stop what a bench run measures: Redis, the mock LLM, our stack and the bare one.

Everything runs as its own process on a free port on 127.0.0.1, with the same
gunicorn and Celery settings for ours and the baseline's.
"""

from __future__ import annotations

import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from worker.dev.procs import Child, free_port, http_ok, wait_until
from worker.dev.redis import RedisServer

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent

# Our default config plus `fragile`, a model whose every call fails with a 500 (per-request
# header, so the mock stays healthy for everything else) and whose breaker opens after 3.
CONFIG = """
default_model: mock
default_program: qa
models:
  mock:
    litellm_model: openai/mock-gpt
    api_base: ${DSPY_FLEET_MOCK_LLM_URL}
    # DSPY_FLEET_BENCH_ENGINE=auto measures DSPy's own lm15 engine (both sides).
    engine: ${DSPY_FLEET_BENCH_ENGINE:-litellm}
    timeout: 30
    input_price_per_1k: 0.00015
    output_price_per_1k: 0.0006
  fragile:
    litellm_model: openai/fragile
    api_base: ${DSPY_FLEET_MOCK_LLM_URL}
    max_retries: 0
    breaker: {failure_threshold: 3, recovery_seconds: 300}
    lm_kwargs: {extra_headers: {X-Mock-Status: "500"}}
programs:
  qa: {signature: "question -> answer"}
"""


@dataclass
class Stack:
    """All processes of one bench run and where they listen."""

    workdir: Path
    redis: RedisServer
    mock_base: str
    ours_redis: str  # db 0
    bare_redis: str  # db 1: separate queues, same server
    children: dict[str, Child] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)

    @property
    def mock_url(self) -> str:
        """What LiteLLM gets as api_base."""
        return self.mock_base + "/v1"

    def mock(self, **faults: Any) -> None:
        """Change the mock LLM's latency or faults."""
        httpx.put(f"{self.mock_base}/_mock/faults", json=faults, timeout=5).raise_for_status()

    def mock_stats(self) -> dict[str, Any]:
        """The mock LLM's request counters."""
        return httpx.get(f"{self.mock_base}/_mock/stats", timeout=5).json()

    def mock_reset(self) -> None:
        """Zero the mock's counters."""
        httpx.post(f"{self.mock_base}/_mock/reset", timeout=5).raise_for_status()

    def env(self, redis_url: str, **extra: str) -> dict[str, str]:
        """Environment of a worker or API of one side."""
        return {
            "DSPY_FLEET_REDIS_URL": redis_url,
            "DSPY_FLEET_MOCK_LLM_URL": self.mock_url,
            "DSPY_FLEET_CONFIG": str(self.workdir / "fleet.yaml"),
            "DSPY_FLEET_LOG_LEVEL": "INFO",
            "DSPY_FLEET_METRICS_PORT": str(free_port()),
            "PYTHONPATH": str(ROOT),
            **extra,
        }

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        """Start one child process, logging to the work directory."""
        child = Child(name, argv, env=env, log_path=self.workdir / f"{name}.log", cwd=ROOT)
        self.children[name] = child
        return child

    def start_workers(self) -> None:
        """Our worker and the bare Celery worker: threads pool, concurrency 64, both queues."""
        common = ["--pool", "threads", "--concurrency", "64", "--queues", "interactive,batch",
                  "--task-events", "--loglevel", "INFO"]  # fmt: skip
        node = uuid.uuid4().hex[:6]
        # `dspy-fleet worker` runs exactly these options from its settings (the defaults).
        self.start("ours-worker", [PY, "-m", "worker.cli", "worker", "--hostname",
                                   f"ours-{node}@%h"], self.env(self.ours_redis))  # fmt: skip
        self.start("bare-worker", [PY, "-m", "celery", "-A", "bench.baselines.bare_celery",
                                   "worker", *common, "--hostname", f"bare-{node}@%h"],
                   self.env(self.bare_redis))  # fmt: skip

    def start_apis(self) -> None:
        """Our API and the bare Flask app, both under gunicorn with api/gunicorn_conf.py."""
        for side, redis_url, argv in (
            # `dspy-fleet api` validates its settings, then execs exactly this gunicorn line.
            ("ours", self.ours_redis, [PY, "-m", "worker.cli", "api"]),
            ("bare", self.bare_redis, [PY, "-m", "gunicorn", "-c", "python:api.gunicorn_conf",
                                       "bench.baselines.bare_flask:create_app()"]),
        ):  # fmt: skip
            port = free_port()
            env = self.env(redis_url, DSPY_FLEET_API_PORT=str(port),
                           BENCH_GET_KEY="bench:cached")  # fmt: skip
            self.start(f"{side}-api", argv, env)
            self.urls[side] = f"http://127.0.0.1:{port}"

    def wait_apis(self) -> None:
        """Until both APIs answer."""
        wait_until(http_ok(self.urls["ours"] + "/health"), 60, "our API",
                   self.children["ours-api"].proc)  # fmt: skip
        bare = self.children["bare-api"]
        wait_until(lambda: _answers(self.urls["bare"] + "/get"), 60, "bare API", bare.proc)

    def stop(self, *names: str) -> None:
        """Stop the named children (all of them, and Redis, when none is named)."""
        for name in names or list(self.children):
            child = self.children.pop(name, None)
            if child is not None:
                child.stop()
        if not names:
            self.redis.stop()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


def start_stack() -> Stack:
    """Redis and the mock LLM, ready; workers and APIs are started by the caller."""
    workdir = Path(tempfile.mkdtemp(prefix="dspy-fleet-bench-"))
    (workdir / "fleet.yaml").write_text(CONFIG)
    redis = RedisServer(log_path=workdir / "redis.log").start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    stack = Stack(workdir=workdir, redis=redis, mock_base=base,
                  ours_redis=f"redis://127.0.0.1:{redis.port}/0",
                  bare_redis=f"redis://127.0.0.1:{redis.port}/1")  # fmt: skip
    stack.start("mock-llm", [PY, "-m", "worker.mock_llm", "--port", str(port)],
                {"PYTHONPATH": str(ROOT)})  # fmt: skip
    wait_until(http_ok(base + "/health"), 30, "mock LLM", stack.children["mock-llm"].proc)
    return stack


def peak_rss_mb(pid: int) -> float:
    """A process's peak resident set size (VmHWM), in MB."""
    return _status_kb(pid, "VmHWM") / 1024


def rss_kb(pid: int) -> int:
    """A process's resident set size now (VmRSS), in kB."""
    return _status_kb(pid, "VmRSS")


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for pid {pid}")


def child_pids(pid: int) -> list[int]:
    """The direct children of a process (gunicorn's workers under its master)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(p) for p in (task / "children").read_text().split()]
    return found
