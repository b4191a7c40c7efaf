"""Streams that end and workers that come back: lease resume across streams and replicas, stream
ownership of leases, and a stream whose worker never reads (bounded, then cut, its unsent tasks
handed back without spending their attempts)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest

from broker.config import Settings
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import lease_pb2, task_pb2
from tests.conftest import RunningBroker, start_broker
from tests.support.lease_stream import LeaseStream, duration
from tests.support.tasks import enqueue, get, spec

LONG = timedelta(minutes=5)


def held(d: lease_pb2.Delivery) -> lease_pb2.HeldLease:
    return lease_pb2.HeldLease(task_id=d.task.id, lease_id=d.lease_id)


async def open_resuming(
    running: RunningBroker, resume: list[lease_pb2.HeldLease], credits: int = 0
) -> tuple[
    grpc.aio.StreamStreamCall[lease_pb2.LeaseRequest, lease_pb2.LeaseResponse],
    list[lease_pb2.SettleResult],
]:
    """Opens a raw stream that resumes `resume`; returns it and the broker's answers."""
    call = running.stub.Lease()
    frame = lease_pb2.LeaseOpen(queues=["emails"], credits=credits, resume=resume)
    frame.lease_duration.CopyFrom(duration(LONG))
    await call.write(lease_pb2.LeaseRequest(open=frame))
    first = await asyncio.wait_for(call.read(), 5)
    assert isinstance(first, lease_pb2.LeaseResponse)
    assert first.WhichOneof("frame") == "opened"
    return call, list(first.opened.resumed)


async def wait_state(running: RunningBroker, task_id: str, state: int, within_s: float) -> float:
    """Waits until the task is in `state`; returns how long that took."""
    started = time.monotonic()
    while (task := await get(running.stub, task_id)).state != state:
        assert time.monotonic() - started < within_s, task_pb2.TaskState.Name(task.state)
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_a_worker_that_reconnects_resumes_its_lease_and_acks_it(
    running: RunningBroker,
) -> None:
    (task_id,) = await enqueue(running.stub, spec())
    first = await LeaseStream(running.stub).open(["emails"], credits=1, lease=LONG)
    (d,) = await first.take(1)
    first.cancel()  # the connection broke under a live worker

    call, [answer] = await open_resuming(running, [held(d)])
    assert answer.kind == lease_pb2.SETTLE_KIND_RESUME
    assert answer.outcome == lease_pb2.SETTLE_OUTCOME_OK, answer.message
    assert answer.lease_expire_time.seconds > time.time() + 60  # renewed to the full lease
    await asyncio.sleep(1.0)  # past the resume window: a resumed lease is not reclaimed
    task = await get(running.stub, task_id)
    assert (task.state, task.attempt, len(task.errors)) == (task_pb2.TASK_STATE_LEASED, 1, 0)

    ack = lease_pb2.AckRequest(task_id=task_id, lease_id=d.lease_id, result=b"once")
    await call.write(lease_pb2.LeaseRequest(ack=ack))
    reply = await asyncio.wait_for(call.read(), 5)
    assert isinstance(reply, lease_pb2.LeaseResponse)
    assert reply.settle_results.results[0].outcome == lease_pb2.SETTLE_OUTCOME_OK
    assert (await get(running.stub, task_id)).result == b"once"
    call.cancel()


async def test_a_lease_resumed_on_another_replica_is_not_handed_back_by_the_first(
    running: RunningBroker, settings: Settings
) -> None:
    other = await start_broker(settings)
    try:
        (task_id,) = await enqueue(running.stub, spec())
        first = await LeaseStream(running.stub).open(["emails"], credits=1, lease=LONG)
        (d,) = await first.take(1)
        # The worker moves the lease to the other replica while its first stream is still open
        # (as at a drain notice), then the first stream ends.
        call, [answer] = await open_resuming(other, [held(d)])
        assert answer.outcome == lease_pb2.SETTLE_OUTCOME_OK
        first.cancel()
        await asyncio.sleep(1.0)  # past the resume window and a reaper pass
        task = await get(running.stub, task_id)
        assert (task.state, task.attempt, len(task.errors)) == (task_pb2.TASK_STATE_LEASED, 1, 0)
        call.cancel()
    finally:
        await other.close()


async def test_resume_of_a_lease_re_leased_elsewhere_is_refused(running: RunningBroker) -> None:
    (task_id,) = await enqueue(running.stub, spec())
    crashed = await LeaseStream(running.stub).open(["emails"], credits=1, lease=LONG)
    (d,) = await crashed.take(1)
    crashed.cancel()
    survivor = await LeaseStream(running.stub).open(["emails"], credits=1, lease=LONG)
    (again,) = await survivor.take(1, wait_s=3)  # the window passed: re-leased
    assert again.task.id == task_id and again.task.attempt == 2

    call, answers = await open_resuming(
        running,
        [
            held(d),
            lease_pb2.HeldLease(task_id="emails:" + "0" * 26, lease_id="0" * 32),
            lease_pb2.HeldLease(task_id="not an id", lease_id="x"),
        ],
    )
    assert [a.outcome for a in answers] == [
        lease_pb2.SETTLE_OUTCOME_LEASE_STALE,
        lease_pb2.SETTLE_OUTCOME_NOT_FOUND,
        lease_pb2.SETTLE_OUTCOME_INVALID_ARGUMENT,
    ]
    assert "open.resume[2].task_id" in answers[2].message
    assert (await get(running.stub, task_id)).state == task_pb2.TASK_STATE_LEASED
    assert (await survivor.ack(again)).outcome == lease_pb2.SETTLE_OUTCOME_OK
    call.cancel()
    await survivor.close()


async def test_a_killed_workers_tasks_come_back_within_a_second(running: RunningBroker) -> None:
    (task_id,) = await enqueue(running.stub, spec())
    crashed = await LeaseStream(running.stub).open(["emails"], credits=1, lease=LONG)
    await crashed.take(1)
    crashed.cancel()
    # The resume window (0.5 s) plus a reaper pass (0.25 s), not the 5-minute lease.
    assert await wait_state(running, task_id, task_pb2.TASK_STATE_PENDING, within_s=1.0) < 1.0


@pytest.fixture
async def strict(settings: Settings) -> AsyncIterator[RunningBroker]:
    running = await start_broker(
        settings, stream_outbox_bytes=64 * 1024, stream_write_timeout_s=1.0
    )
    yield running
    await running.close()


async def test_a_stream_that_never_reads_is_bounded_then_cut_and_unsent_tasks_keep_attempts(
    strict: RunningBroker,
) -> None:
    payload = b"x" * 20_000
    ids = await enqueue(strict.stub, *(spec(payload=payload, max_attempts=2) for _ in range(600)))
    call = strict.stub.Lease()
    frame = lease_pb2.LeaseOpen(queues=["emails"], credits=10_000)
    frame.lease_duration.CopyFrom(duration(LONG))
    await call.write(lease_pb2.LeaseRequest(open=frame))
    # This worker grants credits and never reads a single response. While its writes are stuck,
    # the broker leases it nothing more than what gRPC's buffers took (about 4 MiB here) plus
    # the outbox bound and one lease batch.
    await asyncio.sleep(0.5)
    stats = await strict.stub.Stats(bs.StatsRequest(queues=["emails"]))
    assert stats.queues[0].leased < 400, stats

    # After stream_write_timeout_s (1 s) the stream is cut: unsent tasks come back at once and
    # keep their attempts; the written ones wait the resume window, then spend one attempt.
    deadline = time.monotonic() + 5
    while (await strict.stub.Stats(bs.StatsRequest(queues=["emails"]))).queues[0].pending < 600:
        assert time.monotonic() < deadline, "the stuck stream's tasks did not come back"
        await asyncio.sleep(0.1)
    tasks = [await get(strict.stub, task_id) for task_id in ids]
    spent = [t for t in tasks if t.attempt == 1]
    kept = [t for t in tasks if t.attempt == 0]
    assert len(spent) + len(kept) == 600 and len(kept) >= 200, (len(spent), len(kept))
    assert all(not t.errors for t in kept)
    assert all([e.message for e in t.errors] == ["lease stream closed"] for t in spent)
    assert not strict.broker.registry.sessions  # the broker let go of the stream
    call.cancel()
