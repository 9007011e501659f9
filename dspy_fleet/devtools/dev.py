"""`dspy-fleet dev`: Redis, the mock LLM, a worker and the API as children of one process."""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
from pathlib import Path
from types import FrameType

from dspy_fleet.devtools.procs import http_ok, port_open, wait_until
from dspy_fleet.devtools.stack import Stack

READY_TIMEOUT = 120.0


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

    stack = Stack(logs)
    try:
        if redis_url is None:
            print("starting redis-server ...", flush=True)
            stack.start_redis()
        else:
            stack.use_redis(redis_url)
        print("starting mock LLM, worker and API ...", flush=True)
        try:
            mock = stack.start_mock_llm(port=mock_port)
            # Worker and API start side by side; the API's /ready waits for the worker.
            stack.start_worker("worker", wait=False, DSPY_FLEET_METRICS_PORT=str(metrics_port))
            api = stack.start_api(port=api_port, wait=False)
            ready = http_ok(api.url + "/ready")

            def _up() -> bool:
                dead = [name for name, svc in stack.services.items() if not svc.alive()]
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} exited while starting")
                return stop.is_set() or ready()

            wait_until(_up, READY_TIMEOUT, "the stack")
        except (RuntimeError, TimeoutError) as exc:
            print(f"dspy-fleet dev: {exc}; see the logs in {logs}/", file=sys.stderr)
            return 1
        if stop.is_set():
            return 0
        metrics = stack.services["worker"].metrics_url
        print(_banner(api.url, mock.url, metrics, stack.redis_url, logs), flush=True)
        while not stop.wait(0.5):
            dead = [svc for svc in stack.services.values() if not svc.alive()]
            if dead:
                print(
                    f"dspy-fleet dev: {dead[0].name} exited with code "
                    f"{dead[0].proc.returncode}; see {dead[0].log_path}",
                    file=sys.stderr,
                )
                return 1
        return 0
    finally:
        print("\nstopping ...", flush=True)
        stack.stop()
        print("stopped.", flush=True)
