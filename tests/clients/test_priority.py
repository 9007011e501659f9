"""Priority lanes: an interactive request is served promptly behind a big batch backlog."""

from __future__ import annotations

import time

from dspy_fleet.contract import TERMINAL_STATUSES as TERMINAL
from tests.clients.conftest import Fleet

BACKLOG = 2000


def test_interactive_request_finishes_before_90_percent_of_a_2000_item_backlog(
    running: Fleet,
) -> None:
    # A little provider latency, so that the backlog takes seconds to drain as it would
    # with a real model; caching off so that every item is real work.
    running.mock.set_faults(latency_ms=20)
    items = [{"input": f"Backlog item {i}?", "use_cache": False} for i in range(BACKLOG)]
    try:
        with running.producer() as producer, running.http() as http:
            ids = producer.submit_many(items)  # the batch lane
            ahead = sum(1 for j in producer.get_many(ids) if j and j["status"] in TERMINAL)
            started = time.perf_counter()
            resp = http.post(
                "/v1/predict",
                json={"input": "Interactive: what is 2+2?", "use_cache": False, "wait": 60},
            )
            latency = time.perf_counter() - started
            done = sum(1 for j in producer.get_many(ids) if j and j["status"] in TERMINAL)
            body = resp.json()
            print(
                f"\npriority lanes: interactive request answered in {latency:.2f}s; batch items "
                f"finished when it was submitted: {ahead}/{BACKLOG}, when it finished: "
                f"{done}/{BACKLOG} ({100 * done / BACKLOG:.1f}%)"
            )
            assert resp.status_code == 200, resp.text
            assert body["status"] == "succeeded" and body["queue"] == "interactive"
            assert done < 0.9 * BACKLOG, "the interactive request waited for the batch backlog"
            rest = producer.wait_many(ids, timeout=120)
            assert all(j and j["status"] == "succeeded" for j in rest)
    finally:
        running.mock.set_faults(latency_ms=0)
