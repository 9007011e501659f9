"""FleetClient against the real API: round trips, batches, and errors that carry the codes."""

from __future__ import annotations

import pytest

from dspy_fleet.client import (
    BadRequestError,
    FleetClient,
    FleetError,
    NotFoundError,
    TransportError,
)
from dspy_fleet.devtools.procs import free_port
from tests.clients.conftest import Fleet


@pytest.fixture
def client(running: Fleet) -> FleetClient:
    with FleetClient(running.api.url, timeout=10) as fleet_client:
        yield fleet_client


def test_predict_round_trip(client: FleetClient) -> None:
    done = client.predict("What is 2+2?", use_cache=False)
    assert done.status == "succeeded"
    assert done.outputs == {"answer": "4"}
    assert done.cost is not None and done.cost.input_tokens > 0
    assert client.get(done.id).outputs == done.outputs


def test_submit_then_wait(client: FleetClient) -> None:
    queued = client.submit("What is 5+5?", priority="batch", use_cache=False)
    assert queued.status in ("queued", "running", "succeeded")
    finished = client.wait(queued.id, timeout=30)
    assert finished.status == "succeeded" and finished.queue == "batch"


def test_batch_round_trip(client: FleetClient) -> None:
    created = client.batch(
        [
            {"custom_id": "one", "input": "What is 1+1?"},
            {"custom_id": "bad", "program": "nope", "input": "x"},
        ]
    )
    assert [(e.custom_id, e.code) for e in created.errors] == [("bad", "unknown_program")]
    batch = client.wait_batch(created.id, timeout=30, interval=0.2)
    assert batch.status == "completed" and batch.counts.succeeded == 1 and batch.counts.failed == 1
    lines = {line["custom_id"]: line for line in client.batch_results(created.id)}
    assert lines["one"]["outputs"] == {"answer": "2"}
    assert lines["bad"]["error"]["code"] == "unknown_program"


@pytest.mark.parametrize(
    ("call", "cls", "code", "status"),
    [
        (lambda c: c.get("no-such-job"), NotFoundError, "not_found", 404),
        (lambda c: c.submit("x", program="no-such-program"), NotFoundError, "unknown_program", 404),
        (lambda c: c.submit("x", model="no-such-model"), NotFoundError, "unknown_model", 404),
        (
            lambda c: c.submit("x", inputs={"question": "both"}),
            BadRequestError,
            "validation_error",
            422,
        ),
        (
            lambda c: c.submit("x", parameters={"temperature": 7}),
            BadRequestError,
            "validation_error",
            422,
        ),
        (lambda c: c.get_batch("batch_nope"), NotFoundError, "not_found", 404),
        (lambda c: list(c.batch_results("batch_nope")), NotFoundError, "not_found", 404),
    ],
)
def test_errors_carry_the_service_codes(client: FleetClient, call, cls, code, status) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(cls) as caught:
        call(client)
    err = caught.value
    assert isinstance(err, FleetError)
    assert (err.code, err.status) == (code, status)
    assert err.message and err.request_id


def test_validation_errors_name_the_fields(client: FleetClient) -> None:
    with pytest.raises(BadRequestError) as caught:
        client.submit("x", parameters={"temperature": 7})
    assert [e["field"] for e in caught.value.details["errors"]] == ["parameters.temperature"]


def test_unreachable_service_is_a_transport_error() -> None:
    with (
        FleetClient(f"http://127.0.0.1:{free_port()}", timeout=2) as dead,
        pytest.raises(TransportError) as caught,
    ):
        dead.get("anything")
    assert caught.value.code == "connection_error" and caught.value.status is None
