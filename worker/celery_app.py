"""The Celery app of the worker: ``celery -A worker.celery_app worker``.

Settings and the models/programs file are validated at import, so a bad value
stops the worker at start-up with a message naming the key.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from celery import signals

from worker import kombu_patch, metrics_server
from worker.celery_config import make_celery, send_job
from worker.fleet_config import load_fleet_config
from worker.logs import configure_logging
from worker.settings import WorkerSettings, load_settings

if TYPE_CHECKING:
    from worker.runtime import Runtime

log = logging.getLogger("dspy_fleet.worker")

kombu_patch.install()
settings = load_settings(WorkerSettings)
fleet_config = load_fleet_config(settings.config)
app = make_celery(settings, include=("worker.tasks",))
app.conf.task_default_queue = settings.queue_list[0]

_heartbeat: Any = None


def get_runtime() -> Runtime:
    """The per-process Runtime of this worker (imports dspy: not at module import, for Flower)."""
    from worker import runtime

    return runtime.get_runtime(settings, fleet_config)


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
    from worker.runtime import on_heartbeat

    rt = get_runtime()
    _heartbeat = Heartbeat(
        rt.redis, hostname, info, settings.heartbeat_seconds,
        on_beat=lambda: on_heartbeat(rt, _republish),
    )  # fmt: skip
    _heartbeat.start()
    # worker_ready is sent in the main process only: exactly one metrics server,
    # reading every pool child's samples from the multiprocess directory.
    metrics_server.start(settings.metrics_port)
    log.info("worker ready", extra={"hostname": hostname, "queues": settings.queue_list})


def _republish(job_id: str, message: dict[str, Any], queue: str, request_id: str | None) -> None:
    """Publish a recovered job's message again, exactly as the API first did."""
    send_job(app, message, job_id=job_id, queue=queue, request_id=request_id)


@signals.worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
    metrics_server.stop()


@signals.import_modules.connect
def _prepare_metrics_dir(**_: Any) -> None:
    # Sent by the worker before it imports the task modules, i.e. before
    # prometheus_client is imported: the only moment multiprocess mode can be set.
    if settings.metrics_port:
        metrics_server.prepare()


@signals.worker_process_shutdown.connect
def _mark_child_dead(**_: Any) -> None:
    # A prefork child leaving: its dspy_active_predictions must stop counting.
    # (Children that die without this signal are pruned at scrape time.)
    metrics_server.mark_dead(os.getpid())
