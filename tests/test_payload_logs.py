"""Issue 21, item 3: job inputs and outputs never appear in any process's logs at INFO,
Celery's own lines included, unless the operator opts in (DSPY_FLEET_LOG_PAYLOADS=true).

A job whose input holds a marker string goes through the real stack (API, worker, mock LLM)
as a success, a provider failure, a retried job and a malformed direct message; then every
line of the API's and the worker's logs is searched for the marker. With the opt-in the
same jobs put the marker in the worker's log, so the search can fail.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from dspy_fleet.broker.celery_config import make_celery
from dspy_fleet.contract import TASK_NAME
from dspy_fleet.settings import CommonSettings
from dspy_fleet.store.jobs import JobStore
from tests.conftest import TEST_ENV, MockLLM, OwnStack, poll


def _stack(base: Path, mock_llm: MockLLM, **env: str) -> OwnStack:
    # Quick retries: the retried job must not wait out the default backoff.
    stack = OwnStack(base, env={**TEST_ENV, "DSPY_FLEET_RETRY_BACKOFF_SECONDS": "0.1", **env})
    stack.use_mock_llm(mock_llm)
    stack.start_redis()
    with stack.together():
        stack.start_worker("worker")
        stack.start_api("api")
    return stack


@pytest.fixture
def quiet(mock_llm: MockLLM, tmp_path: Path) -> Iterator[OwnStack]:
    mock_llm.reset()
    stack = _stack(tmp_path, mock_llm)
    yield stack
    stack.stop()
    mock_llm.reset()


@pytest.fixture
def chatty(mock_llm: MockLLM, tmp_path: Path) -> Iterator[OwnStack]:
    mock_llm.reset()
    stack = _stack(tmp_path, mock_llm, DSPY_FLEET_LOG_PAYLOADS="true")
    yield stack
    stack.stop()
    mock_llm.reset()


def _direct(redis_url: str, marker: str) -> str:
    """A malformed message from a direct producer (Celery computes its kwargs repr)."""
    producer = make_celery(CommonSettings(redis_url=redis_url), publisher=True)
    job_id = str(uuid.uuid4())
    message = {"v": 1, "job_id": job_id, "submitted_at": "2026-01-01T00:00:00Z",
               "inputs": {"question": marker}, "unknown_field": marker}  # fmt: skip
    producer.send_task(TASK_NAME, kwargs=message, task_id=job_id, queue="interactive")
    return job_id


def _run_jobs(stack: OwnStack, marker: str) -> None:
    """The marker through a success, a provider failure, a retry and a malformed message."""
    api = stack.api
    assert api is not None
    with httpx.Client(base_url=api.url, timeout=60) as http:

        def predict(tag: str) -> dict[str, Any]:
            body = {"inputs": {"question": f"{marker} {tag}?"}, "use_cache": False, "wait": 30}
            resp = http.post("/v1/predict", json=body)
            assert resp.status_code == 200, resp.text
            return resp.json()

        ok = predict("plain")
        assert ok["status"] == "succeeded" and marker in str(ok["outputs"]), ok
        stack.mock.set_faults(fail_next=1, error_status=400)
        assert predict("refused")["status"] == "failed"
        stack.mock.set_faults(fail_next=1, error_status=500)
        retried = predict("retried")
        assert retried["status"] == "succeeded" and retried["cost"]["attempts"] == 2, retried
    store = JobStore(redis.Redis.from_url(stack.redis_url, decode_responses=True), 3600)
    job_id = _direct(stack.redis_url, marker)
    job = poll(lambda: (r := store.get(job_id)) and r["status"] == "failed" and r, 30)
    assert job["error"]["code"] == "validation_error"


def _lines_with(stack: OwnStack, marker: str) -> list[str]:
    """Every log line of the API and the worker (JSON or not) that holds the marker."""
    found = []
    for name in ("api", "worker"):
        text = (stack.dir / f"{name}.log").read_text(errors="replace")
        found += [f"{name}: {line}" for line in text.splitlines() if marker in line]
    return found


def test_no_payload_in_any_log_line_at_info(quiet: OwnStack) -> None:
    marker = f"MARKER-{uuid.uuid4().hex}"
    _run_jobs(quiet, marker)
    lines = _lines_with(quiet, marker)
    assert lines == [], "\n".join(lines[:5])
    # Celery's own lines are still there, with ids and names only.
    worker_log = (quiet.dir / "worker.log").read_text()
    assert "received" in worker_log and "succeeded in" in worker_log
    # ... and our own lines keep their text and figures.
    assert "prediction failed (provider_bad_request)" in worker_log
    assert "raised expected: JobFailed(code=provider_bad_request)" in worker_log
    assert "<hidden" not in "".join(
        line for line in worker_log.splitlines() if '"logger": "dspy_fleet' in line
    )


def test_payloads_are_logged_when_the_operator_opts_in(chatty: OwnStack) -> None:
    marker = f"MARKER-{uuid.uuid4().hex}"
    _run_jobs(chatty, marker)
    lines = _lines_with(chatty, marker)
    assert any("received" in line for line in lines), lines[:5]
    assert any("succeeded in" in line for line in lines), lines[:5]


def test_library_lines_that_quote_values_keep_only_their_format() -> None:
    from dspy_fleet.logs import PayloadFilter

    def record(name: str, msg: str, *args: Any) -> Any:
        import logging

        rec = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)
        PayloadFilter().filter(rec)
        return rec.getMessage()

    # DSPy's type-mismatch warning quotes the input's value.
    shown = record("dspy.predict.predict", "Type mismatch for '%s': %s", "question", "MARKER")
    assert "MARKER" not in shown
    assert record("dspy_fleet.worker", "retrying in %.2fs", 1.5) == "retrying in 1.50s"
