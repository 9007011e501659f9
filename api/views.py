"""How a job record is shown to HTTP clients (the serializer is dspy_fleet/views.py, shared
with the webhook bodies the worker sends)."""

from __future__ import annotations

from typing import Any

from flask import request

from dspy_fleet.views import prediction_view


def job_view(job: dict[str, Any]) -> dict[str, Any]:
    """The public prediction object of SPEC §2 (GET /v1/predictions/<id>)."""
    return prediction_view(job, request.url_root)
