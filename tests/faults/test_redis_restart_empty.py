"""Issue 11 §4: nothing a broker keeps in memory may outlive the Redis state it mirrors. After a
Redis that restarted empty, a queue the broker saw before is registered and maintained again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace
from typing import TypeVar

import grpc
import pytest

from broker.errors import StoreUnavailable
from broker.ids import new_lease_id
from taskbroker.v1 import task_pb2
from tests.conftest import TEST_SETTINGS, start_broker
from tests.support.redis_server import RedisServer
from tests.support.tasks import enqueue, get, spec

T = TypeVar("T")


LEASED = task_pb2.TASK_STATE_LEASED


async def _retrying(call: Callable[[], Awaitable[T]]) -> T:
    """The call, retried while the broker's pooled connections to the old Redis fail one by
    one (each answers UNAVAILABLE once)."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return await call()
        except (grpc.aio.AioRpcError, StoreUnavailable):
            assert time.monotonic() < deadline, "the broker did not reconnect to redis"
            await asyncio.sleep(0.02)


@pytest.fixture
def lossy_redis() -> Iterator[RedisServer]:
    """A Redis without persistence: a restart brings it back empty."""
    with RedisServer() as server:
        yield server


async def test_an_expired_lease_is_reclaimed_on_time_after_redis_restarted_empty(
    lossy_redis: RedisServer,
) -> None:
    running = await start_broker(replace(TEST_SETTINGS, redis_url=lossy_redis.url))
    try:
        await enqueue(running.stub, spec("seen"))  # the broker has seen the queue
        lossy_redis.restart()
        with lossy_redis.client() as plain:
            assert plain.dbsize() == 0, "redis came back with data"

        [task_id] = await _retrying(lambda: enqueue(running.stub, spec("seen")))
        batch = await running.broker.tasks.lease(
            "seen", [(new_lease_id(), 1000, "gone-worker", "")]
        )
        [lease] = batch.leases

        while (task := await _retrying(lambda: get(running.stub, task_id))).state == LEASED:
            (stats,) = await _retrying(lambda: running.broker.tasks.stats(["seen"]))
            late_ms = stats.now_ms - lease.expire_ms
            assert late_ms < 1000, f"still leased {late_ms} ms after its lease expired"
            await asyncio.sleep(0.05)
        assert task.state == task_pb2.TASK_STATE_PENDING
        assert task.attempt == 1
    finally:
        await running.close()
