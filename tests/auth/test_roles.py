"""Role boundaries on gRPC: each principal does what its grants say on the queues they name,
is refused with PERMISSION_DENIED naming the queue and the role otherwise, and a refused call
does nothing. Lists show only permitted queues; a policy edit applies without a restart."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from taskbroker.v1 import admin_service_pb2 as ad
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import lease_pb2
from tests.auth.conftest import GRANTS, Secured, policy_text
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, error_reason, get, spec

DENIED = grpc.StatusCode.PERMISSION_DENIED


async def denied(call: object, queue: str, role: str) -> None:
    """Awaits the call and checks it was refused naming the queue and the role needed."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == DENIED, caught.value
    details = caught.value.details() or ""
    assert f"queue {queue!r}" in details and role in details, details
    assert error_reason(caught.value) == "PERMISSION_DENIED"


async def pending(secured: Secured, queue: str) -> int:
    [stats] = (await secured.as_("ops").stub.Stats(bs.StatsRequest(queues=[queue]))).queues
    return int(stats.pending)


async def test_a_consumer_of_a_cannot_lease_b_enqueue_or_read_dead_letters(
    secured: Secured,
) -> None:
    await enqueue(secured.as_("ops").stub, spec("a"), spec("b"))
    consumer = secured.as_("consumer")
    for queues in (["b"], ["a", "b"]):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await LeaseStream(consumer.stub).open(queues, credits=10)
        assert caught.value.code() == DENIED
        assert "queue 'b'" in (caught.value.details() or "")
        assert "consume" in (caught.value.details() or "")
    assert await pending(secured, "b") == 1  # nothing was leased
    await denied(consumer.stub.Enqueue(bs.EnqueueRequest(tasks=[spec("a")])), "a", "produce")
    await denied(consumer.admin.ListDeadTasks(ad.ListDeadTasksRequest(queue="a")), "a", "read")
    assert await pending(secured, "a") == 1

    stream = await LeaseStream(consumer.stub).open(["a"], credits=10)
    [delivery] = await stream.take(1)
    assert (await stream.ack(delivery)).outcome == lease_pb2.SETTLE_OUTCOME_OK
    await stream.close()


async def test_a_producer_of_a_cannot_enqueue_into_b_and_a_mixed_call_stores_nothing(
    secured: Secured,
) -> None:
    producer = secured.as_("producer")
    await denied(producer.stub.Enqueue(bs.EnqueueRequest(tasks=[spec("b")])), "b", "produce")
    mixed = bs.EnqueueRequest(tasks=[spec("a"), spec("a"), spec("b")])
    await denied(producer.stub.Enqueue(mixed), "b", "produce")
    assert await pending(secured, "a") == 0
    [task_id] = await enqueue(producer.stub, spec("a"))
    assert (await get(producer.stub, task_id)).id == task_id  # produce reads its queue's tasks
    [other] = await enqueue(secured.as_("ops").stub, spec("b"))
    await denied(producer.stub.GetTask(bs.GetTaskRequest(task_id=other)), "b", "produce or read")
    await denied(producer.stub.CancelTask(bs.CancelTaskRequest(task_id=other)), "b", "produce")
    await denied(producer.admin.PauseQueue(ad.PauseQueueRequest(queue="a")), "a", "admin")


async def test_a_reader_reads_but_cannot_pause_cancel_or_redrive(secured: Secured) -> None:
    [task_id] = await enqueue(secured.as_("ops").stub, spec("a"))
    reader = secured.as_("reader")
    assert (await get(reader.stub, task_id)).id == task_id
    await reader.admin.ListDeadTasks(ad.ListDeadTasksRequest(queue="a"))
    await denied(reader.admin.PauseQueue(ad.PauseQueueRequest(queue="a")), "a", "admin")
    await denied(reader.admin.ResumeQueue(ad.ResumeQueueRequest(queue="a")), "a", "admin")
    redrive = ad.RedriveDeadTasksRequest(queue="a", all=True)
    await denied(reader.admin.RedriveDeadTasks(redrive), "a", "admin")
    delete = ad.DeleteDeadTasksRequest(queue="a", all=True)
    await denied(reader.admin.DeleteDeadTasks(delete), "a", "admin")
    await denied(reader.stub.CancelTask(bs.CancelTaskRequest(task_id=task_id)), "a", "produce")
    [stats] = (await reader.stub.Stats(bs.StatsRequest(queues=["a"]))).queues
    assert not stats.paused and stats.pending == 1

    admin = secured.as_("admin")
    await admin.admin.PauseQueue(ad.PauseQueueRequest(queue="a"))
    [stats] = (await reader.stub.Stats(bs.StatsRequest(queues=["a"]))).queues
    assert stats.paused
    # admin alone does not read tasks or enqueue.
    await denied(admin.stub.GetTask(bs.GetTaskRequest(task_id=task_id)), "a", "produce or read")


async def test_unary_settlements_need_consume_on_the_tasks_queue(secured: Secured) -> None:
    [task_id] = await enqueue(secured.as_("ops").stub, spec("a"))
    producer = secured.as_("producer")
    lease_id = "0" * 32
    await denied(
        producer.stub.Ack(lease_pb2.AckRequest(task_id=task_id, lease_id=lease_id)), "a", "consume"
    )
    await denied(
        producer.stub.Nack(lease_pb2.NackRequest(task_id=task_id, lease_id=lease_id)),
        "a",
        "consume",
    )
    extend = lease_pb2.ExtendLeaseRequest(task_id=task_id, lease_id=lease_id)
    await denied(producer.stub.ExtendLease(extend), "a", "consume")


async def test_list_queues_and_stats_show_only_permitted_queues(secured: Secured) -> None:
    await enqueue(secured.as_("ops").stub, spec("a"), spec("b"), spec("shared"))
    everything = await secured.as_("ops").admin.ListQueues(ad.ListQueuesRequest())
    assert list(everything.queues) == ["a", "b", "shared"]
    for name, seen in (("consumer", ["a"]), ("reader", ["a"]), ("x", ["shared"])):
        caller = secured.as_(name)
        assert list((await caller.admin.ListQueues(ad.ListQueuesRequest())).queues) == seen
    reader = secured.as_("reader")
    page = await reader.stub.Stats(bs.StatsRequest(page_size=1))
    assert [s.queue for s in page.queues] == ["a"] and not page.next_page_token
    # Stats needs read: a consumer's page is empty, a named queue without read is refused.
    consumer_page = await secured.as_("consumer").stub.Stats(bs.StatsRequest())
    assert list(consumer_page.queues) == []
    await denied(reader.stub.Stats(bs.StatsRequest(queues=["a", "b"])), "b", "read")


async def test_a_policy_edit_grants_a_role_without_a_restart(secured: Secured) -> None:
    reader = secured.as_("reader")
    await denied(reader.stub.Stats(bs.StatsRequest(queues=["c"])), "c", "read")
    grants = {**GRANTS, "reader": (["read"], ["a", "c"])}
    secured.policy.write_text(policy_text(grants))
    deadline = time.monotonic() + 5  # the file is looked at about once a second
    while True:
        try:
            await reader.stub.Stats(bs.StatsRequest(queues=["c"]))
            break
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == DENIED and time.monotonic() < deadline, exc
            await asyncio.sleep(0.1)
    # A broken edit keeps the policy in force.
    secured.policy.write_text("[[principals]\n")
    await asyncio.sleep(1.2)
    await reader.stub.Stats(bs.StatsRequest(queues=["c"]))


async def test_watching_a_task_needs_produce_or_read_on_its_queue(secured: Secured) -> None:
    on_a, on_b = await enqueue(secured.as_("ops").stub, spec("a"), spec("b"))
    for name in ("producer", "reader"):
        stub = secured.as_(name).stub
        call = stub.WatchTask(bs.WatchTaskRequest(task_id=on_a))
        first = await asyncio.wait_for(call.read(), 5)
        assert isinstance(first, bs.WatchTaskResponse) and first.task.id == on_a
        call.cancel()
        watch_b = stub.WatchTask(bs.WatchTaskRequest(task_id=on_b))
        await denied(watch_b.read(), "b", "produce or read")
    consumer = secured.as_("consumer").stub
    watch_a = consumer.WatchTask(bs.WatchTaskRequest(task_id=on_a))
    await denied(watch_a.read(), "a", "produce or read")


async def test_depending_on_a_task_needs_produce_on_its_queue(secured: Secured) -> None:
    # The child would receive the parent's result: a producer of a may not name a task of b.
    [other] = await enqueue(secured.as_("ops").stub, spec("b"))
    producer = secured.as_("producer")
    child = spec("a")
    child.depends_on.append(other)
    await denied(producer.stub.Enqueue(bs.EnqueueRequest(tasks=[child])), "b", "produce")
    assert await pending(secured, "a") == 0
    [mine] = await enqueue(producer.stub, spec("a"))
    child = spec("a")
    child.depends_on.append(mine)
    [waiting] = await enqueue(producer.stub, child)
    assert (await get(producer.stub, waiting)).parent_ids == [mine]
