"""gunicorn settings for the API, derived from ApiSettings (used by `dspy-fleet api`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from api.settings import ApiSettings
from worker.settings import load_settings

_settings = load_settings(ApiSettings)

# Several gunicorn workers must report one set of metrics: prometheus-client's
# multiprocess mode. The directory is set before any worker imports the client.
_metrics_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="dspy-fleet-api-metrics-")
)

bind = f"{_settings.api_host}:{_settings.api_port}"
workers = _settings.api_workers
threads = _settings.api_threads
worker_class = "gthread"
# A request may legitimately be held for max_wait_seconds; kill only past that.
timeout = int(_settings.max_wait_seconds) + 30
# SIGTERM: stop accepting, let in-flight requests (including waits) finish.
graceful_timeout = int(_settings.max_wait_seconds) + 5
keepalive = 5
control_socket_disable = True
accesslog = None  # the app logs each request itself, as JSON, with its request id
logconfig_dict: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(timestamp)s %(levelname)s %(name)s %(message)s",
            "rename_fields": {"levelname": "level", "name": "logger"},
            "timestamp": True,
        }
    },
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "stream": "ext://sys.stderr",
        }
    },
    "root": {"handlers": ["stderr"], "level": "INFO"},
    "loggers": {
        "gunicorn.error": {"handlers": ["stderr"], "level": "INFO", "propagate": False},
        "gunicorn.access": {"handlers": ["stderr"], "level": "WARNING", "propagate": False},
    },
}


def on_starting(server: Any) -> None:
    """Start every run with an empty metrics directory (stale files would add old counts)."""
    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)


def child_exit(server: Any, worker: Any) -> None:
    """Let the multiprocess collector drop a dead worker's live gauges."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
