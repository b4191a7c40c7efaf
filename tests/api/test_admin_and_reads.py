"""Stats, CancelTask and AdminService (dead letters, pause/resume, queues), through real gRPC."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from taskbroker.v1 import admin_service_pb2 as ad
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import lease_pb2, task_pb2
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, error_reason, get, spec

if TYPE_CHECKING:  # the async stubs exist only in the generated .pyi files
    from taskbroker.v1.admin_service_pb2_grpc import AdminServiceAsyncStub as Admin
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub as Stub

OK = lease_pb2.SETTLE_OUTCOME_OK
PENDING = task_pb2.TASK_STATE_PENDING
SCHEDULED = task_pb2.TASK_STATE_SCHEDULED
LEASED = task_pb2.TASK_STATE_LEASED
SUCCEEDED = task_pb2.TASK_STATE_SUCCEEDED
DEAD = task_pb2.TASK_STATE_DEAD
CANCELLED = task_pb2.TASK_STATE_CANCELLED

#: How long "nothing is delivered" is watched for.
QUIET_S = 0.3


# --- helpers ------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def worker(
    stub: Stub, queues: list[str], credits: int, lease: timedelta | None = None
) -> AsyncIterator[LeaseStream]:
    """A Lease stream that is half-closed on exit (held tasks go back to pending)."""
    stream = await LeaseStream(stub).open(queues, credits=credits, lease=lease)
    try:
        yield stream
    finally:
        if not stream.ended.is_set():
            await stream.close()


async def crash(stream: LeaseStream) -> None:
    """Drops the stream as a crashed worker would, and waits until it has ended."""
    stream.cancel()
    await asyncio.wait_for(stream.ended.wait(), 5)


async def stats_of(stub: Stub, queue: str) -> bs.QueueStats:
    response = await stub.Stats(bs.StatsRequest(queues=[queue]))
    assert [s.queue for s in response.queues] == [queue]
    return response.queues[0]


async def stats_when(
    stub: Stub, queue: str, ready: Callable[[bs.QueueStats], bool], wait_s: float = 2.0
) -> bs.QueueStats:
    """Polls Stats until ready(stats) holds (for effects the broker applies in the background)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        stats = await stats_of(stub, queue)
        if ready(stats):
            return stats
        if loop.time() > deadline:
            raise AssertionError(f"stats of {queue} never got there: {stats}")
        await asyncio.sleep(0.02)


async def refused(
    call: Awaitable[object], code: grpc.StatusCode, reason: str, field: str = ""
) -> grpc.aio.AioRpcError:
    """Awaits a call that must fail with code, an ErrorInfo reason, and (if given) the field
    named in the message and in a BadRequest field violation."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    assert err.value.code() == code, err.value
    assert error_reason(err.value) == reason
    if field:
        assert field in (err.value.details() or ""), err.value.details()
        assert field in bad_request_fields(err.value)
    return err.value


def bad_request_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None, "no rich status details"
    fields: list[str] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [str(v.field) for v in bad.field_violations]
    return fields


async def assert_still_serving(stub: Stub, admin: Admin) -> None:
    (task_id,) = await enqueue(stub, spec(queue="alive"))
    assert (await get(stub, task_id)).state == PENDING
    assert "alive" in (await admin.ListQueues(ad.ListQueuesRequest())).queues


async def make_dead(stub: Stub, queue: str, n: int) -> list[str]:
    """n dead letters, in dead-letter order: even ones nacked with dead_letter=True, odd ones with
    max_attempts=1 and a plain nack. Task i's error is "<queue> failure <i>"."""
    specs = [
        spec(queue=queue, payload=str(i).encode(), max_attempts=1 if i % 2 else 0) for i in range(n)
    ]
    ids = await enqueue(stub, *specs)
    async with worker(stub, [queue], credits=n) as w:
        deliveries = await w.take(n)
        assert [d.task.id for d in deliveries] == ids
        for i, d in enumerate(deliveries):
            result = await w.nack(d, error=f"{queue} failure {i}", dead_letter=i % 2 == 0)
            assert result.outcome == OK, result
    return ids


async def list_all_dead(
    admin: Admin, queue: str, page_size: int
) -> tuple[list[task_pb2.Task], list[int]]:
    """Follows next_page_token to the end. Returns the tasks and the page sizes seen."""
    tasks: list[task_pb2.Task] = []
    sizes: list[int] = []
    token = ""
    for _ in range(100):
        page = await admin.ListDeadTasks(
            ad.ListDeadTasksRequest(queue=queue, page_size=page_size, page_token=token)
        )
        tasks += page.tasks
        sizes.append(len(page.tasks))
        token = page.next_page_token
        if not token:
            return tasks, sizes
    raise AssertionError("ListDeadTasks never returned an empty next_page_token")


def token_of(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


# --- Stats --------------------------------------------------------------------------------------


async def test_stats_counts_and_totals_follow_a_scripted_lifecycle(stub: Stub) -> None:
    q = "life"
    ok, retry, dead, rec = await enqueue(
        stub, *[spec(queue=q, payload=p) for p in (b"ok", b"retry", b"dead", b"rec")]
    )
    w1 = await LeaseStream(stub).open([q], credits=4)
    d_ok, d_retry, d_dead, d_rec = await w1.take(4)
    assert [d.task.id for d in (d_ok, d_retry, d_dead, d_rec)] == [ok, retry, dead, rec]
    held4 = await stats_of(stub, q)
    assert (held4.pending, held4.scheduled, held4.leased, held4.dead) == (0, 0, 4, 0)

    assert (await w1.ack(d_ok)).outcome == OK
    assert (await w1.nack(d_retry, retry_delay=timedelta(hours=1))).outcome == OK
    assert (await w1.nack(d_dead, dead_letter=True)).outcome == OK
    await crash(w1)  # still holds rec: it goes back to pending, counted as reclaimed
    await stats_when(stub, q, lambda s: s.reclaimed_total == 1)

    held, doomed, _later, _extra = await enqueue(
        stub,
        spec(queue=q, priority=10),  # leased before rec, which waits at priority 0
        spec(queue=q),
        spec(queue=q, delay=timedelta(hours=1)),
        spec(queue=q),
    )
    async with worker(stub, [q], credits=1) as w2:
        (d_held,) = await w2.take(1)
        assert d_held.task.id == held
        await stub.CancelTask(bs.CancelTaskRequest(task_id=doomed))

        s = await stats_of(stub, q)
        assert s.queue == q and not s.paused
        # pending: rec, _extra; scheduled: retry, _later; leased: held; dead: dead.
        assert (s.pending, s.scheduled, s.leased, s.dead) == (2, 2, 1, 1)
        totals = (
            s.enqueued_total,
            s.succeeded_total,
            s.retried_total,
            s.reclaimed_total,
            s.dead_lettered_total,
            s.cancelled_total,
        )
        assert totals == (8, 1, 1, 1, 1, 1)
        assert s.read_time.seconds > 0

    reclaimed = await get(stub, rec)
    assert (reclaimed.state, reclaimed.attempt) == (PENDING, 1)
    assert [e.attempt for e in reclaimed.errors] == [1]
    assert (await get(stub, retry)).state == SCHEDULED
    assert (await get(stub, dead)).state == DEAD
    assert (await get(stub, ok)).state == SUCCEEDED


async def test_oldest_pending_age_grows_with_time_and_is_unset_when_nothing_is_pending(
    stub: Stub,
) -> None:
    q = "aging"
    assert not (await stats_of(stub, q)).HasField("oldest_pending_age")
    (first,) = await enqueue(stub, spec(queue=q))
    await enqueue(stub, spec(queue=q, delay=timedelta(hours=1)))  # scheduled: not pending
    created = (await get(stub, first)).create_time.ToMilliseconds()

    a = await stats_of(stub, q)
    await asyncio.sleep(0.2)
    b = await stats_of(stub, q)
    assert a.HasField("oldest_pending_age") and b.HasField("oldest_pending_age")
    age_a, age_b = a.oldest_pending_age.ToMilliseconds(), b.oldest_pending_age.ToMilliseconds()
    read_a, read_b = a.read_time.ToMilliseconds(), b.read_time.ToMilliseconds()
    assert 0 <= age_a < 1000
    assert age_b - age_a == read_b - read_a >= 150  # it grows with the broker's clock
    assert read_b - age_b == created  # measured from when the task became ready

    async with worker(stub, [q], credits=1) as w:
        await w.take(1)
        leased = await stats_of(stub, q)
        assert (leased.pending, leased.scheduled, leased.leased) == (0, 1, 1)
        assert not leased.HasField("oldest_pending_age")


async def test_oldest_pending_age_is_the_oldest_across_priorities(stub: Stub) -> None:
    q = "bands"
    (low,) = await enqueue(stub, spec(queue=q, priority=-5))
    await asyncio.sleep(0.1)
    await enqueue(stub, spec(queue=q, priority=700), spec(queue=q, priority=0))
    s = await stats_of(stub, q)
    created = (await get(stub, low)).create_time.ToMilliseconds()
    assert s.pending == 3
    assert s.read_time.ToMilliseconds() - s.oldest_pending_age.ToMilliseconds() == created


async def test_stats_without_queues_lists_every_known_queue_by_name(
    stub: Stub, admin: Admin
) -> None:
    await enqueue(stub, spec(queue="beta"), spec(queue="alpha"), spec(queue="alpha"))
    await admin.PauseQueue(ad.PauseQueueRequest(queue="gamma"))  # known, never enqueued to

    every = await stub.Stats(bs.StatsRequest())
    assert [s.queue for s in every.queues] == ["alpha", "beta", "gamma"]
    assert [(s.pending, s.enqueued_total, s.paused) for s in every.queues] == [
        (2, 2, False),
        (1, 1, False),
        (0, 0, True),
    ]
    named = await stub.Stats(bs.StatsRequest(queues=["gamma", "alpha"]))
    assert [s.queue for s in named.queues] == ["gamma", "alpha"]  # request order


@pytest.mark.parametrize(
    ("queues", "field"),
    [
        (["a b"], "queues[0]"),
        ([""], "queues[0]"),
        (["a{b}"], "queues[0]"),
        (["ok", "a:b"], "queues[1]"),
    ],
)
async def test_stats_with_an_invalid_queue_name_is_invalid_argument(
    stub: Stub, admin: Admin, queues: list[str], field: str
) -> None:
    await refused(
        stub.Stats(bs.StatsRequest(queues=queues)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        field,
    )
    await assert_still_serving(stub, admin)


# --- CancelTask ---------------------------------------------------------------------------------


async def test_cancelled_pending_task_is_never_delivered(stub: Stub) -> None:
    q = "cancel-pending"
    doomed, kept = await enqueue(stub, spec(queue=q, payload=b"a"), spec(queue=q, payload=b"b"))

    response = await stub.CancelTask(bs.CancelTaskRequest(task_id=doomed))
    assert response.task.id == doomed and response.task.state == CANCELLED
    assert response.task.HasField("finish_time")
    assert (await get(stub, doomed)).state == CANCELLED

    async with worker(stub, [q], credits=5) as w:
        (d,) = await w.take(1)
        assert d.task.id == kept
        await asyncio.sleep(QUIET_S)
        assert w.deliveries.empty()
        s = await stats_of(stub, q)
        assert (s.pending, s.leased, s.cancelled_total) == (0, 1, 1)
    assert (await get(stub, doomed)).state == CANCELLED


async def test_cancelled_scheduled_task_never_comes_due(stub: Stub) -> None:
    q = "cancel-scheduled"
    (doomed,) = await enqueue(stub, spec(queue=q, delay=timedelta(milliseconds=100)))
    response = await stub.CancelTask(bs.CancelTaskRequest(task_id=doomed))
    assert response.task.state == CANCELLED

    async with worker(stub, [q], credits=5) as w:
        await asyncio.sleep(QUIET_S)  # well past the 100 ms delay
        assert w.deliveries.empty()
    s = await stats_of(stub, q)
    assert (s.pending, s.scheduled, s.cancelled_total) == (0, 0, 1)


async def test_cancelled_leased_task_is_revoked_and_its_ack_is_refused(stub: Stub) -> None:
    q = "cancel-leased"
    task_id, bystander = await enqueue(stub, spec(queue=q), spec(queue=q))
    async with worker(stub, [q], credits=2) as w:
        d, _ = await w.take(2)
        assert d.task.id == task_id and (await get(stub, task_id)).state == LEASED

        response = await stub.CancelTask(bs.CancelTaskRequest(task_id=task_id))
        assert response.task.state == CANCELLED
        assert not response.task.HasField("lease_expire_time")

        revoked = await asyncio.wait_for(w.revoked.get(), 1)
        assert (revoked.task_id, revoked.lease_id, revoked.reason) == (
            task_id,
            d.lease_id,
            "cancelled",
        )
        result = await w.ack(d, result=b"too late")
        assert result.kind == lease_pb2.SETTLE_KIND_ACK
        assert result.outcome == lease_pb2.SETTLE_OUTCOME_LEASE_STALE
        assert (result.task_id, result.lease_id) == (task_id, d.lease_id)
        await refused(
            stub.Ack(lease_pb2.AckRequest(task_id=task_id, lease_id=d.lease_id)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "LEASE_STALE",
        )
        task = await get(stub, task_id)
        assert (task.state, task.result) == (CANCELLED, b"")
        s = await stats_of(stub, q)
        assert (s.leased, s.succeeded_total, s.cancelled_total) == (1, 0, 1)

    # The stream's end gives back the bystander it still held, but not the cancelled task.
    s = await stats_when(stub, q, lambda s: s.reclaimed_total > 0)
    assert (s.reclaimed_total, s.pending, s.leased) == (1, 1, 0)
    assert (await get(stub, bystander)).state == PENDING
    assert (await get(stub, task_id)).state == CANCELLED


@pytest.mark.parametrize(
    ("finish", "state"),
    [("ack", SUCCEEDED), ("dead_letter", DEAD), ("cancel", CANCELLED)],
)
async def test_cancelling_a_finished_task_is_failed_precondition(
    stub: Stub, admin: Admin, finish: str, state: task_pb2.TaskState.ValueType
) -> None:
    q = "finished"
    (task_id,) = await enqueue(stub, spec(queue=q))
    if finish == "cancel":
        await stub.CancelTask(bs.CancelTaskRequest(task_id=task_id))
    else:
        async with worker(stub, [q], credits=1) as w:
            (d,) = await w.take(1)
            if finish == "ack":
                assert (await w.ack(d)).outcome == OK
            else:
                assert (await w.nack(d, dead_letter=True)).outcome == OK
    assert (await get(stub, task_id)).state == state

    await refused(
        stub.CancelTask(bs.CancelTaskRequest(task_id=task_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "TASK_FINISHED",
    )
    assert (await get(stub, task_id)).state == state
    assert (await stats_of(stub, q)).cancelled_total == (1 if finish == "cancel" else 0)
    await assert_still_serving(stub, admin)


async def test_cancelling_an_unknown_task_is_not_found(stub: Stub, admin: Admin) -> None:
    await refused(
        stub.CancelTask(bs.CancelTaskRequest(task_id="emails:01J0000000000000000000000A")),
        grpc.StatusCode.NOT_FOUND,
        "TASK_NOT_FOUND",
    )
    await assert_still_serving(stub, admin)


@pytest.mark.parametrize("task_id", ["", "nope", "emails:short", "a{b}:01J00000000000000000000000"])
async def test_cancelling_a_malformed_id_is_invalid_argument(
    stub: Stub, admin: Admin, task_id: str
) -> None:
    await refused(
        stub.CancelTask(bs.CancelTaskRequest(task_id=task_id)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "task_id",
    )
    await assert_still_serving(stub, admin)


# --- dead letters -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "pages"), [(7, [3, 3, 1]), (6, [3, 3])])
async def test_dead_tasks_page_oldest_first_without_repeats_and_keep_their_errors(
    stub: Stub, admin: Admin, n: int, pages: list[int]
) -> None:
    ids = await make_dead(stub, "mail", n)
    await make_dead(stub, "other", 2)  # another queue's dead letters are not listed

    tasks, sizes = await list_all_dead(admin, "mail", page_size=3)
    assert sizes == pages
    assert [t.id for t in tasks] == ids  # oldest first, each once
    for i, t in enumerate(tasks):
        assert (t.queue, t.state, t.payload) == ("mail", DEAD, str(i).encode())
        assert t.HasField("finish_time")
        assert [(e.attempt, e.message) for e in t.errors] == [(1, f"mail failure {i}")]
        assert t.errors[0].time.seconds > 0
        assert t.last_error == f"mail failure {i}"

    whole = await admin.ListDeadTasks(ad.ListDeadTasksRequest(queue="mail"))  # page_size 0: 100
    assert [t.id for t in whole.tasks] == ids and whole.next_page_token == ""
    s = await stats_of(stub, "mail")
    assert (s.dead, s.dead_lettered_total, s.pending, s.leased) == (n, n, 0, 0)


async def test_dead_tasks_that_died_in_the_same_millisecond_page_without_repeats(
    stub: Stub, admin: Admin
) -> None:
    q = "ties"
    ids = await enqueue(stub, *[spec(queue=q) for _ in range(20)])
    async with worker(stub, [q], credits=20) as w:
        deliveries = await w.take(20)
        # Concurrent nacks share script calls, so several tasks get the same dead-letter time.
        await asyncio.gather(
            *[
                stub.Nack(
                    lease_pb2.NackRequest(
                        task_id=d.task.id, lease_id=d.lease_id, error="x", dead_letter=True
                    )
                )
                for d in deliveries
            ]
        )

    tasks, sizes = await list_all_dead(admin, q, page_size=1)  # every tie spans pages
    assert sizes == [1] * 20
    listed = [t.id for t in tasks]
    assert sorted(listed) == sorted(ids)  # each once
    dead_order = [(t.finish_time.ToMilliseconds(), t.id) for t in tasks]
    assert dead_order == sorted(dead_order)  # oldest first, ties by id


async def test_a_queue_without_dead_letters_lists_an_empty_page(admin: Admin) -> None:
    page = await admin.ListDeadTasks(ad.ListDeadTasksRequest(queue="nothing-dead", page_size=5))
    assert list(page.tasks) == [] and page.next_page_token == ""


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "!!!",
        "%%%%",
        token_of("no colon here"),
        token_of("abc:01J00000000000000000000000"),
    ],
)
async def test_a_garbage_page_token_is_invalid_argument(
    stub: Stub, admin: Admin, token: str
) -> None:
    await make_dead(stub, "mail", 2)
    await refused(
        admin.ListDeadTasks(ad.ListDeadTasksRequest(queue="mail", page_token=token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "page_token",
    )
    await assert_still_serving(stub, admin)


@pytest.mark.parametrize("text", ["12:", "1:not-a-task-id"])
async def test_a_token_the_api_never_issued_is_invalid_argument(
    stub: Stub, admin: Admin, text: str
) -> None:
    await make_dead(stub, "mail", 2)
    await refused(
        admin.ListDeadTasks(ad.ListDeadTasksRequest(queue="mail", page_token=token_of(text))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "page_token",
    )


async def test_a_negative_page_size_is_invalid_argument(stub: Stub, admin: Admin) -> None:
    await make_dead(stub, "mail", 1)
    await refused(
        admin.ListDeadTasks(ad.ListDeadTasksRequest(queue="mail", page_size=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "page_size",
    )
    await assert_still_serving(stub, admin)


async def test_redriven_tasks_are_delivered_again_with_fresh_attempts(
    stub: Stub, admin: Admin
) -> None:
    q = "redrive"
    flagged, exhausted, stays = await make_dead(stub, q, 3)  # exhausted had max_attempts=1

    response = await admin.RedriveDeadTasks(
        ad.RedriveDeadTasksRequest(queue=q, task_ids=[flagged, exhausted])
    )
    assert response.redriven_count == 2
    again = await admin.RedriveDeadTasks(ad.RedriveDeadTasksRequest(queue=q, task_ids=[flagged]))
    assert again.redriven_count == 0  # no longer a dead letter: skipped
    for task_id in (flagged, exhausted):
        task = await get(stub, task_id)
        assert (task.state, task.attempt) == (PENDING, 0)
        assert not task.HasField("finish_time")
        assert len(task.errors) == 1 and task.last_error  # errors are kept
    s = await stats_of(stub, q)
    assert (s.dead, s.pending) == (1, 2)

    async with worker(stub, [q], credits=5) as w:
        first, second = await w.take(2)
        assert [first.task.id, second.task.id] == [flagged, exhausted]
        assert first.task.attempt == second.task.attempt == 1
        await asyncio.sleep(QUIET_S)
        assert w.deliveries.empty()  # the one left dead stays dead

        assert (await w.ack(first)).outcome == OK
        # A fresh set of attempts is still max_attempts: one more failure kills it again.
        assert (await w.nack(second, error="failed again")).outcome == OK
    assert (await get(stub, flagged)).state == SUCCEEDED
    exhausted_task = await get(stub, exhausted)
    assert exhausted_task.state == DEAD
    assert [(e.attempt, e.message) for e in exhausted_task.errors] == [
        (1, f"{q} failure 1"),
        (1, "failed again"),
    ]
    assert (await get(stub, stays)).state == DEAD


async def test_redrive_all_redrives_every_dead_letter_of_the_queue(
    stub: Stub, admin: Admin
) -> None:
    q = "redrive-all"
    ids = await make_dead(stub, q, 4)
    (other,) = await make_dead(stub, "other", 1)

    async with worker(stub, [q], credits=10) as w:  # idle, waiting, when the redrive happens
        await asyncio.sleep(0.05)
        assert w.deliveries.empty()
        response = await admin.RedriveDeadTasks(ad.RedriveDeadTasksRequest(queue=q, all=True))
        assert response.redriven_count == 4
        assert list((await admin.ListDeadTasks(ad.ListDeadTasksRequest(queue=q))).tasks) == []
        assert (await get(stub, other)).state == DEAD

        deliveries = await w.take(4, wait_s=1.0)
        assert sorted(d.task.id for d in deliveries) == sorted(ids)
        assert {d.task.attempt for d in deliveries} == {1}
        for d in deliveries:
            assert (await w.ack(d)).outcome == OK
    s = await stats_of(stub, q)
    assert (s.dead, s.pending, s.succeeded_total) == (0, 0, 4)
    assert (await stats_of(stub, "other")).dead == 1


async def test_deleted_dead_tasks_are_gone(stub: Stub, admin: Admin) -> None:
    q = "delete"
    first, second, third = await make_dead(stub, q, 3)
    (pending,) = await enqueue(stub, spec(queue=q))

    response = await admin.DeleteDeadTasks(
        ad.DeleteDeadTasksRequest(queue=q, task_ids=[first, second, pending])
    )
    assert response.deleted_count == 2  # the pending task is not a dead letter: skipped
    for task_id in (first, second):
        await refused(
            stub.GetTask(bs.GetTaskRequest(task_id=task_id)),
            grpc.StatusCode.NOT_FOUND,
            "TASK_NOT_FOUND",
        )
    assert (await get(stub, pending)).state == PENDING
    listed = await admin.ListDeadTasks(ad.ListDeadTasksRequest(queue=q))
    assert [t.id for t in listed.tasks] == [third]

    everything = await admin.DeleteDeadTasks(ad.DeleteDeadTasksRequest(queue=q, all=True))
    assert everything.deleted_count == 1
    await refused(
        stub.GetTask(bs.GetTaskRequest(task_id=third)),
        grpc.StatusCode.NOT_FOUND,
        "TASK_NOT_FOUND",
    )
    assert list((await admin.ListDeadTasks(ad.ListDeadTasksRequest(queue=q))).tasks) == []
    s = await stats_of(stub, q)
    assert (s.dead, s.pending) == (0, 1)


def dead_call(
    admin: Admin, op: str, queue: str, task_ids: list[str], every: bool = False
) -> Awaitable[object]:
    if op == "redrive":
        return admin.RedriveDeadTasks(
            ad.RedriveDeadTasksRequest(queue=queue, task_ids=task_ids, all=every)
        )
    return admin.DeleteDeadTasks(
        ad.DeleteDeadTasksRequest(queue=queue, task_ids=task_ids, all=every)
    )


@pytest.mark.parametrize("op", ["redrive", "delete"])
async def test_ids_from_another_queue_are_invalid_argument(
    stub: Stub, admin: Admin, op: str
) -> None:
    (mine,) = await make_dead(stub, "mail", 1)
    (theirs,) = await make_dead(stub, "other", 1)
    await refused(
        dead_call(admin, op, "mail", [mine, theirs]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "task_ids[1]",
    )
    assert (await get(stub, mine)).state == DEAD  # nothing was done
    assert (await get(stub, theirs)).state == DEAD
    await assert_still_serving(stub, admin)


@pytest.mark.parametrize("op", ["redrive", "delete"])
async def test_neither_ids_nor_all_is_invalid_argument(stub: Stub, admin: Admin, op: str) -> None:
    (task_id,) = await make_dead(stub, "mail", 1)
    await refused(
        dead_call(admin, op, "mail", []),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "task_ids",
    )
    assert (await get(stub, task_id)).state == DEAD
    await assert_still_serving(stub, admin)


@pytest.mark.parametrize("op", ["redrive", "delete"])
@pytest.mark.parametrize("bad_id", ["nope", "mail:short", ""])
async def test_a_malformed_task_id_is_invalid_argument(
    stub: Stub, admin: Admin, op: str, bad_id: str
) -> None:
    (task_id,) = await make_dead(stub, "mail", 1)
    await refused(
        dead_call(admin, op, "mail", [task_id, bad_id]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "task_ids[1]",
    )
    assert (await get(stub, task_id)).state == DEAD
    await assert_still_serving(stub, admin)


@pytest.mark.parametrize("op", ["redrive", "delete"])
async def test_task_ids_are_ignored_when_all_is_set(stub: Stub, admin: Admin, op: str) -> None:
    await make_dead(stub, "mail", 2)
    (theirs,) = await make_dead(stub, "other", 1)
    response = await dead_call(admin, op, "mail", [theirs], every=True)
    assert isinstance(response, ad.RedriveDeadTasksResponse | ad.DeleteDeadTasksResponse)
    assert (await stats_of(stub, "mail")).dead == 0
    assert (await get(stub, theirs)).state == DEAD


# --- PauseQueue / ResumeQueue -------------------------------------------------------------------


@pytest.mark.parametrize(
    "stream_first", [True, False], ids=["stream-then-pause", "pause-then-stream"]
)
async def test_a_paused_queue_delivers_nothing_until_resumed(
    stub: Stub, admin: Admin, stream_first: bool
) -> None:
    q = "pausable"
    async with contextlib.AsyncExitStack() as stack:
        w = await stack.enter_async_context(worker(stub, [q], credits=5)) if stream_first else None
        await admin.PauseQueue(ad.PauseQueueRequest(queue=q))
        (task_id,) = await enqueue(stub, spec(queue=q))  # enqueues are still accepted
        if w is None:
            w = await stack.enter_async_context(worker(stub, [q], credits=5))

        await asyncio.sleep(QUIET_S)
        assert w.deliveries.empty()
        s = await stats_of(stub, q)
        assert (s.paused, s.pending, s.leased) == (True, 1, 0)

        await admin.ResumeQueue(ad.ResumeQueueRequest(queue=q))
        (d,) = await w.take(1, wait_s=1.0)
        assert d.task.id == task_id
        s = await stats_of(stub, q)
        assert (s.paused, s.pending, s.leased) == (False, 0, 1)


async def test_a_paused_queue_does_not_hold_back_the_streams_other_queues(
    stub: Stub, admin: Admin
) -> None:
    await admin.PauseQueue(ad.PauseQueueRequest(queue="held-back"))
    await enqueue(stub, spec(queue="held-back"))
    (task_id,) = await enqueue(stub, spec(queue="open"))
    async with worker(stub, ["held-back", "open"], credits=1) as w:
        (d,) = await w.take(1, wait_s=1.0)
        assert d.task.id == task_id


async def test_pausing_leaves_held_leases_settleable(stub: Stub, admin: Admin) -> None:
    q = "pause-held"
    (task_id,) = await enqueue(stub, spec(queue=q))
    async with worker(stub, [q], credits=1) as w:
        (d,) = await w.take(1)
        await admin.PauseQueue(ad.PauseQueueRequest(queue=q))
        assert (await w.extend(d, timedelta(seconds=30))).outcome == OK
        assert (await w.ack(d, result=b"done")).outcome == OK
    task = await get(stub, task_id)
    assert (task.state, task.result) == (SUCCEEDED, b"done")
    assert (await stats_of(stub, q)).paused


@pytest.mark.parametrize("rpc", ["pause", "resume"])
async def test_pausing_an_invalid_queue_name_is_invalid_argument(
    stub: Stub, admin: Admin, rpc: str
) -> None:
    call = (
        admin.PauseQueue(ad.PauseQueueRequest(queue="a b"))
        if rpc == "pause"
        else admin.ResumeQueue(ad.ResumeQueueRequest(queue="a b"))
    )
    await refused(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "queue")
    await assert_still_serving(stub, admin)


# --- ListQueues ---------------------------------------------------------------------------------


async def test_list_queues_lists_the_queues_enqueued_to_sorted(stub: Stub, admin: Admin) -> None:
    assert list((await admin.ListQueues(ad.ListQueuesRequest())).queues) == []
    await enqueue(stub, spec(queue="zeta"), spec(queue="alpha"), spec(queue="mid.q"))
    await enqueue(stub, spec(queue="alpha"), spec(queue="Beta"))
    queues = (await admin.ListQueues(ad.ListQueuesRequest())).queues
    assert list(queues) == ["Beta", "alpha", "mid.q", "zeta"]


@pytest.mark.parametrize("queue", ["", "a b", "a:b", "x" * 129])
async def test_listing_dead_tasks_of_an_invalid_queue_is_invalid_argument(
    stub: Stub, admin: Admin, queue: str
) -> None:
    await refused(
        admin.ListDeadTasks(ad.ListDeadTasksRequest(queue=queue)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
        "queue",
    )
    await assert_still_serving(stub, admin)


async def test_dead_letters_of_megabyte_tasks_come_in_pages_a_default_client_can_read(
    stub: Stub, admin: Admin
) -> None:
    # The stubs' channel has gRPC's default 4 MiB receive limit, as grpcurl and most clients do.
    # A page of 100 such tasks would also be far past the broker's own send limit.
    n, size = 24, 1024 * 1024 - 64
    ids: list[str] = []
    for start in range(0, n, 4):  # an Enqueue request has the same limit
        ids += await enqueue(
            stub, *[spec(queue="big", payload=bytes([i]) * size) for i in range(start, start + 4)]
        )
    async with worker(stub, ["big"], credits=n) as w:
        for d in await w.take(n, wait_s=20):
            assert (await w.nack(d, error="no", dead_letter=True)).outcome == OK

    tasks, sizes = await list_all_dead(admin, "big", page_size=0)
    assert sorted(t.id for t in tasks) == sorted(ids)  # each once
    assert sorted(t.payload[0] for t in tasks) == list(range(n))
    assert all(len(t.payload) == size for t in tasks)
    assert len(sizes) > 1 and max(sizes) <= 3, sizes
