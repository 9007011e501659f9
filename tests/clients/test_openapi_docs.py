"""/openapi.json is generated from the models and matches what the API answers; /docs renders
in headless Chromium with every external host unreachable."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from api import create_app
from dspy_fleet.contract import PredictRequest
from tests.clients.conftest import Fleet


def document(http: httpx.Client) -> dict[str, Any]:
    resp = http.get("/openapi.json")
    assert resp.status_code == 200
    return resp.json()


def conforms(doc: dict[str, Any], path: str, method: str, resp: httpx.Response) -> None:
    """The response matches the schema documented for its status and path."""
    responses = doc["paths"][path][method]["responses"]
    documented = responses.get(str(resp.status_code))
    assert documented is not None, f"{method} {path} answered an undocumented {resp.status_code}"
    schema = documented["content"]["application/json"]["schema"]
    Draft202012Validator({**schema, "components": doc["components"]}).validate(resp.json())


def test_every_route_is_documented_with_generated_schemas(fleet: Fleet) -> None:
    app = create_app({"settings": {"redis_url": fleet.redis_url}, "keep_logging": True})
    with fleet.http() as http:
        doc = document(http)
    assert doc["openapi"].startswith("3.")
    routes = {
        (m.lower(), rule.rule.replace("<", "{").replace(">", "}"))
        for rule in app.url_map.iter_rules()
        if not rule.rule.startswith("/static")
        for m in rule.methods or ()
        if m not in ("HEAD", "OPTIONS")
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented
    schemas = doc["components"]["schemas"]
    assert (
        schemas["PredictRequest"]["properties"].keys()
        == PredictRequest.model_json_schema()["properties"].keys()
    )
    for ops in doc["paths"].values():
        for op in ops.values():
            assert op["responses"]["default"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"
            }


def test_live_answers_match_the_document(running: Fleet) -> None:
    with running.http() as http:
        doc = document(http)
        conforms(doc, "/v1/predict", "post", http.post("/v1/predict", json={"wait": 99}))
        conforms(
            doc,
            "/v1/predict",
            "post",
            http.post("/v1/predict", json={"input": "x", "program": "nope"}),
        )
        ok = http.post("/v1/predict", json={"input": "What is 1+1?", "wait": 30})
        conforms(doc, "/v1/predict", "post", ok)
        job = ok.json()["id"]
        conforms(doc, "/v1/predictions/{job_id}", "get", http.get(f"/v1/predictions/{job}"))
        conforms(doc, "/v1/predictions/{job_id}", "get", http.get("/v1/predictions/nope"))
        conforms(doc, "/v1/predictions/{job_id}", "delete", http.delete(f"/v1/predictions/{job}"))
        created = http.post("/v1/batches", json=[{"custom_id": "a", "input": "hi"}, {"input": "x"}])
        conforms(doc, "/v1/batches", "post", created)
        batch = created.json()["id"]
        conforms(doc, "/v1/batches/{batch_id}", "get", http.get(f"/v1/batches/{batch}"))
        conforms(
            doc, "/v1/batches/{batch_id}/cancel", "post", http.post(f"/v1/batches/{batch}/cancel")
        )
        line_schema = doc["components"]["schemas"]["BatchResultLine"]
        for line in http.get(f"/v1/batches/{batch}/results").text.splitlines():
            Draft202012Validator({**line_schema, "components": doc["components"]}).validate(
                json.loads(line)
            )


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        message = "chromium is not installed (Debian package chromium; `make test-tools`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def run_chromium(url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                chromium(),
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--disable-extensions",
                # Only the API on loopback resolves: a page needing a CDN could not render.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--virtual-time-budget=15000",
                "--window-size=1280,1600",
                *extra,
                url,
            ],
            capture_output=True,
            text=True,
            timeout=90,
        )


def test_docs_page_renders_the_operations_offline(fleet: Fleet, logs_dir: Path) -> None:
    chromium()
    url = fleet.api.url + "/docs"
    dom = run_chromium(url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'class="swagger-ui' in html, "Swagger UI did not render"
    for path in (
        "/v1/predict",
        "/v1/predictions/{job_id}",
        "/v1/batches",
        "/v1/batches/{batch_id}/results",
    ):
        assert f'data-path="{path}"' in html, f"operation {path} not rendered"
    assert html.count("opblock-summary-method") >= 15
    shot = logs_dir / "docs-screenshot.png"
    run = run_chromium(url, f"--screenshot={shot}")
    assert run.returncode == 0, run.stderr[-2000:]
    assert shot.stat().st_size > 20_000
    print(f"\n/docs screenshot: {shot}")
