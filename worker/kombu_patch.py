"""Two patches to kombu 5.7's Redis transport: one defect, one hot spot.

**Restart guard.** When the broker connection drops, Celery closes it with ``ignore_errors``, and
closing the Redis channel tries to requeue the unacknowledged messages it holds.
By then the connection's client is gone, so kombu raises AttributeError
(``'NoneType' object has no attribute 'hostname'``), which ``ignore_errors`` does
not catch: Celery calls it unrecoverable and the worker exits. Seen in our chaos
test (Redis restarted mid-run). Skipping that best-effort requeue is safe: the
messages stay in Redis's unacked hash and come back after the visibility timeout.

**One client per channel.** Outside the event loop, every ``_put`` and
``_put_fanout`` (a task message, a task-sent or worker event) builds a new
``redis.Redis`` client on the channel's connection pool and drops it: in redis-py
8 the constructor fills a table of ~200 response callbacks, which our profiles
put at 7-9 % of a publishing API process (py-spy, bench figure c). A client on a
pool holds no connection of its own and is thread-safe, so the channel keeps one
per pool and builds a new one only when the pool is replaced (a reconnect). On a
closed channel it raises a connection error, not kombu's AttributeError: a job that
ends just after Redis went away tries to requeue its message there, and Celery
exits on the AttributeError (seen once in the Redis-restart chaos test).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import redis
from kombu.transport import redis as kombu_redis

log = logging.getLogger("dspy_fleet.worker")


def install() -> None:
    """Apply both patches (idempotent)."""
    _guard_restore_unacked()
    _reuse_sync_client()


def _guard_restore_unacked() -> None:
    original = kombu_redis.QoS.restore_unacked
    if getattr(original, "_dspy_fleet_guard", False):
        return

    @functools.wraps(original)
    def restore_unacked(self: Any, client: Any = None) -> Any:
        try:
            return original(self, client)
        except AttributeError as exc:
            log.warning(
                "could not requeue unacknowledged messages while the broker connection "
                "closed (%s); they return after the visibility timeout",
                exc,
            )
            return None

    restore_unacked._dspy_fleet_guard = True  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked


def _reuse_sync_client() -> None:
    original = kombu_redis.Channel._create_client
    if getattr(original, "_dspy_fleet_reuse", False):
        return

    @functools.wraps(original)
    def _create_client(self: Any, asynchronous: bool = False) -> Any:
        if asynchronous:
            return original(self, asynchronous=True)
        if self._pool is None and self.connection is None:
            # A closed channel (the broker connection dropped): kombu would fail with
            # AttributeError, which Celery calls unrecoverable and exits on. As a
            # connection error, a late ack or requeue of a running job is logged and
            # the message comes back after the visibility timeout.
            raise redis.ConnectionError("the broker channel is closed")
        pool = self.pool
        cached = self.__dict__.get("_dspy_fleet_client")
        if cached is not None and cached.connection_pool is pool:
            return cached
        client = original(self, asynchronous=False)
        self.__dict__["_dspy_fleet_client"] = client
        return client

    _create_client._dspy_fleet_reuse = True  # type: ignore[attr-defined]
    kombu_redis.Channel._create_client = _create_client
