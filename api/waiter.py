"""Hold requests until their jobs end: one pub/sub subscriber per process wakes them all.

Each API process has its own wake channel and one subscriber connection to it, opened
on the first wait. A waiting request registers the process's channel in its job's wake
set and reads the job in one script (:meth:`JobStore.watch`); the script that finishes
the job publishes its id on every registered channel (one PUBLISH per waiting process,
none for a job nobody waits for), and the subscriber wakes the requests waiting for it
in this process. The scripts that change a job's status on the way (running, retrying,
throttled, queued again) publish ``<status> <job id>`` without dropping the set, for the
process's event streams (api/routes/events.py, :meth:`JobWaiter.notified`); a held
``wait`` sleeps through those (it only wants the end: no read, no wake-up per step). A
worker from before the status was sent publishes the bare id for a step too: a held wait
woken by it reads its job and waits on. No request polls Redis while it waits: under the
gevent worker a held request costs a greenlet and its socket, under gthread a thread that
sleeps.

Pub/sub is at-most-once: a message published while the subscriber reconnects is lost.
So the subscriber also sweeps: right after each (re)subscription, and every
RECHECK_SECONDS, it reads the status of every job waited for in this process in one
pipelined round trip and wakes those that ended. A lost notification therefore costs
at most RECHECK_SECONDS of latency, and never holds a request past its ``wait``: a
request re-reads its job when its wait runs out, whatever happened.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis

from api import metrics
from dspy_fleet.contract import TERMINAL_STATUSES
from dspy_fleet.store.jobs import JobStore, read_wake

log = logging.getLogger("dspy_fleet.api")

# How often the subscriber checks every waited-for job itself, for notifications that
# never came (see the module docstring). One pipelined HGET per held request each time:
# 2,000 held requests cost Redis 400 cheap reads a second.
RECHECK_SECONDS = 5.0
# Job ids per pipelined status read of a sweep.
SWEEP_CHUNK = 1000
# Pause before resubscribing after the subscriber lost Redis.
RECONNECT_SECONDS = 0.5
# Longest the subscriber blocks reading before it looks at its stop flag again.
LISTEN_SECONDS = 1.0


class JobWaiter:
    """Lets requests (threads or greenlets) block until a job reaches a terminal status.

    ``client`` is the process's Redis client (the subscriber takes one connection of its
    pool for as long as the process lives); ``store`` reads and watches the jobs.
    """

    def __init__(
        self, client: redis.Redis, store: JobStore, *, recheck_seconds: float = RECHECK_SECONDS
    ) -> None:
        self.client = client
        self.store = store
        self.recheck_seconds = recheck_seconds
        # Unique per process start (a pid alone repeats across pods and restarts).
        self.channel = (
            f"dspy_fleet:waiter:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        )
        self._events: dict[str, set[threading.Event]] = defaultdict(set)
        # The events of ``wait`` calls: set by a job's end only (and by a status-less wake).
        self._ends_only: set[threading.Event] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        # Set while the subscriber is subscribed and has swept once since: from then on an
        # end is heard by notification (or by the next sweep, if the notification is lost).
        self.listening = threading.Event()

    def wait(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        """The job once it ended, or as it stands when ``timeout`` (seconds) runs out; None
        if the job no longer exists. Raises redis.RedisError when Redis fails a read."""
        deadline = time.monotonic() + timeout
        event = threading.Event()
        # Known to the subscriber before the watch: a sweep after a resubscription then
        # covers an end published while it was not listening.
        self._register(job_id, event, ends_only=True)
        try:
            job = self.store.watch(job_id, self.channel, timeout)
            while job is not None and job.get("status") not in TERMINAL_STATUSES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if event.wait(remaining):
                    event.clear()
                job = self.store.get(job_id)
            return job
        finally:
            self._unregister(job_id, event)

    @contextmanager
    def notified(self, job_id: str) -> Iterator[threading.Event]:
        """An event set whenever a notification names ``job_id`` (any status change it
        publishes, see JOB_EVENT in dspy_fleet/store/jobs.py) or a sweep finds it ended,
        for the block. The caller registers this process's channel in the job's wake set
        (:meth:`JobStore.watch`) after entering, then reads: nothing is missed between."""
        event = threading.Event()
        self._register(job_id, event)
        try:
            yield event
        finally:
            self._unregister(job_id, event)

    @property
    def waiting(self) -> int:
        """Jobs waited for in this process right now."""
        with self._lock:
            return len(self._events)

    def _register(self, job_id: str, event: threading.Event, ends_only: bool = False) -> None:
        with self._lock:
            self._events[job_id].add(event)
            if ends_only:
                self._ends_only.add(event)
            if self._thread is None or not self._thread.is_alive():
                # Started lazily, so it runs in each gunicorn worker after the fork (and,
                # under gevent, after the monkey-patching: then it is a greenlet).
                self._thread = threading.Thread(target=self._listen, name="job-waiter", daemon=True)
                self._thread.start()

    def _unregister(self, job_id: str, event: threading.Event) -> None:
        with self._lock:
            self._ends_only.discard(event)
            waiters = self._events.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._events[job_id]

    def _wake(self, job_id: str, source: str, status: str | None = None) -> None:
        """Set the events waiting for ``job_id``; for a ``status`` that is not an end,
        only those of event streams (``wait`` sleeps on)."""
        with self._lock:
            events = list(self._events.get(job_id, ()))
            if status is not None and status not in TERMINAL_STATUSES:
                events = [e for e in events if e not in self._ends_only]
        if events:  # counted before the requests run on
            metrics.WAIT_WAKEUPS.labels(source).inc()
        for event in events:
            event.set()

    def _heard(self, message: str) -> None:
        """Wake whoever a notification concerns (dspy_fleet/store/jobs.py, read_wake). A
        message that is itself an id waited for here is that job's end (or an older worker's
        step): read as such, whatever it looks like."""
        with self._lock:
            bare = message in self._events
        key, status = (message, None) if bare else read_wake(message)
        self._wake(key, "notification", status)

    def _sweep(self) -> None:
        """Wake the waiters of every job that ended (or vanished) without a notification."""
        with self._lock:
            # Batch streams (keys "batch:<id>") recount on their own timer.
            job_ids = [key for key in self._events if not key.startswith("batch:")]
        for start in range(0, len(job_ids), SWEEP_CHUNK):
            chunk = job_ids[start : start + SWEEP_CHUNK]
            for job_id, status in zip(chunk, self.store.statuses(chunk), strict=True):
                if status is None or status in TERMINAL_STATUSES:
                    self._wake(job_id, "sweep")

    def close(self, *, wait: bool = True) -> None:
        """Stop the subscriber, within LISTEN_SECONDS (``wait``: until it stopped); waits in
        progress then end by their timeout."""
        self._stopped.set()
        if wait and self._thread is not None:
            self._thread.join(timeout=LISTEN_SECONDS + 1)

    def _listen(self) -> None:
        while not self._stopped.is_set():
            pubsub = self.client.pubsub()
            try:
                pubsub.subscribe(self.channel)
                next_sweep = float("inf")  # set once the subscription is confirmed
                while not self._stopped.is_set():
                    timeout = min(LISTEN_SECONDS, next_sweep - time.monotonic())
                    msg = pubsub.get_message(timeout=max(0.0, timeout))
                    if msg is not None and msg["type"] == "message":
                        self._heard(msg["data"])
                    elif msg is not None and msg["type"] == "subscribe":
                        # Listening from now on: whatever ended before is found by reading.
                        next_sweep = time.monotonic()
                    if time.monotonic() >= next_sweep:
                        self._sweep()
                        next_sweep = time.monotonic() + self.recheck_seconds
                        self.listening.set()
            except redis.RedisError as exc:
                log.warning("job waiter lost Redis (%s); resubscribing", exc)
                self._stopped.wait(RECONNECT_SECONDS)
            except Exception:
                # Never let the subscriber die: held requests would hear nothing until
                # their waits ran out.
                log.exception("job waiter failed; resubscribing")
                self._stopped.wait(RECONNECT_SECONDS)
            finally:
                self.listening.clear()
                pubsub.close()
