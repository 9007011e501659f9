"""The one JSON error body every failure is rendered as, and the handlers that render it.

The errors themselves live in dspy_fleet/errors.py and carry their code, HTTP status
and headers, so one handler renders them all; only foreign exceptions (werkzeug's,
Redis's, the broker's, anything unexpected) are translated here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import redis
from flask import Flask, Response, g, jsonify
from kombu.exceptions import OperationalError as KombuOperationalError
from werkzeug.exceptions import HTTPException

from api.body import too_large
from dspy_fleet.errors import (
    BrokerUnavailableError,
    FleetError,
    RedisUnavailableError,
)

log = logging.getLogger("dspy_fleet.api")


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """The single error shape of SPEC §2."""
    return {
        "error": {
            "code": code,
            "message": message,
            "details": details or {},
            "request_id": g.get("request_id"),
        }
    }


def _respond(
    status: int,
    code: str,
    message: str,
    details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    resp = jsonify(error_body(code, message, details))
    resp.status_code = status
    resp.headers.update(headers or {})
    return resp


def render(exc: FleetError) -> Response:
    """Any of our errors as the one JSON body, with its status and headers."""
    return _respond(exc.http_status or 500, exc.code, exc.message, exc.details, exc.headers)


# Werkzeug's HTTP errors, named the way our clients see them.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


# Exceptions of a dependency that no code path translated, by cause: (our error, message).
_DEPENDENCY_ERRORS: dict[type[Exception], tuple[type[FleetError], str]] = {
    redis.RedisError: (RedisUnavailableError, "Redis is unavailable; try again shortly."),
    KombuOperationalError: (
        BrokerUnavailableError,
        "the job queue is unavailable; try again shortly.",
    ),
}


def _dependency_handler(ours: type[FleetError], message: str) -> Callable[[Exception], Response]:
    """A handler rendering a dependency's exception as ``ours`` (a 503 naming the cause)."""

    def handle(exc: Exception) -> Response:
        log.warning("%s: %s", ours.code, exc)
        return render(ours(message, details={"reason": type(exc).__name__}))

    return handle


def register_error_handlers(app: Flask) -> None:
    """Map every error, ours or not, to the one JSON shape; nothing escapes as HTML."""

    @app.errorhandler(FleetError)
    def _fleet_error(exc: FleetError) -> Response:
        return render(exc)

    # A dependency's own exception that no code path translated: named by its cause.
    for foreign, (ours, message) in _DEPENDENCY_ERRORS.items():
        app.register_error_handler(foreign, _dependency_handler(ours, message))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 413:
            return render(too_large(int(app.config.get("MAX_CONTENT_LENGTH") or 0)))
        resp = _respond(status, _HTTP_CODES.get(status, "http_error"), exc.description or exc.name)
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            resp.headers["Allow"] = ", ".join(allowed)
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return _respond(500, "internal_error", "internal error; the request id helps us find it")
