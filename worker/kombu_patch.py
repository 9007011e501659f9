"""A guard around one kombu 5.7 defect that kills the worker when Redis restarts.

When the broker connection drops, Celery closes it with ``ignore_errors``, and
closing the Redis channel tries to requeue the unacknowledged messages it holds.
By then the connection's client is gone, so kombu raises AttributeError
(``'NoneType' object has no attribute 'hostname'``), which ``ignore_errors`` does
not catch: Celery calls it unrecoverable and the worker exits. Seen in our chaos
test (Redis restarted mid-run). Skipping that best-effort requeue is safe: the
messages stay in Redis's unacked hash and come back after the visibility timeout.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from kombu.transport import redis as kombu_redis

log = logging.getLogger("dspy_fleet.worker")


def install() -> None:
    """Patch kombu's Redis QoS.restore_unacked once (idempotent)."""
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
