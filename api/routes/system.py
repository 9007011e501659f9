"""Service endpoints: /, /health, /ready, /metrics."""

from __future__ import annotations

import time
from typing import Any

import redis
from flask import Blueprint, Response, current_app, g, jsonify, url_for
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import metrics
from api.services import services
from dspy_fleet import __version__ as VERSION
from dspy_fleet.broker.backends import PUBLISH_ERRORS
from dspy_fleet.broker.celery_config import CALLBACK_QUEUE
from dspy_fleet.contract import QUEUES
from dspy_fleet.errors import NotReadyError
from dspy_fleet.store.breakers import read_states
from dspy_fleet.store.heartbeats import live_workers
from dspy_fleet.store.jobs import CALLBACKS_KEY

bp = Blueprint("system", __name__)


@bp.get("/")
def index() -> Response:
    """Service name, version and links."""
    return jsonify(
        {
            "service": "dspy-fleet",
            "version": VERSION,
            "links": {
                "predict": url_for("predictions.predict", _external=True),
                "health": url_for("system.health", _external=True),
                "ready": url_for("system.ready", _external=True),
                "metrics": url_for("system.metrics_endpoint", _external=True),
            },
        }
    )


@bp.get("/health")
def health() -> Response:
    """Liveness: this process answers. Checks nothing external, on purpose."""
    started = current_app.config["STARTED_AT"]
    return jsonify(
        {"status": "ok", "version": VERSION, "uptime_seconds": round(time.monotonic() - started, 3)}
    )


@bp.get("/ready")
def ready() -> tuple[Response, int]:
    """Readiness: a real Redis round-trip, a real broker round-trip, live workers for every
    queue, config loaded.
    Informational (never failing): the breakers' states, and the webhooks due with the
    number of live workers that deliver them (``callbacks``).

    Public (probes call it): what fails is named, internal addresses are not, except
    to a caller with an admin key."""
    svc = services()
    components: dict[str, dict[str, object]] = {
        "config": {"ok": True, "programs": len(svc.config.programs)}
    }
    try:
        t0 = time.perf_counter()
        svc.redis.ping()
        components["redis"] = {"ok": True, "latency_ms": round((time.perf_counter() - t0) * 1e3, 2)}
        workers = live_workers(svc.redis, svc.settings.worker_max_age_seconds)
        covered = {q for w in workers for q in w.get("queues", [])}
        missing = [q for q in QUEUES if q not in covered]
        components["workers"] = {
            "ok": bool(workers) and not missing,
            "live": len(workers),
            "queues_without_workers": missing,
        }
        # Informational, like the breakers: webhooks wait in Redis until a worker that
        # consumes the callbacks queue delivers them; predictions do not need one.
        consumers = sum(CALLBACK_QUEUE in w.get("queues", []) for w in workers)
        due = int(svc.redis.zcard(CALLBACKS_KEY))
        components["callbacks"] = {"ok": True, "workers": consumers, "due": due}
        if due and not consumers:
            components["callbacks"]["warning"] = (
                f"{due} webhooks are due and no live worker consumes the "
                f"{CALLBACK_QUEUE!r} queue: none is delivered until one does"
            )
        # Informational: an open breaker is a provider's outage, not ours. The
        # service still answers (cache, fallbacks, fast failures), so it stays ready.
        components["breakers"] = {
            "ok": True,
            "states": read_states(svc.redis, list(svc.config.models)),
        }
    except redis.RedisError as exc:
        components["redis"] = {"ok": False, "error": "redis unreachable"}
        if _admin_key():
            # redis-py's message names the internal host and port: for operators only.
            components["redis"]["detail"] = f"{type(exc).__name__}: {exc}"
        components["workers"] = {"ok": False, "error": "unknown while Redis is unavailable"}
    components["broker"] = _broker_component(svc)
    failing = [name for name, c in components.items() if not c["ok"]]
    if failing:
        raise NotReadyError(
            f"not ready: {', '.join(failing)} failing",
            details={"failing": failing, "components": components},
        )
    return jsonify({"status": "ready", "components": components}), 200


def _broker_component(svc: Any) -> dict[str, object]:
    """A real round-trip to the broker (Redis PING, or a passive queue.declare on RabbitMQ):
    a fleet whose API cannot publish answers every job with 503 broker_unavailable."""
    try:
        latency = svc.broker.ping()
    except PUBLISH_ERRORS as exc:
        out: dict[str, object] = {"ok": False, "error": "broker unreachable"}
        if _admin_key():
            # The message may name the internal host and port: for operators only.
            out["detail"] = f"{type(exc).__name__}: {exc}"
        return out
    return {"ok": True, "latency_ms": round(latency, 2)}


def _admin_key() -> bool:
    """Whether the caller presented an admin key. /ready is public, and in open mode
    everyone counts as admin: neither may learn internal addresses from it."""
    return bool(g.get("is_admin")) and not current_app.extensions["dspy_fleet_auth"].open


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    """This process's Prometheus metrics (all gunicorn workers in multiprocess mode)."""
    return Response(generate_latest(metrics.registry()), mimetype=CONTENT_TYPE_LATEST)
