"""GET /v1/usage: the calling tenant's consumption against its quotas and budget."""

from __future__ import annotations

from typing import Any

import redis
from flask import Blueprint, Response, g, jsonify, request

from api.services import services
from dspy_fleet.contract import DEFAULT_TENANT
from dspy_fleet.errors import ForbiddenError, RedisUnavailableError, RequestValidationError

bp = Blueprint("usage", __name__, url_prefix="/v1")


def _flag(name: str) -> bool:
    raw = request.args.get(name, "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise RequestValidationError(
            f"{name} must be true or false",
            details={"errors": [{"field": name, "message": "expected true or false"}]},
        )
    return raw in ("true", "1")


@bp.get("/usage")
def usage() -> Response:
    """The caller's requests and tokens today and USD this month, each against its limit
    (null: unlimited) with its reset time. Admins may ask ``?tenant=NAME`` for one
    tenant or ``?all=true`` for every tenant with quotas or counters."""
    svc = services()
    own = g.get("tenant") or DEFAULT_TENANT
    every = _flag("all")
    tenant = request.args.get("tenant", own)
    if (every or tenant != own) and not g.get("is_admin"):
        raise ForbiddenError("only admin keys may see other tenants' usage")
    try:
        if every:
            body: dict[str, Any] = {
                "tenants": {t: svc.quotas.usage(t) for t in svc.quotas.known_tenants()}
            }
        else:
            body = svc.quotas.usage(tenant)
    except redis.RedisError as exc:
        raise RedisUnavailableError(
            "the usage counters are unavailable, retry shortly",
            details={"reason": type(exc).__name__},
        ) from None
    return jsonify(body)
