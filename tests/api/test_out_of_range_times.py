"""A time stored out of a Timestamp's range (written before schedule_time was bounded) is read
back clamped by GetTask, CancelTask and ListDeadTasks, never as INTERNAL."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import redis
from google.protobuf import timestamp_pb2

from broker.store.keys import QueueKeys
from taskbroker.v1 import admin_service_pb2 as ad
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import task_pb2
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, get, spec

if TYPE_CHECKING:
    from taskbroker.v1.admin_service_pb2_grpc import AdminServiceAsyncStub as Admin
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub as Stub

#: What Lua stored for a schedule_time of 2^62 s, which enqueue accepted before it was bounded.
FAR = b"4.6116860184273879e+21"
#: 9999-12-31T23:59:59Z, the last second a Timestamp may hold.
LAST_SECOND = 253_402_300_799


def _store_far_times(redis_client: redis.Redis, task_id: str, *fields: str) -> None:
    queue, local_id = task_id.split(":", 1)
    redis_client.hset(QueueKeys(queue).task(local_id), mapping=dict.fromkeys(fields, FAR))


async def test_a_far_stored_schedule_time_is_read_and_cancelled(
    stub: Stub, redis_client: redis.Redis
) -> None:
    soon = timestamp_pb2.Timestamp(seconds=int(time.time()) + 3600)
    (task_id,) = await enqueue(stub, spec(schedule_time=soon))
    _store_far_times(redis_client, task_id, "stime")

    task = await get(stub, task_id)
    assert task.state == task_pb2.TASK_STATE_SCHEDULED
    assert task.schedule_time.seconds == LAST_SECOND
    assert task.schedule_time.ToDatetime().year == 9999  # every client can make it a date
    cancelled = (await stub.CancelTask(bs.CancelTaskRequest(task_id=task_id))).task
    assert cancelled.state == task_pb2.TASK_STATE_CANCELLED


async def test_a_far_stored_time_on_a_dead_letter_is_listed(
    stub: Stub, admin: Admin, redis_client: redis.Redis
) -> None:
    (task_id,) = await enqueue(stub, spec(max_attempts=1))
    worker = await LeaseStream(stub).open(["emails"], credits=1)
    (delivery,) = await worker.take(1)
    await worker.nack(delivery, dead_letter=True)
    worker.cancel()
    _store_far_times(redis_client, task_id, "stime", "ftime")

    page = await admin.ListDeadTasks(ad.ListDeadTasksRequest(queue="emails"))
    assert [t.id for t in page.tasks] == [task_id]
    assert page.tasks[0].finish_time.seconds == LAST_SECOND
