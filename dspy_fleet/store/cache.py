"""The prediction cache: L1 in-process TTL LRU, L2 Redis with TTL, and fleet-wide coalescing.

A cache failure is a miss (logged and counted), never an error for the caller.
Coalescing: one caller per key (the leader) holds a Redis lock, renewed while it
computes by one renewer thread per process; the others wait for its entry.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from cachetools import TLRUCache
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from dspy_fleet.errors import JobTimeoutError

log = logging.getLogger("dspy_fleet.cache")

# Counts one cache operation: (level "l1"|"l2", operation "hit"|"miss"|"set"|"error").
# Handed in by the process that owns the metric, so importing this module registers none.
CountOp = Callable[[str, str], None]


@functools.cache
def operations_counter(registry: CollectorRegistry = REGISTRY) -> Counter:
    """This process's ``dspy_cache_operations_total{level,operation}`` (SPEC §4) in
    ``registry``, created on first call. Both processes count cache operations (the API's
    submit fast path reads L2), so the metric is defined once here and registered once per
    registry, even in a process that loads both the API's and the worker's metrics (tests).
    Importing this module registers nothing."""
    return Counter(
        "dspy_cache_operations_total",
        "Cache hits, misses, sets and errors.",
        ["level", "operation"],
        registry=registry,
    )


def _count_nothing(level: str, operation: str) -> None:
    """The default CountOp: count nothing (unit tests, producers)."""


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

# Extend each lock that still holds our token, all in one round trip. KEYS: locks.
# ARGV: lock ms, then one token per key. Returns one flag per key: 1 extended, 0 lost.
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""

_FOUND, _LEAD, _FOLLOW = 1, 2, 0


def l2_key(key: str) -> str:
    """The Redis key of a cache entry."""
    return L2_PREFIX + key


def read_l2(
    client: redis.Redis, key: str, count: CountOp = _count_nothing
) -> dict[str, Any] | None:
    """One L2 lookup (used by the API's fast path too); errors are misses."""
    try:
        raw = client.get(l2_key(key))
    except redis.RedisError as exc:
        count("l2", "error")
        log.warning("L2 cache read failed; treating as a miss: %s", exc)
        return None
    if raw is None:
        count("l2", "miss")
        return None
    entry = parse_l2(raw, count)
    if entry is not None:
        count("l2", "hit")
    return entry


def parse_l2(raw: str | bytes, count: CountOp = _count_nothing) -> dict[str, Any] | None:
    """A stored L2 entry; None (counted as an error) unless it is a JSON object with outputs."""
    try:
        entry = json.loads(raw)
    except ValueError:
        entry = None
    if isinstance(entry, dict) and "outputs" in entry:
        return entry
    count("l2", "error")
    log.warning("corrupt L2 cache entry ignored", extra={"cache": "error"})
    return None


class LockRenewer:
    """Keeps alive every coalescing lock this process leads: one daemon thread, one round trip.

    Each round (every ``lock_seconds / 3``) extends all held locks that still carry
    our token, in one Lua call, so a leader's lock lives exactly as long as its call
    and the cost does not grow with the number of calls in flight (no thread per
    call). A lock held longer than ``max_hold`` is no longer renewed: that leader is
    stuck (see PredictionCache.get_or_compute), and the lock lapses so one follower
    can take over. When the process dies the thread dies with it and every lock it
    led lapses within ``lock_seconds``.
    """

    def __init__(self, client: redis.Redis, *, lock_seconds: float, max_hold: float) -> None:
        self.client = client
        self.lock_ms = max(1, int(lock_seconds * 1000))
        self.interval = lock_seconds / 3
        self.max_hold = max_hold
        self._renew = client.register_script(_RENEW)
        self._cond = threading.Condition()
        # lock key -> (token, monotonic time after which it is no longer renewed)
        self._held: dict[str, tuple[str, float]] = {}
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._closed = False

    def hold(self, lock_key: str, token: str) -> None:
        """Renew ``lock_key`` while it carries ``token``, until release() or max_hold."""
        with self._cond:
            if self._closed:
                return
            self._ensure_thread()
            if not self._held:
                self._cond.notify()  # wake the idle thread; a busy one keeps its rhythm
            self._held[lock_key] = (token, time.monotonic() + self.max_hold)

    def release(self, lock_key: str, token: str) -> None:
        """Stop renewing ``lock_key`` (the leader stored its entry or failed)."""
        with self._cond:
            if self._held.get(lock_key, ("",))[0] == token:
                del self._held[lock_key]

    def held(self) -> dict[str, str]:
        """The locks being renewed now, key -> token (for tests and debugging)."""
        with self._cond:
            return {k: t for k, (t, _) in self._held.items()}

    def close(self) -> None:
        """Stop the thread and renew nothing more, for good (the locks then lapse by TTL)."""
        with self._cond:
            self._closed = True
            self._held.clear()
            self._cond.notify()

    def _ensure_thread(self) -> None:
        # Started on first use, and again in a forked child: a thread of the parent
        # does not exist there, and the parent's locks are not the child's.
        if self._thread is not None and self._pid == os.getpid():
            return
        self._held.clear()
        self._pid = os.getpid()
        self._thread = threading.Thread(
            target=self._run, name="dspy-fleet-lock-renewer", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._held and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                # Sleep a full interval after the first hold: a fresh lock has a full TTL.
                self._cond.wait(self.interval)
                if self._closed:
                    return
            self.renew_once()

    def renew_once(self) -> int:
        """One round: drop locks past max_hold, extend the rest; returns how many were extended."""
        now = time.monotonic()
        with self._cond:
            stuck = [k for k, (_, until) in self._held.items() if now > until]
            for key in stuck:
                del self._held[key]
            held = list(self._held.items())
        for key in stuck:
            log.warning(
                "a coalesced call ran past %.0f s; no longer renewing its lock, so another "
                "caller takes over when it lapses", self.max_hold, extra={"cache_lock": key},
            )  # fmt: skip
        if not held:
            return 0
        keys = [k for k, _ in held]
        try:
            flags = self._renew(keys=keys, args=[self.lock_ms, *(t for _, (t, _u) in held)])
        except redis.RedisError as exc:
            # Weather: try again next round; a lock that lapses meanwhile lets one follower in.
            log.warning("could not renew coalescing locks: %s", exc)
            return 0
        lost = 0
        with self._cond:
            for (key, (token, _u)), flag in zip(held, flags, strict=True):
                # Still held with that token: not released meanwhile, nor re-held by a new
                # leader of this process (whose token the round did not carry).
                if not int(flag) and self._held.get(key, ("",))[0] == token:
                    del self._held[key]
                    lost += 1
        if lost:
            # It lapsed (a renewal came too late) and another caller took it: that one
            # leads now; this leader still finishes, but frees no lock but its own.
            log.warning("lost %d coalescing lock(s) to another caller", lost)
        return sum(int(flag) for flag in flags)


class PredictionCache:
    """Two cache levels plus coalescing of concurrent identical requests."""

    def __init__(self, client: redis.Redis, *, l1_max_entries: int, l1_ttl: float,
                 lock_seconds: float, max_wait: float,
                 count: CountOp = _count_nothing) -> None:  # fmt: skip
        self.client = client
        self.count = count
        self.l1_ttl = l1_ttl
        self.lock_seconds = lock_seconds
        self.max_wait = max_wait
        # Each entry carries its own expiry time, so cache_ttl per request holds in L1 too.
        self._l1: TLRUCache[str, tuple[dict[str, Any], float]] = TLRUCache(
            maxsize=l1_max_entries, ttu=lambda _k, value, now: now + value[1]
        )
        self._l1_lock = threading.Lock()
        self._lookup_or_lead = client.register_script(_LOOKUP_OR_LEAD)
        self._store_and_release = client.register_script(_STORE_AND_RELEASE)
        self._release = client.register_script(_RELEASE)
        self.renewer = LockRenewer(client, lock_seconds=lock_seconds, max_hold=max_wait)

    # --- lookups ---------------------------------------------------------------------------
    def _get_l1(self, key: str) -> dict[str, Any] | None:
        with self._l1_lock:
            found = self._l1.get(key)
        self.count("l1", "miss" if found is None else "hit")
        return None if found is None else found[0]

    def set(self, key: str, entry: dict[str, Any], ttl: int) -> None:
        """Store in both levels; an L2 failure is logged and counted, not raised."""
        self._set_l1(key, entry, min(self.l1_ttl, ttl))
        try:
            self.client.set(l2_key(key), _dumps(entry), ex=ttl)
            self.count("l2", "set")
        except redis.RedisError as exc:
            self.count("l2", "error")
            log.warning("L2 cache write failed: %s", exc)

    def _set_l1(self, key: str, entry: dict[str, Any], ttl: float) -> None:
        if not self._l1.maxsize:
            return  # L1 off (DSPY_FLEET_L1_CACHE_ENTRIES=0): cachetools would raise
        with self._l1_lock:
            self._l1[key] = (entry, ttl)
        self.count("l1", "set")

    def close(self) -> None:
        """Stop renewing locks (the process is going away; they lapse by TTL)."""
        self.renewer.close()

    # --- coalescing ------------------------------------------------------------------------
    def get_or_compute(
        self, key: str, ttl: int, owner: str, compute: Callable[[], dict[str, Any]]
    ) -> tuple[dict[str, Any], str]:
        """The entry and where it came from: "l1", "l2", "coalesced" or "computed".

        Of many concurrent callers with one key, across the fleet, one (the
        leader, holding a Redis lock) computes; the others (followers) wait for
        its entry as long as the lock lives. The leader's lock lives as long as
        its call: this process's renewer extends it every ``lock_seconds / 3``.
        A leader that fails frees the lock at once; one that dies stops renewing,
        so its lock lapses within ``lock_seconds``. Either way exactly one
        follower takes the lock (SET NX, in the lookup script) and computes; the
        others keep waiting, for its entry now. Followers never call the model
        without the lock, except when Redis itself fails (no lock service means
        no coalescing, not no answer).

        A stuck leader is a live process whose call never returns: a connection
        hung past the model timeout, a deadlock in a program. Its renewer would
        keep the lock forever, so the lock is renewed for at most ``max_wait``
        (the job's time limit: a call longer than that is stuck by definition,
        and Celery's prefork pool would have killed it; the threads pool does
        not), then lapses and one follower takes over. A follower waits at most
        ``max_wait`` in all, then fails with ``job_timeout``, as its own time
        limit would make it; it never falls back to calling the model unlocked.
        Round trips for a miss: one to look up and take the lock, one to store
        and release it; a follower polls with the lookup script (10 → 100 ms).
        """
        entry = self._get_l1(key)
        if entry is not None:
            return entry, "l1"
        # A token of our own per call: a paused leader whose lock lapsed and was taken
        # by another delivery of the same job can neither renew nor free the new one's.
        token = f"{owner}:{secrets.token_hex(6)}"
        deadline = time.monotonic() + self.max_wait
        pause = 0.01
        first = True
        while True:
            found, role = self._lookup(key, token, first)
            if found is not None:
                self._set_l1(key, found, min(self.l1_ttl, ttl))
                return found, "l2" if first else "coalesced"
            first = False
            if role == _LEAD:
                return self._lead(key, ttl, token, compute), "computed"
            if role is None:
                # No lock service (Redis down) means no coalescing, not no answer.
                entry = compute()
                self.set(key, entry, ttl)
                return entry, "computed"
            if time.monotonic() > deadline:
                raise JobTimeoutError(
                    f"an identical request has been computing for over {self.max_wait:.0f} s",
                    details={"coalesced": True},
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.1)

    def _lead(
        self, key: str, ttl: int, token: str, compute: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        lock_key = LOCK_PREFIX + key
        self.renewer.hold(lock_key, token)
        try:
            try:
                entry = compute()
            except BaseException:
                self._release_lock(key, token)
                raise
            self._store(key, entry, ttl, token)
            return entry
        finally:
            self.renewer.release(lock_key, token)

    def _lookup(
        self, key: str, owner: str, first: bool
    ) -> tuple[dict[str, Any] | None, int | None]:
        """(entry, None) when L2 has it; else (None, _LEAD, _FOLLOW, or None: Redis failed)."""
        try:
            reply = self._lookup_or_lead(keys=[l2_key(key), LOCK_PREFIX + key],
                                         args=[owner, int(self.lock_seconds * 1000)])  # fmt: skip
        except redis.RedisError as exc:
            self.count("l2", "error")
            log.warning("L2 cache and coalescing lock unavailable; calling the model: %s", exc)
            return None, None
        if int(reply[0]) == _FOUND:
            entry = parse_l2(reply[1], self.count)
            if entry is not None:
                self.count("l2", "hit")
                return entry, None
            # A corrupt entry (counted by parse_l2) is a miss; the leader overwrites it.
            return None, self._acquire(key, owner)
        if first:
            self.count("l2", "miss")
        return None, int(reply[0])

    def _store(self, key: str, entry: dict[str, Any], ttl: int, owner: str) -> None:
        self._set_l1(key, entry, min(self.l1_ttl, ttl))
        try:
            self._store_and_release(keys=[l2_key(key), LOCK_PREFIX + key],
                                    args=[_dumps(entry), ttl, owner])  # fmt: skip
            self.count("l2", "set")
        except redis.RedisError as exc:
            self.count("l2", "error")
            log.warning("L2 cache write failed (the lock expires by itself): %s", exc)

    def _acquire(self, key: str, owner: str) -> int | None:
        """_LEAD if we took the lock, _FOLLOW if another caller holds it, None: Redis failed."""
        try:
            taken = self.client.set(LOCK_PREFIX + key, owner, nx=True,
                                    px=int(self.lock_seconds * 1000))  # fmt: skip
        except redis.RedisError as exc:
            log.warning("coalescing lock unavailable: %s", exc)
            return None  # no lock service: compute, as when the lookup fails
        return _LEAD if taken else _FOLLOW

    def _release_lock(self, key: str, owner: str) -> None:
        """Free the lock after a failed compute, so a follower takes over at once."""
        try:
            self._release(keys=[LOCK_PREFIX + key], args=[owner])
        except redis.RedisError as exc:
            log.warning("could not release coalescing lock (it expires by itself): %s", exc)


def _dumps(entry: dict[str, Any]) -> str:
    return json.dumps(entry, separators=(",", ":"))
