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

from dspy_fleet.broker import kombu_patch
from dspy_fleet.broker.backends import check_broker_url, is_amqp
from dspy_fleet.contract import QUEUES, TASK_NAME
from dspy_fleet.settings import CommonSettings, WorkerSettings
from dspy_fleet.store.connection import is_sentinel, parse_sentinel_url

APP_NAME = "dspy_fleet"
LOG_PAYLOADS_CONF = "dspy_fleet_log_payloads"
# What the task's kwargs repr shows by default: the job's ids and names, never its inputs.
REPR_FIELDS = ("job_id", "tenant", "program", "model", "variant", "priority")
PUBLISH_RETRIES = 1
# Webhook deliveries (worker/webhooks.py): their own task and queue, so that a backlog of
# callbacks to a dead receiver never sits in front of prediction jobs.
CALLBACK_TASK = "dspy_fleet.deliver_callback"
CALLBACK_QUEUE = "callbacks"


def publish_bound(settings: CommonSettings) -> float:
    """Seconds a publish to a hung broker may take before it fails: each attempt may wait
    a connect timeout (a fresh connection's handshake) and a read timeout."""
    return (PUBLISH_RETRIES + 1) * 2 * settings.redis_timeout_seconds


def unacked_mutex_seconds(settings: CommonSettings) -> int:
    """Expiry (s) of kombu's ``unacked_mutex``, the lock of one restore pass: twice the
    restore interval, at least 5 s. A pass takes milliseconds (it restores at most
    ``unacked_restore_limit`` messages); two passes overlapping after an early expiry are
    harmless, since kombu moves each message back in a WATCH transaction of its own."""
    return max(5, 2 * settings.restore_sweep_seconds)


def celery_config(settings: CommonSettings) -> dict[str, Any]:
    """The Celery settings dict for a process with these settings."""
    timeout = settings.redis_timeout_seconds
    transport = {
        "visibility_timeout": settings.visibility_timeout,
        # A hung broker must fail a publish (and an ack) within the timeout, not hold it:
        # kombu's own socket_timeout default is none at all (a 25 s stall held every
        # submission 25 s). No redis-level retry on top: Celery's publish retry policy
        # below retries a failed publish, and a second layer would double each attempt.
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry_on_timeout": False,
        "socket_keepalive": True,
        "health_check_interval": 10,
        # Redeliver a crashed worker's jobs promptly once their visibility timeout passed.
        "unacked_restore_interval": settings.restore_sweep_seconds,
        "unacked_restore_throttle": 1,
        # The lock a restore pass holds (kombu's default expiry: 300 s). A worker killed
        # inside a pass leaves it held until it expires, and until then no worker of the
        # fleet restores anything: a dead worker's prefetched messages waited 5 minutes.
        "unacked_mutex_expire": unacked_mutex_seconds(settings),
    }
    conf: dict[str, Any] = {
        "broker_url": settings.broker,
        "result_backend": settings.backend,
        "broker_transport_options": transport,
        # Celery's docs ask for the same visibility timeout on the result backend.
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout},
        # The result backend's own client: Celery's defaults are a 120 s read timeout and
        # no connect timeout, which a hung Redis would hold a worker thread for.
        "redis_socket_timeout": timeout,
        "redis_socket_connect_timeout": timeout,
        "broker_connection_retry_on_startup": True,
        # A Redis that refuses a command (OOM at maxmemory, READONLY after a failover) is
        # a channel error to kombu; without this Celery calls it unrecoverable and the
        # worker exits. With it the consumer reconnects, as after a lost connection.
        "broker_channel_error_retry": True,
        # JSON only: pickle would let any producer run code on our workers.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "result_expires": settings.job_ttl_seconds,
        "result_extended": True,
        "task_queues": [
            Queue(q, Exchange(q, type="direct"), routing_key=q) for q in (*QUEUES, CALLBACK_QUEUE)
        ],
        "task_default_queue": "interactive",
        "task_routes": {
            TASK_NAME: {"queue": "interactive"},
            CALLBACK_TASK: {"queue": CALLBACK_QUEUE},
        },  # fmt: skip
        # A job is acknowledged only after it ran; a worker killed mid-job has
        # its message redelivered instead of lost.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_soft_time_limit": settings.soft_time_limit,
        "task_time_limit": settings.time_limit,
        # Events let Flower and celery-exporter see every task.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        # A broker outage must turn into a quick 503, not a request that hangs: one retry
        # at once (a stale pooled connection after a Redis restart), so a hung broker costs
        # a publish at most 2 attempts × (connect + read timeout); see publish_bound().
        "task_publish_retry_policy": {
            "max_retries": PUBLISH_RETRIES,
            "interval_start": 0,
            "interval_step": 0,
            "interval_max": 0,
        },
        "broker_pool_limit": 32,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }
    _use_sentinel(conf, settings)
    if is_amqp(settings.broker):
        conf.update(amqp_options(settings))
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


def _use_sentinel(conf: dict[str, Any], settings: CommonSettings) -> None:
    """Translate redis+sentinel:// broker and backend URLs (dspy_fleet/store/connection.py)
    into what kombu's and Celery's Sentinel support take: ``sentinel://h:p/db;...`` plus
    the master name and the Sentinels' options in the transport options."""
    # The Sentinels get the data nodes' timeouts: Celery gives them none of its own (a
    # hung Sentinel would hold a result write forever), kombu only when sentinel_kwargs
    # is left out, which a Sentinel password rules out.
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout_seconds,
        "socket_connect_timeout": settings.redis_timeout_seconds,
    }
    if settings.sentinel_secret:
        sentinel_kwargs["password"] = settings.sentinel_secret
    for url_key, options_key, url in (
        ("broker_url", "broker_transport_options", settings.broker),
        ("result_backend", "result_backend_transport_options", settings.backend),
    ):
        if not is_sentinel(url):
            continue
        parsed = parse_sentinel_url(url)
        conf[url_key] = parsed.kombu_urls()
        conf[options_key] = {
            **conf[options_key],
            "master_name": parsed.master_name,
            "sentinel_kwargs": dict(sentinel_kwargs),
        }


# RabbitMQ 4.x gives quorum queues a delivery limit of 20 (3.x: none): past it a message is
# dropped. A worker that cannot reach Redis gives its message back (worker/tasks.py) and
# takes it again at once, so a Redis outage of a few seconds could reach 20 deliveries and
# lose jobs whose record says "published". Our own leases and the due sweep handle a job
# that keeps failing; the broker need not give up on it.
DELIVERY_LIMIT = 1_000_000


def amqp_options(settings: CommonSettings) -> dict[str, Any]:
    """What changes when the broker is RabbitMQ (amqp://): replaces the Redis transport's
    options and queues (see README, Brokers).

    - Quorum queues: replicated and on disk, so a confirmed message survives a node's
      restart. They have no per-message priority, which the fleet does not need: the
      lanes (interactive, batch) are queues of their own. Celery then uses per-consumer
      QoS and declares its native-delayed-delivery exchanges (unused: retries wait in
      the due-time index, never as countdown messages).
    - Publisher confirms: ``send_task`` returns only once RabbitMQ took the message, so
      a publish that returned is held by the broker (backends.AmqpBroker.held).
    - The same connect/read bound as every Redis client: a hung broker fails a publish
      within ``publish_bound()``, never holds it.
    """
    timeout = settings.redis_timeout_seconds
    args = {"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT}
    return {
        "broker_transport_options": {
            "confirm_publish": True,
            "read_timeout": timeout,
            "write_timeout": timeout,
        },
        "broker_connection_timeout": timeout,
        # A dead TCP peer (a proxy that vanished) is noticed within 2 heartbeats.
        "broker_heartbeat": 10,
        "task_queues": [
            Queue(q, Exchange(q, type="direct"), routing_key=q, durable=True, queue_arguments=args)
            for q in (*QUEUES, CALLBACK_QUEUE)
        ],  # fmt: skip
        "task_default_queue_type": "quorum",
        "worker_detect_quorum_queues": True,
    }


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
    check_broker_url(settings.broker)  # ConfigError for a scheme we cannot run on
    kombu_patch.install()
    app = Celery(APP_NAME, include=list(include), set_as_current=False)
    conf = celery_config(settings)
    if publisher:
        conf.pop("result_backend")
        conf.pop("result_backend_transport_options")
        conf.pop("redis_backend_use_ssl", None)
    app.conf.update(conf)
    # Read by send_job: whether the task args Celery logs and Flower shows carry the inputs.
    app.conf[LOG_PAYLOADS_CONF] = settings.log_payloads
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

    The kwargs' repr (what Celery's "received" line logs and Flower shows) is given, not
    left to Celery: by default the job's ids and names only (REPR_FIELDS), never its inputs,
    which are customer data; with DSPY_FLEET_LOG_PAYLOADS=true the whole message, by the
    builtin repr cut to Celery's 1,024 characters (Celery's ``saferepr`` walks it in Python,
    about 0.25 ms per job in our API profile, a third of send_task's own time)."""
    options.setdefault("argsrepr", "()")
    options.setdefault(
        "kwargsrepr", kwargs_repr(kwargs, payloads=bool(app.conf.get(LOG_PAYLOADS_CONF)))
    )
    app.send_task(TASK_NAME, kwargs=kwargs, task_id=job_id, queue=queue,
                  headers={"request_id": request_id}, **options)  # fmt: skip


def kwargs_repr(kwargs: dict[str, Any], *, payloads: bool = False) -> str:
    """The repr of a job message that Celery logs and Flower shows (see send_job)."""
    if payloads:
        return _short_repr(kwargs)
    return _short_repr({k: kwargs[k] for k in REPR_FIELDS if kwargs.get(k) is not None})


def _short_repr(value: Any, limit: int = 1024) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
