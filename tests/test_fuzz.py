"""schemathesis fuzzes the running API from its OpenAPI document: no 5xx, as documented;
and the shapes it cannot generate (JSON nested thousands deep) are tried by hand."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from api.body import MAX_JSON_DEPTH, check_depth, json_depth
from dspy_fleet.devtools.redis import RedisServer
from dspy_fleet.errors import RequestValidationError
from tests.conftest import MockLLM, start_api, start_worker, stop_all, wait_all_ready

# Every check schemathesis has, except "a schema-valid request must be accepted": which
# program fields a request needs, and which program and model names exist, depend on
# the deployment's config, and the API answers those with 404/422 by design.
EXCLUDED = "positive_data_acceptance"


def test_fuzz_the_api_from_its_openapi_document(mock_llm: MockLLM, tmp_path: Path) -> None:
    server = RedisServer(log_path=tmp_path / "redis.log").start()
    worker = start_worker(server.url, mock_llm.url, tmp_path / "worker.log", wait=False)
    # An event stream the fuzzer opens on a job it created ends with the job, and at the
    # latest after 5 s (the route's maximum duration), never at the request timeout.
    api = start_api(server.url, mock_llm.url, tmp_path / "api.log", wait=False,
                    DSPY_FLEET_EVENTS_MAX_SECONDS="5")  # fmt: skip
    try:
        wait_all_ready(worker, api)  # started side by side
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("schemathesis")), "run",
             f"{api.url}/openapi.json", "--checks", "all", "--exclude-checks", EXCLUDED,
             "--max-examples", "80", "--seed", "20261126", "--request-timeout", "30",
             # One worker: with two, hypothesis describes its lambdas by ast.parse from two
             # threads, which CPython 3.11 can fail with "AST constructor recursion depth
             # mismatch" (a SystemError inside schemathesis, not a fault of our API).
             "--workers", "1"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
    finally:
        stop_all(api, worker)
        server.stop()
    out = proc.stdout + proc.stderr
    summary = out[out.find("SUMMARY") :]
    print(summary)
    assert proc.returncode == 0, out[-6000:]
    generated = int(re.search(r"(\d+) generated", summary).group(1))
    assert generated >= 1000
    assert "Server error" not in out and "5xx" not in summary


# -- nesting: a body nested thousands deep is refused before any parser recurses ------------


def _nested(levels: int) -> str:
    """A JSON value ``levels`` deep (0: a plain string)."""
    return "[" * levels + '"What is 2+2?"' + "]" * levels


def _depth_bodies(depth: int) -> dict[str, tuple[str, str]]:
    """Bodies whose whole JSON document nests exactly ``depth`` levels, per endpoint shape."""
    return {
        "predict": ("application/json", f'{{"inputs": {{"question": {_nested(depth - 2)}}}}}'),
        "batch array": (
            "application/json",
            f'[{{"custom_id": "a", "inputs": {{"question": {_nested(depth - 3)}}}}}]',
        ),
        "batch ndjson": (
            "application/x-ndjson",
            f'{{"custom_id": "a", "inputs": {{"question": "hi"}}}}\n'
            f'{{"custom_id": "b", "inputs": {{"question": {_nested(depth - 2)}}}}}\n',
        ),
    }


@pytest.mark.parametrize("depth", [10, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1, 5_000, 100_000])
def test_deeply_nested_json_is_refused_never_a_500(api_client: httpx.Client, depth: int) -> None:
    for shape, (ctype, body) in _depth_bodies(depth).items():
        path = "/v1/predict" if shape == "predict" else "/v1/batches"
        resp = api_client.post(path, content=body, headers={"Content-Type": ctype})
        if depth <= MAX_JSON_DEPTH:
            assert resp.status_code in (200, 202), (shape, resp.text)
            continue
        assert resp.status_code == 422, (shape, resp.status_code, resp.text[:500])
        error = resp.json()["error"]
        assert error["code"] == "validation_error" and error["request_id"]
        assert error["details"]["max_depth"] == MAX_JSON_DEPTH
        assert error["details"]["errors"][0]["field"] == "(body)"


def test_nesting_scan_ignores_brackets_in_strings_and_counts_ndjson_lines_apart() -> None:
    deep_text = json.dumps({"q": "[" * 1000 + "{" * 1000 + '\\"]'})
    assert json_depth(deep_text.encode()) == 1
    check_depth(b'{"a": [1]}\n' * 1000, lines=True)  # 1000 lines, each 2 deep
    with pytest.raises(RequestValidationError):
        check_depth(b"[" * 65 + b"]" * 65)
