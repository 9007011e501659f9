"""gunicorn settings for the API, derived from ApiSettings (used by `dspy-fleet api`)."""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import resource
import shutil
import tempfile
from typing import Any

from api.settings import ApiSettings
from dspy_fleet.errors import ConfigError
from dspy_fleet.logs import CONTEXT_FIELDS, current_context
from dspy_fleet.settings import load_settings

_settings = load_settings(ApiSettings)


def _require_gevent() -> None:
    """Refuse to start the evented worker without gevent (no silent fallback to threads:
    that would turn thousands of held waits into a dozen)."""
    if importlib.util.find_spec("gevent") is None:
        raise ConfigError(
            "DSPY_FLEET_API_WORKER_CLASS=gevent needs the gevent package (pip install "
            "'dspy-fleet[api]'); install it or set DSPY_FLEET_API_WORKER_CLASS=gthread"
        )


def _raise_fd_limit(needed: int) -> None:
    """Raise this process's open-file limit (inherited by the workers) to ``needed``.

    The soft limit is often 1,024, below what thousands of held connections need; the
    hard limit is what the system allows. ConfigError when even that is too low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ConfigError(
                f"DSPY_FLEET_API_CONNECTIONS ({_settings.api_connections}) needs {needed} "
                f"open files per API process, but the limit is {hard} (ulimit -Hn): lower "
                "DSPY_FLEET_API_CONNECTIONS or raise the limit"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


# Several gunicorn workers must report one set of metrics: prometheus-client's
# multiprocess mode. The directory is set here, in the master, before any worker
# imports the client (it picks its value class at import). An operator's
# directory (a volume under a read-only root FS) is used as given.
_owns_metrics_dir = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
_metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(
    prefix="dspy-fleet-api-metrics-"
)
os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir

bind = f"{_settings.api_host}:{_settings.api_port}"
workers = _settings.api_workers
worker_class = _settings.api_worker_class
if worker_class == "gevent":
    # Each connection is served on a greenlet: a held `wait` costs a greenlet and a
    # socket, not a thread. gunicorn's gevent worker monkey-patches the standard library
    # in each worker before it loads the app (the app is not preloaded in the master).
    _require_gevent()
    worker_connections = _settings.api_connections
    _raise_fd_limit(_settings.fds_needed)
    # Room in the accept queue for a burst of clients the size of one process's slots.
    backlog = max(2048, _settings.api_connections)
else:
    threads = _settings.api_threads
# A request may legitimately be held for max_wait_seconds; kill only past that.
timeout = int(_settings.max_wait_seconds) + 30
# SIGTERM: stop accepting, let in-flight requests (including waits) finish.
graceful_timeout = int(_settings.max_wait_seconds) + 5
keepalive = 5
# The longest request line gunicorn allows short of no limit (its default, 4094, answers a
# batch's percent-encoded callback_url of 2,048 characters with an HTML 414 before the app
# can answer in its one error format).
limit_request_line = 8190
control_socket_disable = True
accesslog = None  # the app logs each request itself, as JSON, with its request id


class _LogFields(logging.Filter):
    """gunicorn's own lines get the SPEC §5 fields too (null here), like every other line."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = current_context()
        for name in CONTEXT_FIELDS:
            if not hasattr(record, name):
                setattr(record, name, context.get(name))
        return True


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
    "filters": {"fields": {"()": _LogFields}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "json",
            "filters": ["fields"],
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
    os.makedirs(_metrics_dir, exist_ok=True)
    # Only the *.db files: the directory itself may be a mount point.
    for name in os.listdir(_metrics_dir):
        if name.endswith(".db"):
            os.unlink(os.path.join(_metrics_dir, name))


def post_worker_init(worker: Any) -> None:
    """Keep what the worker built at start-up (imports, the app: most of its objects) out of
    the garbage collector's full passes: with thousands of requests held, each full pass
    otherwise scans them all and stalls every request of the process meanwhile."""
    gc.freeze()


def child_exit(server: Any, worker: Any) -> None:
    """Let the multiprocess collector drop a dead worker's live gauges.

    Its counters and histograms stay: the requests it answered did happen.
    """
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid, _metrics_dir)


def on_exit(server: Any) -> None:
    """Remove the metrics directory when this master created it."""
    if _owns_metrics_dir:
        shutil.rmtree(_metrics_dir, ignore_errors=True)
