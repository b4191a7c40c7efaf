"""Client and SyncClient through a real in-process broker: options, errors, waits, admin, codec."""

from __future__ import annotations

import asyncio
import json
import math
import pickle
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
import redis

from broker.config import Settings
from taskbroker._client import Client, EnqueueResult, channel_target
from taskbroker._errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    LeaseStaleError,
    TaskbrokerError,
    TaskNotFoundError,
    UnavailableError,
)
from taskbroker._models import NewTask, QueueSettings, RateLimit, TaskState
from taskbroker._status import error_from_rpc
from taskbroker._sync import SyncClient
from taskbroker.codec import from_json, json_payload
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, lease_pb2
from tests.api.test_limits import until
from tests.conftest import RunningBroker, start_broker
from tests.support.lease_stream import LeaseStream
from tests.support.redis_server import free_port

#: A well-formed id of a task that was never enqueued.
UNKNOWN_ID = "emails:01J0000000000000000000000A"
#: Reconnect fast, so a test that starts a broker late does not wait out gRPC's 1 s backoff.
FAST_RECONNECT = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 50)]


@pytest.fixture
async def client(running: RunningBroker) -> AsyncIterator[Client]:
    async with Client(running.target) as client:
        yield client


async def lease_one(running: RunningBroker, queue: str) -> tuple[LeaseStream, lease_pb2.Delivery]:
    stream = await LeaseStream(running.stub).open([queue], credits=1)
    (delivery,) = await stream.take(1)
    return stream, delivery


# --- enqueue --------------------------------------------------------------------------------


async def test_enqueue_defaults(client: Client) -> None:
    task_id = await client.enqueue("emails", "send")

    task = await client.get_task(task_id)
    assert task.id == task_id and task_id.startswith("emails:")
    assert (task.queue, task.type, task.payload, task.headers) == ("emails", "send", b"", {})
    assert task.state is TaskState.PENDING
    assert (task.priority, task.attempt, task.max_attempts) == (0, 0, 5)
    assert task.create_time is not None and task.create_time.tzinfo is UTC
    assert task.lease_expire_time is None and task.finish_time is None
    assert (task.last_error, task.errors, task.result) == ("", (), b"")


async def test_enqueue_with_every_option_is_stored_as_given(client: Client) -> None:
    at = datetime.now(UTC).replace(microsecond=123_000) + timedelta(hours=1)
    task_id = await client.enqueue(
        "emails",
        "send",
        b"hello",
        priority=7,
        schedule_time=at,
        max_attempts=3,
        lease_duration=timedelta(seconds=45),
        idempotency_key="opt-1",
        headers={"traceparent": "00-ab-cd-01"},
        initial_backoff=timedelta(seconds=2),
        max_backoff=timedelta(minutes=1),
        group_key="acme",
    )

    task = await client.get_task(task_id)
    assert task.state is TaskState.SCHEDULED
    assert (task.payload, task.priority, task.max_attempts) == (b"hello", 7, 3)
    assert task.group_key == "acme"
    assert task.headers == {"traceparent": "00-ab-cd-01"}
    assert task.schedule_time == at
    # The SDK's Task leaves out the lease length and retry policy; the raw API has them.
    raw = (await client.stub.GetTask(bs.GetTaskRequest(task_id=task_id))).task
    assert raw.lease_duration.ToTimedelta() == timedelta(seconds=45)
    assert raw.retry_policy.initial_backoff.ToTimedelta() == timedelta(seconds=2)
    assert raw.retry_policy.max_backoff.ToTimedelta() == timedelta(minutes=1)


async def raw_retry_policy(client: Client, task_id: str) -> tuple[timedelta, timedelta]:
    policy = (await client.stub.GetTask(bs.GetTaskRequest(task_id=task_id))).task.retry_policy
    return policy.initial_backoff.ToTimedelta(), policy.max_backoff.ToTimedelta()


async def test_the_deprecated_retry_names_still_work_and_warn(
    client: Client, running: RunningBroker
) -> None:
    first, most = timedelta(seconds=2), timedelta(minutes=1)

    with pytest.warns(DeprecationWarning) as caught:
        task_id = await client.enqueue("emails", "send", retry_initial=first, retry_max=most)
        with SyncClient(running.target) as sync:
            sync_id = await asyncio.to_thread(
                lambda: sync.enqueue("emails", "send", retry_initial=first, retry_max=most)
            )

    assert [str(w.message).split(":")[0] for w in caught] == [
        "retry_initial is deprecated",
        "retry_max is deprecated",
    ] * 2
    assert "use initial_backoff" in str(caught[0].message)
    assert "use max_backoff" in str(caught[1].message)
    assert {w.filename for w in caught} == {__file__}  # each points at the caller's line
    assert await raw_retry_policy(client, task_id) == (first, most)
    assert await raw_retry_policy(client, sync_id) == (first, most)


async def test_delay_schedules_the_task_that_long_after_it_was_accepted(client: Client) -> None:
    task = await client.get_task(await client.enqueue("emails", "send", delay=timedelta(minutes=5)))

    assert task.state is TaskState.SCHEDULED
    assert task.create_time is not None and task.schedule_time is not None
    assert task.schedule_time - task.create_time == timedelta(minutes=5)


async def test_enqueue_many_over_one_queues_rate_stores_the_other_queues_tasks_once(
    client: Client,
) -> None:
    # The broker once answered such a call with RetryInfo, as if nothing was stored, and the
    # SDK sent it whole again: the other queue's task was stored twice, one copy unanswered.
    # One a second: within what the SDK waits out on RetryInfo (ENQUEUE_THROTTLED_MAX_S).
    await client.update_queue_settings("throttled", enqueue_rate_limit=RateLimit(1, 1))
    await client.enqueue("throttled", "t")  # spends the burst
    with pytest.raises(TaskbrokerError) as refused:
        await client.enqueue_many([NewTask("free", "t", b"a"), NewTask("throttled", "t", b"b")])
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refused.value.reason == "ENQUEUE_PARTLY_STORED"
    assert "'throttled'" in str(refused.value)
    assert [s.pending for s in await client.stats("free", "throttled")] == [1, 1]


async def test_idempotency_key_repeat_returns_the_first_task(client: Client) -> None:
    first = await client.enqueue("emails", "send", b"x", idempotency_key="order-42")
    again = await client.enqueue("emails", "send", b"x", idempotency_key="order-42")
    (batch,) = await client.enqueue_many(
        [NewTask("emails", "send", b"x", idempotency_key="order-42")]
    )

    assert again == first
    assert batch == EnqueueResult(task_id=first, duplicate=True)
    (stats,) = await client.stats("emails")
    assert stats.pending == 1 and stats.enqueued_total == 1


async def test_enqueue_returns_a_str_id_that_tells_a_duplicate(client: Client) -> None:
    first = await client.enqueue("emails", "send", b"x", idempotency_key="order-7")
    again = await client.enqueue("emails", "send", b"x", idempotency_key="order-7")
    unkeyed = await client.enqueue("emails", "send", b"x")

    assert (first.duplicate, again.duplicate, unkeyed.duplicate) == (False, True, False)
    # Still the plain id wherever a str goes: equality, hashing, formatting, JSON, pickle.
    assert type(again).__mro__[1:] == (str, object)
    assert again == first and {first: 1}[again] == 1
    assert f"{again}" == str(again) == first and json.dumps([again]) == json.dumps([str(first)])
    assert (await client.get_task(again)).id == first
    copied = pickle.loads(pickle.dumps(again))
    assert copied == first and copied.duplicate is True


async def test_enqueue_many_keeps_order_and_splits_past_1000(client: Client) -> None:
    tasks = [NewTask(f"q{i % 3}", "send", str(i).encode()) for i in range(2_500)]

    results = await client.enqueue_many(tasks)  # one call of 2,500 would be refused

    assert len({r.task_id for r in results}) == 2_500
    assert not any(r.duplicate for r in results)
    for i in (0, 999, 1_000, 1_001, 2_499):
        task = await client.get_task(results[i].task_id)
        assert (task.queue, task.payload) == (f"q{i % 3}", str(i).encode())
    assert sum(s.pending for s in await client.stats("q0", "q1", "q2")) == 2_500
    assert await client.enqueue_many([]) == []


async def test_enqueue_many_accepts_any_iterable_with_options(client: Client) -> None:
    results = await client.enqueue_many(
        NewTask("emails", "send", priority=p, delay=timedelta(hours=1)) for p in (1, 2)
    )
    tasks = [await client.get_task(r.task_id) for r in results]
    assert [(t.priority, t.state) for t in tasks] == [
        (1, TaskState.SCHEDULED),
        (2, TaskState.SCHEDULED),
    ]


# --- errors ---------------------------------------------------------------------------------


async def test_bad_queue_name_is_invalid_argument_naming_the_field(client: Client) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        await client.enqueue("a b", "send")
    assert "tasks[0].queue" in str(err.value)
    assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.reason == "INVALID_ARGUMENT"

    with pytest.raises(InvalidArgumentError, match="task_id"):
        await client.get_task("nope")
    with pytest.raises(InvalidArgumentError):
        await client.stats("a{b}")


async def test_unknown_task_is_task_not_found(client: Client) -> None:
    with pytest.raises(TaskNotFoundError) as err:
        await client.get_task(UNKNOWN_ID)
    assert err.value.code is grpc.StatusCode.NOT_FOUND
    assert err.value.reason == "TASK_NOT_FOUND"
    with pytest.raises(TaskNotFoundError):
        await client.cancel(UNKNOWN_ID)


async def test_idempotency_key_reused_for_another_task_is_already_exists(client: Client) -> None:
    await client.enqueue("emails", "send", b"a", idempotency_key="k")
    with pytest.raises(AlreadyExistsError, match="idempotency_key"):
        await client.enqueue("emails", "send", b"b", idempotency_key="k")


async def test_cancelling_a_finished_task_is_failed_precondition(client: Client) -> None:
    task_id = await client.enqueue("emails", "send")
    await client.cancel(task_id)
    with pytest.raises(FailedPreconditionError) as err:
        await client.cancel(task_id)
    assert err.value.reason == "TASK_FINISHED"


async def test_stale_lease_maps_to_lease_stale_error(
    client: Client, running: RunningBroker
) -> None:
    task_id = await client.enqueue("emails", "send")
    stream, delivery = await lease_one(running, "emails")
    with pytest.raises(grpc.aio.AioRpcError) as raw:
        await client.stub.Ack(lease_pb2.AckRequest(task_id=task_id, lease_id="0" * 32))
    error = error_from_rpc(raw.value)
    assert type(error) is LeaseStaleError
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "LEASE_STALE")
    await stream.ack(delivery)
    await stream.close()


async def test_deadline_exceeded_is_unavailable(
    running: RunningBroker, redis_client: redis.Redis
) -> None:
    async with Client(running.target, timeout=0.05) as client:
        await client.stats()  # connected: only the slow answer below can miss the deadline
        redis_client.client_pause(500)  # every Redis command waits: the answer comes late
        with pytest.raises(UnavailableError) as err:
            await client.stats()
    assert err.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_naive_schedule_time_is_refused_before_any_call(client: Client) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        await client.enqueue("emails", "send", schedule_time=datetime(2030, 1, 1))  # noqa: DTZ001


async def test_closed_client_refuses_calls(running: RunningBroker) -> None:
    client = Client(running.target)
    await client.enqueue("emails", "send")
    await client.close()
    await client.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        await client.enqueue("emails", "send")


# --- wait, cancel, stats --------------------------------------------------------------------


async def test_wait_returns_the_task_with_its_result_once_acked(
    client: Client, running: RunningBroker
) -> None:
    task_id = await client.enqueue("emails", "send")
    waiting = asyncio.create_task(client.wait(task_id, timeout=10))

    stream, delivery = await lease_one(running, "emails")
    await asyncio.sleep(0.1)  # the waiter has seen the task unfinished at least once
    assert not waiting.done()
    await stream.ack(delivery, result=b"sent")
    task = await waiting
    await stream.close()

    assert task.state is TaskState.SUCCEEDED and task.result == b"sent"
    assert task.finish_time is not None and task.attempt == 1


async def test_wait_raises_timeout_error_when_nothing_finishes(client: Client) -> None:
    task_id = await client.enqueue("emails", "send")
    with pytest.raises(TimeoutError):
        await client.wait(task_id, timeout=0.2)
    assert (await client.get_task(task_id)).state is TaskState.PENDING


async def test_wait_watches_the_task_rather_than_polling(
    client: Client, running: RunningBroker
) -> None:
    task_id = await client.enqueue("emails", "send")
    waiting = asyncio.create_task(client.wait(task_id, timeout=10))
    # One WatchTask stream, held open.
    await until(lambda: running.broker.watch_hub.watching == 1, "the watch")
    stream, delivery = await lease_one(running, "emails")
    await stream.ack(delivery, result=b"sent")
    task = await asyncio.wait_for(waiting, 2)
    await stream.close()
    assert task.state is TaskState.SUCCEEDED and task.result == b"sent"
    await until(lambda: not running.broker.watch_hub.watching, "the end of the watch")


class BrokerBeforeWatchTask(broker_service_pb2_grpc.BrokerServiceServicer):
    """A real gRPC server speaking the API as it was before WatchTask: GetTask is served (by
    the running broker, through a channel), WatchTask answers UNIMPLEMENTED, as grpcio's
    generated servicer does for a method it lacks."""

    def __init__(self, upstream: broker_service_pb2_grpc.BrokerServiceAsyncStub) -> None:
        self._upstream = upstream

    async def GetTask(  # noqa: N802 (the RPC's name)
        self, request: bs.GetTaskRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bs.GetTaskResponse:
        response: bs.GetTaskResponse = await self._upstream.GetTask(request)
        return response


async def test_wait_polls_a_broker_that_has_no_watch_task(running: RunningBroker) -> None:
    server = grpc.aio.server()
    broker_service_pb2_grpc.add_BrokerServiceServicer_to_server(
        # The stubs mark every RPC abstract; the ones left out answer UNIMPLEMENTED at run time.
        BrokerBeforeWatchTask(running.stub),  # type: ignore[abstract]
        server,
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with Client(running.target) as producer, Client(f"127.0.0.1:{port}") as old:
            task_id = await producer.enqueue("emails", "send")
            waiting = asyncio.create_task(old.wait(task_id, timeout=10, poll_interval=0.02))
            stream, delivery = await lease_one(running, "emails")
            await stream.ack(delivery, result=b"sent")
            task = await asyncio.wait_for(waiting, 5)
            await stream.close()
        assert task.state is TaskState.SUCCEEDED and task.result == b"sent"
    finally:
        await server.stop(None)


async def test_wait_raises_for_an_unknown_or_malformed_id(client: Client) -> None:
    with pytest.raises(TaskNotFoundError):
        await client.wait(UNKNOWN_ID, timeout=5)
    with pytest.raises(InvalidArgumentError):
        await client.wait("not an id", timeout=5)
    with pytest.raises(ValueError, match="poll_interval"):
        await client.wait(UNKNOWN_ID, poll_interval=0)


async def test_a_timed_out_wait_lets_go_of_its_watch(
    client: Client, running: RunningBroker
) -> None:
    task_id = await client.enqueue("emails", "send")
    with pytest.raises(TimeoutError):
        await client.wait(task_id, timeout=0.3)
    await until(lambda: not running.broker.watch_hub.watching, "the end of the watch")


async def test_wait_watches_again_through_another_broker_when_its_own_drains(
    settings: Settings, running: RunningBroker
) -> None:
    second = await start_broker(settings)
    try:
        async with Client([running.target, second.target]) as client:
            task_id = await client.enqueue("emails", "send")
            waiting = asyncio.create_task(client.wait(task_id, timeout=10))
            hubs = [running.broker.watch_hub, second.broker.watch_hub]
            await until(lambda: any(hub.watching for hub in hubs), "the watch")
            watched = next(hub for hub in hubs if hub.watching)
            other = next(hub for hub in hubs if hub is not watched)
            watched.drain()  # its watch ends UNAVAILABLE, and it refuses new ones
            await until(lambda: other.watching > 0, "the watch through the other broker")
            stream, delivery = await lease_one(running, "emails")
            await stream.ack(delivery, result=b"sent")
            task = await asyncio.wait_for(waiting, 3)
            await stream.close()
            assert task.state is TaskState.SUCCEEDED and task.result == b"sent"
    finally:
        await second.close()


async def test_wait_raises_unavailable_when_no_broker_answers() -> None:
    async with Client(f"127.0.0.1:{free_port()}", options=FAST_RECONNECT) as client:
        with pytest.raises(UnavailableError):
            await client.wait(UNKNOWN_ID, timeout=10)


async def test_cancel_returns_the_cancelled_task(client: Client) -> None:
    task_id = await client.enqueue("emails", "send", delay=timedelta(hours=1))

    task = await client.cancel(task_id)

    assert task.id == task_id and task.state is TaskState.CANCELLED
    assert task.finish_time is not None
    assert (await client.wait(task_id, timeout=1)).state is TaskState.CANCELLED


async def test_stats_count_tasks_per_queue(client: Client) -> None:
    await client.enqueue("emails", "send")
    await client.enqueue("emails", "send", delay=timedelta(hours=1))
    await client.cancel(await client.enqueue("emails", "send"))
    await client.enqueue("sms", "send", delay=timedelta(hours=1))

    emails, sms = await client.stats("emails", "sms")

    assert (emails.queue, emails.pending, emails.scheduled, emails.leased) == ("emails", 1, 1, 0)
    assert (emails.enqueued_total, emails.cancelled_total, emails.paused) == (3, 1, False)
    assert emails.oldest_pending_age is not None and emails.oldest_pending_age >= timedelta(0)
    assert (sms.pending, sms.scheduled, sms.oldest_pending_age) == (0, 1, None)
    assert [s.queue for s in await client.stats()] == ["emails", "sms"]


# --- administration -------------------------------------------------------------------------


async def test_dead_letters_can_be_listed_redriven_and_deleted(
    client: Client, running: RunningBroker
) -> None:
    ids = [await client.enqueue("jobs", "run", str(i).encode()) for i in range(3)]
    stream = await LeaseStream(running.stub).open(["jobs"], credits=3)
    for delivery in await stream.take(3):
        await stream.nack(delivery, error="bad input", dead_letter=True)
    await stream.close()

    dead = [task async for task in client.dead_letters("jobs", page_size=2)]  # two pages
    assert sorted(t.id for t in dead) == sorted(ids)
    assert all(t.state is TaskState.DEAD and t.last_error == "bad input" for t in dead)
    assert all(t.errors[0].message == "bad input" for t in dead)

    assert await client.redrive("jobs", [ids[0]]) == 1
    assert (await client.get_task(ids[0])).state is TaskState.PENDING
    assert await client.delete_dead("jobs", [ids[1]]) == 1
    assert [t.id async for t in client.dead_letters("jobs")] == [ids[2]]
    assert await client.redrive("jobs", all=True) == 1
    assert await client.delete_dead("jobs", all=True) == 0
    assert [t async for t in client.dead_letters("jobs")] == []
    with pytest.raises(InvalidArgumentError, match="task_ids"):
        await client.redrive("jobs")


async def test_queues_pause_and_resume(client: Client) -> None:
    await client.enqueue("emails", "send")
    await client.enqueue("sms", "send")
    assert await client.queues() == ["emails", "sms"]

    await client.pause("emails")
    assert [s.paused for s in await client.stats("emails", "sms")] == [True, False]
    await client.resume("emails")
    assert [s.paused for s in await client.stats("emails", "sms")] == [False, False]


# --- targets and retries --------------------------------------------------------------------


def test_channel_target_builds_static_lists() -> None:
    assert channel_target("localhost:50051") == "localhost:50051"
    assert channel_target(["10.0.0.1:1"]) == "10.0.0.1:1"
    assert channel_target(["10.0.0.1:1", "10.0.0.2:2"]) == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target(["[::1]:1", "[::2]:2"]) == "ipv6:[::1]:1,[::2]:2"
    for bad in ([], ["broker-0:1", "broker-1:1"], ["10.0.0.1:1", "[::1]:1"], ["10.0.0.1", "x"]):
        with pytest.raises(ValueError, match="target"):
            channel_target(bad)


async def test_two_targets_are_balanced_round_robin(
    running: RunningBroker, settings: Settings
) -> None:
    second = await start_broker(settings)
    streams: list[LeaseStream] = []
    try:
        async with Client([running.target, second.target]) as client:
            # Lease streams stay with the broker that took them, so each registry shows which
            # broker each call reached (the first calls may all go to whichever connected first).
            for _ in range(50):
                streams.append(await LeaseStream(client.stub).open(["emails"], credits=0))
                if running.broker.registry.sessions and second.broker.registry.sessions:
                    break
                await asyncio.sleep(0.02)
            assert running.broker.registry.sessions and second.broker.registry.sessions
            for stream in streams:
                await stream.close()
    finally:
        await second.close()


async def test_a_target_that_is_down_is_skipped(running: RunningBroker) -> None:
    down = f"127.0.0.1:{free_port()}"
    async with Client([down, running.target]) as client:
        ids = [await client.enqueue("emails", "send") for _ in range(10)]
        assert len(set(ids)) == 10


async def test_unavailable_enqueue_is_retried_only_with_an_idempotency_key(
    settings: Settings,
) -> None:
    port = free_port()

    async def start_late() -> RunningBroker:
        await asyncio.sleep(0.2)
        return await start_broker(settings, listen=f"127.0.0.1:{port}")

    async with Client(f"127.0.0.1:{port}", options=FAST_RECONNECT) as client:
        with pytest.raises(UnavailableError) as err:
            await client.enqueue("emails", "send")
        assert err.value.code is grpc.StatusCode.UNAVAILABLE

        starting = asyncio.create_task(start_late())
        task_id = await client.enqueue("emails", "send", idempotency_key="k")
        running = await starting
        try:
            assert (await client.get_task(task_id)).state is TaskState.PENDING
        finally:
            await running.close()


# --- SyncClient -----------------------------------------------------------------------------


async def test_sync_client_serves_four_threads_at_once(running: RunningBroker) -> None:
    client = SyncClient(running.target)

    def produce(thread: int) -> list[str]:
        ids: list[str] = [
            client.enqueue("emails", "send", f"{thread}-{i}".encode()) for i in range(25)
        ]
        ids += [r.task_id for r in client.enqueue_many(NewTask("sms", "send") for _ in range(5))]
        for task_id in ids[:3]:
            assert client.get_task(task_id).state is TaskState.PENDING
        return ids

    try:
        batches = await asyncio.gather(*(asyncio.to_thread(produce, t) for t in range(4)))
        assert len({task_id for ids in batches for task_id in ids}) == 120
        stats = await asyncio.to_thread(client.stats, "emails", "sms")
        assert [s.pending for s in stats] == [100, 20]
        cancelled = await asyncio.to_thread(client.cancel, batches[0][0])
        assert cancelled.state is TaskState.CANCELLED
        with pytest.raises(TaskNotFoundError):
            await asyncio.to_thread(client.get_task, UNKNOWN_ID)
    finally:
        await asyncio.to_thread(client.close)
    client.close()  # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        client.enqueue("emails", "send")


async def test_sync_client_wait_blocks_until_the_task_finishes(running: RunningBroker) -> None:
    with SyncClient(running.target) as client:
        task_id = await asyncio.to_thread(client.enqueue, "emails", "send")
        waiting = asyncio.ensure_future(asyncio.to_thread(client.wait, task_id, timeout=10))
        stream, delivery = await lease_one(running, "emails")
        await stream.ack(delivery, result=b"ok")
        task = await waiting
        await stream.close()
        assert task.state is TaskState.SUCCEEDED and task.result == b"ok"

        other = await asyncio.to_thread(client.enqueue, "emails", "send")
        with pytest.raises(TimeoutError):
            await asyncio.to_thread(client.wait, other, timeout=0.2)


async def test_sync_client_enqueue_tells_a_duplicate(running: RunningBroker) -> None:
    with SyncClient(running.target) as client:
        first = await asyncio.to_thread(client.enqueue, "emails", "send", idempotency_key="k")
        again = await asyncio.to_thread(client.enqueue, "emails", "send", idempotency_key="k")

    assert again == first
    assert (first.duplicate, again.duplicate) == (False, True)


# --- codec ----------------------------------------------------------------------------------


def test_json_codec_round_trip_is_compact_utf8() -> None:
    value = {"user": "Zoë", "ids": [1, 2.5, None, True], "nested": {"a": []}}

    payload = json_payload(value)

    assert payload == '{"user":"Zoë","ids":[1,2.5,null,true],"nested":{"a":[]}}'.encode()
    assert from_json(payload) == value
    with pytest.raises(ValueError):
        json_payload(math.nan)
    with pytest.raises(TypeError):
        json_payload(object())


def test_sdk_errors_share_one_base() -> None:
    for cls in (InvalidArgumentError, TaskNotFoundError, LeaseStaleError, UnavailableError):
        assert issubclass(cls, TaskbrokerError)


async def test_queue_settings_change_only_what_is_given(client: Client) -> None:
    assert await client.queue_settings("emails") == QueueSettings()
    first = await client.update_queue_settings(
        "emails", rate_limit=RateLimit(50), per_key_max_concurrency=2
    )
    assert first == QueueSettings(rate_limit=RateLimit(50, 50), per_key_max_concurrency=2)
    second = await client.update_queue_settings("emails", rate_limit=None, max_concurrency=8)
    assert second == QueueSettings(max_concurrency=8, per_key_max_concurrency=2)
    assert await client.update_queue_settings("emails") == second  # nothing given: a read
    [stats] = await client.stats("emails")
    assert stats.settings == second
    with pytest.raises(InvalidArgumentError, match="per_key_max_concurrency"):
        await client.update_queue_settings("emails", per_key_max_concurrency=-1)
