"""Enqueue and GetTask: ids, order, defaults, idempotency and refusal of bad input."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
import redis
from google.protobuf import timestamp_pb2

from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import task_pb2
from tests.conftest import RunningBroker
from tests.support.tasks import enqueue, error_reason, get, spec

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub as Stub


async def test_enqueued_task_is_pending_with_defaults_filled_in(stub: Stub) -> None:
    (task_id,) = await enqueue(stub, spec(payload=b"hello", headers={"traceparent": "00-ab-cd-01"}))

    task = await get(stub, task_id)
    assert task.id == task_id and task_id.startswith("emails:")
    assert task.state == task_pb2.TASK_STATE_PENDING
    assert (task.queue, task.type, task.payload) == ("emails", "send", b"hello")
    assert dict(task.headers) == {"traceparent": "00-ab-cd-01"}
    assert task.attempt == 0 and task.max_attempts == 5
    assert task.create_time.seconds > 0


async def test_batch_results_come_back_in_request_order(stub: Stub) -> None:
    specs = [spec(queue=f"q{i % 3}", payload=str(i).encode()) for i in range(30)]
    ids = await enqueue(stub, *specs)
    assert len(set(ids)) == 30
    for i, task_id in enumerate(ids):
        task = await get(stub, task_id)
        assert task.payload == str(i).encode() and task.queue == f"q{i % 3}"


async def test_idempotency_key_repeat_returns_first_task(stub: Stub) -> None:
    first = await stub.Enqueue(bs.EnqueueRequest(tasks=[spec(idempotency_key="order-42")]))
    again = await stub.Enqueue(bs.EnqueueRequest(tasks=[spec(idempotency_key="order-42")]))

    assert not first.results[0].duplicate
    assert again.results[0].duplicate
    assert again.results[0].task_id == first.results[0].task_id
    stats = await stub.Stats(bs.StatsRequest(queues=["emails"]))
    assert stats.queues[0].pending == 1 and stats.queues[0].enqueued_total == 1


async def test_idempotency_key_with_different_body_is_refused(stub: Stub) -> None:
    await enqueue(stub, spec(payload=b"a", idempotency_key="k"))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await enqueue(stub, spec(payload=b"b", idempotency_key="k"))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "tasks[0].idempotency_key" in (err.value.details() or "")
    assert error_reason(err.value) == "IDEMPOTENCY_KEY_CONFLICT"


async def test_idempotency_conflict_in_one_call_does_not_fail_concurrent_calls(stub: Stub) -> None:
    await enqueue(stub, spec(payload=b"a", idempotency_key="taken"))
    bad = stub.Enqueue(bs.EnqueueRequest(tasks=[spec(payload=b"b", idempotency_key="taken")]))
    good = [enqueue(stub, spec(payload=str(i).encode())) for i in range(20)]
    results = await asyncio.gather(bad, *good, return_exceptions=True)

    assert isinstance(results[0], grpc.aio.AioRpcError)
    assert all(isinstance(r, list) for r in results[1:])
    stats = await stub.Stats(bs.StatsRequest(queues=["emails"]))
    assert stats.queues[0].pending == 21


async def test_idempotency_key_window_expires(running_short_window: Stub) -> None:
    stub = running_short_window
    (first,) = await enqueue(stub, spec(idempotency_key="k"))
    await asyncio.sleep(0.3)
    (second,) = await enqueue(stub, spec(idempotency_key="k"))
    assert first != second


async def test_same_key_twice_in_one_batch_is_one_task(stub: Stub) -> None:
    response = await stub.Enqueue(
        bs.EnqueueRequest(tasks=[spec(idempotency_key="k"), spec(idempotency_key="k")])
    )
    a, b = response.results
    assert a.task_id == b.task_id and not a.duplicate and b.duplicate


async def test_delay_and_schedule_time_make_the_task_scheduled(stub: Stub) -> None:
    later = timestamp_pb2.Timestamp()
    later.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    ids = await enqueue(stub, spec(delay=timedelta(minutes=5)), spec(schedule_time=later), spec())
    states = [(await get(stub, i)).state for i in ids]
    assert states == [
        task_pb2.TASK_STATE_SCHEDULED,
        task_pb2.TASK_STATE_SCHEDULED,
        task_pb2.TASK_STATE_PENDING,
    ]


BAD_SPECS = [
    (spec(queue=""), "tasks[0].queue"),
    (spec(queue="a{b}"), "tasks[0].queue"),
    (spec(queue="a:b"), "tasks[0].queue"),
    (spec(queue="a*"), "tasks[0].queue"),
    (spec(queue="a b"), "tasks[0].queue"),
    (spec(queue="a\nb"), "tasks[0].queue"),
    (spec(queue="x" * 129), "tasks[0].queue"),
    (spec(type_=""), "tasks[0].type"),
    (spec(type_="send\x00"), "tasks[0].type"),
    (spec(priority=1001), "tasks[0].priority"),
    (spec(delay=timedelta(seconds=-1)), "tasks[0].delay"),
    (spec(max_attempts=-1), "tasks[0].max_attempts"),
    (spec(max_attempts=1001), "tasks[0].max_attempts"),
    (spec(lease_duration=timedelta(milliseconds=1)), "tasks[0].lease_duration"),
    (spec(idempotency_key="k" * 257), "tasks[0].idempotency_key"),
    (spec(headers={"bad key": "v"}), "tasks[0].headers"),
    (spec(headers={f"h{i}": "v" for i in range(65)}), "tasks[0].headers"),
    (spec(payload=b"x" * (1024 * 1024 + 1)), "tasks[0]: the task is 1048581 bytes"),
    # One limit on the whole task: headers and the idempotency key count with the payload.
    (spec(payload=b"x" * (1024 * 1024 - 100), headers={"h": "v" * 4000}), "max_task_bytes"),
    (spec(payload=b"x" * (1024 * 1024 - 100), idempotency_key="k" * 200), "max_task_bytes"),
    (spec(schedule_time=timestamp_pb2.Timestamp(seconds=2**62)), "tasks[0].schedule_time"),
    (spec(schedule_time=timestamp_pb2.Timestamp(seconds=-1)), "tasks[0].schedule_time"),
]


@pytest.mark.parametrize(("bad", "field"), BAD_SPECS, ids=[f for _, f in BAD_SPECS])
async def test_bad_task_is_invalid_argument_naming_the_field_and_stores_nothing(
    stub: Stub, redis_client: redis.Redis, bad: task_pb2.TaskSpec, field: str
) -> None:
    before = redis_client.dbsize()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await enqueue(stub, spec(queue="good"), bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field.replace("[0]", "[1]") in (err.value.details() or "")
    assert redis_client.dbsize() == before
    assert await enqueue(stub, spec())  # the server keeps serving


async def test_delay_and_schedule_time_together_are_refused(stub: Stub) -> None:
    at = timestamp_pb2.Timestamp(seconds=2_000_000_000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await enqueue(stub, spec(delay=timedelta(seconds=1), schedule_time=at))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_empty_and_oversized_batches_are_refused(stub: Stub) -> None:
    for tasks in ([], [spec() for _ in range(1001)]):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Enqueue(bs.EnqueueRequest(tasks=tasks))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "tasks" in (err.value.details() or "")
    assert len(await enqueue(stub, *[spec() for _ in range(1000)])) == 1000


@pytest.mark.parametrize(
    "method",
    [
        "/taskbroker.v1.BrokerService/Enqueue",
        "/taskbroker.v1.BrokerService/GetTask",
        "/taskbroker.v1.AdminService/ListDeadTasks",
    ],
)
async def test_bytes_that_do_not_parse_are_invalid_argument(
    running: RunningBroker, method: str
) -> None:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = running.channel.unary_unary(method)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(b"\xff\xff\xff\xff\x0f")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = err.value.details() or ""
    assert "DecodeError" not in details and "class" not in details


@pytest.mark.parametrize("task_id", ["", "nope", "emails:short", "a{b}:01J00000000000000000000000"])
async def test_malformed_task_id_is_invalid_argument(stub: Stub, task_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetTask(bs.GetTaskRequest(task_id=task_id))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "task_id" in (err.value.details() or "")


async def test_unknown_task_is_not_found(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetTask(bs.GetTaskRequest(task_id="emails:01J0000000000000000000000A"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_reason(err.value) == "TASK_NOT_FOUND"
