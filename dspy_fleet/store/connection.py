"""The one place Redis clients are made: plain ``redis://`` URLs and Redis Sentinel.

The fleet's Sentinel URL form (documented in the README, section Redis Sentinel)::

    redis+sentinel://[[username]:password@]host:port[,host:port...]/master_name[/db]

``host:port`` pairs are Sentinels (port 26379 when left out); ``master_name`` is the name
the Sentinels monitor; the userinfo is the **data nodes'** password (as in a redis:// URL
and in kombu's and Celery's ``sentinel://``). The Sentinels' own password is a separate
secret, DSPY_FLEET_SENTINEL_PASSWORD, passed here as ``sentinel_password``: Sentinels and
data nodes usually have different ACLs, and a URL is logged and shown far more often than
a secret setting.

A Sentinel client asks the Sentinels for the master's address on each new connection and
drops pooled connections to a node that is no longer the master (redis-py's
SentinelConnectionPool), so a process follows a failover without a restart: commands
during the switch fail (ConnectionError, ReadOnlyError, MasterNotFoundError), which the API
answers with 503 and the workers retry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.sentinel import Sentinel, SentinelConnectionPool

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``redis+sentinel://`` URL."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None
    password: str | None

    def kombu_urls(self) -> str:
        """The same Sentinels as kombu's (and Celery's result backend's) URL list:
        ``sentinel://[:password@]host:port/db;sentinel://...``; the master name and the
        Sentinels' password go in the transport options (dspy_fleet/broker/celery_config.py)."""
        auth = ""
        if self.password is not None:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password, safe='')}@"
        return ";".join(f"sentinel://{auth}{h}:{p}/{self.db}" for h, p in self.sentinels)


def is_sentinel(url: str) -> bool:
    """Whether ``url`` is in the fleet's Sentinel form."""
    return url.startswith(SENTINEL_SCHEME + "://")


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse ``redis+sentinel://[[user]:password@]h1:p1[,h2:p2...]/master_name[/db]``.

    Raises ValueError naming what is wrong (no host, no master name, a bad db number).
    """
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        raise ValueError(f"not a {SENTINEL_SCHEME}:// URL")
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if sep else None
    sentinels: list[tuple[str, int]] = []
    for item in filter(None, hostlist.split(",")):
        host, sep, port = item.rpartition(":")
        if not sep or "]" in port:  # no port, or the end of a bare IPv6 address
            host, port = item, str(SENTINEL_PORT)
        if not port.isdigit():
            raise ValueError(f"{SENTINEL_SCHEME} URL: bad port in {item!r}")
        sentinels.append((host.strip("[]"), int(port)))
    if not sentinels:
        raise ValueError(f"{SENTINEL_SCHEME} URL: no Sentinel host")
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"{SENTINEL_SCHEME} URL: the path must be /master_name[/db]")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"{SENTINEL_SCHEME} URL: bad db number {path[1]!r}")
    db = int(path[1]) if len(path) == 2 else 0
    return SentinelUrl(tuple(sentinels), path[0], db, username, password)


class _SentinelBlockingPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """redis-py's Sentinel pool with BlockingConnectionPool's bound: past
    ``max_connections`` a command waits up to ``timeout`` s for a free connection."""


def redis_client(
    url: str,
    *,
    sentinel_password: str | None = None,
    max_connections: int | None = None,
    pool_timeout: float | None = None,
    **options: Any,
) -> redis.Redis:
    """A redis-py client for ``url`` (redis://, rediss://, unix:// or redis+sentinel://).

    ``options`` are the connections' options, as for ``redis.Redis.from_url``. With
    ``max_connections`` the pool is bounded: a command that finds every connection busy
    waits up to ``pool_timeout`` seconds, then raises redis.ConnectionError. For a
    Sentinel URL the client talks to the current master (found through the Sentinels,
    with their connect and read timeouts taken from ``options``); raises ValueError for a
    malformed Sentinel URL.
    """
    if not is_sentinel(url):
        if max_connections is None:
            return redis.Redis.from_url(url, **options)
        pool = redis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=pool_timeout, **options
        )
        return redis.Redis(connection_pool=pool)
    parsed = parse_sentinel_url(url)
    # The Sentinels get the same socket timeouts as the data nodes: a hung Sentinel must
    # not hold a command longer than a hung master would.
    sentinel_kwargs: dict[str, Any] = {k: v for k, v in options.items() if k.startswith("socket_")}
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
    node: dict[str, Any] = {"db": parsed.db, **options}
    if parsed.password is not None:
        node["password"] = parsed.password
    if parsed.username is not None:
        node["username"] = parsed.username
    sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)
    if max_connections is None:
        return sentinel.master_for(parsed.master_name, **node)
    return sentinel.master_for(
        parsed.master_name,
        connection_pool_class=_SentinelBlockingPool,
        max_connections=max_connections,
        timeout=pool_timeout,
        **node,
    )
