"""Per-request plumbing: request ids, access logs and request metrics."""

from __future__ import annotations

import logging
import re
import time
import uuid

from flask import Flask, Response, g, request

from api import metrics
from dspy_fleet.logs import bind_context, reset_context

log = logging.getLogger("dspy_fleet.api.access")
# Accept the client's id only when it is a sane token; otherwise mint our own.
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def init_app(app: Flask) -> None:
    """Install the before/after hooks."""

    @app.before_request
    def _start() -> None:
        incoming = request.headers.get("X-Request-ID", "")
        g.request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
        g.started = time.perf_counter()
        g.log_token = bind_context(request_id=g.request_id)

    @app.after_request
    def _finish(resp: Response) -> Response:
        resp.headers["X-Request-ID"] = g.get("request_id", "")
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        metrics.REQUESTS.labels(endpoint, request.method, str(resp.status_code)).inc()
        metrics.REQUEST_DURATION.labels(endpoint).observe(elapsed)
        log.info(
            "%s %s %s",
            request.method,
            request.path,
            resp.status_code,
            extra={
                "latency_ms": round(elapsed * 1000, 2),
                "http_status": resp.status_code,
                **g.get("log_fields", {}),
            },  # fmt: skip
        )
        return resp

    @app.teardown_request
    def _reset(_: BaseException | None) -> None:
        token = g.pop("log_token", None)
        if token is not None:
            reset_context(token)
