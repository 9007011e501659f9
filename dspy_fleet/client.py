"""FleetClient: a typed HTTP client of the dspy-fleet API (httpx, explicit timeouts).

Every error the service answers with becomes an exception carrying its ``code``,
``message``, ``details``, HTTP ``status`` and ``request_id`` (plus ``retryable`` and
``retry_after``); the class follows the status (``NotFoundError`` for 404 …) so callers
can catch broadly or by code. All of them derive from ``dspy_fleet.errors.FleetError``.

    with FleetClient("http://127.0.0.1:8080") as fleet:
        print(fleet.predict("What is 2+2?").outputs)    # {'answer': '4'}
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from dspy_fleet.contract import TERMINAL_STATUSES as TERMINAL
from dspy_fleet.errors import ClientError
from dspy_fleet.schemas import Batch, BatchCreated, Feedback, FeedbackList, Prediction

# The API holds a request at most this long (DSPY_FLEET_MAX_WAIT_SECONDS's ceiling).
MAX_SERVER_WAIT = 60.0


# The SDK's base, under the name its users import; it is the client-side branch of the
# one hierarchy, so ``except dspy_fleet.errors.FleetError`` catches it too.
FleetError = ClientError


class BadRequestError(ClientError):
    """400/422: the request breaks the schema (``details.errors`` names the fields)."""


class AuthError(ClientError):
    """401/403: missing, invalid or insufficient API key."""


class NotFoundError(ClientError):
    """404: unknown id, program, model or variant."""


class ConflictError(ClientError):
    """409: e.g. cancelling a job that already runs."""


class PayloadTooLargeError(ClientError):
    """413: the body is over the service's limit."""


class RateLimitedError(ClientError):
    """429: slow down (``retry_after`` says for how long, when the service said)."""

    retryable = True


class UnavailableError(ClientError):
    """503 (and other 5xx): the service or its queue is down; nothing was accepted."""

    retryable = True


class TransportError(ClientError):
    """The service could not be reached or did not answer in time."""

    retryable = True


class JobFailedError(ClientError):
    """The prediction ended failed or cancelled; ``prediction`` holds it."""

    def __init__(self, prediction: Prediction) -> None:
        err = prediction.error
        super().__init__(
            err.code if err else prediction.status,
            err.message if err else f"prediction {prediction.status}",
            details=err.details if err else {},
        )
        self.prediction = prediction


class WaitTimeoutError(ClientError):
    """The job did not end within the client's ``timeout``; ``prediction`` is its last state."""

    def __init__(self, prediction: Prediction) -> None:
        super().__init__("wait_timeout", f"prediction {prediction.id} is still {prediction.status}")
        self.prediction = prediction


_BY_STATUS: dict[int, type[ClientError]] = {
    400: BadRequestError,
    401: AuthError,
    403: AuthError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: BadRequestError,
    429: RateLimitedError,
}


def error_from(resp: httpx.Response) -> ClientError:
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
        cls = UnavailableError if resp.status_code >= 500 else ClientError
    return cls(code, message, status=resp.status_code, details=details, request_id=request_id,
               retry_after=_retry_after(resp))  # fmt: skip


def _retry_after(resp: httpx.Response) -> float | None:
    """The Retry-After header in seconds (the service sends whole seconds, never a date)."""
    try:
        return float(resp.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event of an event stream.

    ``event``: ``status`` / ``result`` (predictions) or ``progress`` / ``result`` (batches);
    ``id``: the event's id (pass it as ``last_event_id`` to resume after it; None when the
    server gave none); ``data``: its JSON data, parsed; ``retry_ms``: the reconnect delay
    the server asked for in this block (None when it named none)."""

    event: str | None
    id: str | None
    data: Any
    retry_ms: int | None = None


def parse_sse(lines: Iterable[str]) -> Iterator[Event]:
    """Server-Sent Events from the stream's lines (the WHATWG rules: comments skipped, a
    blank line ends an event, ``data`` lines joined with newlines, parsed as JSON)."""
    event: str | None = None
    event_id: str | None = None
    data: list[str] = []
    retry: int | None = None
    for line in lines:
        if line == "":
            if data or retry is not None:
                text = "\n".join(data)
                parsed = json.loads(text) if data else None
                yield Event(event or ("message" if data else None), event_id, parsed, retry)
            event, event_id, data, retry = None, None, [], None
            continue
        if line.startswith(":"):
            continue  # a comment (keep-alive)
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)


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
        timeout = httpx.Timeout(
            (self.timeout.read or 0.0) + server_wait, connect=self.timeout.connect
        )
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
        request_id, priority, use_cache, cache_ttl, variant, callback_url: a webhook called
        when it ends, README Webhooks). Returns it queued, or finished
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
        return self._get(job_id, wait)[0]

    def _get(self, job_id: str, wait: float) -> tuple[Prediction, float | None]:
        params = {"wait": wait} if wait else None
        resp = self._request("GET", f"/v1/predictions/{job_id}", params=params, server_wait=wait)
        return Prediction.model_validate(resp.json()), _retry_after(resp)

    def wait(self, job_id: str, *, timeout: float = 120.0) -> Prediction:
        """Long-poll until the job ends; WaitTimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            job, poll_again = self._get(job_id, max(0.0, min(remaining, MAX_SERVER_WAIT)))
            if job.status in TERMINAL:
                return job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(job)
            if poll_again:
                # The API was over its wait cap and answered at once: poll again when it
                # says, not in a tight loop.
                time.sleep(min(poll_again, remaining))

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

    # -- feedback and the A/B report --------------------------------------------------------

    def feedback(
        self,
        job_id: str,
        score: float,
        *,
        source: str | None = None,
        label: str | None = None,
        comment: str | None = None,
        expected: Mapping[str, Any] | None = None,
    ) -> Feedback:
        """POST /v1/predictions/<id>/feedback: judge a succeeded prediction (``score`` 0..1
        by convention, higher better). One per prediction and ``source`` (default
        "default"): posting again replaces it (``replaced`` says so). ConflictError
        ``not_succeeded`` for a prediction that has not succeeded, NotFoundError for an
        unknown one."""
        fields = dict(expected) if expected is not None else None
        body: dict[str, Any] = {"score": score, "source": source, "label": label,
                                "comment": comment, "expected": fields}  # fmt: skip
        resp = self._request("POST", f"/v1/predictions/{job_id}/feedback",
                             json={k: v for k, v in body.items() if v is not None})  # fmt: skip
        return Feedback.model_validate(resp.json())

    def get_feedback(self, job_id: str) -> list[Feedback]:
        """GET /v1/predictions/<id>/feedback: every source's feedback on the prediction."""
        resp = self._request("GET", f"/v1/predictions/{job_id}/feedback")
        return FeedbackList.model_validate(resp.json()).feedback

    def report(
        self,
        program: str,
        *,
        since: str | None = None,
        control: str | None = None,
        source: str | None = None,
        version: str | None = None,
    ) -> dict[str, Any]:
        """GET /v1/programs/<name>/report: per variant n, success rate, latency p50/p95, cost
        per request and mean feedback score; each variant tested against ``control``, with
        a plain ``verdict`` line (README, A/B report). ``since``: a date or ISO 8601 time;
        ``version``: jobs that ran that program version only."""
        params = {k: v for k, v in (("since", since), ("control", control),
                                    ("source", source), ("version", version))
                  if v is not None}  # fmt: skip
        resp = self._request("GET", f"/v1/programs/{program}/report", params=params or None)
        return dict(resp.json())

    # -- traces and examples ----------------------------------------------------------------

    def traces(
        self,
        program: str,
        *,
        since: str | None = None,
        variant: str | None = None,
        version: str | None = None,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """GET /v1/programs/<name>/traces: the program's newest kept traces (inputs, outputs,
        LM calls, variant, program_version, feedback), newest first (README, Traces)."""
        params = _params(since=since, variant=variant, version=version, limit=limit)
        resp = self._request("GET", f"/v1/programs/{program}/traces", params=params or None)
        return list(resp.json()["traces"])

    def trace(self, job_id: str) -> dict[str, Any]:
        """GET /v1/predictions/<id>/trace: the prediction's kept trace (NotFoundError: none)."""
        return dict(self._request("GET", f"/v1/predictions/{job_id}/trace").json())

    def examples(
        self,
        program: str,
        *,
        since: str | None = None,
        variant: str | None = None,
        version: str | None = None,
        min_score: float | None = None,
    ) -> tuple[list[str], Iterator[dict[str, Any]]]:
        """GET /v1/programs/<name>/examples: the program's input field names and its
        examples, streamed: dicts that ``dspy.Example(**record).with_inputs(*input_fields)``
        loads (README, Traces and examples)."""
        params = _params(since=since, variant=variant, version=version, min_score=min_score)
        path = f"/v1/programs/{program}/examples"
        try:
            cm = self._http.stream("GET", path, params=params or None)
            resp = cm.__enter__()
        except httpx.HTTPError as exc:
            raise TransportError("connection_error", f"GET {path} failed: {exc}") from exc
        if resp.status_code >= 400:
            resp.read()
            cm.__exit__(None, None, None)
            raise error_from(resp)
        fields = [f for f in resp.headers.get("X-Input-Fields", "").split(",") if f]

        def records() -> Iterator[dict[str, Any]]:
            try:
                for line in resp.iter_lines():
                    if line.strip():
                        yield json.loads(line)
            except httpx.HTTPError as exc:
                raise TransportError("connection_error", f"GET {path} failed: {exc}") from exc
            finally:
                cm.__exit__(None, None, None)

        return fields, records()

    # -- batches ----------------------------------------------------------------------------

    def batch(
        self,
        items: Iterable[Mapping[str, Any]],
        *,
        idempotency_key: str | None = None,
        callback_url: str | None = None,
        callback_items: bool = False,
    ) -> BatchCreated:
        """POST /v1/batches: items are dicts with ``custom_id`` plus predict fields.
        Invalid items come back in ``errors``; the others are queued (lane: batch).
        ``callback_url`` is called once when the batch ends (``callback_items``: and as each
        item ends).

        With ``idempotency_key`` (sent as the Idempotency-Key header) calling again with the
        same key and items names the same batch and jobs: nothing runs or bills twice, and
        items Redis refused the first time (``rejected``) are added."""
        lines = "".join(json.dumps(dict(i), separators=(",", ":")) + "\n" for i in items)
        headers = {"Content-Type": "application/x-ndjson"}
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        params: dict[str, str] = {}
        if callback_url is not None:
            params["callback_url"] = callback_url
        if callback_items:
            params["callback_items"] = "true"
        resp = self._request("POST", "/v1/batches", content=lines.encode(), headers=headers,
                             params=params or None)  # fmt: skip
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

    # -- event streams ----------------------------------------------------------------------

    def iter_events(
        self, job_id: str, *, last_event_id: str | None = None, reconnects: int = 5
    ) -> Iterator[Event]:
        """GET /v1/predictions/<id>/events: the prediction's events, ending with its result.

        Yields :class:`Event` s: ``status`` (data {id, status, at, attempt?,
        retry_in_seconds?, error?, throttled_until?, throttle_reason?}) for each status
        change, then one ``result`` (data: the prediction as :meth:`get` returns it, as a
        dict), after which the iterator ends. ``last_event_id`` resumes after an event a
        previous stream sent. A dropped connection, or a stream the server closed at its
        maximum duration, is reconnected with ``Last-Event-ID`` after the server's
        ``retry`` interval, so no event is missed or repeated; ``TransportError`` after
        ``reconnects`` attempts in a row that brought no event. Errors before the stream
        starts raise as the other calls do (``NotFoundError`` for an unknown id or another
        tenant's; ``RateLimitedError`` is retried after its ``retry_after``)."""
        yield from self._events(f"/v1/predictions/{job_id}/events", last_event_id, reconnects)

    def iter_batch_events(
        self, batch_id: str, *, last_event_id: str | None = None, reconnects: int = 5
    ) -> Iterator[Event]:
        """GET /v1/batches/<id>/events: ``progress`` events (data {id, status, counts}) as the
        batch's counts change, then one ``result`` (data: the batch object) once it ended.
        Reconnects like :meth:`iter_events`; a snapshot equal to the last one received is
        not sent again."""
        yield from self._events(f"/v1/batches/{batch_id}/events", last_event_id, reconnects)

    def _events(self, path: str, last_id: str | None, reconnects: int) -> Iterator[Event]:
        retry_s = 1.0
        failures = 0
        # Reads wait for the server's keep-alive comments (every 15 s by default).
        timeout = httpx.Timeout(max(self.timeout.read or 0.0, 60.0), connect=self.timeout.connect)
        while True:
            headers = {"Accept": "text/event-stream"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            got_event = False
            try:
                with self._http.stream("GET", path, headers=headers, timeout=timeout) as resp:
                    if resp.status_code >= 400:
                        resp.read()
                        err = error_from(resp)
                        if resp.status_code not in (429, 502, 503, 504):
                            raise err
                        failures += 1
                        if failures > reconnects:
                            raise err
                        time.sleep(err.retry_after or retry_s)
                        continue
                    for event in parse_sse(resp.iter_lines()):
                        if event.retry_ms is not None:
                            retry_s = event.retry_ms / 1000
                        if event.event is None:
                            continue  # a retry-only block
                        got_event = True
                        if event.id is not None:
                            last_id = event.id
                        yield event
                        if event.event == "result":
                            return
            except httpx.HTTPError as exc:
                if got_event:
                    failures = 0
                failures += 1
                if failures > reconnects:
                    raise TransportError("connection_error", f"GET {path} failed: {exc}") from exc
                time.sleep(retry_s)
                continue
            # The server closed the stream before the result (its maximum duration): resume.
            failures = 0 if got_event else failures + 1
            if failures > reconnects:
                raise TransportError("stream_closed", f"GET {path} ended without a result")
            time.sleep(retry_s)

    def wait_batch(self, batch_id: str, *, timeout: float = 600.0, interval: float = 0.5) -> Batch:
        """Poll until the batch has no pending items; a ``wait_timeout`` FleetError after."""
        deadline = time.monotonic() + timeout
        while True:
            batch = self.get_batch(batch_id)
            if batch.counts.pending == 0:
                return batch
            if time.monotonic() >= deadline:
                raise ClientError("wait_timeout", f"batch {batch_id} still has pending items")
            time.sleep(interval)

    def cancel_batch(self, batch_id: str) -> Batch:
        """POST /v1/batches/<id>/cancel: queued items are cancelled, running ones finish."""
        return Batch.model_validate(self._request("POST", f"/v1/batches/{batch_id}/cancel").json())


def _params(**given: Any) -> dict[str, str]:
    """Query parameters: the ones given, as text."""
    return {k: str(v) for k, v in given.items() if v is not None}
