"""Hold a request until its job ends: one pub/sub listener per process wakes the waiters.

Polling Redis per waiting request would add its poll interval to every
response; a shared subscription wakes the right request within a millisecond.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from typing import Any

import redis

from worker.jobs import DONE_CHANNEL, TERMINAL, JobStore

log = logging.getLogger("dspy_fleet.api")

# Waiters re-read the job at least this often, so an event missed while the
# listener reconnects (Redis restart) costs at most this much latency.
RECHECK_SECONDS = 1.0


class JobWaiter:
    """Lets request threads block until a job reaches a terminal status."""

    def __init__(self, client: redis.Redis, store: JobStore) -> None:
        self.client = client
        self.store = store
        self._events: dict[str, set[threading.Event]] = defaultdict(set)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def wait(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        """The job once it ended, or as it stands when ``timeout`` runs out."""
        deadline = time.monotonic() + timeout
        event = threading.Event()
        self._register(job_id, event)
        try:
            while True:
                # Subscribed before reading: an end published after this read still wakes us.
                job = self.store.get(job_id)
                remaining = deadline - time.monotonic()
                if job is None or job.get("status") in TERMINAL or remaining <= 0:
                    return job
                event.wait(min(remaining, RECHECK_SECONDS))
                event.clear()
        finally:
            self._unregister(job_id, event)

    def _register(self, job_id: str, event: threading.Event) -> None:
        with self._lock:
            self._events[job_id].add(event)
            if self._thread is None or not self._thread.is_alive():
                # Started lazily, so it runs in each gunicorn worker after the fork.
                self._thread = threading.Thread(target=self._listen, name="job-waiter", daemon=True)
                self._thread.start()

    def _unregister(self, job_id: str, event: threading.Event) -> None:
        with self._lock:
            waiters = self._events.get(job_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._events[job_id]

    def _wake(self, job_id: str) -> None:
        with self._lock:
            for event in self._events.get(job_id, ()):
                event.set()

    def _listen(self) -> None:
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(DONE_CHANNEL)
                while True:
                    msg = pubsub.get_message(timeout=1.0)
                    if msg and msg.get("type") == "message":
                        self._wake(msg["data"])
            except redis.RedisError as exc:
                log.warning("job-done listener lost Redis (%s); resubscribing", exc)
                time.sleep(0.5)
            finally:
                pubsub.close()
