"""The dispatcher: thousands of subscribed queues cost a bounded number of Redis connections, and
nothing at all while idle; work still reaches the streams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from broker.config import Settings
from broker.dispatch import LEASE_WORKERS, Dispatcher
from broker.models import Lease, QueueSettings, RateLimit
from broker.queue import TaskQueue, TaskRequest
from broker.store.redis_store import RedisStore
from tests.support.redis_server import RedisServer

STREAMS = 40
QUEUES_PER_STREAM = 64  # 2,560 subscribed queues: ten times the Redis pool of 256


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test alone: its command counts see no other test's broker."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(own_redis: RedisServer) -> Iterator[redis.Redis]:
    client = own_redis.client()
    yield client
    client.close()


@pytest.fixture
async def tasks(own_redis: RedisServer) -> AsyncIterator[TaskQueue]:
    store = RedisStore(aioredis.Redis.from_url(own_redis.url, max_connections=256))
    yield TaskQueue(store, Settings(redis_url=own_redis.url))
    await store.close()


def _lease_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_many_idle_subscribed_queues_use_few_connections_and_no_calls(
    tasks: TaskQueue, redis_client: redis.Redis
) -> None:
    dispatcher = Dispatcher(tasks)
    got: list[Lease] = []

    def deliver(leases: list[Lease]) -> bool:
        got.extend(leases)
        return True

    subs = []
    for s in range(STREAMS):
        queues = [f"q{s}-{i}" for i in range(QUEUES_PER_STREAM)]
        sub = dispatcher.subscribe(queues, 10_000, deliver)
        sub.add_credits(10)
        subs.append(sub)
    try:
        # Every queue is looked at once (nothing is known about it yet: a lease call and its
        # due-index hint), then all goes quiet.
        # (Counted until nothing more happens for 0.5 s: a script's first call on a fresh
        # Redis also counts its NOSCRIPT refusal.)
        deadline = time.monotonic() + 30
        calls, still_since = _lease_calls(redis_client), time.monotonic()
        while calls < 2 * STREAMS * QUEUES_PER_STREAM or time.monotonic() - still_since < 0.5:
            assert time.monotonic() < deadline, "the first look at each queue did not finish"
            await asyncio.sleep(0.05)
            now_calls = _lease_calls(redis_client)
            if now_calls != calls:
                calls, still_since = now_calls, time.monotonic()
        clients = int(redis_client.info("clients")["connected_clients"])
        assert clients <= LEASE_WORKERS + 4, f"{clients} connections for idle queues"

        calls = _lease_calls(redis_client)
        await asyncio.sleep(1.0)
        assert _lease_calls(redis_client) - calls <= 2  # idle: (almost) nothing runs

        await tasks.enqueue([TaskRequest("q17-33", "t")])
        dispatcher.notify("q17-33")  # what the Pub/Sub wake does
        deadline = time.monotonic() + 5
        while not got:
            assert time.monotonic() < deadline, "the woken queue's task was not delivered"
            await asyncio.sleep(0.01)
        assert [le.task.ref.queue for le in got] == ["q17-33"]
    finally:
        for sub in subs:
            sub.close()
        await dispatcher.stop()


async def test_a_rate_limited_queue_is_not_leased_from_on_every_wake(
    tasks: TaskQueue, redis_client: redis.Redis
) -> None:
    """Held back by its rate limit, a pump sleeps until the next token is due: wakes from a busy
    producer's enqueues cost no lease call meanwhile, and the tasks still go at the rate."""
    await tasks.update_queue_settings("slow", QueueSettings(rate_limit=RateLimit(2, 1)), [])
    dispatcher = Dispatcher(tasks)
    got: list[Lease] = []

    def deliver(leases: list[Lease]) -> bool:
        got.extend(leases)
        return True

    sub = dispatcher.subscribe(["slow"], 10_000, deliver)
    sub.add_credits(100)
    try:
        await tasks.enqueue([TaskRequest("slow", "t") for _ in range(3)])
        dispatcher.notify("slow")
        deadline = time.monotonic() + 5
        while not got:
            assert time.monotonic() < deadline, "the first task was not delivered"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the call that found no token
        calls = _lease_calls(redis_client)
        for _ in range(20):  # 20 wakes within the 0.5 s until the next token
            dispatcher.notify("slow")
            await asyncio.sleep(0.01)
        assert _lease_calls(redis_client) - calls <= 1
        while len(got) < 3:
            assert time.monotonic() < deadline, "the rate-limited tasks stopped coming"
            await asyncio.sleep(0.01)
    finally:
        sub.close()
        await dispatcher.stop()
