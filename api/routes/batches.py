"""POST /v1/batches, GET /v1/batches/<id>, its results (NDJSON) and cancelling it."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, g, jsonify, request, stream_with_context, url_for
from pydantic import ValidationError

from api import metrics
from api.auth import visible
from api.batches import (
    CANCELLABLE,
    batches,
    cancel_job,
    item_line,
    new_batch_id,
    summarize,
)
from api.errors import ApiError, BadRequest, NotFound, ServiceUnavailable, ValidationFailed
from api.routes.predictions import _plan, _schema_errors
from api.services import services
from worker.contract import (
    DEFAULT_TENANT,
    JobMessage,
    PredictFields,
    build_message,
    new_job_id,
    utcnow,
)
from worker.errors import FleetError
from worker.jobs import TERMINAL
from worker.producer import BatchItem, ProducerError

log = logging.getLogger("dspy_fleet.api")
bp = Blueprint("batches", __name__, url_prefix="/v1")
NDJSON = "application/x-ndjson"


def _tenant() -> str:
    return g.get("tenant") or DEFAULT_TENANT


def _raw_items() -> list[Any]:
    """The request's items: a JSON array, or one JSON value per line (NDJSON).

    An NDJSON line that is not JSON becomes an invalid item, not a rejected batch."""
    mimetype = request.mimetype
    if mimetype in (NDJSON, "application/jsonl", "application/x-jsonlines"):
        items: list[Any] = []
        text = request.get_data(as_text=True)
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                items.append(_Unreadable(f"line {number} is not valid JSON: {exc.msg}"))
        return items
    body = request.get_json(force=True, silent=True)
    if body is None:
        raise BadRequest("request body is not valid JSON (send a JSON array or NDJSON lines)")
    if not isinstance(body, list):
        raise ValidationFailed(
            "a batch is a JSON array of items (or application/x-ndjson, one item per line)",
            details={"errors": [{"field": "(body)", "message": "expected an array"}]},
        )
    return body


class _Unreadable:
    """An NDJSON line that could not be parsed."""

    def __init__(self, message: str) -> None:
        self.message = message


def _error(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "details": details or {}}


def _check(index: int, raw: Any, seen: set[str], batch_id: str) -> tuple[Any, Any]:
    """(message, None) for a valid item or (custom_id, error) for an invalid one."""
    tenant = _tenant()
    custom_id = raw.get("custom_id") if isinstance(raw, dict) else None
    custom_id = custom_id if isinstance(custom_id, str) else None
    if isinstance(raw, _Unreadable):
        return None, _error("invalid_json", raw.message)
    try:
        item = BatchItem.model_validate(raw)
    except ValidationError as exc:
        err = _schema_errors(exc)
        return custom_id, _error(err.code, err.message, err.details)
    if item.custom_id in seen:
        return item.custom_id, _error(
            "duplicate_custom_id", f"custom_id {item.custom_id!r} appears earlier in this batch"
        )
    seen.add(item.custom_id)
    try:
        route, _key = _plan(item)  # type: ignore[arg-type]
    except (ApiError, FleetError) as exc:
        return item.custom_id, _error(exc.code, exc.message, exc.details)
    fields = item.model_copy(
        update={"program": route.program, "model": route.model, "variant": route.variant}
    )
    plain = PredictFields.model_validate(fields.model_dump(exclude={"custom_id"}))
    # Without an idempotency key, the job id is derived from the batch and custom_id.
    job_id = new_job_id(tenant, item.request_id or f"{batch_id}\x00{item.custom_id}")
    return build_message(plain, tenant=tenant, job_id=job_id), None


def _batch_view(batch_id: str, meta: dict[str, str]) -> dict[str, Any]:
    summary = summarize(batches().store, batch_id, meta)
    view: dict[str, Any] = {
        "id": batch_id,
        "object": "batch",
        **summary,
        "created_at": meta.get("created_at"),
    }
    if "cancelled_at" in meta:
        view["cancelled_at"] = meta["cancelled_at"]
    view["status_url"] = url_for("batches.get_batch", batch_id=batch_id, _external=True)
    view["results_url"] = url_for("batches.batch_results", batch_id=batch_id, _external=True)
    return view


def _owned(batch_id: str) -> dict[str, str]:
    meta = batches().store.meta(batch_id)
    if meta is None or not visible(meta.get("tenant")):
        # Another tenant's batch is indistinguishable from one that does not exist.
        raise NotFound(f"no batch with id {batch_id!r}")
    return meta


@bp.post("/batches")
def create_batch() -> tuple[Response, int]:
    """Submit many predictions; invalid items are reported per item, the rest are queued."""
    raw = _raw_items()
    limit = services().settings.max_batch_items
    if not raw:
        raise ValidationFailed(
            "a batch needs at least one item",
            code="empty_batch",
            details={"errors": [{"field": "(body)", "message": "no items"}]},
        )
    if len(raw) > limit:
        raise ValidationFailed(
            f"a batch holds at most {limit} items; this one has {len(raw)}",
            code="too_many_items",
            details={"max_items": limit, "items": len(raw)},
        )
    batch_id = new_batch_id()
    seen: set[str] = set()
    entries: list[dict[str, Any]] = []
    messages: list[JobMessage] = []
    errors: list[dict[str, Any]] = []
    for index, item in enumerate(raw):
        checked, error = _check(index, item, seen, batch_id)
        if error is not None:
            entries.append({"index": index, "custom_id": checked, "error": error})
            errors.append({"index": index, "custom_id": checked, **error})
        else:
            entries.append(
                {"index": index, "custom_id": raw[index]["custom_id"], "job_id": checked.job_id}
            )
            messages.append(checked)
    machinery = batches()
    try:
        created = machinery.publisher.push(messages, request_id=g.get("request_id"))
    except ProducerError as exc:
        log.warning("broker refused a batch: %s", exc)
        raise ServiceUnavailable(
            "the job queue is unavailable; the batch was not accepted, retry shortly",
            code="broker_unavailable",
            details={"reason": str(exc)},
        ) from None
    for msg, new in zip(messages, created, strict=True):
        if new:
            metrics.JOBS_ENQUEUED.labels(msg.priority).inc()
    meta = {
        "id": batch_id,
        "tenant": _tenant(),
        "created_at": utcnow().isoformat(),
        "total": len(entries),
        "valid": len(messages),
    }
    machinery.store.create(batch_id, meta, entries)
    log.info(
        "batch accepted",
        extra={"batch_id": batch_id, "items": len(entries), "invalid": len(errors)},
    )
    view = _batch_view(batch_id, {k: str(v) for k, v in meta.items()})
    view["errors"] = errors
    resp = jsonify(view)
    resp.headers["Location"] = view["status_url"]
    return resp, 202


@bp.get("/batches/<batch_id>")
def get_batch(batch_id: str) -> Response:
    """A batch's status and counts{total, succeeded, failed, cancelled, pending}."""
    return jsonify(_batch_view(batch_id, _owned(batch_id)))


@bp.get("/batches/<batch_id>/results")
def batch_results(batch_id: str) -> Response:
    """NDJSON, one line per item that has ended (every item once the batch has ended)."""
    _owned(batch_id)
    store = batches().store

    def lines() -> Iterator[str]:
        for chunk in store.with_jobs(batch_id):
            for entry, job in chunk:
                line = item_line(entry, job)
                if line.get("status") in TERMINAL:
                    yield json.dumps(line, separators=(",", ":")) + "\n"

    return Response(stream_with_context(lines()), mimetype=NDJSON)


@bp.post("/batches/<batch_id>/cancel")
@bp.delete("/batches/<batch_id>")
def cancel_batch(batch_id: str) -> Response:
    """Cancel every item still queued; items already running finish (status cancelling)."""
    _owned(batch_id)
    machinery = batches()
    machinery.store.mark_cancelled(batch_id)
    cancelled = 0
    ttl = machinery.settings.job_ttl_seconds
    for chunk in machinery.store.with_jobs(batch_id):
        for _entry, job in chunk:
            # Read first, then cancel only what looked cancellable (cancel_job re-checks).
            if job is not None and job.get("status") in CANCELLABLE:
                cancelled += cancel_job(machinery.store.client, ttl, job["job_id"]) == "cancelled"
    log.info("batch cancelled", extra={"batch_id": batch_id, "cancelled": cancelled})
    return jsonify(_batch_view(batch_id, _owned(batch_id)))
