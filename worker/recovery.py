"""The due sweep: every job that has not finished ends, whatever was lost on the way.

Every accepted job sits in the due-time index (``dspy_fleet:pending``, a sorted set on
Redis's clock) until it finishes, scored by the next time someone must look at it:

- ``queued``: accepted (or published) + ``RECOVERY_AFTER_SECONDS``: does the broker still
  hold its message (dspy_fleet/broker/backends.py, ``Broker.held``)? With Redis, not by
  scanning the queue: the queue is FIFO, so if the oldest message still waiting there was
  published after this job's, this job's message should have been consumed, and then only
  a worker holding it unacknowledged holds it. With RabbitMQ, a message whose publish was
  confirmed is held (RabbitMQ redelivers it itself if its consumer dies), however long it
  waits. If the broker does not hold it (and the job is not claimed, on two looks in a
  row, so a message caught mid-handover is never counted), the message was lost — an API
  that died before publishing, a publish refused during a broker outage, a worker killed
  between kombu's pop and its unacked record — and is published again. Otherwise it is
  looked at again later.
- ``retrying``: the retry's due time (retries are scheduled here, not as Celery countdown
  messages): published then.
- ``throttled``: its turn at its model's provider limit (dspy_fleet/store/pacing.py):
  published then, a little early; the worker that takes it waits out the rest.
- ``running``: its lease's expiry (renewed while its worker lives). A lapsed lease means
  the owner died: the job is published again, and the next delivery takes it over.

Each worker sweeps every ``SWEEP_SECONDS`` with no global lock: one Lua script takes up
to ``BATCH`` due entries and pushes their scores a little into the future, atomically,
so two sweepers never take the same one. No cap on the backlog, no give-up threshold.
Publishing twice is harmless: a job is claimed under one lease, and finishes and bills once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import redis

from dspy_fleet.broker.backends import PUBLISHED_FIELD, Broker, Waiting
from dspy_fleet.contract import TERMINAL_STATUSES
from dspy_fleet.store.jobs import JOB_EVENT, KEY_PREFIX, LEASE_PREFIX, PENDING_KEY

log = logging.getLogger("dspy_fleet.recovery")

SWEEP_SECONDS = 0.5
BATCH = 500  # entries taken per script call; a sweep calls it until nothing is due
HOLD_SECONDS = 10.0  # a taken entry's score meanwhile: if its sweeper dies, looked at again
CONFIRM_SECONDS = 1.0  # a suspect is looked at again this soon, before it is republished

Publish = Callable[[str, dict[str, Any], str, str | None], None]

_LUA_TERMINAL = (
    "local TERMINAL = {" + ", ".join(f"{s} = true" for s in sorted(TERMINAL_STATUSES)) + "}\n"
)

# Take up to ARGV[1] due jobs. Those whose next step needs no look at the broker happen
# here, atomically with the take: ended or expired → out of the index; running under a
# live lease → re-scored to its expiry; retrying (due) or running with a lapsed lease →
# status queued (an event in the job's log), to be published by the caller. Queued jobs
# are re-scored ARGV[2] seconds ahead and returned for the watermark check.
# Going back to queued for a new publish clears the broker's "published" mark (AMQP).
# KEYS: pending set. ARGV: limit, hold s, recovery_after s, job prefix, lease prefix,
# the statuses queued, running, retrying and throttled, the published field.
# Returns {now, {id, kind, message, queue, request_id, enqueued_at, suspect}...}.
_TAKE = (
    _LUA_TERMINAL
    + JOB_EVENT
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
local out = {string.format('%.6f', now)}
for _, id in ipairs(due) do
  local job = ARGV[4] .. id
  local lease = ARGV[5] .. id
  local f = redis.call('HMGET', job, 'status', 'message', 'queue', 'request_id',
                       'enqueued_at', 'suspect')
  local status = f[1]
  if not status or TERMINAL[status] then
    redis.call('ZREM', KEYS[1], id)
  elseif status == ARGV[7] and redis.call('EXISTS', lease) == 1 then
    redis.call('ZADD', KEYS[1], now + redis.call('PTTL', lease) / 1000, id)
  elseif not f[2] then
    -- No copy of the message (a raw send_task job): the broker's redelivery is all there is.
    redis.call('ZREM', KEYS[1], id)
  elseif status == ARGV[6] and f[5] and tonumber(f[5]) + tonumber(ARGV[3]) > now then
    -- Accepted by a creator with a shorter (or no) recovery_after: not due by ours yet.
    redis.call('ZADD', KEYS[1], tonumber(f[5]) + tonumber(ARGV[3]), id)
  elseif status == ARGV[6] then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), id)
    out[#out + 1] = {id, ARGV[6], f[2], f[3] or false, f[4] or false, f[5] or false,
                     f[6] or false}
  elseif status == ARGV[8] or status == ARGV[7] or status == ARGV[9] then
    local kind = 'takeover'
    if status == ARGV[8] then kind = 'retry' elseif status == ARGV[9] then kind = 'throttle' end
    redis.call('HSET', job, 'status', ARGV[6], 'enqueued_at', string.format('%.6f', now))
    redis.call('HDEL', job, 'suspect', ARGV[10])
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), id)
    job_event(job, id, true)
    out[#out + 1] = {id, kind, f[2], f[3] or false, f[4] or false, false, false}
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return out
"""
)

# Republish a queued job seen lost twice: only if it is still queued (not claimed since).
# KEYS: job, pending set. ARGV: job id, recovery_after s, the status queued.
# Returns the message, or nil.
_REQUEUE = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[3] then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[1], 'enqueued_at', string.format('%.6f', now))
redis.call('HDEL', KEYS[1], 'suspect')
redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[2]), ARGV[1])
return redis.call('HGET', KEYS[1], 'message')
"""


class Due(NamedTuple):
    """A due job the sweep took."""

    job_id: str
    kind: str  # "queued", "retry", "throttle" or "takeover"
    message: str
    queue: str
    request_id: str | None
    enqueued_at: float | None
    suspect: bool


class Sweeper:
    """The due sweep of one worker process."""

    def __init__(
        self, client: redis.Redis, publish: Publish, *, recovery_after: float, broker: Broker
    ) -> None:
        """``client``: the job store's Redis; ``broker`` answers "does the broker still
        hold this job's message?" (dspy_fleet/broker/backends.py)."""
        self.client = client
        self.broker = broker
        self.publish = publish
        self.recovery_after = recovery_after
        self._take = client.register_script(_TAKE)
        self._requeue = client.register_script(_REQUEUE)

    def sweep(self) -> list[str]:
        """Handle every job due now; returns the ids published again."""
        published: list[str] = []
        while True:
            now, due = self._take_due()
            published += self._handle(now, due)
            if len(due) < BATCH:
                return published

    def _take_due(self) -> tuple[float, list[Due]]:
        reply = self._take(
            keys=[PENDING_KEY],
            args=[
                BATCH,
                HOLD_SECONDS,
                self.recovery_after,
                KEY_PREFIX,
                LEASE_PREFIX,
                "queued",
                "running",
                "retrying",
                "throttled",
                PUBLISHED_FIELD,
            ],  # fmt: skip
        )
        due = [
            Due(
                str(r[0]),
                str(r[1]),
                str(r[2]),
                str(r[3] or "interactive"),
                str(r[4]) if r[4] else None,
                float(r[5]) if r[5] else None,
                bool(r[6]),
            )  # fmt: skip
            for r in reply[1:]
        ]
        return float(reply[0]), due

    def _handle(self, now: float, due: Sequence[Due]) -> list[str]:
        published = []
        queued = []
        for job in due:
            if job.kind == "queued":
                queued.append(job)
                continue
            self._publish(job.job_id, job.message, job.queue, job.request_id)
            published.append(job.job_id)
            if job.kind == "takeover":
                log.warning("job's lease lapsed (its worker died): published it again",
                            extra={"job_id": job.job_id})  # fmt: skip
            elif job.kind == "throttle":
                # Thousands of these in a paced batch: not worth a line each at INFO.
                log.debug("throttled job's turn: published it again", extra={"job_id": job.job_id})
            else:
                log.info("retry due: published the job again", extra={"job_id": job.job_id})
        if queued:
            published += self._check_queued(now, queued)
        return published

    def _check_queued(self, now: float, jobs: Sequence[Due]) -> list[str]:
        """Queued jobs the broker no longer holds are suspects; suspects seen so twice are
        lost and published again (the broker's answer: backends.Broker.held)."""
        held = self.broker.held(
            self.client, [Waiting(j.job_id, j.queue, j.enqueued_at) for j in jobs]
        )
        later = self.client.pipeline(transaction=False)
        lost = []
        for job in jobs:
            if job.job_id in held:
                # Still waiting its turn, or held by a worker: look again later.
                if job.suspect:
                    later.hdel(KEY_PREFIX + job.job_id, "suspect")
                later.zadd(PENDING_KEY, {job.job_id: now + self.recovery_after}, xx=True)
            elif not job.suspect:
                later.hset(KEY_PREFIX + job.job_id, "suspect", "1")
                later.zadd(PENDING_KEY, {job.job_id: now + CONFIRM_SECONDS}, xx=True)
            else:
                lost.append(job)
        later.execute()
        published = []
        for job in lost:
            message = self._requeue(
                keys=[KEY_PREFIX + job.job_id, PENDING_KEY],
                args=[job.job_id, self.recovery_after, "queued"],
            )
            if not message:
                continue  # claimed (or ended) since the look
            self._publish(job.job_id, str(message), job.queue, job.request_id)
            published.append(job.job_id)
            log.warning("republished a job whose message was lost", extra={"job_id": job.job_id})
        return published

    def _publish(self, job_id: str, message: str, queue: str, request_id: str | None) -> None:
        self.publish(job_id, json.loads(message), queue, request_id)


class Sweeps(Protocol):
    """Something swept periodically: the due sweep, the webhook sweep (worker/webhooks.py)."""

    def sweep(self) -> list[str]:
        """Handle what is due now; returns the ids handled."""
        ...


class SweepThread:
    """Runs a worker's :class:`Sweeper` (or another sweep) every ``SWEEP_SECONDS`` until
    stopped."""

    def __init__(
        self, sweeper: Sweeps, interval: float = SWEEP_SECONDS, name: str = "dspy-fleet-due-sweep"
    ) -> None:
        self.sweeper = sweeper
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._failing_since: float | None = None

    def start(self) -> None:
        """Start sweeping."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current sweep."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweeper.sweep()
                if self._failing_since is not None:
                    log.info("due sweep works again")
                self._failing_since = None
            except Exception as exc:  # a sweep must never die: it is what ends lost jobs
                now = time.monotonic()
                if self._failing_since is None or now - self._failing_since > 60:
                    log.warning("due sweep failed (retrying every %.1fs): %s", self.interval, exc)
                    self._failing_since = now
