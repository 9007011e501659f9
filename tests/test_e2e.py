"""One real prediction end to end: HTTP → API → Redis → Celery worker → DSPy → dspy.LM → mock."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from dspy_fleet.broker.celery_config import make_celery
from dspy_fleet.broker.producer import Producer
from dspy_fleet.contract import TASK_NAME
from dspy_fleet.errors import JobFailed
from dspy_fleet.settings import CommonSettings
from tests.conftest import MockLLM, Service, poll, wait_for_job


def test_submit_then_poll_until_succeeded(api_client: httpx.Client) -> None:
    resp = api_client.post("/v1/predict", json={"input": "What is 2+2?"})
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body["status"] == "queued"
    assert body["status_url"].endswith(f"/v1/predictions/{body['id']}")
    assert resp.headers["Location"] == body["status_url"]

    job = wait_for_job(api_client, body["id"])
    assert job["status"] == "succeeded", job
    assert job["outputs"]["answer"] == "4"
    cost = job["cost"]
    assert cost["input_tokens"] > 0 and cost["output_tokens"] > 0
    assert cost["model"] == "mock" and cost["provider_model"] == "openai/mock-gpt"
    assert cost["cached"] is False and cost["attempts"] == 1
    # gpt-4o-mini prices from the default config: $0.15 / $0.60 per 1M tokens.
    expected = cost["input_tokens"] * 0.15e-6 + cost["output_tokens"] * 0.6e-6
    assert abs(cost["cost_usd"] - expected) < 1e-12
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    # The version of the program state that ran it, as the catalog shows it.
    programs = {p["name"]: p for p in api_client.get("/v1/programs").json()["programs"]}
    assert job["program_version"] == programs[job["program"]]["version"] is not None


def test_wait_returns_the_finished_prediction(api_client: httpx.Client) -> None:
    resp = api_client.post("/v1/predict", json={"input": "What is 6 * 7?", "wait": 15})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "succeeded"
    assert body["outputs"]["answer"] == "42"


def test_get_with_wait_long_polls(api_client: httpx.Client) -> None:
    job_id = api_client.post("/v1/predict", json={"input": "What is 1+1?"}).json()["id"]
    body = api_client.get(f"/v1/predictions/{job_id}", params={"wait": 15}).json()
    assert body["status"] == "succeeded"
    assert body["outputs"]["answer"] == "2"


def test_named_inputs_for_a_two_input_program(api_client: httpx.Client) -> None:
    resp = api_client.post(
        "/v1/predict",
        json={
            "program": "rag",
            "inputs": {"context": "Paris is in France.", "question": "Where is Paris?"},
            "wait": 15,
        },
    )
    assert resp.status_code == 200, resp.text
    assert resp.json()["outputs"]["answer"]


def test_same_request_id_is_one_job_and_one_llm_call(
    api_client: httpx.Client, mock_llm: MockLLM
) -> None:
    mock_llm.reset()
    key = f"idem-{uuid.uuid4()}"
    payload = {"input": "Name a colour.", "request_id": key, "use_cache": False}
    first = api_client.post("/v1/predict", json=payload)
    second = api_client.post("/v1/predict", json={**payload, "wait": 15})
    assert first.status_code == 202
    assert second.json()["id"] == first.json()["id"]
    wait_for_job(api_client, first.json()["id"])
    third = api_client.post("/v1/predict", json=payload)
    assert third.status_code == 200 and third.json()["id"] == first.json()["id"]
    assert mock_llm.stats()["chat_completions"] == 1


def test_request_id_travels_into_the_worker_logs(api_client: httpx.Client, worker: Service) -> None:
    rid = f"trace-{uuid.uuid4().hex[:12]}"
    resp = api_client.post(
        "/v1/predict", json={"input": "What is 3+4?", "wait": 15}, headers={"X-Request-ID": rid}
    )
    assert resp.headers["X-Request-ID"] == rid
    job_id = resp.json()["id"]

    def worker_line() -> dict | None:
        return next(
            (
                line
                for line in worker.log_lines()
                if line.get("request_id") == rid and line.get("job_id") == job_id
            ),
            None,
        )

    line = poll(worker_line, timeout=10)
    assert line["logger"].startswith("dspy_fleet")
    assert line["program"] == "qa" and line["model"] == "mock"


def test_malformed_direct_message_fails_that_job_only(
    api_client: httpx.Client, redis_server, worker: Service
) -> None:
    producer = make_celery(CommonSettings(redis_url=redis_server.url))
    bad_id = str(uuid.uuid4())
    # A direct producer forgot the contract version and sent a number as input.
    result = producer.send_task(
        TASK_NAME, kwargs={"job_id": bad_id, "input": 42}, task_id=bad_id, queue="interactive"
    )
    # Celery-native producers see the failure too, with the same error code.
    with pytest.raises(JobFailed) as info:
        result.get(timeout=20)
    assert info.value.args[0]["code"] == "validation_error"
    job = wait_for_job(api_client, bad_id)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "validation_error"
    fields = {e["field"] for e in job["error"]["details"]["errors"]}
    assert {"v", "input", "submitted_at"} <= fields

    assert worker.child.alive()
    ok = api_client.post("/v1/predict", json={"input": "What is 5+5?", "wait": 15})
    assert ok.json()["status"] == "succeeded"
    assert ok.json()["outputs"]["answer"] == "10"


def test_direct_producer_with_a_valid_message(api_client: httpx.Client, redis_server) -> None:
    producer = make_celery(CommonSettings(redis_url=redis_server.url))
    job_id = str(uuid.uuid4())
    message = {
        "v": 1,
        "job_id": job_id,
        "submitted_at": "2026-01-01T00:00:00Z",
        "program": "qa",
        "input": "What is 9-3?",
    }
    result = producer.send_task(TASK_NAME, kwargs=message, task_id=job_id, queue="batch")
    envelope = result.get(timeout=20)
    assert envelope["outputs"]["answer"] == "6"
    job = api_client.get(f"/v1/predictions/{job_id}").json()
    assert job["status"] == "succeeded" and job["queue"] == "batch"


@pytest.mark.parametrize(
    "body",
    [
        {"program": "rag", "input": "one string for two fields"},
        {"program": "qa", "inputs": {"q": "a misspelt field"}},
        {"program": "nope", "input": "x"},
        {"input": "x", "variant": "B"},
        {"input": "x", "model": "gpt-99"},
    ],
    ids=["shorthand-for-two-inputs", "wrong-field", "program", "variant", "model"],
)
def test_a_mistake_gets_the_same_error_from_the_api_and_the_worker(
    api_client: httpx.Client, redis_server, body: dict[str, Any]
) -> None:
    # The API checks input fields once a worker has published its programs.
    poll(lambda: all(p["loaded"] for p in api_client.get("/v1/programs").json()["programs"]))
    refused = api_client.post("/v1/predict", json=body)
    assert refused.status_code in (404, 422), refused.text
    said_by_api = refused.json()["error"]
    # A direct producer skips the API: the worker finds the same mistake.
    with Producer(redis_url=redis_server.url) as producer:
        job_id = producer.submit(body)
    job = wait_for_job(api_client, job_id)
    assert job["status"] == "failed"
    fields = ("code", "message", "details")
    assert {k: job["error"][k] for k in fields} == {k: said_by_api[k] for k in fields}
