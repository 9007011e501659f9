"""Replica acknowledgement of accepted jobs: Redis ``WAIT`` behind a fence write.

Replication from a Redis master is asynchronous: a job record the master acknowledged may
not be on any replica yet, and a failover that promotes that replica loses it (the client
already has its 202). ``WAIT n timeout`` blocks until ``n`` replicas have acknowledged every
write *of the connection that sends it*; the API's writes of one job go over pooled
connections (the record, then the publish), so WAIT alone on some connection could confirm
nothing. Hence the fence: one write on the connection that then sends WAIT. Replication is
one ordered stream, so a replica that has the fence has every write the master finished
before it: the job record and, with the broker on the same Redis, its queued message.
"""

from __future__ import annotations

import redis

# The fence key: one short-lived string; its value does not matter, only that it was written.
FENCE_KEY = "dspy_fleet:replication_fence"
FENCE_TTL_MS = 60_000


def confirm(client: redis.Redis, replicas: int, timeout_ms: int) -> int:
    """Write the fence and ``WAIT replicas timeout_ms`` on one connection (one round-trip,
    at most ``timeout_ms`` ms plus the network); returns how many replicas acknowledged
    everything the master finished before the fence (possibly fewer than ``replicas``).
    Raises redis.RedisError when the master fails the commands."""
    pipe = client.pipeline(transaction=False)
    pipe.set(FENCE_KEY, "1", px=FENCE_TTL_MS)
    pipe.wait(replicas, timeout_ms)
    return int(pipe.execute()[-1])
