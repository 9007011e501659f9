"""The rules under a plan: variant assignment, the model rule and the cache key.

Pure functions that :mod:`dspy_fleet.plan` applies for the API and the worker alike;
never import dspy here.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from dspy_fleet.fleet_config import FleetConfig, ProgramConfig

CACHE_KEY_VERSION = "1"  # bump to invalidate every cache entry at once


def canonical_json(value: Any) -> str:
    """Sorted, compact JSON: the same data always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()


def assignment_point(program: str, inputs: dict[str, Any], params: dict[str, Any]) -> float:
    """A stable number in [0, 1) for this request, for weighted variant assignment.

    It hashes what makes requests "the same" (program, inputs, LM parameters) and
    nothing variant-specific, so the same input always lands in the same arm.
    """
    digest = _digest("assign", program, canonical_json(inputs), canonical_json(params))
    return int(digest[:15], 16) / float(16**15)


def choose_variant(program: ProgramConfig, point: float) -> str | None:
    """The variant whose weight band contains ``point`` (None when there are no variants)."""
    if not program.variants:
        return None
    names = sorted(program.variants)
    total = sum(program.variants[n].weight for n in names)
    edge = 0.0
    for name in names:
        edge += program.variants[name].weight / total
        if point < edge:
            return name
    return names[-1]  # float rounding at the top edge


def pick_model(config: FleetConfig, program: str, model: str | None, variant: str | None) -> str:
    """The one model rule: the request's, else the variant's, else the program's, else the default.

    Tolerates an unknown program or variant (then their models do not apply), so that
    a job whose plan failed is still recorded under the model it would have used.
    """
    prog = config.programs.get(program)
    arm = prog.variants.get(variant) if prog and variant else None
    return (
        model
        or (arm.model if arm else None)
        or (prog.model if prog else None)
        or (config.default_model)
    )


def cache_key(
    program: str,
    version: str,
    model: str,
    inputs: dict[str, Any],
    params: dict[str, Any],
    owner: str | None = None,
) -> str:
    """The cache key: program and its state version, model alias, inputs, LM parameters,
    and ``owner`` (the tenant, for a program whose ``cache_scope`` is ``tenant``; None
    for ``global``), so that one tenant's entry is never another's hit.

    Secrets and request ids never enter it: only what determines the answer and who may
    see it. A 64-character hex SHA-256 digest.
    """
    parts = [program, version, model, canonical_json(inputs), canonical_json(params)]
    if owner is not None:
        parts.append(f"tenant={owner}")
    return _digest(CACHE_KEY_VERSION, *parts)
