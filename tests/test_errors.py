"""Every error of the one hierarchy has a code and a status, and the API renders each the same way.

Fast: no Redis, no workers. The API side is a bare Flask app with the API's own error
handlers and a route that raises the error under test.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator

import httpx
import pytest
from flask import Flask, g

import dspy_fleet.client as sdk
import dspy_fleet.errors as errors
from api.errors import register_error_handlers

SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")

# The SDK's branch takes its code and status from the service's answer at run time.
CLIENT_SIDE = errors.ClientError
# Exceptions of the module that are signals to Celery, not errors anyone answers with.
SIGNALS = {errors.RetryJob, errors.Throttled, errors.JobFailed}


def _server_errors() -> list[type[errors.FleetError]]:
    found = []
    for _, cls in inspect.getmembers(errors, inspect.isclass):
        if cls.__module__ != errors.__name__ or not issubclass(cls, BaseException):
            continue
        if cls in SIGNALS or issubclass(cls, CLIENT_SIDE):
            continue
        found.append(cls)
    return found


ERRORS = _server_errors()

# Errors whose constructor takes more than the message.
MAKERS: dict[type[errors.FleetError], Callable[[], errors.FleetError]] = {
    errors.CircuitOpenError: lambda: errors.CircuitOpenError("mock-gpt", retry_after=2.4),
}


def _make(cls: type[errors.FleetError]) -> errors.FleetError:
    maker = MAKERS.get(cls)
    return maker() if maker else cls(f"{cls.__name__} happened", details={"why": "a test"})


def test_every_exception_of_the_module_is_in_the_hierarchy() -> None:
    # A new error that is not a FleetError would escape the API's one handler as a 500.
    assert errors.RequestError in ERRORS and errors.JobError in ERRORS
    assert all(issubclass(cls, errors.FleetError) for cls in ERRORS)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_error_has_a_code_a_status_and_a_docstring(cls: type[errors.FleetError]) -> None:
    err = _make(cls)
    assert SNAKE.match(err.code), err.code
    assert 400 <= err.http_status <= 599
    assert isinstance(err.retryable, bool)
    assert cls.__doc__ and cls.__doc__.strip()
    assert err.to_dict() == {"code": err.code, "message": err.message, "details": err.details}


@pytest.fixture(scope="module")
def api() -> Iterator[httpx.Client]:
    """A Flask app with the API's error handlers and one route that raises the chosen error."""
    app = Flask(__name__)
    register_error_handlers(app)

    @app.before_request
    def _request_id() -> None:
        g.request_id = "req-test"

    @app.get("/raise/<name>")
    def _raise(name: str) -> None:
        raise _make(getattr(errors, name))

    transport = httpx.WSGITransport(app=app)
    with httpx.Client(transport=transport, base_url="http://api.test") as client:
        yield client


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_api_renders_every_error_in_the_one_shape(
    api: httpx.Client, cls: type[errors.FleetError]
) -> None:
    err = _make(cls)
    resp = api.get(f"/raise/{cls.__name__}")
    assert resp.status_code == err.http_status
    assert resp.headers["Content-Type"].startswith("application/json")
    assert resp.json() == {
        "error": {
            "code": err.code,
            "message": err.message,
            "details": err.details,
            "request_id": "req-test",
        }
    }
    for name, value in err.headers.items():
        assert resp.headers[name] == value
    if err.retry_after is not None:
        assert int(resp.headers["Retry-After"]) >= err.retry_after


def test_outages_ask_clients_to_come_back() -> None:
    for cls in (errors.RedisUnavailableError, errors.BrokerUnavailableError):
        err = cls("down")
        assert err.http_status == 503 and err.retryable
        assert err.headers == {"Retry-After": "1"}
    assert errors.CircuitOpenError("m", retry_after=2.4).headers == {"Retry-After": "3"}
    assert errors.UnauthorizedError("who?").headers == {"WWW-Authenticate": "Bearer"}


@pytest.mark.parametrize(
    ("status", "code", "sdk_class"),
    [
        (404, "unknown_program", sdk.NotFoundError),
        (422, "validation_error", sdk.BadRequestError),
        (401, "unauthorized", sdk.AuthError),
        (429, "rate_limited", sdk.RateLimitedError),
        (503, "redis_unavailable", sdk.UnavailableError),
    ],
)
def test_sdk_errors_are_caught_by_the_one_base(
    status: int, code: str, sdk_class: type[sdk.FleetError]
) -> None:
    body = {"error": {"code": code, "message": "no", "details": {"x": 1}, "request_id": "r1"}}
    resp = httpx.Response(status, json=body, headers={"Retry-After": "1"})
    with pytest.raises(errors.FleetError) as caught:
        raise sdk.error_from(resp)
    err = caught.value
    assert isinstance(err, sdk_class) and isinstance(err, sdk.FleetError)
    assert (err.code, err.status, err.http_status) == (code, status, status)
    assert (err.message, err.details, err.request_id) == ("no", {"x": 1}, "r1")
    assert err.retry_after == 1.0 and err.retryable == (status in (429, 503))
    assert str(err) == f"{code}: no"
