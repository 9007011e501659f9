"""Logs: one request id followed from the API's line to the worker's line, and the
SPEC §5 fields on every JSON line of both processes."""

from __future__ import annotations

import uuid

import httpx

from dspy_fleet.logs import CONTEXT_FIELDS
from tests.conftest import Service, poll

FIELDS = {"timestamp", "level", "logger", "message", *CONTEXT_FIELDS}


def test_request_id_followed_from_api_line_to_worker_line(
    api: Service, worker: Service, api_client: httpx.Client
) -> None:
    rid = f"trace-{uuid.uuid4().hex[:12]}"
    resp = api_client.post(
        "/v1/predict",
        json={"input": "Trace me: 8+1?", "wait": 20, "use_cache": False},
        headers={"X-Request-ID": rid},
    )
    assert resp.status_code == 200, resp.text
    job_id = resp.json()["id"]

    def api_access_line() -> dict | None:
        return next(
            (
                x
                for x in api.log_lines()
                if x.get("request_id") == rid and x["logger"] == "dspy_fleet.api.access"
            ),
            None,
        )

    api_line = poll(api_access_line, 10)
    assert api_line["message"] == "POST /v1/predict 200"

    def worker_done() -> dict | None:
        return next(
            (
                x
                for x in worker.log_lines()
                if x.get("request_id") == rid and x.get("status") == "succeeded"
            ),
            None,
        )

    worker_line = poll(worker_done, 10)
    assert worker_line["job_id"] == job_id
    assert worker_line["program"] == "qa" and worker_line["model"] == "mock"
    assert worker_line["input_tokens"] > 0 and worker_line["latency_ms"] > 0
    assert worker_line["timestamp"] >= api_line["timestamp"][:19]


def test_every_json_line_has_the_spec_fields(
    api: Service, worker: Service, api_client: httpx.Client
) -> None:
    api_client.get("/health")
    for service in (api, worker):
        lines = service.log_lines()
        assert len(lines) > 3
        loggers = {line["logger"] for line in lines}
        if service is api:
            assert any(name.startswith("gunicorn") for name in loggers)
        incomplete = [
            (line["logger"], line["message"][:60], sorted(FIELDS - set(line)))
            for line in lines
            if not set(line) >= FIELDS
        ]
        assert not incomplete, incomplete
