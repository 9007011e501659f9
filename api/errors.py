"""The API's errors and the one JSON error body every failure is rendered as."""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, Response, g, jsonify
from werkzeug.exceptions import HTTPException

from worker.errors import FleetError

log = logging.getLogger("dspy_fleet.api")


class ApiError(Exception):
    """An error the API answers with; ``status`` is the HTTP code."""

    status = 500
    code = "internal_error"
    headers: dict[str, str] = {}

    def __init__(
        self, message: str, *, details: dict[str, Any] | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code:
            self.code = code


class BadRequest(ApiError):
    """The request cannot be read at all (e.g. malformed JSON)."""

    status = 400
    code = "invalid_json"


class ValidationFailed(ApiError):
    """The request is readable but breaks the schema; details name the fields."""

    status = 422
    code = "validation_error"


class NotFound(ApiError):
    """Unknown id, program, model or route."""

    status = 404
    code = "not_found"


class Conflict(ApiError):
    """The request clashes with the resource's state (e.g. cancelling a running job)."""

    status = 409
    code = "conflict"


class ServiceUnavailable(ApiError):
    """A dependency (Redis, the broker) is down; the request was not accepted."""

    status = 503
    code = "service_unavailable"


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


def register_error_handlers(app: Flask) -> None:
    """Map every error, ours or not, to the one JSON shape; nothing escapes as HTML."""

    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return _respond(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.errorhandler(FleetError)
    def _fleet_error(exc: FleetError) -> Response:
        return _respond(422, exc.code, exc.message, exc.details)

    @app.errorhandler(redis.RedisError)
    def _redis_error(exc: redis.RedisError) -> Response:
        log.warning("redis unavailable: %s", exc)
        return _respond(
            503,
            "redis_unavailable",
            "Redis is unavailable; try again shortly.",
            {"reason": type(exc).__name__},
            {"Retry-After": "1"},
        )

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = exc.description or exc.name
        if status == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            message = f"request body is larger than the limit of {limit} bytes"
            return _respond(status, code, message, {"limit_bytes": limit})
        resp = _respond(status, code, message)
        allowed = getattr(exc, "valid_methods", None)
        if allowed:
            resp.headers["Allow"] = ", ".join(allowed)
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return _respond(500, "internal_error", "internal error; the request id helps us find it")
