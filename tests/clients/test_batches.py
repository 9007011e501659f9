"""Batches over HTTP: per-item validation, counts, NDJSON results keyed by custom_id."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx

from tests.clients.conftest import MAX_BATCH_ITEMS, Fleet
from tests.conftest import poll

# index -> (what breaks the item, the error code it must be reported with)
INVALID: dict[int, tuple[dict[str, Any], str]] = {
    7: ({"program": "no-such-program"}, "unknown_program"),
    77: ({"inputs": {"question": "both forms"}}, "validation_error"),
    177: ({"parameters": {"temperature": 9}}, "validation_error"),
    277: ({"model": "no-such-model"}, "unknown_model"),
    377: ({"colour": "blue"}, "validation_error"),
}


def results(http: httpx.Client, batch_id: str) -> list[dict[str, Any]]:
    resp = http.get(f"/v1/batches/{batch_id}/results")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/x-ndjson")
    return [json.loads(line) for line in resp.text.splitlines() if line]


def test_batch_of_500_with_invalid_items_counts_and_results(running: Fleet) -> None:
    items = [{"custom_id": f"item-{i}", "input": f"What is {i}+1?"} for i in range(500)]
    for index, (patch, _) in INVALID.items():
        items[index] = {**items[index], **patch}
    with running.http() as http:
        resp = http.post("/v1/batches", json=items)
        assert resp.status_code == 202, resp.text
        created = resp.json()
        assert created["counts"]["total"] == 500
        reported = {e["index"]: (e["custom_id"], e["code"]) for e in created["errors"]}
        assert reported == {i: (f"item-{i}", code) for i, (_, code) in INVALID.items()}

        def ended() -> dict[str, Any] | None:
            body = http.get(f"/v1/batches/{created['id']}").json()
            return body if body["counts"]["pending"] == 0 else None

        batch = poll(ended, timeout=90, interval=0.5)
        assert batch["status"] == "completed"
        assert batch["counts"] == {
            "total": 500,
            "succeeded": 495,
            "failed": 5,
            "cancelled": 0,
            "pending": 0,
        }
        lines = results(http, created["id"])
    per_id = Counter(line["custom_id"] for line in lines)
    assert len(lines) == 500
    assert set(per_id) == {item["custom_id"] for item in items}
    assert set(per_id.values()) == {1}, "each custom_id exactly once"
    failed = {
        line["custom_id"]: line["error"]["code"] for line in lines if line["status"] != "succeeded"
    }
    assert failed == {f"item-{i}": code for i, (_, code) in INVALID.items()}
    sample = next(line for line in lines if line["custom_id"] == "item-3")
    assert sample["outputs"]["answer"] == "4"
    assert sample["cost"]["input_tokens"] > 0


def test_ndjson_batch_reports_unreadable_lines_per_item(running: Fleet) -> None:
    body = "\n".join(
        [
            json.dumps({"custom_id": "a", "input": "What is 1+1?"}),
            "{not json",
            "",
            json.dumps({"custom_id": "a", "input": "again"}),
            json.dumps({"custom_id": "b", "input": "What is 2+2?"}),
        ]
    )
    with running.http() as http:
        resp = http.post(
            "/v1/batches", content=body, headers={"Content-Type": "application/x-ndjson"}
        )
        assert resp.status_code == 202, resp.text
        created = resp.json()
        assert [(e["index"], e["code"]) for e in created["errors"]] == [
            (1, "invalid_json"),
            (2, "duplicate_custom_id"),
        ]
        batch = poll(
            lambda: (b := http.get(created["status_url"]).json())["counts"]["pending"] == 0 and b
        )
        assert batch["counts"] == {
            "total": 4,
            "succeeded": 2,
            "failed": 2,
            "cancelled": 0,
            "pending": 0,
        }


def test_whole_batch_errors_are_loud(fleet: Fleet) -> None:
    too_many = [{"custom_id": str(i), "input": "x"} for i in range(MAX_BATCH_ITEMS + 1)]
    with fleet.http() as http:
        resp = http.post("/v1/batches", json=too_many)
        assert resp.status_code == 422
        assert resp.json()["error"]["code"] == "too_many_items"
        assert resp.json()["error"]["details"] == {
            "max_items": MAX_BATCH_ITEMS,
            "items": MAX_BATCH_ITEMS + 1,
        }
        assert http.post("/v1/batches", json=[]).json()["error"]["code"] == "empty_batch"
        assert http.post("/v1/batches", json={"custom_id": "a"}).status_code == 422
        assert (
            http.post(
                "/v1/batches", content=b"[{", headers={"Content-Type": "application/json"}
            ).status_code
            == 400
        )
        missing = http.get("/v1/batches/batch_nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
        assert http.get("/v1/batches/batch_nope/results").status_code == 404
