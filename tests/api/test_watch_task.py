"""BrokerService.WatchTask through real gRPC on real Redis: the states in order and the end of
the stream, the errors, the deadline, a cancel, the finished-event path (the scripts'
tb:finished announcements) and the re-read timer that stands in for a lost event, a second
replica, the watcher bound, a client that goes away and a draining broker; standalone and
Cluster where the topology matters."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import TYPE_CHECKING, cast

import grpc
import pytest
import redis

from broker.config import Settings
from broker.store.keys import FINISHED_CHANNEL, QueueKeys
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import lease_pb2, task_pb2
from tests.api.test_limits import until
from tests.conftest import TEST_SETTINGS, RunningBroker, start_broker
from tests.support.lease_stream import LeaseStream
from tests.support.redis_server import RedisCluster
from tests.support.tasks import enqueue, error_reason, spec

if TYPE_CHECKING:  # the async stubs exist only in the generated .pyi files
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

UNKNOWN_ID = "emails:01J0000000000000000000000A"
S = task_pb2.TaskState
#: Re-reads so far apart that only a finished event can end a watch in a test's time.
NO_TIMER = {"watch_poll_initial_s": 30.0, "watch_poll_max_s": 30.0}

Call = grpc.aio.UnaryStreamCall[bs.WatchTaskRequest, bs.WatchTaskResponse]


def watch(stub: BrokerServiceAsyncStub, task_id: str, timeout: float | None = None) -> Call:
    return stub.WatchTask(bs.WatchTaskRequest(task_id=task_id), timeout=timeout)


async def next_task(call: Call, wait_s: float = 3.0) -> task_pb2.Task:
    response = await asyncio.wait_for(call.read(), wait_s)
    assert isinstance(response, bs.WatchTaskResponse), response
    return response.task


async def ends(call: Call, wait_s: float = 3.0) -> None:
    """The stream ends cleanly, with nothing more."""
    assert await asyncio.wait_for(call.read(), wait_s) is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def fails(call: Call, wait_s: float = 3.0) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await asyncio.wait_for(call.read(), wait_s)
    return caught.value


async def no_watchers(running: RunningBroker, wait_s: float = 2.0) -> None:
    await until(lambda: not running.broker.watch_hub.watching, "no watchers", wait_s)


def task_key(task_id: str) -> str:
    queue, _, local_id = task_id.partition(":")
    return QueueKeys(queue).task(local_id)


@pytest.fixture(params=["standalone", "cluster"])
def topology_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    if request.param == "cluster":
        cluster = cast("RedisCluster", request.getfixturevalue("redis_cluster"))
        with cluster.client() as client:
            client.flushall()
        return replace(TEST_SETTINGS, redis_url=cluster.url, redis_cluster=True)
    return settings


@pytest.fixture
async def broker(topology_settings: Settings) -> AsyncIterator[RunningBroker]:
    running = await start_broker(topology_settings)
    await running.broker.watch_hub.connected.wait()
    yield running
    await running.close()


async def test_a_watcher_sees_pending_leased_succeeded_in_order_and_the_stream_ends(
    broker: RunningBroker,
) -> None:
    (task_id,) = await enqueue(broker.stub, spec())
    call = watch(broker.stub, task_id)
    first = await next_task(call)
    assert (first.id, first.state, first.attempt) == (task_id, S.TASK_STATE_PENDING, 0)

    worker = await LeaseStream(broker.stub).open(["emails"], credits=1)
    (delivery,) = await worker.take(1)
    leased = await next_task(call)
    assert (leased.state, leased.attempt) == (S.TASK_STATE_LEASED, 1)

    await worker.ack(delivery, result=b"done")
    done = await next_task(call)
    assert (done.state, done.result) == (S.TASK_STATE_SUCCEEDED, b"done")
    await ends(call)
    await no_watchers(broker)
    await worker.close()


async def test_a_retry_is_a_change_and_a_dead_letter_ends_the_stream(
    broker: RunningBroker,
) -> None:
    (task_id,) = await enqueue(broker.stub, spec(max_attempts=2))
    worker = await LeaseStream(broker.stub).open(["emails"], credits=1)
    (first,) = await worker.take(1)
    call = watch(broker.stub, task_id)
    assert (await next_task(call)).state == S.TASK_STATE_LEASED
    await worker.nack(first, error="boom")  # retried: the broker's short test backoff
    states = [(await next_task(call)).state]
    await worker.credit(1)
    (second,) = await worker.take(1)
    await worker.nack(second, error="boom again")
    while states[-1] != S.TASK_STATE_DEAD:
        states.append((await next_task(call)).state)
    # Each read is sent only when state or attempt changed; the retry's states may go by
    # faster than a read, but the order holds and DEAD is last.
    assert states[0] in (S.TASK_STATE_SCHEDULED, S.TASK_STATE_PENDING, S.TASK_STATE_LEASED)
    assert states[-1] == S.TASK_STATE_DEAD
    await ends(call)
    await worker.close()


async def test_unknown_and_malformed_ids(broker: RunningBroker) -> None:
    error = await fails(watch(broker.stub, UNKNOWN_ID))
    assert error.code() == grpc.StatusCode.NOT_FOUND and error_reason(error) == "TASK_NOT_FOUND"
    error = await fails(watch(broker.stub, "not an id"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = await fails(watch(broker.stub, ""))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    await no_watchers(broker)


async def test_the_deadline_ends_the_stream_with_deadline_exceeded(broker: RunningBroker) -> None:
    (task_id,) = await enqueue(broker.stub, spec())
    started = time.monotonic()
    call = watch(broker.stub, task_id, timeout=0.5)
    assert (await next_task(call)).state == S.TASK_STATE_PENDING
    error = await fails(call)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.4 < time.monotonic() - started < 2.0
    await no_watchers(broker)


async def test_a_task_cancelled_while_watched_ends_the_stream_cancelled(
    broker: RunningBroker,
) -> None:
    (fresh, delayed) = await enqueue(broker.stub, spec(), spec(delay=timedelta(hours=1)))
    for task_id, first in ((fresh, S.TASK_STATE_PENDING), (delayed, S.TASK_STATE_SCHEDULED)):
        call = watch(broker.stub, task_id)
        assert (await next_task(call)).state == first
        await broker.stub.CancelTask(bs.CancelTaskRequest(task_id=task_id))
        assert (await next_task(call)).state == S.TASK_STATE_CANCELLED
        await ends(call)
    await no_watchers(broker)


async def test_a_finished_task_is_sent_once_and_the_stream_ends(broker: RunningBroker) -> None:
    (task_id,) = await enqueue(broker.stub, spec())
    await broker.stub.CancelTask(bs.CancelTaskRequest(task_id=task_id))
    call = watch(broker.stub, task_id)
    assert (await next_task(call)).state == S.TASK_STATE_CANCELLED
    await ends(call)


async def test_a_watch_through_a_second_replica_follows_a_task_settled_through_the_first(
    topology_settings: Settings,
) -> None:
    first = await start_broker(topology_settings)
    second = await start_broker(topology_settings)
    (task_id,) = await enqueue(first.stub, spec())
    call = watch(second.stub, task_id)
    assert (await next_task(call)).state == S.TASK_STATE_PENDING
    worker = await LeaseStream(first.stub).open(["emails"], credits=1)
    (delivery,) = await worker.take(1)
    assert (await next_task(call)).state == S.TASK_STATE_LEASED
    await worker.ack(delivery)
    assert (await next_task(call)).state == S.TASK_STATE_SUCCEEDED
    await ends(call)
    await worker.close()
    await first.close()
    await second.close()


# --- the finished event and the timer -------------------------------------------------------


async def leased_and_watched(
    running: RunningBroker,
) -> tuple[LeaseStream, lease_pb2.Delivery, Call]:
    """A leased task (so it has a hash for the watch to mark) and a watch on it."""
    (task_id,) = await enqueue(running.stub, spec())
    worker = await LeaseStream(running.stub).open(["emails"], credits=1)
    (delivery,) = await worker.take(1)
    call = watch(running.stub, task_id)
    assert (await next_task(call)).state == S.TASK_STATE_LEASED
    return worker, delivery, call


@pytest.mark.parametrize("finish", ["ack", "dead_letter", "cancel"])
async def test_a_finish_arrives_by_its_event_when_the_timer_is_far_off(
    topology_settings: Settings, finish: str
) -> None:
    running = await start_broker(topology_settings, **NO_TIMER)
    await running.broker.watch_hub.connected.wait()
    worker, delivery, call = await leased_and_watched(running)
    started = time.monotonic()
    if finish == "ack":
        await worker.ack(delivery)
    elif finish == "dead_letter":
        await worker.nack(delivery, error="no", dead_letter=True)
    else:
        await running.stub.CancelTask(bs.CancelTaskRequest(task_id=delivery.task.id))
    try:
        task = await next_task(call, wait_s=1.0)
        assert task.state in (S.TASK_STATE_SUCCEEDED, S.TASK_STATE_DEAD, S.TASK_STATE_CANCELLED)
        assert time.monotonic() - started < 1.0
        await ends(call)
    finally:
        await worker.close()
        await running.close()


async def test_the_hub_wakes_a_watcher_on_an_announcement_on_any_node(
    topology_settings: Settings,
) -> None:
    """The hub's half of the event path: an id published on tb:finished wakes its watchers at
    once (here the publish is made by hand, after an ack, as the scripts will)."""
    running = await start_broker(topology_settings, **NO_TIMER)
    await running.broker.watch_hub.connected.wait()
    worker, delivery, call = await leased_and_watched(running)
    await worker.ack(delivery)
    task_id = delivery.task.id
    url = topology_settings.redis_url or ""
    # On a Cluster the PUBLISH reaches every node, whichever the hub listens on.
    r = (
        redis.RedisCluster.from_url(url)
        if topology_settings.redis_cluster
        else redis.Redis.from_url(url)
    )
    with r:
        assert r.hget(task_key(task_id), "w") == b"1"  # marked by the watch
        started = time.monotonic()
        r.publish(FINISHED_CHANNEL, task_id)
    try:
        assert (await next_task(call, wait_s=1.0)).state == S.TASK_STATE_SUCCEEDED
        assert time.monotonic() - started < 1.0
        await ends(call)
    finally:
        await worker.close()
        await running.close()


async def test_a_lost_event_still_ends_the_watch_within_the_timer_interval(
    settings: Settings,
) -> None:
    running = await start_broker(settings, watch_poll_initial_s=0.1, watch_poll_max_s=0.4)
    await running.broker.watch_hub.connected.wait()
    # No subscription at all: every announcement is lost.
    await running.broker.watch_hub.stop()
    worker, delivery, call = await leased_and_watched(running)
    await asyncio.sleep(1.0)  # the re-reads back off to their longest interval
    started = time.monotonic()
    await worker.ack(delivery)
    try:
        assert (await next_task(call, wait_s=2.0)).state == S.TASK_STATE_SUCCEEDED
        assert time.monotonic() - started < 0.4 + 0.3
        await ends(call)
    finally:
        await worker.close()
        await running.close()


async def test_the_mark_never_makes_a_hash_for_a_missing_or_fresh_task(
    settings: Settings, redis_client: redis.Redis
) -> None:
    running = await start_broker(settings)
    await fails(watch(running.stub, UNKNOWN_ID))
    assert not redis_client.exists(task_key(UNKNOWN_ID))

    (task_id,) = await enqueue(running.stub, spec())  # fresh: a stream entry, no hash
    call = watch(running.stub, task_id)
    assert (await next_task(call)).state == S.TASK_STATE_PENDING
    await asyncio.sleep(0.3)  # several re-reads
    assert not redis_client.exists(task_key(task_id))

    worker = await LeaseStream(running.stub).open(["emails"], credits=1)
    (delivery,) = await worker.take(1)  # its first transition makes its hash
    assert (await next_task(call)).state == S.TASK_STATE_LEASED
    # The read that saw LEASED may have come before the watcher's next mark: marked by the one
    # after it, within the watcher's first re-read interval.
    await until(lambda: redis_client.hget(task_key(task_id), "w") == b"1", "the mark", 2.0)
    await worker.ack(delivery)
    assert (await next_task(call)).state == S.TASK_STATE_SUCCEEDED
    await worker.close()
    await running.close()


# --- bounds and lifecycle ---------------------------------------------------------------------


async def test_watchers_past_max_watchers_are_refused(settings: Settings) -> None:
    running = await start_broker(settings, max_watchers=2)
    ids = await enqueue(running.stub, spec(), spec(), spec())
    calls = [watch(running.stub, task_id) for task_id in ids[:2]]
    for call in calls:
        await next_task(call)
    error = await fails(watch(running.stub, ids[2]))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_watchers" in (
        error.details() or ""
    )
    calls[0].cancel()
    await asyncio.sleep(0.2)
    assert (await next_task(watch(running.stub, ids[2]))).id == ids[2]  # room again
    for call in calls:
        call.cancel()
    await running.close()


async def test_a_watcher_whose_client_goes_away_is_cleaned_up(settings: Settings) -> None:
    running = await start_broker(settings)
    ids = await enqueue(running.stub, spec(), spec())
    calls = [watch(running.stub, task_id) for task_id in ids]
    for call in calls:
        await next_task(call)
    assert running.broker.watch_hub.watching == 2
    calls[0].cancel()
    await asyncio.sleep(0.2)
    assert running.broker.watch_hub.watching == 1
    await running.channel.close()  # the connection goes away
    await no_watchers(running)
    await running.broker.stop(grace_s=0.2)


async def test_a_draining_broker_ends_watches_unavailable_and_refuses_new_ones(
    settings: Settings,
) -> None:
    running = await start_broker(settings)
    (task_id,) = await enqueue(running.stub, spec())
    call = watch(running.stub, task_id)
    await next_task(call)
    running.broker.dispatcher.drain()
    running.broker.watch_hub.drain()
    error = await fails(call)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and error_reason(error) == "DRAINING"
    error = await fails(watch(running.stub, task_id))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    await running.close()


async def test_a_waiting_child_is_seen_released_when_its_parent_succeeds(
    broker: RunningBroker,
) -> None:
    parent, child = await enqueue(broker.stub, spec(), spec(depends_on_positions=[0]))
    call = watch(broker.stub, child)
    assert (await next_task(call)).state == S.TASK_STATE_WAITING
    worker = await LeaseStream(broker.stub).open(["emails"], credits=1)
    (delivery,) = await worker.take(1)
    assert delivery.task.id == parent
    await worker.ack(delivery)
    released = await next_task(call)  # no event for a release: the re-read finds it
    assert released.state in (S.TASK_STATE_PENDING, S.TASK_STATE_LEASED)
    assert [r.task_id for r in released.parent_results] == [parent]
    await worker.close()
    call.cancel()
    await no_watchers(broker)
