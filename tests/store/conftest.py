"""Fixtures of the store tests: a RedisStore on a standalone Redis and on a Redis Cluster."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

from broker.config import Settings
from broker.queue import TaskQueue
from broker.store.redis_store import AnyRedis, RedisStore
from tests.support.redis_server import RedisCluster, RedisServer


@dataclass(frozen=True, slots=True)
class Topology:
    """Where the store under test runs: one standalone server, or every node of a cluster."""

    name: str
    url: str
    node_urls: tuple[str, ...]

    @property
    def is_cluster(self) -> bool:
        return self.name == "cluster"

    def client(self) -> AnyRedis:
        """The client a broker would use (bytes replies, as RedisStore expects)."""
        if self.is_cluster:
            return AsyncRedisCluster.from_url(self.url)
        return aioredis.Redis.from_url(self.url)

    def node_clients(self) -> list[aioredis.Redis]:
        """One plain client per node, for commands that must reach every node."""
        return [aioredis.Redis.from_url(url) for url in self.node_urls]


@pytest.fixture(params=["standalone", "cluster"])
def topology(request: pytest.FixtureRequest) -> Topology:
    """The session's standalone server or cluster, with every node flushed for this test."""
    name = cast("str", request.param)
    if name == "cluster":
        cluster = cast("RedisCluster", request.getfixturevalue("redis_cluster"))
        topo = Topology(name, cluster.url, tuple(node.url for node in cluster.nodes))
    else:
        server = cast("RedisServer", request.getfixturevalue("redis_server"))
        topo = Topology(name, server.url, (server.url,))
    for url in topo.node_urls:
        with redis.Redis.from_url(url) as client:
            client.flushall()
    return topo


@pytest.fixture
async def store(topology: Topology) -> AsyncIterator[RedisStore]:
    store = RedisStore(topology.client())
    yield store
    await store.close()


@pytest.fixture
def settings(topology: Topology) -> Settings:
    """The broker's defaults on the topology under test (a module may override it)."""
    return Settings(redis_url=topology.url, redis_cluster=topology.is_cluster)


@pytest.fixture
def tasks(store: RedisStore, settings: Settings) -> TaskQueue:
    return TaskQueue(store, settings)
