"""Caps on held requests (``wait``), per tenant and in total, so no tenant can starve the others.

A request that waits for its job (``wait`` on POST /v1/predict, ``?wait=`` on
GET /v1/predictions/<id>) holds one of its gunicorn worker's slots until the job ends:
a connection (and a greenlet) under the default gevent worker, a thread under gthread.
Without a cap, one tenant's long waits could take every slot and everybody's cheap
requests would queue behind them (or, under gevent, wait in the accept queue).

The count lives in each API process (a lock and two counters), not in Redis: the
resource it protects is that process's slots, and only a per-process count can promise
that a full cap still leaves slots free in *this* process, whatever the load balancer
does. It is exact, costs no Redis round trip, and a crashed process takes its holds with
it (a Redis counter would need a lease for that). The price: the caps scale with the
processes (fleet-wide, a tenant may hold ``API_WORKERS × replicas × MAX_WAITS_PER_TENANT``
waits), which is what slots scale with too.

A request over a cap is not refused: its job is already accepted (POST) or exists
(GET), so it is answered at once as if ``wait`` were 0, with ``Retry-After`` saying
when to poll again and ``X-Wait-Capped`` naming the cap (``tenant`` or ``total``).
A 429 after the job was queued would invite the client to submit it again.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Flask, current_app

from api import metrics
from api.settings import ApiSettings

# What an over-cap answer suggests before the next poll: long enough that a polling
# loop does not spin, short enough that a waiting client barely notices.
POLL_AGAIN_SECONDS = 1
EXTENSION = "dspy_fleet_wait_limiter"


class WaitLimiter:
    """Counts held requests of one process, in total and per tenant; never blocks."""

    def __init__(self, total: int, per_tenant: int) -> None:
        self.total = total
        self.per_tenant = per_tenant
        self._held = 0
        self._by_tenant: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> str | None:
        """Take a slot for ``tenant``; None when taken, else the name of the full cap."""
        with self._lock:
            if self._by_tenant.get(tenant, 0) >= self.per_tenant:
                return "tenant"
            if self._held >= self.total:
                return "total"
            self._held += 1
            self._by_tenant[tenant] += 1
        metrics.WAITS_HELD.inc()
        return None

    def release(self, tenant: str) -> None:
        """Give back a slot taken by ``acquire``."""
        with self._lock:
            self._held -= 1
            self._by_tenant[tenant] -= 1
            if not self._by_tenant[tenant]:
                del self._by_tenant[tenant]
        metrics.WAITS_HELD.dec()

    @contextmanager
    def slot(self, tenant: str) -> Iterator[str | None]:
        """Hold a slot for the block; yields the full cap's name instead when there is none."""
        refused = self.acquire(tenant)
        if refused is not None:
            metrics.LIMITED.labels(f"wait_{refused}").inc()
            yield refused
            return
        try:
            yield None
        finally:
            self.release(tenant)

    @property
    def held(self) -> int:
        """Requests held right now."""
        with self._lock:
            return self._held


def init_app(app: Flask, settings: ApiSettings) -> None:
    """Give the app its process's wait limiter (each gunicorn worker builds its own app)."""
    app.extensions[EXTENSION] = WaitLimiter(settings.wait_cap, settings.tenant_wait_cap)


def wait_limiter() -> WaitLimiter:
    """The current app's wait limiter."""
    return current_app.extensions[EXTENSION]
