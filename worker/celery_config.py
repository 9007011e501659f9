"""Celery configuration shared by the worker app and the API's publishing client.

Both must agree on serialization and on the Redis visibility timeout (with
several apps on one broker the shortest timeout wins), so both build their
Celery app here. Never import dspy here.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

from celery import Celery
from kombu import Exchange, Queue

from worker import kombu_patch
from worker.contract import QUEUES, TASK_NAME
from worker.settings import CommonSettings, WorkerSettings

APP_NAME = "dspy_fleet"


def celery_config(settings: CommonSettings) -> dict[str, Any]:
    """The Celery settings dict for a process with these settings."""
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # Redis restarts must not crash publishers or consumers: retry quietly.
        "retry_on_timeout": True,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 10,
        # Redeliver a crashed worker's jobs promptly once their visibility timeout passed.
        "unacked_restore_interval": settings.restore_sweep_seconds,
        "unacked_restore_throttle": 1,
    }
    conf: dict[str, Any] = {
        "broker_url": settings.broker,
        "result_backend": settings.backend,
        "broker_transport_options": transport,
        # Celery's docs ask for the same visibility timeout on the result backend.
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "broker_connection_retry_on_startup": True,
        # JSON only: pickle would let any producer run code on our workers.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.job_ttl_seconds,
        "result_extended": True,
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        "task_default_queue": "interactive",
        "task_routes": {TASK_NAME: {"queue": "interactive"}},
        # A job is acknowledged only after it ran; a worker killed mid-job has
        # its message redelivered instead of lost.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_soft_time_limit": settings.soft_time_limit,
        "task_time_limit": settings.time_limit,
        # Events let Flower and celery-exporter see every task.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # A broker outage must turn into a quick 503, not a request that hangs.
        "task_publish_retry_policy": {
            "max_retries": 2,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 0.5,
        },
        "broker_pool_limit": 32,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }
    if (broker_ssl := ssl_options(settings.broker)) is not None:
        conf["broker_use_ssl"] = broker_ssl
    if (backend_ssl := ssl_options(settings.backend)) is not None:
        conf["redis_backend_use_ssl"] = backend_ssl
    if isinstance(settings, WorkerSettings):
        conf.update(
            worker_pool=settings.pool,
            worker_concurrency=settings.concurrency,
            # Low prefetch: a slow job must not hold a stack of others hostage.
            worker_prefetch_multiplier=settings.prefetch_multiplier,
            # Warm shutdown on SIGTERM: give in-flight LLM calls time to finish.
            worker_soft_shutdown_timeout=settings.soft_shutdown_timeout,
            worker_enable_soft_shutdown_on_idle=True,
            worker_cancel_long_running_tasks_on_connection_loss=False,
        )
    return conf


_CERT_REQS = {"required": ssl.CERT_REQUIRED, "optional": ssl.CERT_OPTIONAL, "none": ssl.CERT_NONE}


def ssl_options(url: str) -> dict[str, Any] | None:
    """TLS options for a rediss:// URL (CA and client certs from its query), else None.

    Celery refuses a rediss:// URL without them; certificates are verified unless
    the URL says ``ssl_cert_reqs=none``.
    """
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        return None
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    opts: dict[str, Any] = {"ssl_cert_reqs": _CERT_REQS[query.get("ssl_cert_reqs", "required")]}
    for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if key in query:
            opts[key] = query[key]
    return opts


def make_celery(
    settings: CommonSettings, *, include: tuple[str, ...] = (), publisher: bool = False
) -> Celery:
    """A Celery app named dspy_fleet configured from these settings.

    ``publisher=True`` is for processes that only publish jobs and read outcomes from
    the job store (the API, the SDK producer): without a result backend, send_task
    does not subscribe to each task's result channel (a round-trip and a pub/sub
    subscription per published job, for nothing). Workers still store results.
    """
    kombu_patch.install()
    app = Celery(APP_NAME, include=list(include), set_as_current=False)
    conf = celery_config(settings)
    if publisher:
        conf.pop("result_backend")
        conf.pop("result_backend_transport_options")
        conf.pop("redis_backend_use_ssl", None)
    app.conf.update(conf)
    return app


def send_job(
    app: Celery,
    kwargs: dict[str, Any],
    *,
    job_id: str,
    queue: str,
    request_id: str | None,
    **options: Any,
) -> None:
    """Publish one contract-v1 job message: by task name, task id = job id, request id in the
    headers (it rides into the worker's logs). The one way every producer here publishes.

    The kwargs' repr (what Flower shows) is given, not left to Celery: its ``saferepr``
    walks the message in Python, about 0.25 ms per job in our API profile (a third of
    send_task's own time); a message is plain JSON data, so the builtin repr, cut to
    Celery's 1,024 characters, shows the same."""
    options.setdefault("argsrepr", "()")
    options.setdefault("kwargsrepr", _short_repr(kwargs))
    app.send_task(TASK_NAME, kwargs=kwargs, task_id=job_id, queue=queue,
                  headers={"request_id": request_id}, **options)  # fmt: skip


def _short_repr(value: Any, limit: int = 1024) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
