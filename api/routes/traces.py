"""Program traces and the DSPy examples built from them.

GET /v1/programs/<name>/traces, GET /v1/predictions/<id>/trace and
GET /v1/programs/<name>/examples (NDJSON). The traces live in Redis
(dspy_fleet/store/traces.py); the worker captures them (worker/traces.py). A tenant sees
its own jobs' traces and examples only, an admin everyone's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify, request

from api.auth import visible
from api.routes.feedback import name_param, parse_time
from api.services import services
from dspy_fleet.errors import NotFoundError, RequestValidationError, UnknownProgramError
from dspy_fleet.examples import example_record

bp = Blueprint("traces", __name__, url_prefix="/v1")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def _invalid(field: str, message: str) -> RequestValidationError:
    return RequestValidationError(
        f"{field}: {message}", details={"errors": [{"field": field, "message": message}]}
    )


def _program(name: str) -> None:
    if name not in services().config.programs:
        raise UnknownProgramError(f"unknown program {name!r}", details={"program": name})


def _filters() -> dict[str, Any]:
    """The query's filters shared by traces and examples; 422 on a bad one."""
    since = request.args.get("since")
    return {
        "since": parse_time(since).timestamp() if since is not None else 0.0,
        "variant": name_param("variant"),
        "version": name_param("version"),
        "tenant": g.get("tenant_filter"),
    }


def _number(name: str, low: float, high: float) -> float | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise _invalid(name, f"expected a number from {low:g} to {high:g}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise _invalid(name, f"expected a number from {low:g} to {high:g}")
    return value


@bp.get("/programs/<program>/traces")
def list_traces(program: str) -> Response:
    """The program's newest kept traces (``limit``, default 100), newest first, with the
    feedback on each; filters ``since``, ``variant``, ``version``."""
    _program(program)
    f = _filters()
    raw = request.args.get("limit", str(DEFAULT_LIMIT))
    if not (raw.isdigit() and 1 <= int(raw) <= MAX_LIMIT):
        raise _invalid("limit", f"expected a whole number from 1 to {MAX_LIMIT}")
    limit = int(raw)
    kept = list(services().traces.scan(program, f["since"], tenant=f["tenant"],
                                       variant=f["variant"], version=f["version"]))  # fmt: skip
    newest = [{**k["trace"], "feedback": k["feedback"]} for k in reversed(kept[-limit:])]
    return jsonify({"program": program, "traces": newest, "count": len(newest)})


@bp.get("/predictions/<job_id>/trace")
def get_trace(job_id: str) -> Response:
    """The prediction's kept trace with its feedback; 404 when none is kept (not sampled,
    no feedback kept it, or it expired) or it is another tenant's."""
    kept = services().traces.get(job_id)
    if kept is None or not visible(kept["trace"].get("tenant")):
        raise NotFoundError(f"no trace kept for prediction {job_id!r}")
    return jsonify({**kept["trace"], "feedback": kept["feedback"]})


@bp.get("/programs/<program>/examples")
def examples(program: str) -> Response:
    """The program's kept traces of succeeded jobs as DSPy examples, one JSON object a
    line (dspy_fleet/examples.py); ``min_score``: only those whose mean feedback score is
    at least that (records without feedback left out). The header X-Input-Fields names
    the inputs to pass to ``Example.with_inputs``."""
    _program(program)
    f = _filters()
    min_score = _number("min_score", 0, 1)
    entry = services().catalog.get(program) or {}
    input_fields = ",".join(entry.get("input_fields") or [])
    # The scan starts before the first byte goes out: a Redis failure is a clean 5xx.
    kept = services().traces.scan(program, f["since"], tenant=f["tenant"], variant=f["variant"],
                                  version=f["version"])  # fmt: skip
    first = next(kept, None)

    def lines() -> Iterator[str]:
        for item in [first] if first is not None else []:
            yield from _line(item, min_score)
        for item in kept:
            yield from _line(item, min_score)

    response = Response(lines(), mimetype="application/x-ndjson")
    response.headers["X-Input-Fields"] = input_fields
    return response


def _line(kept: dict[str, Any], min_score: float | None) -> Iterator[str]:
    record = example_record(kept)
    if record is None:
        return
    score = record["dspy_score"]
    if min_score is not None and (score is None or score < min_score):
        return
    yield json.dumps(record, separators=(",", ":")) + "\n"
