"""How jobs and batches are shown to clients: the one serializer of the HTTP API's
GET /v1/predictions/<id> and GET /v1/batches/<id> bodies, and of the webhook bodies the
worker sends (README, Webhooks: "the body is what polling returns").

Links are built on ``base_url``, the API's root as the client reached it (the API passes
its request's; the worker the one recorded when the job was submitted over HTTP; a job
pushed by a direct producer has none, and its links are paths). Never import flask here.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from dspy_fleet.store.batches import BatchStore, summarize

_ALWAYS = ("status", "program", "model", "variant", "created_at")
_WHEN_SET = (
    "request_id",
    "queue",
    "started_at",
    "finished_at",
    "attempts",
    "retry_in_seconds",
    "throttled_until",
    "throttle_reason",
    "requested_model",
    "program_version",
    "outputs",
    "error",
    "cost",
)
# What a path segment keeps unquoted: Werkzeug's url_for does the same for a <job_id>.
_SAFE = "!$&'()*+,:;=@"


def link(base_url: str | None, *segments: str) -> str:
    """``base_url`` + "v1/<segments>" (quoted); a path ("/v1/...") without a base."""
    path = "v1/" + "/".join(quote(s, safe=_SAFE) for s in segments)
    return (base_url or "/").rstrip("/") + "/" + path


def callback_view(record: dict[str, Any]) -> dict[str, Any] | None:
    """``{status: pending|delivered|failed, attempts, last_error}`` of a job's or a batch's
    webhook (None when it has no callback_url). ``attempts`` counts attempts started."""
    if not record.get("callback_url"):
        return None
    return {
        "status": record.get("callback_status") or "pending",
        "attempts": int(record.get("callback_attempts") or 0),
        "last_error": record.get("callback_last_error"),
    }


def prediction_view(job: dict[str, Any], base_url: str | None) -> dict[str, Any]:
    """The public prediction object of SPEC §2 for a job record (JobStore.get)."""
    view: dict[str, Any] = {"id": job["job_id"]}
    view.update({k: job.get(k) for k in _ALWAYS})
    view.update({k: job[k] for k in _WHEN_SET if job.get(k) is not None})
    view["cached"] = bool((job.get("cost") or {}).get("cached", False))
    if (callback := callback_view(job)) is not None:
        view["callback"] = callback
    view["status_url"] = link(base_url, "predictions", job["job_id"])
    return view


def batch_view(
    store: BatchStore, batch_id: str, meta: dict[str, str], base_url: str | None
) -> dict[str, Any]:
    """The batch object (status, counts from its items' jobs, links) for its metadata."""
    view: dict[str, Any] = {
        "id": batch_id,
        "object": "batch",
        **summarize(store, batch_id, meta),
        "created_at": meta.get("created_at"),
    }
    if "cancelled_at" in meta:
        view["cancelled_at"] = meta["cancelled_at"]
    if (callback := callback_view(meta)) is not None:
        view["callback"] = callback
    view["status_url"] = link(base_url, "batches", batch_id)
    view["results_url"] = link(base_url, "batches", batch_id, "results")
    return view
