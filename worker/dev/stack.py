"""`dspy-fleet dev`: Redis, the mock LLM, a worker and the API as children of one process."""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from worker.dev.procs import Child, http_ok, port_open, wait_until
from worker.dev.redis import RedisServer

READY_TIMEOUT = 120.0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "worker.cli", *args]


def _banner(api: str, mock: str, metrics: str, redis_url: str, logs: Path) -> str:
    return f"""
dspy-fleet is running.
  API             {api}   (health: {api}/health, ready: {api}/ready)
  mock LLM        {mock}
  worker metrics  {metrics}
  Redis           {redis_url}
  logs            {logs}/

Try it:
  curl -s -X POST {api}/v1/predict -H 'Content-Type: application/json' \\
       -d '{{"input":"What is 2+2?"}}'
  curl -s {api}/v1/predictions/<id from the answer above>
  curl -s -X POST {api}/v1/predict -H 'Content-Type: application/json' \\
       -d '{{"input":"What is 2+2?","wait":10}}'

Press Ctrl-C to stop everything.
"""


def run_dev_stack(
    *, api_port: int, mock_port: int, metrics_port: int, redis_url: str | None
) -> int:
    """Start the stack, print how to use it, and stop every child on Ctrl-C. Returns exit code."""
    busy = [p for p in (api_port, mock_port, metrics_port) if port_open(p)]
    if busy:
        print(
            f"dspy-fleet dev: port(s) {busy} already in use; stop what holds them "
            "or pass --api-port/--mock-port/--metrics-port",
            file=sys.stderr,
        )
        return 2
    logs = Path(tempfile.mkdtemp(prefix="dspy-fleet-dev-"))
    stop = threading.Event()

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    redis_server: RedisServer | None = None
    children: list[Child] = []
    try:
        if redis_url is None:
            print("starting redis-server ...", flush=True)
            redis_server = RedisServer(log_path=logs / "redis.log").start()
            redis_url = redis_server.url
        mock_url = f"http://127.0.0.1:{mock_port}/v1"
        env = {
            "DSPY_FLEET_REDIS_URL": redis_url,
            "DSPY_FLEET_MOCK_LLM_URL": mock_url,
            "DSPY_FLEET_API_PORT": str(api_port),
            "DSPY_FLEET_METRICS_PORT": str(metrics_port),
        }
        print("starting mock LLM, worker and API ...", flush=True)
        for name, argv in (
            ("mock-llm", _cli("mock-llm", "--port", str(mock_port))),
            ("worker", _cli("worker")),
            ("api", _cli("api")),
        ):
            children.append(Child(name, argv, env=env, log_path=logs / f"{name}.log"))
        api = f"http://127.0.0.1:{api_port}"
        ready = http_ok(api + "/ready")

        def _up() -> bool:
            dead = [c.name for c in children if not c.alive()]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while starting")
            return stop.is_set() or ready()

        try:
            wait_until(_up, READY_TIMEOUT, "the stack")
        except (RuntimeError, TimeoutError) as exc:
            print(f"dspy-fleet dev: {exc}; see the logs in {logs}/", file=sys.stderr)
            return 1
        if stop.is_set():
            return 0
        print(
            _banner(api, mock_url, f"http://127.0.0.1:{metrics_port}/metrics", redis_url, logs),
            flush=True,
        )
        while not stop.wait(0.5):
            dead = [c for c in children if not c.alive()]
            if dead:
                print(
                    f"dspy-fleet dev: {dead[0].name} exited with code "
                    f"{dead[0].proc.returncode}; see {logs}/{dead[0].name}.log",
                    file=sys.stderr,
                )
                return 1
        return 0
    finally:
        print("\nstopping ...", flush=True)
        for child in reversed(children):
            child.stop()
        if redis_server is not None:
            redis_server.stop()
        print("stopped.", flush=True)
