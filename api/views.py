"""How a job record is shown to HTTP clients."""

from __future__ import annotations

from typing import Any

from flask import url_for

_ALWAYS = ("status", "program", "model", "variant", "created_at")
_WHEN_SET = (
    "request_id",
    "queue",
    "started_at",
    "finished_at",
    "attempts",
    "retry_in_seconds",
    "requested_model",
    "outputs",
    "error",
    "cost",
)


def job_view(job: dict[str, Any]) -> dict[str, Any]:
    """The public prediction object of SPEC §2 (GET /v1/predictions/<id>)."""
    view: dict[str, Any] = {"id": job["job_id"]}
    view.update({k: job.get(k) for k in _ALWAYS})
    view.update({k: job[k] for k in _WHEN_SET if job.get(k) is not None})
    view["cached"] = bool((job.get("cost") or {}).get("cached", False))
    view["status_url"] = url_for("predictions.get_prediction", job_id=job["job_id"], _external=True)
    return view
