"""Service endpoints: /, /health, /ready, /metrics."""

from __future__ import annotations

import time

import redis
from flask import Blueprint, Response, current_app, jsonify, url_for
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import metrics
from api.errors import error_body
from api.services import services
from worker.breaker import read_states
from worker.contract import QUEUES
from worker.heartbeat import live_workers

bp = Blueprint("system", __name__)
VERSION = "0.1.0"


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
    """Readiness: a real Redis round-trip, live workers for every queue, config loaded."""
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
        # Informational: an open breaker is a provider's outage, not ours. The
        # service still answers (cache, fallbacks, fast failures), so it stays ready.
        components["breakers"] = {
            "ok": True,
            "states": read_states(svc.redis, list(svc.config.models)),
        }
    except redis.RedisError as exc:
        components["redis"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        components["workers"] = {"ok": False, "error": "unknown while Redis is unavailable"}
    failing = [name for name, c in components.items() if not c["ok"]]
    if failing:
        body = error_body(
            "not_ready",
            f"not ready: {', '.join(failing)} failing",
            {"failing": failing, "components": components},
        )
        return jsonify(body), 503
    return jsonify({"status": "ready", "components": components}), 200


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    """This process's Prometheus metrics (all gunicorn workers in multiprocess mode)."""
    return Response(generate_latest(metrics.registry()), mimetype=CONTENT_TYPE_LATEST)
