"""The Celery app of the worker: ``celery -A worker.celery_app worker``.

Settings and the models/programs file are validated at import, so a bad value
stops the worker at start-up with a message naming the key.
"""

from __future__ import annotations

import gc
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from celery import signals

from dspy_fleet.broker import kombu_patch
from dspy_fleet.broker.backends import Broker, broker_for
from dspy_fleet.broker.celery_config import CALLBACK_QUEUE, CALLBACK_TASK, make_celery, send_job
from dspy_fleet.errors import ConfigError
from dspy_fleet.fleet_config import load_fleet_config
from dspy_fleet.logs import configure_logging
from dspy_fleet.settings import WorkerSettings, check_redelivery_window, load_settings
from worker import metrics_server

if TYPE_CHECKING:
    from worker.runtime import Runtime
    from worker.webhooks import Webhooks

log = logging.getLogger("dspy_fleet.worker")

kombu_patch.install()
settings = load_settings(WorkerSettings)
fleet_config = load_fleet_config(settings.config)
check_redelivery_window(settings, fleet_config)
app = make_celery(settings, include=("worker.tasks",))
app.conf.task_default_queue = settings.queue_list[0]

_heartbeat: Any = None
_sweep: Any = None
_callback_sweep: Any = None
_webhooks: Webhooks | None = None


def get_runtime() -> Runtime:
    """The per-process Runtime of this worker (imports dspy: not at module import, for Flower)."""
    from worker import runtime

    return runtime.get_runtime(settings, fleet_config)


def get_webhooks() -> Webhooks:
    """This process's webhook delivery machinery (on the runtime's Redis client)."""
    global _webhooks
    if _webhooks is None:
        from worker.webhooks import Webhooks

        _webhooks = Webhooks(settings, get_runtime().redis, settings.job_ttl_seconds)
    return _webhooks


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    configure_logging(settings.log_level, service="worker", payloads=settings.log_payloads)


@signals.celeryd_init.connect
def _pause_gc_while_starting(**_: Any) -> None:
    # Sent by `celery worker` only (not Flower, not an import), before it imports the task
    # modules and builds the runtime: no cyclic garbage collection during those imports
    # (~1 s of a worker's ~6 s start-up CPU; they leave ~3,000 unreachable objects).
    # _build_runtime turns it back on, whatever happens.
    gc.disable()


@signals.worker_init.connect
def _build_runtime(**_: Any) -> None:
    # Build programs before accepting work: a broken program or state file
    # stops the worker now rather than failing every job later. Celery logs and swallows
    # an Exception from a signal handler (the worker would then start): exit instead.
    try:
        get_runtime()
    except ConfigError as exc:
        log.critical("refusing to start: %s", exc)
        raise SystemExit(f"dspy-fleet worker: {exc}") from None
    finally:
        _freeze_startup_heap()


def _freeze_startup_heap() -> None:
    """Take what start-up imported and built out of every later garbage collection, then
    collect as usual (before the broker connection and the prefork pool's children).

    Celery, DSPy, LiteLLM and the programs (~430,000 objects the collector tracks) live as
    long as the process. A full collection over them costs ~0.26 s of CPU with the GIL
    held (measured on a 2-core machine), paid now and then while jobs run and several
    times over at interpreter exit: 1.3 s of an idle worker's 2.2 s SIGTERM-to-exit.
    """
    gc.freeze()
    gc.enable()


@signals.worker_ready.connect
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    global _heartbeat, _sweep, _callback_sweep
    from dspy_fleet.store.heartbeats import Heartbeat
    from worker.recovery import Sweeper, SweepThread

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
        on_beat=lambda: on_heartbeat(rt),
    )  # fmt: skip
    _heartbeat.start()
    # Every worker sweeps the due-time index (no lock: the take script shares it out).
    _sweep = SweepThread(
        Sweeper(rt.redis, _republish, recovery_after=settings.recovery_after_seconds,
                broker=_broker())
    )  # fmt: skip
    _sweep.start()
    if CALLBACK_QUEUE in settings.queue_list:
        # Workers that deliver webhooks also sweep for due ones (no lock: the take shares).
        from worker.webhooks import CallbackSweeper

        _callback_sweep = SweepThread(
            CallbackSweeper(get_webhooks(), _publish_callback), name="dspy-fleet-webhook-sweep"
        )
        _callback_sweep.start()
    # worker_ready is sent in the main process only: exactly one metrics server,
    # reading every pool child's samples from the multiprocess directory.
    metrics_server.start(settings.metrics_port, host=settings.metrics_host)
    log.info("worker ready", extra={"hostname": hostname, "queues": settings.queue_list,
                                    "engines": rt.models.engines})  # fmt: skip


def _republish(job_id: str, message: dict[str, Any], queue: str, request_id: str | None) -> None:
    """Publish a job's stored message again (a retry that is due, a lost message, a job
    whose worker died), exactly as the API first did."""
    send_job(app, message, job_id=job_id, queue=queue, request_id=request_id)
    # Returned: the broker took it (with RabbitMQ, confirmed it); the sweep's "held?" asks.
    _broker().mark_published(get_runtime().redis, [job_id])


_broker_instance: Broker | None = None


def _broker() -> Broker:
    """This process's broker interface (dspy_fleet/broker/backends.py), made on first use."""
    global _broker_instance
    if _broker_instance is None:
        _broker_instance = broker_for(settings.broker, timeout=settings.redis_timeout_seconds,
                                      sentinel_password=settings.sentinel_secret)  # fmt: skip
    return _broker_instance


def _publish_callback(member: str, attempt: int) -> None:
    """Publish one webhook delivery attempt onto the callbacks queue."""
    app.send_task(CALLBACK_TASK, kwargs={"member": member, "attempt": attempt},
                  queue=CALLBACK_QUEUE)  # fmt: skip


@signals.worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()
    if _sweep is not None:
        _sweep.stop()
    if _callback_sweep is not None:
        _callback_sweep.stop()
    metrics_server.stop()


@signals.import_modules.connect
def _prepare_metrics_dir(sender: Any = None, **_: Any) -> None:
    # Sent before the task modules are imported, i.e. before the worker's metrics are
    # built: the last moment multiprocess mode can be set. Flower sends it too (it imports
    # the task modules) but is no worker: its loader's worker_initialized stays False
    # (Celery's init_worker sets it just before sending this signal).
    loader = getattr(sender, "loader", None)
    if settings.metrics_port and getattr(loader, "worker_initialized", False):
        metrics_server.prepare()


@signals.worker_process_shutdown.connect
def _mark_child_dead(**_: Any) -> None:
    # A prefork child leaving: its dspy_active_predictions must stop counting.
    # (Children that die without this signal are pruned at scrape time.)
    metrics_server.mark_dead(os.getpid())
