"""Cost aggregates in Redis: day × model × variant × program × tenant, each job billed once.

The job store applies a job's bill in the same Lua script that writes its terminal
state, guarded by a per-job "finished" marker (SET NX), so a retried or
redelivered job counts exactly once.
Shared by the worker (billing), the API (cache fast path, GET /costs); no dspy here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

import redis

DAY_PREFIX = "dspy_fleet:costs:"
SEP = "|"  # names are restricted to [\w.:-], so this never occurs inside one
NANO = 1_000_000_000  # costs are summed as integer nano-USD: no float drift
# How long daily aggregates are kept.
KEEP_DAYS = 400
KEEP_SECONDS = KEEP_DAYS * 86400
# usage_missing: jobs whose provider left a token count unreported; their unknown counts
# and cost add nothing (no guessed 0). saved_unknown: cache hits whose savings are unknown.
# Each billed job counts in exactly one of: priced (cost_nusd), unpriced, usage_missing.
METRICS = ("requests", "succeeded", "failed", "cached", "input_tokens", "output_tokens",
           "saved_input_tokens", "saved_output_tokens", "cost_nusd", "unpriced",
           "usage_missing", "saved_unknown")  # fmt: skip


@dataclass(frozen=True)
class Bill:
    """What one job adds to one day's aggregates: HINCRBY field/amount pairs."""

    day: date
    pairs: tuple[str | int, ...]
    # What the same job adds to its tenant's quota counters (dspy_fleet/store/quotas.py),
    # from the same increments: tokens billed and nano-USD, and the model that served.
    tenant: str | None = None
    model: str = ""
    tokens: int = 0
    nusd: int = 0

    @property
    def key(self) -> str:
        """The Redis hash of that day."""
        return DAY_PREFIX + self.day.isoformat()


def increments(cost: dict[str, Any], *, status: str) -> dict[str, int]:
    """What one job adds to the aggregates, from its cost record.

    A count the provider did not report (null) adds nothing to the totals; the job is
    counted in ``usage_missing`` instead, and a hit whose savings are unknown in
    ``saved_unknown``: the totals hold only what was measured."""
    inc = {"requests": 1, status: 1}
    if cost.get("cached"):
        inc["cached"] = 1
        saved_in, saved_out = cost.get("saved_input_tokens"), cost.get("saved_output_tokens")
        if saved_in is None or saved_out is None:
            inc["saved_unknown"] = 1
        inc["saved_input_tokens"] = int(saved_in or 0)
        inc["saved_output_tokens"] = int(saved_out or 0)
    inc["input_tokens"] = int(cost.get("input_tokens") or 0)
    inc["output_tokens"] = int(cost.get("output_tokens") or 0)
    missing = bool(cost.get("usage_missing")) or any(
        cost.get(k, 0) is None for k in ("input_tokens", "output_tokens")
    )
    if missing:
        inc["usage_missing"] = 1
    elif cost.get("cost_usd") is None:
        inc["unpriced"] = 1
    else:
        inc["cost_nusd"] = round(float(cost["cost_usd"]) * NANO)
    return {k: v for k, v in inc.items() if v}


def make_bill(
    cost: dict[str, Any], *, status: str, dims: tuple[str, str, str, str], day: date
) -> Bill:
    """The bill of a job; ``dims`` are (model, variant, program, tenant)."""
    prefix = SEP.join(dims) + SEP
    pairs: list[str | int] = []
    inc = increments(cost, status=status)
    for metric, value in inc.items():
        pairs += [prefix + metric, value]
    tokens = inc.get("input_tokens", 0) + inc.get("output_tokens", 0)
    return Bill(day=day, pairs=tuple(pairs), tenant=dims[3], model=dims[0], tokens=tokens,
                nusd=inc.get("cost_nusd", 0))  # fmt: skip


def _empty() -> dict[str, Any]:
    return dict.fromkeys(METRICS, 0)


def _finish(totals: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in totals.items() if k != "cost_nusd"}
    out["cost_usd"] = round(totals["cost_nusd"] / NANO, 9)
    return out


def read_costs(
    client: redis.Redis, since: date, until: date, tenant: str | None = None
) -> dict[str, Any]:
    """Totals and breakdowns by model, variant, program, tenant and day (``tenant`` filters)."""
    days = [since + timedelta(n) for n in range(max(0, (until - since).days + 1))]
    pipe = client.pipeline(transaction=False)
    for day in days:
        pipe.hgetall(DAY_PREFIX + day.isoformat())
    total = _empty()
    groups: dict[str, dict[str, dict[str, Any]]] = {
        g: defaultdict(_empty) for g in ("model", "variant", "program", "tenant", "day")
    }
    for day, raw in zip(days, pipe.execute(), strict=True):
        for field, value in raw.items():
            parts = field.split(SEP)
            if len(parts) != 5 or parts[4] not in METRICS:
                continue
            model, variant, program, who, metric = parts
            if tenant is not None and who != tenant:
                continue
            n = int(value)
            total[metric] += n
            for group, name in (("model", model), ("variant", variant), ("program", program),
                                ("tenant", who), ("day", day.isoformat())):  # fmt: skip
                groups[group][name][metric] += n
    return {
        "since": since.isoformat(),
        "until": until.isoformat(),
        "totals": _finish(total),
        **{f"by_{g}": {k: _finish(v) for k, v in sorted(d.items())} for g, d in groups.items()},
    }
