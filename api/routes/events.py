"""Server-Sent Event streams: GET /v1/predictions/<id>/events and GET /v1/batches/<id>/events.

A prediction's stream replays its event log (a Redis list the job store's scripts append
at every status change, atomically with the change: dspy_fleet/store/jobs.py, JOB_EVENT)
and follows it live: ``status`` events (queued, running, retrying, throttled), then one
``result`` event whose data is the prediction as GET /v1/predictions/<id> shows it, and
the stream ends. Each event's ``id`` is its number in the log (1, 2, ...), so a client
that reconnects with ``Last-Event-ID`` gets exactly the events after it: nothing missed,
nothing repeated.

Live delivery costs no Redis connection and no thread per stream: a stream registers its
process's wake channel in the job's wake set and waits on the process's one pub/sub
subscriber (api/waiter.py), which the status-changing scripts publish to. While nothing
happens it writes a ``: keep-alive`` comment every DSPY_FLEET_EVENTS_KEEPALIVE_SECONDS
(no Redis read), and reads the log again every 5 s (api/waiter.py's RECHECK_SECONDS) in
case a notification was lost (pub/sub is at-most-once). A stream stays open at most
DSPY_FLEET_EVENTS_MAX_SECONDS; the client then reconnects with ``Last-Event-ID``
(``retry:`` says after 1 s).

A batch's stream is a series of snapshots: a ``progress`` event ({id, status, counts}) each
time its counts change, then one ``result`` event with the batch object once it has ended.
It registers its process's channel in the batch's wake set, and the scripts that end the
batch's items publish to it (dspy_fleet/store/jobs.py, _CALLBACK_DUE): the stream recounts
(one pipelined status read per 500 items) when woken, at most once per
DSPY_FLEET_EVENTS_BATCH_POLL_SECONDS however fast its items end, and every RECHECK_SECONDS
in case a notification was lost; a batch where nothing ends costs no reads between. Its
event id names the snapshot, so a reconnect with ``Last-Event-ID`` is sent the
current snapshot only when it differs from the last one received.

Both check the tenant like GET (another tenant's id is a 404), answer errors in the one
JSON error format before the stream starts, and hold one of the process's wait slots
(api/limits.py): over a cap, ``429 rate_limited`` with ``Retry-After``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Response, g, request

from api import metrics
from api.auth import visible
from api.batches import batches
from api.limits import POLL_AGAIN_SECONDS, wait_limiter
from api.routes.predictions import _waiter
from api.services import services
from api.waiter import RECHECK_SECONDS
from dspy_fleet.contract import DEFAULT_TENANT, TERMINAL_STATUSES
from dspy_fleet.errors import NotFoundError, RateLimitedError, RequestValidationError
from dspy_fleet.store.batches import BatchStore, summarize
from dspy_fleet.store.jobs import JobStore
from dspy_fleet.views import batch_view, prediction_view

bp = Blueprint("events", __name__, url_prefix="/v1")

EVENT_STREAM = "text/event-stream"
LAST_EVENT_ID = "Last-Event-ID"
# What the client waits before reconnecting (the SSE ``retry:`` field), in milliseconds.
RETRY_MS = 1000
KEEP_ALIVE = ": keep-alive\n\n"
# A prediction's event ids number its log's entries; a batch's name a snapshot of its counts.
JOB_EVENT_ID = re.compile(r"^[0-9]{1,9}$")
BATCH_EVENT_ID = re.compile(r"^[a-z_]{1,20}(?:\.[0-9]{1,9}){5}$")
BATCH_ENDED = frozenset({"completed", "failed", "cancelled"})
# What a batch's wake-ups are published as, before its id (dspy_fleet/store/jobs.py).
BATCH_WAKE = "batch:"


def sse(event: str, data: dict[str, Any], event_id: str | None = None) -> str:
    """One SSE event: ``id:`` (when given), ``event:`` and one ``data:`` line of JSON."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _last_event_id(pattern: re.Pattern[str], what: str) -> str | None:
    raw = request.headers.get(LAST_EVENT_ID)
    if raw is None or raw == "":
        return None
    if not pattern.match(raw):
        raise RequestValidationError(
            f"{LAST_EVENT_ID} must be an event id this stream sent ({what})",
            details={"errors": [{"field": LAST_EVENT_ID, "message": "not an event id"}]},
        )
    return raw


def _hold_slot() -> Callable[[], None]:
    """Take one of the process's wait slots for the caller's tenant (429 over a cap); the
    returned function gives it back (once, however often it is called)."""
    tenant = g.get("tenant") or DEFAULT_TENANT
    limiter = wait_limiter()
    refused = limiter.acquire(tenant)
    if refused is not None:
        metrics.LIMITED.labels(f"wait_{refused}").inc()
        raise RateLimitedError(
            f"too many requests held open ({refused} cap); retry shortly",
            details={"limit": refused},
            retry_after=POLL_AGAIN_SECONDS,
        )
    metrics.STREAMS_OPEN.inc()
    released = threading.Event()

    def release() -> None:
        if not released.is_set():
            released.set()
            metrics.STREAMS_OPEN.dec()
            limiter.release(tenant)

    return release


def _response(body: Iterator[str], release: Callable[[], None]) -> Response:
    resp = Response(body, mimetype=EVENT_STREAM)
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"  # proxies (nginx) must not buffer it
    # Called when the server closes the response: at the end, or when the client went
    # away (even before the generator ever ran, so the slot is never leaked).
    resp.call_on_close(release)
    return resp


def _at(seconds: str) -> str:
    """A log entry's time (Redis's clock, "<s>.<us>") as ISO 8601 UTC, to the millisecond."""
    moment = datetime.fromtimestamp(float(seconds), UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def status_data(job_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A ``status`` event's data: {id, status, at, attempt?, retry_in_seconds?, error?,
    throttled_until?, throttle_reason?} from a log entry (JobStore.events)."""
    data: dict[str, Any] = {"id": job_id, "status": fields.get("status"), "at": _at(fields["t"])}
    if "attempts" in fields:
        data["attempt"] = int(fields["attempts"])
    if "retry_in_seconds" in fields:
        data["retry_in_seconds"] = float(fields["retry_in_seconds"])
    if "error" in fields:
        data["error"] = json.loads(fields["error"])
    for name in ("throttled_until", "throttle_reason"):
        if name in fields:
            data[name] = fields[name]
    return data


@bp.get("/predictions/<job_id>/events")
def prediction_events(job_id: str) -> Response:
    """A prediction's status changes and result, as Server-Sent Events (module docstring)."""
    raw_after = _last_event_id(JOB_EVENT_ID, "a whole number")
    after = int(raw_after) if raw_after is not None else None
    svc = services()
    job = svc.store.get(job_id)
    if job is None or not visible(job.get("tenant")):
        # Another tenant's job is indistinguishable from one that does not exist.
        raise NotFoundError(f"no prediction with id {job_id!r}")
    settings = svc.settings
    stream = JobStream(svc.store, _waiter(), job_id, request.url_root,
                       max_seconds=settings.events_max_seconds,
                       keepalive=settings.events_keepalive_seconds)  # fmt: skip
    release = _hold_slot()
    return _response(stream.events(after), release)


class JobStream:
    """The events of one prediction for one client (see the module docstring)."""

    def __init__(self, store: JobStore, waiter: Any, job_id: str, base_url: str, *,
                 max_seconds: float, keepalive: float) -> None:  # fmt: skip
        self.store = store
        self.waiter = waiter
        self.job_id = job_id
        self.base_url = base_url
        self.max_seconds = max_seconds
        self.keepalive = keepalive

    def _result(self, event_id: str | None) -> Iterator[str]:
        job = self.store.get(self.job_id)
        if job is not None:
            yield sse("result", prediction_view(job, self.base_url), event_id)

    def events(self, after: int | None) -> Iterator[str]:
        """The SSE text: the events after ``after`` (an event's number; None: all), live
        until the result or the stream's maximum duration."""
        deadline = time.monotonic() + self.max_seconds
        yield f"retry: {RETRY_MS}\n\n"
        with self.waiter.notified(self.job_id) as woken:
            # Registered before the read: any change after it is published to us.
            job = self.store.watch(self.job_id, self.waiter.channel, self.max_seconds)
            if job is None:
                return
            ended = job.get("status") in TERMINAL_STATUSES
            while True:
                entries, exists = self.store.events(self.job_id, after)
                for fields in entries:
                    after = int(fields["n"])
                    if fields.get("status") in TERMINAL_STATUSES:
                        yield from self._result(str(after))
                        return
                    yield sse("status", status_data(self.job_id, fields), str(after))
                if ended:
                    # Ended, with no terminal entry after ``after``: a client resuming after
                    # the result, or a job older than its log. The result, without an id.
                    yield from self._result(None)
                    return
                if not exists:
                    return  # the record expired
                recheck = time.monotonic() + RECHECK_SECONDS
                if (yield from _await_change(woken, deadline, recheck, self.keepalive)) is None:
                    return


def _await_change(woken: threading.Event, deadline: float, recheck: float,
                  keepalive: float) -> Generator[str, None, bool | None]:  # fmt: skip
    """Keep-alive comments until ``woken`` is set (True; it is cleared again) or
    ``recheck`` passes, the time to read again anyway as a notification may be lost
    (False). None when the stream's ``deadline`` comes first (the client resumes with
    Last-Event-ID). Times are time.monotonic()'s."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if woken.wait(min(keepalive, remaining, max(0.0, recheck - time.monotonic()))):
            woken.clear()
            return True
        if time.monotonic() >= recheck:
            return False
        yield KEEP_ALIVE


@bp.get("/batches/<batch_id>/events")
def batch_events(batch_id: str) -> Response:
    """A batch's progress counts and its final object, as Server-Sent Events."""
    after = _last_event_id(BATCH_EVENT_ID, "an event id this batch's stream sent")
    store = batches().store
    meta = store.meta(batch_id)
    if meta is None or not visible(meta.get("tenant")):
        raise NotFoundError(f"no batch with id {batch_id!r}")
    settings = services().settings
    body = _batch_stream(store, _waiter(), batch_id, after, request.url_root,
                         settings.events_max_seconds, settings.events_keepalive_seconds,
                         settings.events_batch_poll_seconds)  # fmt: skip
    release = _hold_slot()
    return _response(body, release)


def batch_event_id(summary: dict[str, Any]) -> str:
    """The id of a batch snapshot: its status and counts (equal ids, equal snapshots)."""
    c = summary["counts"]
    parts = (c["total"], c["succeeded"], c["failed"], c["cancelled"], c["pending"])
    return summary["status"] + "".join(f".{n}" for n in parts)


def _batch_stream(store: BatchStore, waiter: Any, batch_id: str, after: str | None,
                  base_url: str, max_seconds: float, keepalive: float,
                  interval: float) -> Iterator[str]:  # fmt: skip
    """The SSE text of a batch (module docstring); ``interval``: the least time between two
    recounts."""
    deadline = time.monotonic() + max_seconds
    yield f"retry: {RETRY_MS}\n\n"
    with waiter.notified(BATCH_WAKE + batch_id) as woken:
        store.watch(batch_id, waiter.channel, max_seconds)  # before the first count
        while True:
            meta = store.meta(batch_id)
            if meta is None:
                return  # expired
            summary = summarize(store, batch_id, meta)
            counted = time.monotonic()
            if summary["status"] in BATCH_ENDED:
                view = batch_view(store, batch_id, meta, base_url)
                yield sse("result", view, batch_event_id(view))
                return
            event_id = batch_event_id(summary)
            if event_id != after:
                yield sse("progress", {"id": batch_id, **summary}, event_id)
                after = event_id
            recheck = counted + RECHECK_SECONDS
            woke = yield from _await_change(woken, deadline, recheck, keepalive)
            if woke is None:
                return
            if woke:  # ends that come meanwhile set `woken` again: one recount for them all
                time.sleep(max(0.0, min(counted + interval, deadline) - time.monotonic()))
