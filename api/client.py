"""FleetClient: a typed HTTP client of the dspy-fleet API (httpx, explicit timeouts).

Every error the service answers with becomes an exception carrying its ``code``,
``message``, ``details``, HTTP ``status`` and ``request_id``; the class follows the
status (``NotFoundError`` for 404 …) so callers can catch broadly or by code.

    with FleetClient("http://127.0.0.1:8080") as fleet:
        print(fleet.predict("What is 2+2?").outputs)    # {'answer': '4'}
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import httpx

from api.schemas import Batch, BatchCreated, Prediction

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
# The API holds a request at most this long (DSPY_FLEET_MAX_WAIT_SECONDS's ceiling).
MAX_SERVER_WAIT = 60.0


class FleetError(Exception):
    """An error answered by the service (or the transport, with ``status`` None)."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        details: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.details = details or {}
        self.request_id = request_id


class BadRequestError(FleetError):
    """400/422: the request breaks the schema (``details.errors`` names the fields)."""


class AuthError(FleetError):
    """401/403: missing, invalid or insufficient API key."""


class NotFoundError(FleetError):
    """404: unknown id, program, model or variant."""


class ConflictError(FleetError):
    """409: e.g. cancelling a job that already runs."""


class PayloadTooLargeError(FleetError):
    """413: the body is over the service's limit."""


class RateLimitedError(FleetError):
    """429: slow down."""


class UnavailableError(FleetError):
    """503 (and other 5xx): the service or its queue is down; nothing was accepted."""


class TransportError(FleetError):
    """The service could not be reached or did not answer in time."""


class JobFailedError(FleetError):
    """The prediction ended failed or cancelled; ``prediction`` holds it."""

    def __init__(self, prediction: Prediction) -> None:
        err = prediction.error
        super().__init__(
            err.code if err else prediction.status,
            err.message if err else f"prediction {prediction.status}",
            details=err.details if err else {},
        )
        self.prediction = prediction


class WaitTimeoutError(FleetError):
    """The job did not end within the client's ``timeout``; ``prediction`` is its last state."""

    def __init__(self, prediction: Prediction) -> None:
        super().__init__("wait_timeout", f"prediction {prediction.id} is still {prediction.status}")
        self.prediction = prediction


_BY_STATUS: dict[int, type[FleetError]] = {
    400: BadRequestError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: BadRequestError,
    429: RateLimitedError,
}


def error_from(resp: httpx.Response) -> FleetError:
    """The exception for an error response (the service's one error shape, when it is one)."""
    try:
        body = resp.json()["error"]
        code, message = str(body["code"]), str(body["message"])
        details, request_id = body.get("details") or {}, body.get("request_id")
    except (ValueError, KeyError, TypeError):
        code, message, details = f"http_{resp.status_code}", resp.text[:200], {}
        request_id = resp.headers.get("X-Request-ID")
    cls = _BY_STATUS.get(resp.status_code)
    if cls is None:
        cls = UnavailableError if resp.status_code >= 500 else FleetError
    return cls(code, message, status=resp.status_code, details=details, request_id=request_id)


class FleetClient:
    """Client of one dspy-fleet API."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8080",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"User-Agent": "dspy-fleet-client/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        # Connecting should be quick; reads may include a server-side wait (added per call).
        self.timeout = httpx.Timeout(timeout, connect=min(timeout, 5.0))
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=self.timeout,
            transport=transport,
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _request(
        self, method: str, path: str, *, server_wait: float = 0.0, **kwargs: Any
    ) -> httpx.Response:
        timeout = httpx.Timeout(self.timeout.read + server_wait, connect=self.timeout.connect)
        try:
            resp = self._http.request(method, path, timeout=timeout, **kwargs)
        except httpx.TimeoutException as exc:
            raise TransportError("timeout", f"{method} {path} timed out: {exc}") from exc
        except httpx.HTTPError as exc:
            raise TransportError("connection_error", f"{method} {path} failed: {exc}") from exc
        if resp.status_code >= 400:
            raise error_from(resp)
        return resp

    # -- predictions ------------------------------------------------------------------------

    def submit(
        self,
        input: str | None = None,
        *,
        inputs: Mapping[str, Any] | None = None,
        wait: float = 0.0,
        **fields: Any,
    ) -> Prediction:
        """POST /v1/predict: queue a prediction (``fields``: program, model, parameters,
        request_id, priority, use_cache, cache_ttl, variant). Returns it queued, or finished
        when it ended within ``wait`` seconds or came from the cache."""
        body: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
        if input is not None:
            body["input"] = input
        if inputs is not None:
            body["inputs"] = dict(inputs)
        if wait:
            body["wait"] = wait
        resp = self._request("POST", "/v1/predict", json=body, server_wait=wait)
        return Prediction.model_validate(resp.json())

    def get(self, job_id: str, *, wait: float = 0.0) -> Prediction:
        """GET /v1/predictions/<id> (``wait`` long-polls up to 60 s)."""
        params = {"wait": wait} if wait else None
        resp = self._request("GET", f"/v1/predictions/{job_id}", params=params, server_wait=wait)
        return Prediction.model_validate(resp.json())

    def wait(self, job_id: str, *, timeout: float = 120.0) -> Prediction:
        """Long-poll until the job ends; WaitTimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            job = self.get(job_id, wait=max(0.0, min(remaining, MAX_SERVER_WAIT)))
            if job.status in TERMINAL:
                return job
            if time.monotonic() >= deadline:
                raise WaitTimeoutError(job)

    def predict(
        self,
        input: str | None = None,
        *,
        inputs: Mapping[str, Any] | None = None,
        timeout: float = 120.0,
        **fields: Any,
    ) -> Prediction:
        """Submit and wait: the succeeded prediction, else JobFailedError / WaitTimeoutError."""
        job = self.submit(input, inputs=inputs, wait=min(timeout, MAX_SERVER_WAIT), **fields)
        if job.status not in TERMINAL:
            job = self.wait(job.id, timeout=timeout)
        if job.status != "succeeded":
            raise JobFailedError(job)
        return job

    def cancel(self, job_id: str) -> Prediction:
        """DELETE /v1/predictions/<id>: cancel a queued job (ConflictError once it runs)."""
        return Prediction.model_validate(
            self._request("DELETE", f"/v1/predictions/{job_id}").json()
        )

    # -- batches ----------------------------------------------------------------------------

    def batch(self, items: Iterable[Mapping[str, Any]]) -> BatchCreated:
        """POST /v1/batches: items are dicts with ``custom_id`` plus predict fields.
        Invalid items come back in ``errors``; the others are queued (lane: batch)."""
        lines = "".join(json.dumps(dict(i), separators=(",", ":")) + "\n" for i in items)
        resp = self._request(
            "POST",
            "/v1/batches",
            content=lines.encode(),
            headers={"Content-Type": "application/x-ndjson"},
        )
        return BatchCreated.model_validate(resp.json())

    def get_batch(self, batch_id: str) -> Batch:
        """GET /v1/batches/<id>: status and counts."""
        return Batch.model_validate(self._request("GET", f"/v1/batches/{batch_id}").json())

    def batch_results(self, batch_id: str) -> Iterator[dict[str, Any]]:
        """The results lines (one per item that has ended), streamed."""
        path = f"/v1/batches/{batch_id}/results"
        try:
            with self._http.stream("GET", path) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise error_from(resp)
                for line in resp.iter_lines():
                    if line.strip():
                        yield json.loads(line)
        except httpx.HTTPError as exc:
            raise TransportError("connection_error", f"GET {path} failed: {exc}") from exc

    def wait_batch(self, batch_id: str, *, timeout: float = 600.0, interval: float = 0.5) -> Batch:
        """Poll until the batch has no pending items; WaitTimeoutError-like FleetError after."""
        deadline = time.monotonic() + timeout
        while True:
            batch = self.get_batch(batch_id)
            if batch.counts.pending == 0:
                return batch
            if time.monotonic() >= deadline:
                raise FleetError("wait_timeout", f"batch {batch_id} still has pending items")
            time.sleep(interval)

    def cancel_batch(self, batch_id: str) -> Batch:
        """POST /v1/batches/<id>/cancel: queued items are cancelled, running ones finish."""
        return Batch.model_validate(self._request("POST", f"/v1/batches/{batch_id}/cancel").json())
