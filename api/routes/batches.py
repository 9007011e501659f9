"""POST /v1/batches, GET /v1/batches/<id>, its results (NDJSON) and cancelling it."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from typing import Any

import redis
from flask import Blueprint, Response, g, jsonify, request, stream_with_context
from pydantic import ValidationError

from api import metrics
from api.auth import visible
from api.batches import (
    CANCELLABLE,
    batches,
    cancel_job,
    item_line,
    new_batch_id,
)
from api.body import check_depth
from api.routes.predictions import _plan, _schema_errors, check_callback
from api.services import services
from dspy_fleet.broker.producer import (
    PushResult,
    batch_id_for,
    claim_idempotency_key,
    fingerprint,
    item_job_id,
)
from dspy_fleet.contract import (
    DEFAULT_TENANT,
    TERMINAL_STATUSES,
    BatchItem,
    JobMessage,
    PredictFields,
    build_message,
    check_callback_form,
    new_job_id,
    utcnow,
)
from dspy_fleet.errors import (
    EmptyBatchError,
    FleetError,
    InvalidJsonError,
    NotFoundError,
    RedisUnavailableError,
    RequestValidationError,
    TooManyItemsError,
)
from dspy_fleet.store.callbacks import CallbackStore
from dspy_fleet.views import batch_view

log = logging.getLogger("dspy_fleet.api")
bp = Blueprint("batches", __name__, url_prefix="/v1")
NDJSON = "application/x-ndjson"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 128


def _tenant() -> str:
    return g.get("tenant") or DEFAULT_TENANT


def _raw_items() -> list[Any]:
    """The request's items: a JSON array, or one JSON value per line (NDJSON).

    An NDJSON line that is not JSON becomes an invalid item, not a rejected batch; a body
    (or any line) nested deeper than api.body.MAX_JSON_DEPTH is a 422 for the whole batch,
    refused before anything parses it."""
    mimetype = request.mimetype
    ndjson = mimetype in (NDJSON, "application/jsonl", "application/x-jsonlines")
    check_depth(request.get_data(), lines=ndjson)  # before any parser recurses into it
    if ndjson:
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
        raise InvalidJsonError("request body is not valid JSON (send a JSON array or NDJSON lines)")
    if not isinstance(body, list):
        raise RequestValidationError(
            "a batch is a JSON array of items (or application/x-ndjson, one item per line)",
            details={"errors": [{"field": "(body)", "message": "expected an array"}]},
        )
    return body


class _Unreadable:
    """An NDJSON line that could not be parsed."""

    def __init__(self, message: str) -> None:
        self.message = message


def _idempotency_key() -> str | None:
    """The request's Idempotency-Key header (a header, so JSON arrays and NDJSON alike)."""
    key = request.headers.get(IDEMPOTENCY_HEADER)
    if key is None:
        return None
    key = key.strip()
    if not key or len(key) > MAX_KEY_CHARS:
        raise RequestValidationError(
            f"{IDEMPOTENCY_HEADER} must be 1 to {MAX_KEY_CHARS} characters",
            details={"errors": [{"field": IDEMPOTENCY_HEADER, "message": "bad length"}]},
        )
    return key


def _fingerprint(raw: list[Any]) -> str:
    """The items as sent: a retry with the same key must send the same ones."""
    return fingerprint(
        [{"unreadable": i.message} if isinstance(i, _Unreadable) else i for i in raw]
    )


def _error(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "details": details or {}}


class BatchCallback:
    """The batch's webhook, from the query string: ``callback_url`` (called once when the
    batch ends, with the batch object) and ``callback_items`` (true: each item without a
    callback_url of its own is called back at that URL too, with its prediction)."""

    def __init__(self) -> None:
        # Given but empty is a bad URL (422), not "no callback".
        self.url = request.args.get("callback_url")
        raw = request.args.get("callback_items", "false").strip().lower()
        if raw not in ("true", "false", "1", "0"):
            raise RequestValidationError(
                "callback_items must be true or false",
                details={"errors": [{"field": "callback_items", "message": "not a boolean"}]},
            )
        self.items = raw in ("true", "1")
        if self.url is not None:
            try:
                check_callback_form(self.url)
            except ValueError as exc:
                raise RequestValidationError(
                    f"invalid request: {exc}",
                    details={"errors": [{"field": "callback_url", "message": str(exc)}]},
                ) from None
            check_callback(self.url)
        elif self.items:
            raise RequestValidationError(
                "callback_items needs a callback_url",
                details={"errors": [{"field": "callback_items", "message": "no callback_url"}]},
            )


def _check(
    index: int, raw: Any, seen: set[str], batch_id: str, callback: BatchCallback
) -> tuple[Any, Any]:
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
    if callback.items and item.callback_url is None:
        item = item.model_copy(update={"callback_url": callback.url})
    try:
        check_callback(item.callback_url)
        plan = _plan(item)
    except FleetError as exc:
        return item.custom_id, _error(exc.code, exc.message, exc.details)
    plain = PredictFields.model_validate(plan.routed(item).model_dump(exclude={"custom_id"}))
    # An item's own request_id names its job; else the batch and custom_id do (with an
    # idempotency key the batch id is stable, so a retry names the same jobs).
    if item.request_id is not None:
        job_id = new_job_id(tenant, item.request_id)
    else:
        job_id = item_job_id(tenant, batch_id, item.custom_id)
    return build_message(plain, tenant=tenant, job_id=job_id), None


def _batch_view(batch_id: str, meta: dict[str, str]) -> dict[str, Any]:
    return batch_view(batches().store, batch_id, meta, request.url_root)


def _owned(batch_id: str) -> dict[str, str]:
    meta = batches().store.meta(batch_id)
    if meta is None or not visible(meta.get("tenant")):
        # Another tenant's batch is indistinguishable from one that does not exist.
        raise NotFoundError(f"no batch with id {batch_id!r}")
    return meta


@bp.post("/batches")
def create_batch() -> tuple[Response, int]:
    """Submit many predictions; invalid items are reported per item, the rest are queued.

    With an Idempotency-Key header the batch id and its items' job ids derive from the
    key: a retry names the same batch and jobs, so nothing runs or bills twice and the
    items missing from an earlier attempt are added. If Redis refuses part of the job
    records, the answer is still 202 with the batch id and exactly which items were
    ``accepted`` (they run) and ``rejected`` (they do not; also listed in ``errors``).
    """
    raw = _raw_items()
    limit = services().settings.max_batch_items
    if not raw:
        raise EmptyBatchError(
            "a batch needs at least one item",
            details={"errors": [{"field": "(body)", "message": "no items"}]},
        )
    if len(raw) > limit:
        raise TooManyItemsError(
            f"a batch holds at most {limit} items; this one has {len(raw)}",
            details={"max_items": limit, "items": len(raw)},
        )
    key = _idempotency_key()
    callback = BatchCallback()
    batch_id = batch_id_for(_tenant(), key) if key is not None else new_batch_id()
    seen: set[str] = set()
    entries: list[dict[str, Any]] = []
    messages: list[JobMessage] = []
    errors: list[dict[str, Any]] = []
    names: list[str] = []  # each message's custom_id
    for index, item in enumerate(raw):
        checked, error = _check(index, item, seen, batch_id, callback)
        if error is not None:
            entries.append({"index": index, "custom_id": checked, "error": error})
            errors.append({"index": index, "custom_id": checked, **error})
        else:
            custom_id = raw[index]["custom_id"]
            entries.append({"index": index, "custom_id": custom_id, "job_id": checked.job_id})
            messages.append(checked)
            names.append(custom_id)
    machinery = batches()
    # Every valid item is a request against the tenant's quotas, all or none, before
    # anything is written (429 quota_exceeded names the quota).
    counted = services().admit(_tenant(), len(messages)) if messages else None
    meta = {
        "id": batch_id,
        "tenant": _tenant(),
        "created_at": utcnow().isoformat(),
        "total": len(entries),
        "valid": len(messages),
    }
    # On every item: its end wakes the batch's event streams (dspy_fleet/store/jobs.py,
    # _CALLBACK_DUE). `batch_id` is only for batches with a callback (their "ended" count;
    # an item another batch takes over by its idempotency key is adopted through it).
    extra: dict[str, Any] = {"batch": batch_id}
    if callback.url is not None:
        # Every item's end counts in "ended"; the batch is due once "expected" have ended.
        meta.update(callback_url=callback.url, api_url=request.url_root, expected=len(messages))
        extra["batch_id"] = batch_id
    if any(m.callback_url is not None for m in messages):
        extra["api_url"] = request.url_root  # the links of the items' webhook bodies
    try:
        # The key's items first (a different item set is refused before anything is
        # written), then the batch, then its jobs: an item never runs outside its batch.
        if key is not None:
            ttl = machinery.settings.job_ttl_seconds
            claim_idempotency_key(machinery.store.client, batch_id, _fingerprint(raw), ttl)
        new_batch = machinery.store.create(batch_id, meta, entries)
    except (redis.RedisError, FleetError) as exc:
        services().refund(counted)
        if isinstance(exc, FleetError):
            raise
        raise _refused(type(exc).__name__, batch_id if key is not None else None) from None
    result = machinery.publisher.push(messages, request_id=g.get("request_id"),
                                      record_extra=extra)  # fmt: skip
    # Items recorded by an earlier attempt (same key), or refused, are not new requests.
    services().refund(counted, sum(1 for new in result.created if not new))
    if callback.url is not None and new_batch:
        _count_uncreated(batch_id, messages, result)
    for msg, new in zip(messages, result.created, strict=True):
        if new:
            metrics.JOBS_ENQUEUED.labels(msg.priority).inc()
    if result.unpublished:
        log.warning(
            "batch jobs recorded but not published; the recovery sweep will publish them",
            extra={"batch_id": batch_id, "unpublished": result.unpublished},
        )
    fate = _fate(result, names)
    _raise_unless_accepted(result, fate, batch_id, key)
    if fate["accepted"]:
        services().confirm_replicated({"batch_id": batch_id})
    rejected = fate["rejected"]
    indexes = {e["custom_id"]: e["index"] for e in entries if "job_id" in e}
    for custom_id in rejected:
        errors.append(
            {"index": indexes[custom_id], "custom_id": custom_id, "code": "redis_unavailable",
             "message": "Redis refused this item's job record; it will not run (resubmit "
                        "with the same Idempotency-Key to add it)", "details": {}}
        )  # fmt: skip
    errors.sort(key=lambda e: e["index"])
    log.info(
        "batch accepted",
        extra={"batch_id": batch_id, "items": len(entries), "invalid": len(errors) - len(rejected),
               "rejected": len(rejected)},
    )  # fmt: skip
    stored = machinery.store.meta(batch_id) or {k: str(v) for k, v in meta.items()}
    view = _batch_view(batch_id, stored)
    view["errors"] = errors
    view["accepted"] = fate["accepted"]
    view["rejected"] = rejected
    if key is not None:
        view["idempotency_key"] = key
    resp = jsonify(view)
    resp.headers["Location"] = view["status_url"]
    return resp, 202


def _count_uncreated(batch_id: str, messages: list[JobMessage], result: PushResult) -> None:
    """Items this batch did not create (an item's request_id named an existing job; Redis
    refused its record) do not carry its id: count them towards its end now, or adopt them
    (dspy_fleet/store/callbacks.py), so the batch's webhook is not waited for in vain."""
    existing = [m.job_id for m, new in zip(messages, result.created, strict=True)
                if not new and m.job_id in set(result.accepted)]  # fmt: skip
    refused = len(result.rejected) + len(result.unknown)
    try:
        CallbackStore(batches().store.client).adopt(batch_id, existing, refused)
    except redis.RedisError as exc:
        log.warning("could not count a batch's pre-existing items for its webhook: %s", exc,
                    extra={"batch_id": batch_id})  # fmt: skip


def _refused(reason: str, batch_id: str | None) -> RedisUnavailableError:
    """503: Redis refused the batch; none of its jobs was recorded."""
    log.warning("Redis refused a batch: %s", reason)
    details: dict[str, Any] = {"reason": reason}
    if batch_id is not None:
        details["batch_id"] = batch_id
    return RedisUnavailableError(
        "the job store is unavailable; the batch was not accepted, retry shortly",
        details=details,
    )


def _fate(result: PushResult, names: list[str]) -> dict[str, list[str]]:
    """The custom_ids of the items accepted, rejected and of unknown fate, in order."""
    fate: dict[str, list[str]] = {"accepted": [], "rejected": [], "unknown": []}
    sets = {k: set(getattr(result, k)) for k in fate}
    for job_id, name in zip(result.job_ids, names, strict=True):
        for kind, ids in sets.items():
            if job_id in ids:
                fate[kind].append(name)
                break
    return fate


def _raise_unless_accepted(
    result: PushResult, fate: dict[str, list[str]], batch_id: str, key: str | None
) -> None:
    """503 when no item was accepted, or when some items' fate is unknown."""
    if result.unknown:
        # The connection broke mid-write and the records cannot be read back: only a retry
        # with the same key can settle these items without running any of them twice.
        raise RedisUnavailableError(
            "the job store failed while the batch was being recorded; some items may run. "
            "Resubmit the same items with the same Idempotency-Key to settle them",
            details={"batch_id": batch_id, **fate},
        )
    if result.rejected and not result.accepted:
        if key is None:
            # Nothing of it will ever run; if Redis refuses this too, it expires.
            with contextlib.suppress(redis.RedisError):
                batches().store.delete(batch_id)
        raise _refused("job records refused", batch_id if key is not None else None)


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
                if line.get("status") in TERMINAL_STATUSES:
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
