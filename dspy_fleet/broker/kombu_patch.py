"""Three patches to kombu 5.7's Redis transport: two defects, one hot spot.

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

**Redis refusing writes.** A consumer takes a message with BRPOP, then records it
in the ``unacked`` hash (ZADD + HSET). A Redis at ``maxmemory`` (noeviction) serves
the BRPOP but refuses the record (OOM), and kombu raised out of the event loop:
the message, already off its queue and not in ``unacked``, was lost, and Celery
called the error unrecoverable and the worker exited (the whole fleet at once,
seen in issue 13's reproduction). Now the record is retried until Redis takes it
(the consumer waits rather than taking more messages), so the message is never
only in memory for longer than Redis refuses writes. An ack, or the requeue of a
message a job hands back, that Redis refuses (OOM, READONLY after a failover) is
logged instead of raised out of the event loop: both are atomic, so the message
stays in ``unacked`` and comes back after the visibility timeout.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

log = logging.getLogger("dspy_fleet.worker")


# The consumer's wait between attempts to record a message Redis refused: short at
# first (a blip), then capped so an outage costs one command a second.
_APPEND_BACKOFF_START = 0.05
_APPEND_BACKOFF_MAX = 1.0


def install() -> None:
    """Apply the three patches (idempotent)."""
    _guard_restore_unacked()
    _reuse_sync_client()
    _survive_refused_writes()


def _guard_restore_unacked() -> None:
    original = kombu_redis.QoS.restore_unacked
    if getattr(original, "_dspy_fleet_guard", False):
        return

    @functools.wraps(original)
    def restore_unacked(self: Any, client: Any = None) -> Any:
        try:
            return original(self, client)
        except (AttributeError, redis.RedisError) as exc:
            # A Redis that refuses the requeue (OOM, READONLY, gone) aborts its transaction
            # whole: the messages stay in the unacked hash, nothing is lost.
            log.warning(
                "could not requeue unacknowledged messages while the broker connection "
                "closed (%s); they return after the visibility timeout",
                exc,
            )
            return None

    restore_unacked._dspy_fleet_guard = True  # type: ignore[attr-defined]
    kombu_redis.QoS.restore_unacked = restore_unacked  # type: ignore[method-assign]


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
    kombu_redis.Channel._create_client = _create_client  # type: ignore[method-assign]


def _survive_refused_writes() -> None:
    qos = kombu_redis.QoS
    if getattr(qos.append, "_dspy_fleet_survive", False):
        return
    append, ack, reject = qos.append, qos.ack, qos.reject

    @functools.wraps(append)
    def append_until_recorded(self: Any, message: Any, delivery_tag: str) -> Any:
        wait = _APPEND_BACKOFF_START
        refused_since: float | None = None
        while True:
            try:
                result = append(self, message, delivery_tag)
            except redis.RedisError as exc:
                if _shutting_down():
                    # Last resort: its job record keeps a copy of the message, and the
                    # workers' recovery sweep publishes a queued job nobody holds.
                    log.error(
                        "worker stopping while Redis refuses to record message %s "
                        "(%s); the recovery sweep republishes its job",
                        delivery_tag,
                        exc,
                    )
                    raise
                if refused_since is None:
                    refused_since = time.monotonic()
                    log.warning(
                        "Redis refused to record a message just taken (%s); "
                        "holding it and retrying until Redis accepts writes",
                        exc,
                    )
                time.sleep(wait)
                wait = min(wait * 2, _APPEND_BACKOFF_MAX)
                continue
            if refused_since is not None:
                log.warning(
                    "message recorded after Redis refused writes for %.1f s",
                    time.monotonic() - refused_since,
                )
            return result

    @functools.wraps(ack)
    def ack_or_leave(self: Any, delivery_tag: str) -> Any:
        try:
            return ack(self, delivery_tag)
        except redis.ResponseError as exc:
            _left_unacked("ack", delivery_tag, exc)
            virtual.QoS.ack(self, delivery_tag)  # free this consumer's prefetch slot
            return None

    @functools.wraps(reject)
    def reject_or_leave(self: Any, delivery_tag: str, requeue: bool = False) -> Any:
        try:
            return reject(self, delivery_tag, requeue=requeue)
        except redis.ResponseError as exc:
            _left_unacked("requeue" if requeue else "reject", delivery_tag, exc)
            virtual.QoS.ack(self, delivery_tag)
            return None

    append_until_recorded._dspy_fleet_survive = True  # type: ignore[attr-defined]
    qos.append = append_until_recorded  # type: ignore[method-assign]
    qos.ack = ack_or_leave  # type: ignore[method-assign]
    qos.reject = reject_or_leave  # type: ignore[method-assign]


def _left_unacked(what: str, delivery_tag: str, exc: Exception) -> None:
    # Connection errors are Celery's to log (ack_log_error); a refusal (OOM, READONLY)
    # would otherwise escape the event loop. The message's transaction did not apply.
    log.warning(
        "Redis refused the %s of message %s (%s); it stays unacknowledged and "
        "is delivered again after the visibility timeout",
        what,
        delivery_tag,
        exc,
    )


def _shutting_down() -> bool:
    # Celery's signal handlers set these on a warm or cold shutdown.
    from celery.worker import state

    return bool(state.should_stop or state.should_terminate)
