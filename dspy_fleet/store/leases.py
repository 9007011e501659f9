"""Keep the leases of the jobs this process runs alive: one thread, one round trip per beat.

A job's lease (claimed in the job store's start script, dspy_fleet/store/jobs.py) expires
on Redis's clock unless renewed; a lease that lapses means "the owner died", and the next
delivery of the job takes it over. Each worker process runs one renewer thread (not one
per job) that renews every lease it holds every ``lease_seconds / 3`` in one Lua call, and
pushes each job's score in the due-time index to the new expiry. A renewal only counts
while the job's hash still names our token: a lease taken over stays lost (the old owner
is fenced out of finishing by the finish script).
"""

from __future__ import annotations

import logging
import os
import threading

import redis

from dspy_fleet.store.jobs import JOB_EVENT, KEY_PREFIX, LEASE_PREFIX, PENDING_KEY

log = logging.getLogger("dspy_fleet.worker")

# KEYS: pending set, then job hash and lease key per job. ARGV: lease ms, the statuses
# queued and running, then job id and token per job. Returns the ids whose lease was
# taken over (no longer ours).
_RENEW = (
    JOB_EVENT
    + """
local t = redis.call('TIME')
local expiry = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[1]) / 1000
local lost = {}
for i = 2, #KEYS, 2 do
  local id, token = ARGV[i + 2], ARGV[i + 3]
  if redis.call('HGET', KEYS[i], 'lease') == token then
    redis.call('SET', KEYS[i + 1], token, 'PX', ARGV[1])
    -- A sweep that found the lease lapsed may have marked the job for another run; we
    -- still hold it (nobody claimed it since), so it is running again.
    if redis.call('HGET', KEYS[i], 'status') == ARGV[2] then
      redis.call('HSET', KEYS[i], 'status', ARGV[3])
      job_event(KEYS[i], id, true, {'attempts'})
    end
    redis.call('ZADD', KEYS[1], 'XX', expiry, id)
  else
    lost[#lost + 1] = id
  end
end
return lost
"""
)


class LeaseKeeper:
    """The leases this process holds, renewed by one daemon thread while any is held."""

    def __init__(self, client: redis.Redis, lease_seconds: float) -> None:
        self.client = client
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self.interval = lease_seconds / 3
        self._renew = client.register_script(_RENEW)
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def hold(self, job_id: str, token: str) -> None:
        """Renew ``job_id``'s lease (``token``) until :meth:`drop`."""
        with self._lock:
            self._held[job_id] = token
            # A thread does not survive a fork: a prefork child starts its own.
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="dspy-fleet-leases", daemon=True
                )
                self._thread.start()

    def drop(self, job_id: str) -> None:
        """Stop renewing ``job_id``'s lease (the job finished, was handed back, or is lost)."""
        with self._lock:
            self._held.pop(job_id, None)

    def held(self) -> dict[str, str]:
        """The job ids and tokens held now."""
        with self._lock:
            return dict(self._held)

    def renew(self) -> list[str]:
        """Renew every held lease in one round trip; returns the ids taken over by others."""
        held = self.held()
        if not held:
            return []
        keys = [PENDING_KEY]
        args: list[str | int] = [self.lease_ms, "queued", "running"]
        for job_id, token in held.items():
            keys += [KEY_PREFIX + job_id, LEASE_PREFIX + job_id]
            args += [job_id, token]
        lost = [str(j) for j in self._renew(keys=keys, args=args)]
        if lost:
            with self._lock:
                for job_id in lost:
                    if self._held.get(job_id) == held[job_id]:
                        del self._held[job_id]
            log.warning("lost the lease of %d running job(s) to another delivery: %s",
                        len(lost), ", ".join(lost))  # fmt: skip
        return lost

    def _run(self) -> None:
        while not self._wake.wait(self.interval):
            try:
                self.renew()
            except redis.RedisError as exc:
                # Weather: the leases may lapse, and then another delivery takes the jobs
                # over; this owner's writes are fenced out. Keep trying.
                log.warning("could not renew job leases: %s", exc)
