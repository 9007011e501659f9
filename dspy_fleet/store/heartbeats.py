"""Worker liveness in Redis: workers beat, the API's /ready reads who is alive.

A Celery broadcast ping would cost the readiness probe a fixed wait on every
call; a heartbeat key is one cheap round-trip and just as honest.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import redis

log = logging.getLogger(__name__)

WORKERS_KEY = "dspy_fleet:workers"
INFO_PREFIX = "dspy_fleet:worker:"


class Heartbeat:
    """A daemon thread that records this worker as alive every ``interval`` seconds."""

    def __init__(
        self,
        client: redis.Redis,
        hostname: str,
        info: dict[str, Any],
        interval: float,
        on_beat: Callable[[], None] | None = None,
    ) -> None:
        self.client = client
        self.hostname = hostname
        self.info = info
        self.interval = interval
        self.on_beat = on_beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dspy-fleet-heartbeat", daemon=True)

    def start(self) -> None:
        """Beat once now (so /ready turns green at once), then keep beating."""
        self.beat()
        self._thread.start()

    def beat(self) -> None:
        """Record one beat; a Redis outage (or any error of ``on_beat``) is logged, never
        fatal: a dead heartbeat thread would keep /ready at 503 after the outage ended."""
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(WORKERS_KEY, {self.hostname: time.time()})
            pipe.set(
                INFO_PREFIX + self.hostname, json.dumps(self.info), ex=int(self.interval * 3) + 1
            )
            pipe.execute()
            if self.on_beat is not None:
                self.on_beat()
        except Exception as exc:  # the thread must outlive every outage, whatever it raises
            log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        """Stop beating and leave the live set, so /ready notices a clean shutdown at once."""
        self._stop.set()
        try:
            self.client.zrem(WORKERS_KEY, self.hostname)
            self.client.delete(INFO_PREFIX + self.hostname)
        except redis.RedisError:
            pass

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()


def live_workers(client: redis.Redis, max_age: float) -> list[dict[str, Any]]:
    """Workers that beat within ``max_age`` seconds, with what they reported."""
    cutoff = time.time() - max_age
    # decode_responses=True: members are str.
    names = cast(list[str], client.zrangebyscore(WORKERS_KEY, cutoff, "+inf"))
    if not names:
        return []
    infos = client.mget([INFO_PREFIX + n for n in names])
    return [
        {"hostname": n, **json.loads(i)} for n, i in zip(names, infos, strict=True) if i is not None
    ]
