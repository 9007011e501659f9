"""Every bad request gets the right 4xx and the one JSON error shape; never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

TOO_LONG = "x" * 129

# (case, method, path, body (json value, or raw bytes), status, error code, field named)
CASES: list[tuple[str, str, str, Any, int, str, str | None]] = [
    ("malformed json", "POST", "/v1/predict", b'{"input": "hi"', 400, "invalid_json", None),
    ("empty body", "POST", "/v1/predict", b"", 400, "invalid_json", None),
    ("array body", "POST", "/v1/predict", [1, 2], 422, "validation_error", None),
    ("no input", "POST", "/v1/predict", {"program": "qa"}, 422, "validation_error", None),
    (
        "input and inputs",
        "POST",
        "/v1/predict",
        {"input": "a", "inputs": {"question": "b"}},
        422,
        "validation_error",
        None,
    ),
    (
        "unknown field",
        "POST",
        "/v1/predict",
        {"input": "a", "temprature": 1},
        422,
        "validation_error",
        "temprature",
    ),
    (
        "wait too long",
        "POST",
        "/v1/predict",
        {"input": "a", "wait": 61},
        422,
        "validation_error",
        "wait",
    ),
    (
        "bad priority",
        "POST",
        "/v1/predict",
        {"input": "a", "priority": "urgent"},
        422,
        "validation_error",
        "priority",
    ),
    (
        "temperature range",
        "POST",
        "/v1/predict",
        {"input": "a", "parameters": {"temperature": 5}},
        422,
        "validation_error",
        "parameters.temperature",
    ),
    (
        "parameter not allowed",
        "POST",
        "/v1/predict",
        {"input": "a", "parameters": {"api_key": "sk-x"}},
        422,
        "validation_error",
        "parameters.api_key",
    ),
    (
        "request_id too long",
        "POST",
        "/v1/predict",
        {"input": "a", "request_id": TOO_LONG},
        422,
        "validation_error",
        "request_id",
    ),
    ("input wrong type", "POST", "/v1/predict", {"input": 5}, 422, "validation_error", "input"),
    (
        "input too long",
        "POST",
        "/v1/predict",
        {"input": "x" * 100_001},
        422,
        "validation_error",
        "input",
    ),
    (
        "inputs field too long",
        "POST",
        "/v1/predict",
        {"program": "rag", "inputs": {"context": "x" * 100_001, "question": "q"}},
        422,
        "validation_error",
        "inputs",
    ),
    (
        "too many stop words",
        "POST",
        "/v1/predict",
        {"input": "a", "parameters": {"stop": ["a", "b", "c", "d", "e"]}},
        422,
        "validation_error",
        "parameters.stop",
    ),
    (
        "unknown program",
        "POST",
        "/v1/predict",
        {"input": "a", "program": "nope"},
        404,
        "unknown_program",
        None,
    ),
    (
        "unknown model",
        "POST",
        "/v1/predict",
        {"input": "a", "model": "gpt-99"},
        404,
        "unknown_model",
        None,
    ),
    (
        "unknown variant",
        "POST",
        "/v1/predict",
        {"input": "a", "variant": "B"},
        404,
        "unknown_variant",
        None,
    ),
    ("unknown prediction", "GET", "/v1/predictions/does-not-exist", None, 404, "not_found", None),
    ("bad wait param", "GET", "/v1/predictions/x?wait=abc", None, 422, "validation_error", "wait"),
    (
        "negative wait param",
        "GET",
        "/v1/predictions/x?wait=-1",
        None,
        422,
        "validation_error",
        "wait",
    ),
    ("unknown route", "GET", "/v2/nothing", None, 404, "not_found", None),
    ("wrong method", "DELETE", "/health", None, 405, "method_not_allowed", None),
    (
        "body too large",
        "POST",
        "/v1/predict",
        b'{"input": "' + b"x" * 1_100_000 + b'"}',
        413,
        "payload_too_large",
        None,
    ),
]


@pytest.mark.parametrize(
    ("case", "method", "path", "body", "status", "code", "field"), CASES, ids=[c[0] for c in CASES]
)
def test_bad_request(
    api_client: httpx.Client,
    case: str,
    method: str,
    path: str,
    body: Any,
    status: int,
    code: str,
    field: str | None,
) -> None:
    kwargs: dict[str, Any] = {"headers": {"X-Request-ID": f"case-{status}"}}
    if isinstance(body, bytes):
        kwargs["content"] = body
        kwargs["headers"]["Content-Type"] = "application/json"
    elif body is not None:
        kwargs["json"] = body
    resp = api_client.request(method, path, **kwargs)
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"].startswith("application/json")
    error = resp.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["details"], dict)
    assert error["request_id"] == f"case-{status}" == resp.headers["X-Request-ID"]
    if field is not None:
        named = [e["field"] for e in error["details"]["errors"]]
        assert field in named, named


LIMIT = 1_048_576  # DSPY_FLEET_MAX_BODY_BYTES's default, which the test API runs with


def _chunks(body: bytes, size: int = 65_536) -> Iterator[bytes]:
    # A generator body: httpx sends it with Transfer-Encoding: chunked, no Content-Length.
    for i in range(0, len(body), size):
        yield body[i : i + size]


# Over by up to one limit's worth: the API reads that much more of a chunked body before
# it answers, so a client still sending reads the 413 instead of a reset connection.
@pytest.mark.parametrize(
    ("size", "status"), [(LIMIT, 202), (LIMIT + 1, 413), (2 * LIMIT, 413)], ids=str
)
def test_chunked_bodies_meet_the_same_limit(
    api_client: httpx.Client, size: int, status: int
) -> None:
    # Padding with whitespace keeps the JSON valid at any size.
    # An input of its own: a fresh job, and no cache entry another test's question could hit.
    head = b'{"input": "What is 3+4? (chunked body)"}'
    body = head + b" " * (size - len(head))
    resp = api_client.post(
        "/v1/predict", content=_chunks(body), headers={"Content-Type": "application/json"}
    )
    assert resp.request.headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in resp.request.headers
    assert resp.status_code == status, resp.text[:300]
    if status == 413:
        error = resp.json()["error"]
        assert error["code"] == "payload_too_large" and error["request_id"]
        assert error["details"] == {"limit_bytes": LIMIT}
    # The connection serves the next request normally.
    assert api_client.get("/health").status_code == 200


def test_unknown_names_list_what_exists(api_client: httpx.Client) -> None:
    error = api_client.post("/v1/predict", json={"input": "a", "program": "nope"}).json()["error"]
    assert "qa" in error["details"]["programs"]


def test_rejected_requests_leave_no_job_behind(api_client: httpx.Client, redis_server) -> None:
    import redis

    client = redis.Redis.from_url(redis_server.url)

    def job_keys() -> set[bytes]:
        return set(client.scan_iter("dspy_fleet:job:*"))

    before = job_keys()
    for body in ({"input": "a", "model": "gpt-99"}, {"input": 5}, {"input": "a", "wait": 99}):
        assert api_client.post("/v1/predict", json=body).status_code in (404, 422)
    assert job_keys() == before


@pytest.mark.parametrize(
    "query",
    [
        "since=0001-01-01&until=0001-01-01",
        "until=0001-01-02",
        "since=9999-12-31",
        "until=9999-12-31",
        "since=2026-01-01&until=2025-01-01",
    ],  # fmt: skip
)
def test_costs_date_edges_are_answered(api_client: httpx.Client, query: str) -> None:
    # Found by the fuzzer: date arithmetic at the ends of the calendar once answered 500.
    resp = api_client.get(f"/costs?{query}")
    assert resp.status_code == 200, resp.text
    assert resp.json()["since"] and resp.json()["until"]
