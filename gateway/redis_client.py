"""One place that turns a Redis URL into a client with the gateway's failure behaviour."""

from __future__ import annotations

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def create_redis(url: str, *, timeout: float, max_connections: int = 64) -> redis.Redis:
    # No retries: a charge resent after a dropped connection could be applied twice, and a
    # caller waiting on retries would not get its fast 503. Timeouts bound every wait.
    # A blocking pool: a burst wider than the pool waits (within the same timeout) for a
    # connection instead of failing at once with "Too many connections", which would
    # refuse paying requests with 503 while Redis is perfectly healthy.
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=0,
    )
    return redis.Redis.from_pool(pool)
