"""Which program state, variant and model a request runs on, and its cache key.

Shared by the API (cache fast path, variant in the message) and the worker, so
both compute the same answer; never import dspy here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from worker.fleet_config import FleetConfig, ProgramConfig

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


@dataclass(frozen=True)
class Route:
    """Where a request goes: program, variant (or None) and model alias."""

    program: str
    variant: str | None
    model: str


def resolve(
    config: FleetConfig,
    program: str,
    *,
    model: str | None,
    variant: str | None,
    inputs: dict[str, Any] | None,
    params: dict[str, Any],
) -> Route:
    """Pick the variant (forced, or assigned from the request) and the model.

    The model is the request's, else the variant's, else the program's, else the default.
    ``inputs`` must be the canonical field mapping; without it no variant is assigned.
    """
    prog = config.programs[program]
    if variant is None and prog.variants and inputs is not None:
        variant = choose_variant(prog, assignment_point(program, inputs, params))
    variant_model = prog.variants[variant].model if variant in prog.variants else None
    alias = model or variant_model or prog.model or config.default_model
    return Route(program=program, variant=variant, model=alias)


def bind_inputs(
    input_fields: tuple[str, ...] | list[str], text: str | None, inputs: dict[str, Any] | None
) -> dict[str, Any] | None:
    """Canonical inputs ({field: value}) for a request, or None if they do not fit the fields."""
    if text is not None:
        return {input_fields[0]: text} if len(input_fields) == 1 else None
    given = dict(inputs or {})
    return given if set(given) == set(input_fields) else None


def cache_key(
    program: str, version: str, model: str, inputs: dict[str, Any], params: dict[str, Any]
) -> str:
    """The cache key: program and its state version, model alias, inputs, LM parameters.

    Secrets and request ids never enter it: only what determines the answer.
    """
    return _digest(
        CACHE_KEY_VERSION, program, version, model, canonical_json(inputs), canonical_json(params)
    )
