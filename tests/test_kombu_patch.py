"""The kombu patch (dspy_fleet/broker/kombu_patch.py) on a real Redis: one client per pool."""

from __future__ import annotations

import pytest
import redis
from kombu import Connection

from dspy_fleet.broker import kombu_patch
from dspy_fleet.devtools.redis import RedisServer


def test_channel_reuses_one_client_per_pool(redis_server: RedisServer) -> None:
    kombu_patch.install()
    kombu_patch.install()  # idempotent
    with Connection(redis_server.url) as conn:
        channel = conn.default_channel
        first = channel._create_client()
        assert channel._create_client() is first
        assert channel._create_client(asynchronous=True) is not first

        queue = conn.SimpleQueue("kombu-patch-test")
        for i in range(3):
            queue.put({"n": i})
        assert [queue.get(timeout=5).payload["n"] for _ in range(3)] == [0, 1, 2]

        # A replaced pool (what a reconnect does) gets a client of its own.
        channel._disconnect_pools()
        assert channel._create_client() is not first
        queue.put({"n": 3})
        assert queue.get(timeout=5).payload["n"] == 3
        queue.close()
    assert redis.Redis.from_url(redis_server.url).ping()


def test_closed_channel_raises_a_connection_error(redis_server: RedisServer) -> None:
    """Celery treats a connection error on ack/requeue as recoverable; AttributeError not."""
    kombu_patch.install()
    with Connection(redis_server.url) as conn:
        channel = conn.channel()
        channel.close()
        with pytest.raises(redis.ConnectionError):
            channel._create_client()
        assert isinstance(redis.ConnectionError(), conn.connection_errors)
