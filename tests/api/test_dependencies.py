"""Task dependencies through real gRPC (issue 17), on one Redis and on a 3-master Cluster: a
child waits, then runs with its parents' results; failure policies; cascading cancel; the
checks that refuse a bad graph before anything is stored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta

import grpc
import pytest

from broker.config import Settings
from taskbroker.v1 import admin_service_pb2 as ad
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import task_pb2
from taskbroker.v1.lease_pb2 import Delivery as Delivered
from tests.conftest import TEST_SETTINGS, RunningBroker, start_broker
from tests.support.lease_stream import LeaseStream
from tests.support.redis_server import RedisCluster
from tests.support.tasks import enqueue, get, spec

WAITING = task_pb2.TASK_STATE_WAITING
PENDING = task_pb2.TASK_STATE_PENDING
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
CANCELLED = task_pb2.TASK_STATE_CANCELLED
DEAD = task_pb2.TASK_STATE_DEAD
RUN = task_pb2.PARENT_FAILURE_POLICY_RUN
WAIT = task_pb2.PARENT_FAILURE_POLICY_WAIT


@pytest.fixture(params=["standalone", "cluster"])
async def broker(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[RunningBroker]:
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        client = cluster.client()
        client.flushall()
        client.close()
        settings = replace(TEST_SETTINGS, redis_url=cluster.url, redis_cluster=True)
    running = await start_broker(settings)
    try:
        yield running
    finally:
        await running.close()


async def state_becomes(stub: object, task_id: str, state: int, wait_s: float = 3.0) -> None:
    deadline = time.monotonic() + wait_s
    while True:
        task = await get(stub, task_id)  # type: ignore[arg-type]
        if task.state == state:
            return
        assert time.monotonic() < deadline, f"{task_id} is {task.state}, not {state}"
        await asyncio.sleep(0.02)


async def test_a_chain_runs_in_order_and_each_step_gets_its_parent_s_result(
    broker: RunningBroker,
) -> None:
    stub = broker.stub
    # Three queues, so parents and children live in different Cluster slots.
    a, b, c = await enqueue(
        stub,
        spec(queue="resize", type_="a"),
        spec(queue="album", type_="b", depends_on_positions=[0]),
        spec(queue="mail", type_="c", depends_on_positions=[1]),
    )
    assert (await get(stub, b)).state == WAITING
    assert list((await get(stub, b)).waiting_for) == [a]
    worker = await LeaseStream(stub).open(["resize", "album", "mail"], credits=10)
    (first,) = await worker.take(1)
    assert first.task.id == a
    await asyncio.sleep(0.2)
    assert worker.deliveries.empty()  # b waits for a
    await worker.ack(first, result=b"resized")
    (second,) = await worker.take(1)
    assert second.task.id == b
    assert [(p.task_id, p.state, p.result) for p in second.task.parent_results] == [
        (a, SUCCEEDED, b"resized")
    ]
    await worker.ack(second, result=b"album")
    (third,) = await worker.take(1)
    assert third.task.id == c and third.task.parent_results[0].result == b"album"
    assert list(third.task.parent_ids) == [b]
    await worker.ack(third)
    parent = await get(stub, a)
    assert list(parent.child_ids) == [b] and parent.child_count == 1
    await worker.close()


async def test_a_chord_gets_every_result_in_parent_order(broker: RunningBroker) -> None:
    stub = broker.stub
    n = 20
    specs = [spec(queue=f"img{i % 3}", type_="resize", payload=str(i).encode()) for i in range(n)]
    specs.append(spec(queue="mail", type_="album", depends_on_positions=list(range(n))))
    ids = await enqueue(stub, *specs)
    worker = await LeaseStream(stub).open(["img0", "img1", "img2", "mail"], credits=50)
    resizes = await worker.take(n)
    for d in reversed(resizes):
        await worker.ack(d, result=b"r" + d.task.payload)
    (fan_in,) = await worker.take(1)
    assert fan_in.task.id == ids[-1]
    got = [(p.task_id, p.result) for p in fan_in.task.parent_results]
    assert got == [(ids[i], b"r" + str(i).encode()) for i in range(n)]
    await worker.close()


async def test_a_parent_by_id_that_already_succeeded_counts_at_once(broker: RunningBroker) -> None:
    stub = broker.stub
    (parent,) = await enqueue(stub, spec(queue="first"))
    worker = await LeaseStream(stub).open(["first", "second"], credits=5)
    (d,) = await worker.take(1)
    await worker.ack(d, result=b"done")
    (child,) = await enqueue(stub, spec(queue="second", depends_on=[parent]))
    (d2,) = await worker.take(1)
    assert d2.task.id == child and d2.task.parent_results[0].result == b"done"
    await worker.close()


async def test_a_dead_parent_cancels_its_waiting_descendants_by_default(
    broker: RunningBroker,
) -> None:
    stub = broker.stub
    a, b, c = await enqueue(
        stub,
        spec(queue="p", max_attempts=1),
        spec(queue="c1", depends_on_positions=[0]),
        spec(queue="c2", depends_on_positions=[1]),
    )
    worker = await LeaseStream(stub).open(["p"], credits=1)
    (d,) = await worker.take(1)
    await worker.nack(d, dead_letter=True)
    assert (await get(stub, a)).state == DEAD
    await state_becomes(stub, b, CANCELLED)
    await state_becomes(stub, c, CANCELLED)
    await worker.close()


async def test_run_anyway_runs_after_a_failed_parent_and_sees_its_state(
    broker: RunningBroker,
) -> None:
    stub = broker.stub
    ok, bad, child = await enqueue(
        stub,
        spec(queue="p", type_="ok"),
        spec(queue="p", type_="bad", max_attempts=1),
        spec(queue="c", depends_on_positions=[0, 1], parent_failure_policy=RUN),
    )
    worker = await LeaseStream(stub).open(["p", "c"], credits=5)
    for d in await worker.take(2):
        if d.task.id == ok:
            await worker.ack(d, result=b"fine")
        else:
            await worker.nack(d, dead_letter=True)
    (d,) = await worker.take(1)
    assert d.task.id == child
    assert [(p.task_id, p.state) for p in d.task.parent_results] == [(ok, SUCCEEDED), (bad, DEAD)]
    await worker.close()


async def test_wait_policy_holds_a_child_until_its_dead_parent_is_redriven(
    broker: RunningBroker,
) -> None:
    stub = broker.stub
    parent, child = await enqueue(
        stub,
        spec(queue="p", max_attempts=1),
        spec(queue="c", depends_on_positions=[0], parent_failure_policy=WAIT),
    )
    worker = await LeaseStream(stub).open(["p", "c"], credits=5)
    (d,) = await worker.take(1)
    await worker.nack(d, dead_letter=True)
    await asyncio.sleep(0.5)
    assert (await get(stub, child)).state == WAITING
    await broker.admin.RedriveDeadTasks(ad.RedriveDeadTasksRequest(queue="p", task_ids=[parent]))
    (again,) = await worker.take(1)
    assert again.task.id == parent
    await worker.ack(again, result=b"second time")
    (d2,) = await worker.take(1)
    assert d2.task.id == child and d2.task.parent_results[0].result == b"second time"
    await worker.close()


async def test_cancelling_a_parent_cascades_to_its_waiting_descendants(
    broker: RunningBroker,
) -> None:
    stub = broker.stub
    a, b, c, d = await enqueue(
        stub,
        spec(queue="p"),
        spec(queue="c1", depends_on_positions=[0]),
        spec(queue="c2", depends_on_positions=[1]),
        spec(queue="c2", depends_on_positions=[1], parent_failure_policy=RUN),
    )
    await stub.CancelTask(bs.CancelTaskRequest(task_id=a))
    await state_becomes(stub, b, CANCELLED)
    await state_becomes(stub, c, CANCELLED)
    await state_becomes(stub, d, PENDING)  # RUN: a cancelled parent counts as ended
    waiting = await stub.CancelTask(bs.CancelTaskRequest(task_id=d))
    assert waiting.task.state == CANCELLED


async def test_a_waiting_task_can_be_cancelled_and_never_runs(broker: RunningBroker) -> None:
    stub = broker.stub
    _, child = await enqueue(stub, spec(queue="p"), spec(queue="c", depends_on_positions=[0]))
    cancelled = await stub.CancelTask(bs.CancelTaskRequest(task_id=child))
    assert cancelled.task.state == CANCELLED
    worker = await LeaseStream(stub).open(["p", "c"], credits=5)
    (d,) = await worker.take(1)
    await worker.ack(d)
    await asyncio.sleep(0.5)
    assert worker.deliveries.empty()
    await worker.close()


async def test_a_delayed_child_is_scheduled_from_its_release(broker: RunningBroker) -> None:
    stub = broker.stub
    _, child = await enqueue(
        stub,
        spec(queue="p"),
        spec(queue="c", depends_on_positions=[0], delay=timedelta(milliseconds=600)),
    )
    worker = await LeaseStream(stub).open(["p", "c"], credits=5)
    (d,) = await worker.take(1)
    await asyncio.sleep(0.8)  # longer than the delay: it counts from the release, not enqueue
    await worker.ack(d)
    await state_becomes(stub, child, task_pb2.TASK_STATE_SCHEDULED, wait_s=1)
    started = time.monotonic()
    (d2,) = await worker.take(1, wait_s=3)
    assert d2.task.id == child and time.monotonic() - started > 0.3
    await worker.close()


async def test_stats_count_waiting_tasks(broker: RunningBroker) -> None:
    stub = broker.stub
    await enqueue(stub, spec(queue="p"), spec(queue="c", depends_on_positions=[0]))
    stats = await stub.Stats(bs.StatsRequest(queues=["c"]))
    assert stats.queues[0].waiting == 1 and stats.queues[0].pending == 0


@pytest.mark.parametrize(
    ("specs", "field"),
    [
        ([spec(), spec(depends_on_positions=[1])], "tasks[1].depends_on_positions"),
        ([spec(), spec(depends_on_positions=[2])], "tasks[1].depends_on_positions"),
        (
            [spec(depends_on_positions=[1]), spec(depends_on_positions=[0])],
            "tasks[0].depends_on_positions",
        ),
        ([spec(), spec(depends_on=["emails:nonsense"])], "tasks[1].depends_on[0]"),
        (
            [spec(depends_on=["emails:01ARZ3NDEKTSV4RRFFQ69G5FAV"])],
            "tasks[0].depends_on[0]",
        ),
        ([spec(parent_failure_policy=9)], "tasks[0].parent_failure_policy"),
        ([spec(depends_on_positions=[0] * 2)], "tasks[0].depends_on_positions"),
    ],
    ids=["itself", "out-of-range", "cycle", "malformed-id", "unknown-id", "policy", "twice"],
)
async def test_a_bad_graph_is_invalid_argument_and_nothing_is_stored(
    broker: RunningBroker, specs: list[task_pb2.TaskSpec], field: str
) -> None:
    stub = broker.stub
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await enqueue(stub, *specs)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (caught.value.details() or "")
    (stats,) = (await stub.Stats(bs.StatsRequest(queues=["emails"]))).queues
    assert stats.pending == 0 and stats.waiting == 0


async def test_a_parent_that_is_an_idempotency_duplicate_is_the_task_stored_before(
    broker: RunningBroker,
) -> None:
    stub = broker.stub
    (original,) = await enqueue(stub, spec(queue="p", idempotency_key="resize-1"))
    reply = await stub.Enqueue(
        bs.EnqueueRequest(
            tasks=[
                spec(queue="p", idempotency_key="resize-1"),
                spec(queue="c", depends_on_positions=[0]),
            ]
        )
    )
    assert reply.results[0].duplicate and reply.results[0].task_id == original
    child = reply.results[1].task_id
    assert list((await get(stub, child)).parent_ids) == [original]
    worker = await LeaseStream(stub).open(["p", "c"], credits=5)
    (d,) = await worker.take(1)
    assert d.task.id == original
    await worker.ack(d, result=b"once")
    (d2,) = await worker.take(1)
    assert d2.task.id == child and d2.task.parent_results[0].result == b"once"
    await worker.close()


async def test_an_ack_repeated_tells_the_children_once(broker: RunningBroker) -> None:
    stub = broker.stub
    parent, child = await enqueue(stub, spec(queue="p"), spec(queue="c", depends_on_positions=[0]))
    worker = await LeaseStream(stub).open(["p"], credits=1)
    (d,) = await worker.take(1)
    await state_is_linked(broker, parent)
    await worker.ack(d, result=b"r")
    again = await worker.ack(d, result=b"r")
    assert again.already_settled
    await state_becomes(stub, child, PENDING)
    await broker.broker.mover.idle()
    assert broker.broker.mover.moved >= 1
    assert (await stub.Stats(bs.StatsRequest(queues=["c"]))).queues[0].pending == 1
    await worker.close()


async def state_is_linked(broker: RunningBroker, parent: str) -> None:
    """Waits until the mover has linked the parent to its child (its child_count is 1)."""
    deadline = time.monotonic() + 3
    while (await get(broker.stub, parent)).child_count != 1:
        assert time.monotonic() < deadline, "never linked"
        await asyncio.sleep(0.02)


async def test_a_released_child_keeps_its_group_key_and_its_queue_s_limits(
    broker: RunningBroker,
) -> None:
    stub = broker.stub
    await broker.admin.UpdateQueueSettings(
        ad.UpdateQueueSettingsRequest(
            queue="c",
            settings={"max_concurrency": 1},  # type: ignore[arg-type]
            update_mask={"paths": ["max_concurrency"]},  # type: ignore[arg-type]
        )
    )
    ids = await enqueue(
        stub,
        spec(queue="p"),
        spec(queue="c", group_key="tenant-a", depends_on_positions=[0]),
        spec(queue="c", group_key="tenant-b", depends_on_positions=[0]),
    )
    worker = await LeaseStream(stub).open(["p", "c"], credits=5)
    (d,) = await worker.take(1)
    await worker.ack(d)
    (first,) = await worker.take(1)
    assert first.task.group_key in ("tenant-a", "tenant-b")
    await asyncio.sleep(0.3)
    assert worker.deliveries.empty()  # max_concurrency 1 holds the other back
    await worker.ack(first)
    (second,) = await worker.take(1)
    assert {first.task.id, second.task.id} == set(ids[1:])
    await worker.close()


async def test_parents_ending_at_once_on_two_replicas_release_their_child_once(
    settings: Settings,
) -> None:
    one, two = await start_broker(settings), await start_broker(settings)
    try:
        n = 100
        *parents, child = await enqueue(
            one.stub,
            *[spec(queue=f"p{i % 2}") for i in range(n)],
            spec(queue="c", depends_on_positions=list(range(n))),
        )
        first = await LeaseStream(one.stub).open(["p0"], credits=n)
        second = await LeaseStream(two.stub).open(["p1"], credits=n)
        a, b = await asyncio.gather(first.take(n // 2), second.take(n // 2))

        async def ack_all(stream: LeaseStream, held: list[Delivered], result: bytes) -> None:
            for d in held:  # one write at a time on a stream; the two streams side by side
                await stream.ack(d, result=result)

        await asyncio.gather(ack_all(first, a, b"1"), ack_all(second, b, b"2"))
        worker = await LeaseStream(two.stub).open(["c"], credits=5)
        (d,) = await worker.take(1)
        assert d.task.id == child and len(d.task.parent_results) == n
        assert [p.task_id for p in d.task.parent_results] == parents
        await worker.ack(d)
        await asyncio.sleep(0.3)
        assert worker.deliveries.empty()
        (stats,) = (await one.stub.Stats(bs.StatsRequest(queues=["c"]))).queues
        assert (stats.pending, stats.waiting, stats.succeeded_total) == (0, 0, 1)
        for stream in (first, second, worker):
            await stream.close()
    finally:
        await one.close()
        await two.close()


async def test_results_past_one_mib_in_all_are_marked_omitted_not_sent(
    broker: RunningBroker,
) -> None:
    stub = broker.stub
    big = 400 * 1024
    ids = await enqueue(
        stub,
        *[spec(queue="p", payload=str(i).encode()) for i in range(3)],
        spec(queue="c", depends_on_positions=[0, 1, 2]),
    )
    worker = await LeaseStream(stub).open(["p", "c"], credits=5)
    for d in sorted(await worker.take(3), key=lambda d: d.task.payload):
        await worker.ack(d, result=d.task.payload * big)
    (fan_in,) = await worker.take(1)
    got = [(p.task_id, len(p.result), p.result_omitted) for p in fan_in.task.parent_results]
    # 2 x 400 KiB fit in 1 MiB; the third is left out, and read with GetTask when needed.
    assert got == [(ids[0], big, False), (ids[1], big, False), (ids[2], 0, True)]
    assert len((await get(stub, ids[2])).result) == big
    await worker.close()
