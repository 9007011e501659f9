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

# The entry if L2 has it; else take the coalescing lock if it is free. One atomic
# step, so no leader can store the entry and release the lock between our miss and
# our acquire. KEYS: entry, lock. ARGV: owner, lock ms. Returns {1, entry}, {2}
# (we lead) or {0} (another caller leads: wait for its entry).
_LOOKUP_OR_LEAD = """
local hit = redis.call('GET', KEYS[1])
if hit then return {1, hit} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {0}
"""

# Store the entry, then free the lock if we still own it (a leader that overran
# its lock TTL must not free the next leader's). The entry is in before the lock
# is gone: a follower that takes the lock next finds it, and calls no model.
# KEYS: entry, lock. ARGV: entry JSON, ttl s, owner.
_STORE_AND_RELEASE = """
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then redis.call('DEL', KEYS[2]) end
return 1
"""

# Free the lock only if we still own it (after a failed compute). KEYS: lock. ARGV: owner.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_FOUND, _LEAD, _FOLLOW = 1, 2, 0


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
        self._lookup_or_lead = client.register_script(_LOOKUP_OR_LEAD)
        self._store_and_release = client.register_script(_STORE_AND_RELEASE)
        self._release = client.register_script(_RELEASE)

    # --- lookups ---------------------------------------------------------------------------
    def _get_l1(self, key: str) -> dict[str, Any] | None:
        with self._l1_lock:
            found = self._l1.get(key)
        metrics.CACHE_OPERATIONS.labels("l1", "miss" if found is None else "hit").inc()
        return None if found is None else found[0]

    def set(self, key: str, entry: dict[str, Any], ttl: int) -> None:
        """Store in both levels; an L2 failure is logged and counted, not raised."""
        self._set_l1(key, entry, min(self.l1_ttl, ttl))
        try:
            self.client.set(l2_key(key), _dumps(entry), ex=ttl)
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
        follower never waits much longer than ``lock_seconds``. Round trips for a
        miss: one to look up and take the lock, one to store and release it.
        """
        entry = self._get_l1(key)
        if entry is not None:
            return entry, "l1"
        deadline = time.monotonic() + self.lock_seconds
        pause = 0.01
        first = True
        while True:
            found, role = self._lookup(key, owner, first)
            if found is not None:
                self._set_l1(key, found, min(self.l1_ttl, ttl))
                return found, "l2" if first else "coalesced"
            first = False
            if role == _LEAD:
                try:
                    entry = compute()
                except BaseException:
                    self._release_lock(key, owner)
                    raise
                self._store(key, entry, ttl, owner)
                return entry, "computed"
            if role is None or time.monotonic() > deadline:
                # No lock service (Redis down) means no coalescing, not no answer.
                if role is not None:
                    log.warning("waited too long for a coalesced result; calling the model")
                entry = compute()
                self.set(key, entry, ttl)
                return entry, "computed"
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _lookup(
        self, key: str, owner: str, first: bool
    ) -> tuple[dict[str, Any] | None, int | None]:
        """(entry, None) when L2 has it; else (None, _LEAD, _FOLLOW, or None: Redis failed)."""
        try:
            reply = self._lookup_or_lead(keys=[l2_key(key), LOCK_PREFIX + key],
                                         args=[owner, int(self.lock_seconds * 1000)])  # fmt: skip
        except redis.RedisError as exc:
            count_l2("error")
            log.warning("L2 cache and coalescing lock unavailable; calling the model: %s", exc)
            return None, None
        if int(reply[0]) == _FOUND:
            entry = parse_l2(reply[1])
            if entry is not None:
                count_l2("hit")
                return entry, None
            # A corrupt entry (counted by parse_l2) is a miss; the leader overwrites it.
            return None, _LEAD if self._acquire(key, owner) else _FOLLOW
        if first:
            count_l2("miss")
        return None, int(reply[0])

    def _store(self, key: str, entry: dict[str, Any], ttl: int, owner: str) -> None:
        self._set_l1(key, entry, min(self.l1_ttl, ttl))
        try:
            self._store_and_release(keys=[l2_key(key), LOCK_PREFIX + key],
                                    args=[_dumps(entry), ttl, owner])  # fmt: skip
            count_l2("set")
        except redis.RedisError as exc:
            count_l2("error")
            log.warning("L2 cache write failed (the lock expires by itself): %s", exc)

    def _acquire(self, key: str, owner: str) -> bool:
        try:
            return bool(self.client.set(LOCK_PREFIX + key, owner, nx=True,
                                        px=int(self.lock_seconds * 1000)))  # fmt: skip
        except redis.RedisError as exc:
            log.warning("coalescing lock unavailable: %s", exc)
            return True  # no lock service: compute, as when the lookup fails

    def _release_lock(self, key: str, owner: str) -> None:
        """Free the lock after a failed compute, so a follower takes over at once."""
        try:
            self._release(keys=[LOCK_PREFIX + key], args=[owner])
        except redis.RedisError as exc:
            log.warning("could not release coalescing lock (it expires by itself): %s", exc)


def _dumps(entry: dict[str, Any]) -> str:
    return json.dumps(entry, separators=(",", ":"))
