"""The broker over other topologies: replicas sharing one Redis, and a Redis Cluster."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import timedelta

import pytest

from broker.config import Settings
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import lease_pb2, task_pb2
from tests.conftest import TEST_SETTINGS, start_broker
from tests.support.lease_stream import LeaseStream
from tests.support.redis_server import RedisCluster
from tests.support.tasks import enqueue, get, spec


async def test_a_task_enqueued_on_one_replica_is_pushed_by_another(settings: Settings) -> None:
    producer_side = await start_broker(settings)
    worker_side = await start_broker(settings)
    worker = await LeaseStream(worker_side.stub).open(["emails"], credits=1)
    await asyncio.sleep(0.2)
    started = time.monotonic()
    (task_id,) = await enqueue(producer_side.stub, spec())
    (d,) = await worker.take(1, wait_s=2)
    assert d.task.id == task_id and time.monotonic() - started < 1.0  # a Pub/Sub wake
    # Either replica settles it: the lease lives in Redis, not in the replica.
    await producer_side.stub.Ack(lease_pb2.AckRequest(task_id=task_id, lease_id=d.lease_id))
    assert (await get(worker_side.stub, task_id)).state == task_pb2.TASK_STATE_SUCCEEDED
    await worker.close()
    await producer_side.close()
    await worker_side.close()


async def test_leases_of_a_replica_that_vanished_come_back_after_they_expire(
    settings: Settings,
) -> None:
    doomed = await start_broker(settings)
    survivor = await start_broker(settings)
    (task_id,) = await enqueue(survivor.stub, spec())
    worker = await LeaseStream(doomed.stub).open(["emails"], credits=1, lease=timedelta(seconds=1))
    (first,) = await worker.take(1)
    # A replica that dies hard gives nothing back; stop its loops and Redis use as a kill would.
    doomed.broker.dispatcher.drain()
    await doomed.broker.dispatcher.stop()
    await doomed.broker.wake_listener.stop()
    for loop in doomed.broker.loops:
        await loop.stop()
    await doomed.broker.store.close()

    other = await LeaseStream(survivor.stub).open(["emails"], credits=1)
    (again,) = await other.take(1, wait_s=4)
    assert again.task.id == task_id and again.lease_id != first.lease_id
    assert again.task.attempt == 2
    await other.close()
    await survivor.close()
    worker.cancel()
    await doomed.channel.close()
    await doomed.broker.server.stop(0)
    if doomed.broker.web is not None:
        await doomed.broker.web.stop()
    await doomed.broker.registry.wait_background()  # the stream's release reconnected: close it
    await doomed.broker.store.close()


@pytest.fixture
def cluster_settings(redis_cluster: RedisCluster) -> Settings:
    client = redis_cluster.client()
    client.flushall()
    client.close()
    return replace(TEST_SETTINGS, redis_url=redis_cluster.url, redis_cluster=True)


async def test_the_whole_lifecycle_runs_on_a_redis_cluster(cluster_settings: Settings) -> None:
    running = await start_broker(cluster_settings)
    queues = [f"q{i}" for i in range(6)]  # spread over the cluster's slots
    worker = await LeaseStream(running.stub).open(queues, credits=100)
    ids = await enqueue(running.stub, *[spec(queue=q) for q in queues for _ in range(3)])
    delivered = await worker.take(len(ids), wait_s=5)
    assert sorted(d.task.id for d in delivered) == sorted(ids)
    for d in delivered[:-1]:
        assert (await worker.ack(d)).outcome == lease_pb2.SETTLE_OUTCOME_OK
    last = delivered[-1]
    assert (await worker.nack(last, dead_letter=True)).outcome == lease_pb2.SETTLE_OUTCOME_OK
    stats = await running.stub.Stats(bs.StatsRequest())
    assert sum(s.succeeded_total for s in stats.queues) == len(ids) - 1
    assert sum(s.dead for s in stats.queues) == 1
    await worker.close()
    await running.close()


async def test_cancel_on_one_replica_revokes_the_lease_held_through_another(
    settings: Settings,
) -> None:
    holder_side = await start_broker(settings)
    other_side = await start_broker(settings)
    (task_id,) = await enqueue(holder_side.stub, spec())
    worker = await LeaseStream(holder_side.stub).open(["emails"], credits=1)
    (d,) = await worker.take(1)
    await other_side.stub.CancelTask(bs.CancelTaskRequest(task_id=task_id))
    revoked = await asyncio.wait_for(worker.revoked.get(), 2)
    assert (revoked.task_id, revoked.lease_id, revoked.reason) == (task_id, d.lease_id, "cancelled")
    assert (await worker.ack(d)).outcome == lease_pb2.SETTLE_OUTCOME_LEASE_STALE
    await worker.close()
    await holder_side.close()
    await other_side.close()
