"""The program catalog in Redis: workers publish what they loaded, the API reads it.

The API cannot build DSPy programs (it never imports dspy), but it needs their
input fields and state versions to validate requests and compute cache keys.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import redis

CATALOG_KEY = "dspy_fleet:programs"


def publish(client: redis.Redis, catalog: dict[str, dict[str, Any]]) -> None:
    """Record the programs this worker serves (last writer wins, fields are per program)."""
    if catalog:
        client.hset(CATALOG_KEY, mapping={k: json.dumps(v) for k, v in catalog.items()})


class CatalogReader:
    """Reads the catalog with a short in-process TTL, so a hot path costs no round-trip."""

    def __init__(self, client: redis.Redis, ttl_seconds: float) -> None:
        self.client = client
        self.ttl = ttl_seconds
        self._data: dict[str, dict[str, Any]] = {}
        self._loaded_at = -1e9
        self._lock = threading.Lock()

    def all(self) -> dict[str, dict[str, Any]]:
        """Every published program; an unreachable Redis keeps the last known copy."""
        if time.monotonic() - self._loaded_at > self.ttl:
            with self._lock:
                if time.monotonic() - self._loaded_at > self.ttl:
                    try:
                        raw = self.client.hgetall(CATALOG_KEY)
                        self._data = {str(k): json.loads(v) for k, v in raw.items()}
                    except redis.RedisError:
                        pass
                    self._loaded_at = time.monotonic()
        return self._data

    def get(self, program: str) -> dict[str, Any] | None:
        """One program's entry, or None when no worker has published it yet."""
        return self.all().get(program)
