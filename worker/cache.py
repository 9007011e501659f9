"""The prediction cache: L1 in-process TTL LRU, L2 Redis with TTL, and fleet-wide coalescing.

A cache failure is a miss (logged and counted), never an error for the caller.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from cachetools import TLRUCache

from worker import metrics

log = logging.getLogger("dspy_fleet.cache")

L2_PREFIX = "dspy_fleet:cache:"
LOCK_PREFIX = "dspy_fleet:cache_lock:"

# Delete the lock only if we still own it: a leader that overran its lock TTL
# must not free the lock of the next leader.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def l2_key(key: str) -> str:
    """The Redis key of a cache entry."""
    return L2_PREFIX + key


def read_l2(client: redis.Redis, key: str) -> dict[str, Any] | None:
    """One L2 lookup (used by the API's fast path too); errors are misses."""
    try:
        raw = client.get(l2_key(key))
    except redis.RedisError as exc:
        count_l2("error")
        log.warning("L2 cache read failed; treating as a miss: %s", exc)
        return None
    if raw is None:
        count_l2("miss")
        return None
    entry = parse_l2(raw)
    if entry is not None:
        count_l2("hit")
    return entry


def parse_l2(raw: str | bytes) -> dict[str, Any] | None:
    """A stored L2 entry; None (counted as an error) unless it is a JSON object with outputs."""
    try:
        entry = json.loads(raw)
    except ValueError:
        entry = None
    if isinstance(entry, dict) and "outputs" in entry:
        return entry
    count_l2("error")
    log.warning("corrupt L2 cache entry ignored", extra={"cache": "error"})
    return None


def count_l2(operation: str) -> None:
    """Count one L2 operation: hit, miss, set or error."""
    metrics.CACHE_OPERATIONS.labels("l2", operation).inc()


class PredictionCache:
    """Two cache levels plus coalescing of concurrent identical requests."""

    def __init__(self, client: redis.Redis, *, l1_max_entries: int, l1_ttl: float,
                 lock_seconds: float) -> None:  # fmt: skip
        self.client = client
        self.l1_ttl = l1_ttl
        self.lock_seconds = lock_seconds
        # Each entry carries its own expiry time, so cache_ttl per request holds in L1 too.
        self._l1: TLRUCache[str, tuple[dict[str, Any], float]] = TLRUCache(
            maxsize=l1_max_entries, ttu=lambda _k, value, now: now + value[1]
        )
        self._l1_lock = threading.Lock()
        self._release = client.register_script(_RELEASE)

    # --- lookups ---------------------------------------------------------------------------
    def get(self, key: str) -> tuple[dict[str, Any] | None, str | None]:
        """(entry, level) from L1, else L2 (then kept in L1); (None, None) on a miss."""
        with self._l1_lock:
            found = self._l1.get(key)
        if found is not None:
            metrics.CACHE_OPERATIONS.labels("l1", "hit").inc()
            return found[0], "l1"
        metrics.CACHE_OPERATIONS.labels("l1", "miss").inc()
        entry = read_l2(self.client, key)
        if entry is None:
            return None, None
        self._set_l1(key, entry, self.l1_ttl)
        return entry, "l2"

    def set(self, key: str, entry: dict[str, Any], ttl: int) -> None:
        """Store in both levels; an L2 failure is logged and counted, not raised."""
        self._set_l1(key, entry, min(self.l1_ttl, ttl))
        try:
            self.client.set(l2_key(key), json.dumps(entry, separators=(",", ":")), ex=ttl)
            count_l2("set")
        except redis.RedisError as exc:
            count_l2("error")
            log.warning("L2 cache write failed: %s", exc)

    def _set_l1(self, key: str, entry: dict[str, Any], ttl: float) -> None:
        with self._l1_lock:
            self._l1[key] = (entry, ttl)
        metrics.CACHE_OPERATIONS.labels("l1", "set").inc()

    # --- coalescing ------------------------------------------------------------------------
    def get_or_compute(
        self, key: str, ttl: int, owner: str, compute: Callable[[], dict[str, Any]]
    ) -> tuple[dict[str, Any], str]:
        """The entry and where it came from: "l1", "l2", "coalesced" or "computed".

        Of many concurrent callers with one key, across the fleet, one (the
        leader, holding a Redis lock) computes; the others wait for its entry.
        A leader that dies frees the lock by TTL and a follower takes over, so a
        follower never waits much longer than ``lock_seconds``.
        """
        entry, level = self.get(key)
        if entry is not None and level is not None:
            return entry, level
        deadline = time.monotonic() + self.lock_seconds
        pause = 0.01
        while True:
            leader = self._acquire(key, owner)
            if leader:
                # The previous leader may have stored the entry and released the
                # lock between our miss and our acquire: look once more.
                entry = read_l2(self.client, key)
                if entry is not None:
                    self._release_lock(key, owner)
                    self._set_l1(key, entry, min(self.l1_ttl, ttl))
                    return entry, "coalesced"
            if leader is None or leader:
                # No lock service (Redis down) means no coalescing, not no answer.
                try:
                    entry = compute()
                    # Stored before the lock is released: a follower that takes the
                    # lock next must find the entry, not call the model again.
                    self.set(key, entry, ttl)
                finally:
                    if leader:
                        self._release_lock(key, owner)
                return entry, "computed"
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
            entry = read_l2(self.client, key)
            if entry is not None:
                self._set_l1(key, entry, min(self.l1_ttl, ttl))
                return entry, "coalesced"
            if time.monotonic() > deadline:
                log.warning("waited too long for a coalesced result; calling the model")
                entry = compute()
                self.set(key, entry, ttl)
                return entry, "computed"

    def _acquire(self, key: str, owner: str) -> bool | None:
        try:
            return bool(self.client.set(LOCK_PREFIX + key, owner, nx=True,
                                        px=int(self.lock_seconds * 1000)))  # fmt: skip
        except redis.RedisError as exc:
            log.warning("coalescing lock unavailable: %s", exc)
            return None

    def _release_lock(self, key: str, owner: str) -> None:
        try:
            self._release(keys=[LOCK_PREFIX + key], args=[owner])
        except redis.RedisError as exc:
            log.warning("could not release coalescing lock (it expires by itself): %s", exc)
