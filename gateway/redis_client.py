"""One place that turns a Redis URL into a client with the gateway's failure behaviour.

``redis://``, ``rediss://`` and ``unix://`` give a plain client; ``redis+cluster://`` and
``rediss+cluster://`` give a Redis Cluster client seeded from the URL's host and port.
"""

from __future__ import annotations

import logging
from typing import TypeAlias

import redis.asyncio as redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException, RedisError

log = logging.getLogger("gateway.redis")
RedisClient: TypeAlias = redis.Redis | RedisCluster
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
# What a failing Redis may raise: the cluster client's own errors (slot not covered, no
# node reachable at start) do not derive from RedisError.
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)


def is_cluster_url(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def create_client(
    url: str, *, timeout: float, max_connections: int = 64, read_timeout: float | None = None
) -> RedisClient:
    """A cluster client for a ``+cluster`` URL, else a plain one (see create_redis).

    ``read_timeout`` (default: ``timeout``) bounds the wait for a reply to a command sent;
    the quota store gives its callers their 503 after ``timeout`` and reads on, to follow
    up a charge Redis applies late."""
    if is_cluster_url(url):
        return create_cluster(
            url, timeout=timeout, max_connections=max_connections, read_timeout=read_timeout
        )
    return create_redis(
        url, timeout=timeout, max_connections=max_connections, read_timeout=read_timeout
    )


def create_redis(
    url: str, *, timeout: float, max_connections: int = 64, read_timeout: float | None = None
) -> redis.Redis:
    # No retries: a charge resent after a dropped connection could be applied twice, and a
    # caller waiting on retries would not get its fast 503. Timeouts bound every wait.
    # A blocking pool: a burst wider than the pool waits (within the same timeout) for a
    # connection instead of failing at once with "Too many connections", which would
    # refuse paying requests with 503 while Redis is perfectly healthy.
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout if read_timeout is None else read_timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    return redis.Redis.from_pool(pool)


def create_cluster(
    url: str, *, timeout: float, max_connections: int = 64, read_timeout: float | None = None
) -> RedisCluster:
    # The client-level retry (0 attempts) is the one that would re-send a command after a
    # connection error or a cluster-down reply; off, for the same reason as create_redis.
    # MOVED and ASK are still followed: a redirected command was not executed. Node
    # connections never retry (redis-py builds them with 0 retries). max_connections is
    # per node, and unlike the blocking pool a burst beyond it fails at once (the quota
    # store bounds its batches in flight below it).
    # reinitialize_steps=0: on MOVED, patch that slot's owner rather than close the whole
    # client every fifth redirect, which would cut the connections of charges in flight.
    return RedisCluster.from_url(
        url.replace("+cluster", "", 1),
        max_connections=max_connections,
        reinitialize_steps=0,
        socket_timeout=timeout if read_timeout is None else read_timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )


class OutageLog:
    """Says once per outage why Redis failed, and once that it is back: the 503s (or the
    requests let through, failing open) do not say why, and a line per request would
    flood the log."""

    __slots__ = ("down",)

    def __init__(self) -> None:
        self.down = False

    def failed(self, exc: BaseException) -> None:
        if not self.down:
            self.down = True
            text = str(exc)
            why = f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
            log.warning("redis unavailable, charges fail until it is back: %s", why)

    def ok(self) -> None:
        if self.down:
            self.down = False
            log.warning("redis is back")
