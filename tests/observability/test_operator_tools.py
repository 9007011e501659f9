"""Flower and celery-exporter, live against the session's broker, see our tasks."""

from __future__ import annotations

import os
import subprocess
import uuid

import httpx

from dspy_fleet.contract import TASK_NAME
from tests.conftest import PY, Service, poll
from tests.observability.conftest import (
    FLOWER_AUTH,
    Tool,
    basic_auth_header,
    scrape,
    total,
)


def _workers_online(flower: Tool) -> float:
    return total(scrape(flower.url + "/metrics"), "flower_worker_online")


def test_flower_shows_our_task_succeeded_behind_basic_auth(
    flower: Tool, api_client: httpx.Client, worker: Service
) -> None:
    # Flower only knows what it saw: wait until its event receiver hears the worker.
    poll(lambda: _workers_online(flower) >= 1, timeout=30, interval=0.2)
    resp = api_client.post(
        "/v1/predict", json={"input": f"Flower {uuid.uuid4().hex[:6]}: 2+3?", "wait": 20}
    )
    assert resp.json()["status"] == "succeeded", resp.text
    job_id = resp.json()["id"]

    assert httpx.get(f"{flower.url}/api/task/info/{job_id}", timeout=5).status_code == 401
    auth = basic_auth_header(*FLOWER_AUTH)
    assert httpx.get(f"{flower.url}/api/tasks", headers=basic_auth_header("ops", "wrong"),
                     timeout=5).status_code == 401  # fmt: skip

    def task_info() -> dict | None:
        r = httpx.get(f"{flower.url}/api/task/info/{job_id}", headers=auth, timeout=5)
        return r.json() if r.status_code == 200 and r.json().get("state") == "SUCCESS" else None

    info = poll(task_info, timeout=20, interval=0.2)
    assert info["name"] == TASK_NAME
    listed = httpx.get(
        f"{flower.url}/api/tasks", params={"taskname": TASK_NAME}, headers=auth, timeout=5
    ).json()
    assert listed[job_id]["state"] == "SUCCESS"


def test_celery_exporter_counts_our_tasks_and_queues(
    celery_exporter: Tool, api_client: httpx.Client, worker: Service
) -> None:
    def worker_up() -> bool:
        return total(scrape(celery_exporter.url + "/metrics"), "celery_worker_up") >= 1

    poll(worker_up, timeout=30, interval=0.2)
    resp = api_client.post(
        "/v1/predict", json={"input": f"Exporter {uuid.uuid4().hex[:6]}: 4+4?", "wait": 20}
    )
    assert resp.json()["status"] == "succeeded", resp.text

    def succeeded() -> float:
        samples = scrape(celery_exporter.url + "/metrics")
        return total(samples, "celery_task_succeeded_total", name=TASK_NAME)

    assert poll(succeeded, timeout=20, interval=0.2) >= 1
    samples = scrape(celery_exporter.url + "/metrics")
    queues = {
        labels["queue_name"]: value
        for name, labels, value in samples
        if name == "celery_queue_length"
    }
    assert set(queues) >= {"interactive", "batch"}, celery_exporter.log()
    assert all(v >= 0 for v in queues.values())


def test_flower_refuses_to_run_open_in_production() -> None:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "DSPY_FLEET_FLOWER"))
    }
    result = subprocess.run(
        [PY, "-m", "dspy_fleet.cli.main", "flower", "--port", "1"],
        env={**env, "DSPY_FLEET_ENV": "production"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "basic-auth" in result.stderr
