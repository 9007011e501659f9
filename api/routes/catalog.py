"""GET /v1/programs and GET /costs: what the fleet serves and what it has cost."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from flask import Blueprint, Response, g, jsonify, request

from api.services import services
from dspy_fleet.errors import RequestValidationError
from dspy_fleet.routing import pick_model
from dspy_fleet.store import ledger
from dspy_fleet.store.quotas import QUOTAS

bp = Blueprint("catalog", __name__)
MAX_COST_DAYS = 366


@bp.get("/v1/programs")
def programs() -> Response:
    """Registered programs: fields (as the workers loaded them), variants and models."""
    svc = services()
    published = svc.catalog.all()
    out = []
    for name, cfg in svc.config.programs.items():
        loaded = published.get(name)
        out.append({
            "name": name,
            "description": cfg.description,
            "loaded": loaded is not None,
            "input_fields": loaded["input_fields"] if loaded else None,
            "output_fields": loaded["output_fields"] if loaded else None,
            "version": loaded["version"] if loaded else None,
            "default_model": pick_model(svc.config, name, None, None),
            "variants": [
                {"name": v, "weight": var.weight, "model": var.model,
                 "version": (loaded or {}).get("variants", {}).get(v, {}).get("version")}
                for v, var in sorted(cfg.variants.items())
            ],
        })  # fmt: skip
    models = [
        {"name": alias, "provider_model": m.litellm_model, "fallbacks": m.fallbacks,
         "input_price_per_1k": m.input_price_per_1k, "output_price_per_1k": m.output_price_per_1k}
        for alias, m in sorted(svc.config.models.items())
    ]  # fmt: skip
    return jsonify(
        {
            "programs": out,
            "models": models,
            "default_program": svc.config.default_program,
            "default_model": svc.config.default_model,
        }
    )


def _days_before(day: date, n: int) -> date:
    """``day`` minus ``n`` days, never before the first representable date."""
    return day - timedelta(days=n) if (day - date.min).days >= n else date.min


def _day(name: str, default: date) -> date:
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        return date.fromisoformat(raw)
    except ValueError:
        raise RequestValidationError(
            f"{name} must be a date like 2026-01-31",
            details={"errors": [{"field": name, "message": "expected YYYY-MM-DD"}]},
        ) from None


@bp.get("/costs")
def costs() -> Response:
    """Cost and token totals from the fleet's aggregates, with breakdowns; ?since=&until=."""
    today = datetime.now(UTC).date()
    until = _day("until", today)
    since = _day("since", _days_before(until, 29))
    # At most MAX_COST_DAYS days are read (the answer's "since" says where it starts);
    # since after until is an empty range.
    since = max(since, _days_before(until, MAX_COST_DAYS - 1))
    tenant = g.get("tenant_filter")  # set by auth: a tenant only sees its own costs
    svc = services()
    costs = ledger.read_costs(svc.redis, since, until, tenant=tenant)
    # Each tenant's limits beside its spend: its entry says what it may spend, and
    # "budgets" what it used of that this day and month (as GET /v1/usage shows it).
    names = [tenant] if tenant is not None else sorted(set(svc.config.tenants)
                                                       | set(costs["by_tenant"]))  # fmt: skip
    for name in names:
        quota = svc.config.tenants.get(name)
        limits = quota.model_dump() if quota else dict.fromkeys(QUOTAS)
        if name in costs["by_tenant"]:
            costs["by_tenant"][name]["limits"] = limits
    costs["budgets"] = {name: svc.quotas.usage(name) for name in names}
    return jsonify(costs)
