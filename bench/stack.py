"""Start and stop what a bench run measures: Redis, the mock LLM, our stack and the bare one.

Everything runs as its own process on a free port on 127.0.0.1, started by the project's
one stack builder (dspy_fleet/devtools/stack.py), with the same gunicorn and Celery
settings for ours and the baseline's.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from dspy_fleet.devtools import stack
from dspy_fleet.devtools.procs import child_pids as child_pids  # memory figures use it
from dspy_fleet.devtools.services import Service

PY = sys.executable
ROOT = Path(__file__).resolve().parent.parent

# Our default config plus `fragile`, a model whose every call fails with a 500 (its base URL,
# so the mock stays healthy for everything else) and whose breaker opens after 3.
CONFIG = """
default_model: mock
default_program: qa
models:
  mock:
    litellm_model: openai/mock-gpt
    api_base: ${DSPY_FLEET_MOCK_LLM_URL}
    # The default engine, as a user gets it; DSPY_FLEET_BENCH_ENGINE=litellm measures
    # LiteLLM (both sides).
    engine: ${DSPY_FLEET_BENCH_ENGINE:-auto}
    timeout: 30
    input_price_per_1k: 0.00015
    output_price_per_1k: 0.0006
  # Figure (m): a provider limit the fleet paces to (the mock enforces it during (m)).
  paced:
    litellm_model: openai/paced-gpt
    api_base: ${DSPY_FLEET_MOCK_LLM_URL}
    engine: ${DSPY_FLEET_BENCH_ENGINE:-auto}
    timeout: 30
    rpm: 600
    input_price_per_1k: 0.00015
    output_price_per_1k: 0.0006
  # Every call fails with a 500: a base URL the mock always fails (a per-request header
  # would make DSPy fall back to LiteLLM, and load it into the worker of figure g).
  fragile:
    litellm_model: openai/fragile
    api_base: ${DSPY_FLEET_MOCK_LLM_URL}/_status/500
    max_retries: 0
    breaker: {failure_threshold: 3, recovery_seconds: 300}
programs:
  qa: {signature: "question -> answer"}
  # Figure (k): the same program with tracing off and at 100 % (qa: the defaults).
  qa_untraced:
    signature: "question -> answer"
    traces: {sample_rate: 0, keep_on_feedback: false}
  qa_traced:
    signature: "question -> answer"
    traces: {sample_rate: 1}
"""


# What the bare worker gets on its command line: `dspy-fleet worker` runs exactly these
# options from its settings (the defaults).
BARE_WORKER_ARGS = ["--pool", "threads", "--concurrency", "64", "--queues", "interactive,batch",
                    "--task-events", "--without-mingle", "--loglevel", "INFO"]  # fmt: skip
BARE_CELERY_APP = "bench.baselines.bare_celery"
BARE_FLASK_APP = "bench.baselines.bare_flask:create_app()"


class Stack(stack.Stack):
    """All processes of one bench run and where they listen: ours and the bare baseline's,
    on one Redis server (ours on database 0, the bare side on 1: separate queues)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(
            workdir, env={"DSPY_FLEET_CONFIG": str(workdir / "fleet.yaml"),
                          "PYTHONPATH": str(ROOT)}, cwd=ROOT,
        )  # fmt: skip
        self.urls: dict[str, str] = {}

    @property
    def ours_redis(self) -> str:
        """Our side's broker (database 0)."""
        return self.redis_url.rsplit("/", 1)[0] + "/0"

    @property
    def bare_redis(self) -> str:
        """The bare side's broker (database 1)."""
        return self.redis_url.rsplit("/", 1)[0] + "/1"

    @property
    def children(self) -> dict[str, Service]:
        """Workers and APIs by name (``ours-worker``, ``bare-api``, ...)."""
        return self.services

    def mock(self, **faults: Any) -> None:
        """Change the mock LLM's latency or faults."""
        assert self.mock_llm is not None
        self.mock_llm.set_faults(**faults)

    def mock_stats(self) -> dict[str, Any]:
        """The mock LLM's request counters."""
        assert self.mock_llm is not None
        return self.mock_llm.stats()

    def mock_reset(self) -> None:
        """Zero the mock's counters."""
        assert self.mock_llm is not None
        self.mock_llm.reset_stats()

    def start_workers(self) -> None:
        """Our worker and the bare Celery worker: threads pool, concurrency 64, both queues."""
        # Figure (j) sends webhooks to a dead port on 127.0.0.1: allow-listed, and signed.
        self.start_worker("ours-worker", redis_url=self.ours_redis, wait=False,
                          DSPY_FLEET_CALLBACK_ALLOW="127.0.0.1/32",
                          DSPY_FLEET_CALLBACK_SECRETS='{"*": "bench"}')  # fmt: skip
        self.start_worker("bare-worker", redis_url=self.bare_redis, app=BARE_CELERY_APP,
                          args=BARE_WORKER_ARGS, wait=False)  # fmt: skip

    def start_apis(self) -> None:
        """Our API and the bare Flask app, both under gunicorn with api/gunicorn_conf.py."""
        # `dspy-fleet api` validates its settings, then execs exactly the bare side's line.
        for side, redis_url, app in (("ours", self.ours_redis, None),
                                     ("bare", self.bare_redis, BARE_FLASK_APP)):  # fmt: skip
            api = self.start_api(f"{side}-api", redis_url=redis_url, app=app, wait=False,
                                 BENCH_GET_KEY="bench:cached")  # fmt: skip
            self.urls[side] = api.url

    def wait_apis(self) -> None:
        """Until both APIs answer."""
        for side in ("ours", "bare"):
            self.services[f"{side}-api"].wait_ready()


def start_stack() -> Stack:
    """Redis and the mock LLM, ready; workers and APIs are started by the caller."""
    workdir = Path(tempfile.mkdtemp(prefix="dspy-fleet-bench-"))
    (workdir / "fleet.yaml").write_text(CONFIG)
    bench = Stack(workdir)
    try:
        bench.start_redis()
        bench.start_mock_llm()
    except BaseException:
        bench.stop()
        raise
    return bench


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
