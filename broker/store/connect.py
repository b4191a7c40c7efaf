"""redis_client: the redis-py client the broker's settings ask for (standalone or Cluster), with
its timeouts, retry and connection pool."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from broker.config import Settings
from broker.store.redis_store import AnyRedis


def redis_client(settings: Settings, url: str) -> AnyRedis:
    # One quick retry for a dropped connection; an outage beyond that is UNAVAILABLE at once
    # rather than a call hanging in redis-py's default backoff.
    common: dict[str, Any] = {
        "socket_timeout": settings.redis_timeout_s,
        "socket_connect_timeout": min(2.0, settings.redis_timeout_s),
        "retry": Retry(ExponentialBackoff(cap=0.1, base=0.02), 1),
        "health_check_interval": 10,
    }
    if settings.redis_cluster:
        return RedisCluster.from_url(url, max_connections=settings.redis_max_connections, **common)
    # A caller finding every connection busy waits its turn (first come, first served) rather
    # than failing with MaxConnectionsError: a burst from one client delays others a little
    # instead of failing their calls.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=settings.redis_max_connections,
        timeout=settings.redis_timeout_s,
        **common,
    )
    return aioredis.Redis.from_pool(pool)
