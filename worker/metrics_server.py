"""The worker's HTTP server for Prometheus: ``/metrics`` and ``/health`` on DSPY_FLEET_METRICS_PORT
(on DSPY_FLEET_METRICS_HOST, 127.0.0.1 unless set).

Every pool uses prometheus-client's multiprocess mode, so one server in the
main process reports the samples of every pool child. The alternative (each
prefork child starting its own server) is the classic bug: only one child
binds the port and the counts come out a fraction of the truth.

Order matters: prometheus-client picks its value class (in-memory, or the
multiprocess files) when it is first imported, and a metric keeps the class it was
built with. Celery's CLI imports prometheus-client before any of our code runs (it
loads Flower's CLI plugin, which imports it), so :func:`prepare` sets the directory and
picks the value class again, before the task modules build the worker's metrics (the
``import_modules`` signal, which the worker sends before it imports them).

``dspy_circuit_breaker_state`` is not served here: the API exports the fleet's shared
breaker states (api/metrics.py), so that N workers do not report N copies of them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

log = logging.getLogger("dspy_fleet.worker.metrics")

ENV = "PROMETHEUS_MULTIPROC_DIR"
# Files of live gauges carry the pid that wrote them: gauge_livesum_<pid>.db.
_LIVE_FILE = re.compile(r"^gauge_live\w*?_(\d+)\.db$")

_state: dict[str, Any] = {"dir": None, "owned": False, "server": None, "thread": None}


def prepare() -> Path:
    """Point prometheus-client at an empty multiprocess directory; returns the directory.

    Uses PROMETHEUS_MULTIPROC_DIR when the operator set it (a volume in a
    read-only container), else a private temporary directory. Stale files from
    an earlier run would add old counts, so the directory is emptied.

    If prometheus-client is already imported (Celery's CLI imports it through Flower's
    plugin), its value class is picked again now that the directory is set: metrics
    built from here on (the worker's, when the task modules are imported) write to the
    directory. Call it before worker.metrics is imported.
    """
    given = os.environ.get(ENV)
    if given:
        path = Path(given)
        path.mkdir(parents=True, exist_ok=True)
        owned = False
    else:
        path = Path(tempfile.mkdtemp(prefix="dspy-fleet-worker-metrics-"))
        os.environ[ENV] = str(path)  # inherited by prefork children
        owned = True
    if _state["dir"] != path:
        _empty(path)
    _state.update(dir=path, owned=owned)
    if "prometheus_client.values" in sys.modules and not multiprocess_enabled():
        from prometheus_client import values

        # The class prometheus-client would have picked had the variable been set at its
        # import (values.get_value_class reads PROMETHEUS_MULTIPROC_DIR).
        values.ValueClass = values.get_value_class()
    return path


def _empty(path: Path) -> None:
    # Only our *.db files: the directory itself may be a mount point.
    for db in path.glob("*.db"):
        db.unlink(missing_ok=True)


def multiprocess_enabled() -> bool:
    """True when this process writes its samples to the multiprocess directory."""
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


def mark_dead(pid: int) -> None:
    """Drop the live-gauge samples of a process that exited (a pool child)."""
    if os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def _prune_dead_children(path: Path) -> None:
    # A child killed by SIGKILL or the hard time limit never runs its shutdown
    # signal; its dspy_active_predictions would count forever without this.
    for db in path.glob("gauge_live*.db"):
        match = _LIVE_FILE.match(db.name)
        if match and not _pid_alive(int(match.group(1))):
            mark_dead(int(match.group(1)))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def render() -> bytes:
    """The exposition text of every process of this worker."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    path = _state["dir"]
    if path is None or not multiprocess_enabled():
        from worker.metrics import REGISTRY

        return generate_latest(REGISTRY)
    _prune_dead_children(path)
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    return generate_latest(registry)


def wsgi_app(started: float) -> Callable[..., Iterable[bytes]]:
    """The WSGI app: /metrics, and /health (liveness: checks nothing external)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            body, ctype, status = render(), CONTENT_TYPE_LATEST, "200 OK"
        elif path in ("/health", "/healthz"):
            payload = {
                "status": "ok",
                "pid": os.getpid(),
                "uptime_seconds": round(time.monotonic() - started, 3),
            }
            body, ctype, status = json.dumps(payload).encode(), "application/json", "200 OK"
        else:
            body, ctype, status = b'{"error": "not found"}', "application/json", "404 Not Found"
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the logs; stay quiet."""


def start(port: int, host: str = "127.0.0.1") -> int | None:
    """Serve /metrics and /health from this (the main) process; returns the bound port.

    Idempotent: a second call keeps the first server, so there is exactly one.
    """
    if not port:
        return None
    if _state["server"] is not None:
        return int(_state["server"].server_port)
    server = make_server(
        host, port, wsgi_app(time.monotonic()), server_class=_Server, handler_class=_QuietHandler
    )
    if not multiprocess_enabled():
        log.error(
            "prometheus_client was imported before the metrics directory was set: "
            "/metrics shows the main process only (wrong under prefork)"
        )
    thread = threading.Thread(target=server.serve_forever, name="metrics-server", daemon=True)
    thread.start()
    _state.update(server=server, thread=thread)
    log.info(
        "metrics server listening",
        extra={"host": host, "port": server.server_port, "multiprocess": multiprocess_enabled()},
    )
    return int(server.server_port)


def stop() -> None:
    """Stop the server and remove the metrics directory if this process created it."""
    server = _state["server"]
    if server is not None:
        server.shutdown()
        server.server_close()
        _state.update(server=None, thread=None)
    if _state["owned"] and _state["dir"] is not None:
        shutil.rmtree(_state["dir"], ignore_errors=True)
        _state.update(dir=None, owned=False)
