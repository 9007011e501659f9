"""The Celery app of the worker: ``celery -A worker.celery_app worker``.

Settings and the models/programs file are validated at import, so a bad value
stops the worker at start-up with a message naming the key.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Any

import redis
from celery import signals

from worker.celery_config import make_celery
from worker.fleet_config import load_fleet_config
from worker.jobs import JobStore
from worker.logs import configure_logging
from worker.settings import WorkerSettings, load_settings

log = logging.getLogger("dspy_fleet.worker")

settings = load_settings(WorkerSettings)
fleet_config = load_fleet_config(settings.config)
app = make_celery(settings, include=("worker.tasks",))
app.conf.task_default_queue = settings.queue_list[0]

_runtime: Any = None
_runtime_lock = threading.Lock()
_heartbeat: Any = None


def redis_client() -> redis.Redis:
    """A Redis client for the job store and heartbeats (decoded strings)."""
    return redis.Redis.from_url(
        settings.redis_url,
        decode_responses=True,
        socket_timeout=5,
        socket_connect_timeout=5,
        health_check_interval=10,
        retry_on_timeout=True,
    )


def get_runtime() -> Any:
    """The per-process Runtime, built on first use (after fork under prefork)."""
    global _runtime
    if _runtime is None:
        with _runtime_lock:
            if _runtime is None:
                from worker.lm import ModelPool
                from worker.programs import ProgramRegistry
                from worker.runner import Runtime

                _runtime = Runtime(
                    config=fleet_config,
                    registry=ProgramRegistry(fleet_config),
                    models=ModelPool(fleet_config),
                    store=JobStore(redis_client(), settings.job_ttl_seconds),
                )
    return _runtime


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging(settings.log_level, service="worker")


@signals.worker_init.connect
def _build_runtime(**_: Any) -> None:
    # Build programs before accepting work: a broken program or state file
    # stops the worker now rather than failing every job later.
    get_runtime()


@signals.worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    from worker.heartbeat import Heartbeat

    hostname = getattr(sender, "hostname", None) or f"{socket.gethostname()}:{os.getpid()}"
    info = {
        "queues": settings.queue_list,
        "pid": os.getpid(),
        "pool": settings.pool,
        "concurrency": settings.concurrency,
    }
    _heartbeat = Heartbeat(redis_client(), hostname, info, settings.heartbeat_seconds)
    _heartbeat.start()
    if settings.metrics_port and settings.pool != "prefork":
        # Under prefork every child would race for the port; multiprocess mode
        # serving is set up separately for that pool.
        from prometheus_client import start_http_server

        start_http_server(settings.metrics_port)
    log.info("worker ready", extra={"hostname": hostname, "queues": settings.queue_list})


@signals.worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
