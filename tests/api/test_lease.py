"""The Lease stream: push, credits, in-stream settlements, hand-back on drop, and bad frames."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
import pytest
import redis

from broker.models import Task
from broker.store.keys import QueueKeys
from broker.store.redis_store import FETCH_PAYLOAD_BYTES
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import lease_pb2, task_pb2
from tests.conftest import RunningBroker
from tests.support.lease_stream import LeaseStream, duration
from tests.support.tasks import enqueue, get, spec

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub as Stub


async def test_idle_worker_gets_a_new_task_pushed_at_once(stub: Stub) -> None:
    worker = await LeaseStream(stub).open(["emails"], credits=1)
    await asyncio.sleep(0.2)  # the stream is idle: the dispatcher is asleep, not polling
    started = time.monotonic()
    (task_id,) = await enqueue(stub, spec())
    (delivery,) = await worker.take(1)
    # A wake-up, not a poll: the safety re-check is 30 s, so anything near that would be a poll.
    assert time.monotonic() - started < 1.0
    assert delivery.task.id == task_id
    assert delivery.task.state == task_pb2.TASK_STATE_LEASED and delivery.task.attempt == 1
    assert len(delivery.lease_id) == 32
    assert (await get(stub, task_id)).state == task_pb2.TASK_STATE_LEASED
    await worker.close()


async def test_never_more_leases_than_credits(stub: Stub) -> None:
    await enqueue(stub, *[spec(payload=str(i).encode()) for i in range(10)])
    worker = await LeaseStream(stub).open(["emails"], credits=3)
    first = await worker.take(3)
    await asyncio.sleep(0.3)
    assert worker.deliveries.empty()  # acking does not grant credit: only credit frames do
    for d in first:
        assert (await worker.ack(d)).outcome == lease_pb2.SETTLE_OUTCOME_OK
    await asyncio.sleep(0.2)
    assert worker.deliveries.empty()
    stats = (await stub.Stats(bs.StatsRequest(queues=["emails"]))).queues[0]
    assert (stats.pending, stats.leased, stats.succeeded_total) == (7, 0, 3)

    await worker.credit(4)
    assert len(await worker.take(4)) == 4
    await asyncio.sleep(0.2)
    assert worker.deliveries.empty()
    await worker.close()


async def test_several_tasks_share_one_frame_and_come_in_fifo_order(stub: Stub) -> None:
    ids = await enqueue(stub, *[spec(payload=str(i).encode()) for i in range(50)])
    call = stub.Lease()
    await call.write(
        lease_pb2.LeaseRequest(open=lease_pb2.LeaseOpen(queues=["emails"], credits=50))
    )
    opened = await call.read()
    assert isinstance(opened, lease_pb2.LeaseResponse) and opened.WhichOneof("frame") == "opened"
    frame = await call.read()
    assert isinstance(frame, lease_pb2.LeaseResponse)
    assert len(frame.deliveries.deliveries) > 1
    got = [d.task.id for d in frame.deliveries.deliveries]
    assert got == ids[: len(got)]
    call.cancel()


async def test_in_stream_ack_nack_extend_answer_per_item(stub: Stub) -> None:
    await enqueue(stub, spec(), spec(), spec())
    worker = await LeaseStream(stub).open(["emails"], credits=3, lease=timedelta(seconds=5))
    a, b, c = await worker.take(3)

    acked = await worker.ack(a, result=b"done")
    assert (acked.kind, acked.outcome, acked.task_id) == (
        lease_pb2.SETTLE_KIND_ACK,
        lease_pb2.SETTLE_OUTCOME_OK,
        a.task.id,
    )
    again = await worker.ack(a, result=b"done")
    assert again.outcome == lease_pb2.SETTLE_OUTCOME_OK and again.already_settled

    nacked = await worker.nack(b, error="smtp down", retry_delay=timedelta(minutes=1))
    assert (
        nacked.kind == lease_pb2.SETTLE_KIND_NACK and nacked.outcome == lease_pb2.SETTLE_OUTCOME_OK
    )

    extended = await worker.extend(c, timedelta(minutes=10))
    assert extended.outcome == lease_pb2.SETTLE_OUTCOME_OK
    assert extended.lease_expire_time.seconds > c.lease_expire_time.seconds + 500

    assert (await get(stub, a.task.id)).result == b"done"
    retried = await get(stub, b.task.id)
    assert retried.state == task_pb2.TASK_STATE_SCHEDULED and retried.last_error == "smtp down"
    await worker.close()


async def test_unknown_task_and_bad_lease_ids_in_stream_are_answered_not_fatal(stub: Stub) -> None:
    (task_id,) = await enqueue(stub, spec())
    worker = await LeaseStream(stub).open(["emails"], credits=1)
    (d,) = await worker.take(1)
    bogus = lease_pb2.Delivery(lease_id="0" * 32)
    bogus.task.id = "emails:01J0000000000000000000000A"
    assert (await worker.ack(bogus)).outcome == lease_pb2.SETTLE_OUTCOME_NOT_FOUND
    bad = lease_pb2.Delivery(lease_id="not-hex")
    bad.task.id = task_id
    assert (await worker.ack(bad)).outcome == lease_pb2.SETTLE_OUTCOME_INVALID_ARGUMENT
    wrong = lease_pb2.Delivery(lease_id="f" * 32)
    wrong.task.id = task_id
    assert (await worker.ack(wrong)).outcome == lease_pb2.SETTLE_OUTCOME_LEASE_STALE
    assert (await worker.ack(d)).outcome == lease_pb2.SETTLE_OUTCOME_OK  # the stream lives on
    await worker.close()


async def test_dropped_stream_returns_its_tasks_within_a_second_as_a_spent_attempt(
    stub: Stub,
) -> None:
    (task_id,) = await enqueue(stub, spec(max_attempts=3))
    crashed = await LeaseStream(stub).open(["emails"], credits=1, lease=timedelta(minutes=5))
    (d,) = await crashed.take(1)
    crashed.cancel()  # as a killed worker's connection would end

    survivor = await LeaseStream(stub).open(["emails"], credits=1, lease=timedelta(minutes=5))
    started = time.monotonic()
    (again,) = await survivor.take(1, wait_s=2)
    assert time.monotonic() - started < 1.0  # not the 5-minute lease expiry
    assert again.task.id == task_id and again.task.attempt == 2
    assert again.lease_id != d.lease_id
    task = await get(stub, task_id)
    assert [e.message for e in task.errors] == ["lease stream closed"]
    await survivor.close()


async def test_task_that_keeps_killing_its_workers_ends_dead_not_in_a_loop(stub: Stub) -> None:
    (task_id,) = await enqueue(stub, spec(max_attempts=3))
    for attempt in (1, 2, 3):
        worker = await LeaseStream(stub).open(["emails"], credits=1)
        (d,) = await worker.take(1, wait_s=2)
        assert d.task.attempt == attempt
        worker.cancel()
    # The last attempt's lease waits the resume window (0.5 s), then the reaper ends it.
    deadline = time.monotonic() + 2.0
    while (task := await get(stub, task_id)).state != task_pb2.TASK_STATE_DEAD:
        assert time.monotonic() < deadline, f"still {task_pb2.TaskState.Name(task.state)}"
        await asyncio.sleep(0.05)
    assert len(task.errors) == 3


async def test_half_closed_stream_gets_its_settle_results_then_ends(stub: Stub) -> None:
    await enqueue(stub, spec())
    worker = await LeaseStream(stub).open(["emails"], credits=1)
    (d,) = await worker.take(1)
    ack = lease_pb2.AckRequest(task_id=d.task.id, lease_id=d.lease_id)
    await worker.call.write(lease_pb2.LeaseRequest(ack=ack))
    await worker.close()
    result = worker.results.get_nowait()
    assert result.outcome == lease_pb2.SETTLE_OUTCOME_OK
    assert (await get(stub, d.task.id)).state == task_pb2.TASK_STATE_SUCCEEDED


async def test_one_stream_on_several_queues_gets_work_from_each(stub: Stub) -> None:
    await enqueue(stub, *[spec(queue="a") for _ in range(5)], *[spec(queue="b") for _ in range(5)])
    worker = await LeaseStream(stub).open(["a", "b"], credits=4)
    got = await worker.take(4)
    assert {d.task.queue for d in got} == {"a", "b"}
    await worker.close()


async def test_a_settlements_frame_is_answered_per_item_and_grants_its_credits(
    stub: Stub,
) -> None:
    await enqueue(stub, spec(), spec(), spec(), spec(), spec())
    worker = await LeaseStream(stub).open(["emails"], credits=3, lease=timedelta(seconds=5))
    a, b, c = await worker.take(3)
    frame = lease_pb2.Settlements(
        acks=[
            lease_pb2.AckRequest(task_id=a.task.id, lease_id=a.lease_id, result=b"done"),
            lease_pb2.AckRequest(task_id=b.task.id, lease_id="f" * 32),  # not its lease
            lease_pb2.AckRequest(task_id=b.task.id, lease_id="xyz"),  # malformed
        ],
        nacks=[lease_pb2.NackRequest(task_id=b.task.id, lease_id=b.lease_id, error="smtp down")],
        extends=[
            lease_pb2.ExtendLeaseRequest(
                task_id=c.task.id,
                lease_id=c.lease_id,
                lease_duration=duration(timedelta(minutes=10)),
            )
        ],
        credits=2,
    )
    await worker.call.write(lease_pb2.LeaseRequest(settlements=frame))

    answers = [await asyncio.wait_for(worker.results.get(), 5) for _ in range(5)]
    outcome = {(r.task_id, r.lease_id, r.kind): r.outcome for r in answers}
    assert outcome == {
        (a.task.id, a.lease_id, lease_pb2.SETTLE_KIND_ACK): lease_pb2.SETTLE_OUTCOME_OK,
        (b.task.id, "f" * 32, lease_pb2.SETTLE_KIND_ACK): lease_pb2.SETTLE_OUTCOME_LEASE_STALE,
        (b.task.id, "xyz", lease_pb2.SETTLE_KIND_ACK): (lease_pb2.SETTLE_OUTCOME_INVALID_ARGUMENT),
        (b.task.id, b.lease_id, lease_pb2.SETTLE_KIND_NACK): lease_pb2.SETTLE_OUTCOME_OK,
        (c.task.id, c.lease_id, lease_pb2.SETTLE_KIND_EXTEND): lease_pb2.SETTLE_OUTCOME_OK,
    }
    assert (await get(stub, a.task.id)).result == b"done"
    assert (await get(stub, b.task.id)).last_error == "smtp down"
    assert (
        await get(stub, c.task.id)
    ).lease_expire_time.seconds > a.lease_expire_time.seconds + 500
    # The frame's two credits bring the two tasks still pending.
    assert len(await worker.take(2)) == 2
    await worker.close()


async def test_a_frames_acks_are_each_answered_in_order_with_their_refusal(stub: Stub) -> None:
    await enqueue(stub, spec(), spec())
    worker = await LeaseStream(stub).open(["emails"], credits=2, lease=timedelta(seconds=5))
    a, b = await worker.take(2)
    assert (await worker.ack(a)).outcome == lease_pb2.SETTLE_OUTCOME_OK
    unknown = "emails:" + "0" * 26
    items = [
        (b.task.id, b.lease_id),  # applied
        (a.task.id, a.lease_id),  # a repeat of an applied ack
        ("emails:nope", b.lease_id),  # malformed task id
        (unknown, b.lease_id),  # no such task
        (b.task.id, "f" * 32),  # not its lease
    ]
    acks = [lease_pb2.AckRequest(task_id=t, lease_id=lid) for t, lid in items]
    await worker.call.write(lease_pb2.LeaseRequest(settlements=lease_pb2.Settlements(acks=acks)))

    answers = [await asyncio.wait_for(worker.results.get(), 5) for _ in items]
    assert [(r.task_id, r.lease_id) for r in answers] == items
    assert {r.kind for r in answers} == {lease_pb2.SETTLE_KIND_ACK}
    assert [(r.outcome, r.already_settled) for r in answers] == [
        (lease_pb2.SETTLE_OUTCOME_OK, False),
        (lease_pb2.SETTLE_OUTCOME_OK, True),
        (lease_pb2.SETTLE_OUTCOME_INVALID_ARGUMENT, False),
        (lease_pb2.SETTLE_OUTCOME_NOT_FOUND, False),
        (lease_pb2.SETTLE_OUTCOME_LEASE_STALE, False),
    ]
    assert "task_id" in answers[2].message and unknown in answers[3].message
    assert all(r.message for r in answers[2:]) and not any(r.message for r in answers[:2])
    await worker.close()


async def test_a_frame_of_many_acks_takes_a_few_script_calls(
    stub: Stub, redis_client: redis.Redis
) -> None:
    await enqueue(stub, *[spec() for _ in range(200)])
    worker = await LeaseStream(stub).open(["emails"], credits=200)
    deliveries = await worker.take(200)
    redis_client.config_resetstat()
    acks = [lease_pb2.AckRequest(task_id=d.task.id, lease_id=d.lease_id) for d in deliveries]
    frame = lease_pb2.LeaseRequest(settlements=lease_pb2.Settlements(acks=acks))
    await worker.call.write(frame)
    answers = [await asyncio.wait_for(worker.results.get(), 5) for _ in range(200)]

    assert {r.outcome for r in answers} == {lease_pb2.SETTLE_OUTCOME_OK}
    scripts = redis_client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
    assert 0 < scripts <= 2, scripts  # group commit: one script call for the whole frame
    stats = (await stub.Stats(bs.StatsRequest(queues=["emails"]))).queues[0]
    assert (stats.succeeded_total, stats.leased, stats.pending) == (200, 0, 0)
    await worker.close()


async def test_bad_credits_in_a_settlements_frame_end_the_stream(stub: Stub) -> None:
    opened = lease_pb2.LeaseRequest(open=lease_pb2.LeaseOpen(queues=["a"], credits=1))
    too_many = lease_pb2.LeaseRequest(settlements=lease_pb2.Settlements(credits=20_000))
    err = await first_frame_error(stub, opened, too_many)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "settlements.credits" in (err.details() or "")


async def test_large_tasks_are_delivered_in_frames_within_the_message_limit(
    running: RunningBroker,
) -> None:
    # 20 tasks of 1 MiB: one frame would exceed the broker's send limit (task limit + 16 MiB).
    big = [spec(payload=bytes([i]) * (1024 * 1024 - 16)) for i in range(20)]
    for start in range(0, 20, 4):  # an Enqueue request has the same limit
        await enqueue(running.stub, *big[start : start + 4])
    worker = await LeaseStream(running.stub).open(["emails"], credits=20)
    deliveries = await worker.take(20, wait_s=20)
    assert sorted(d.task.payload[0] for d in deliveries) == list(range(20))
    assert worker.error is None
    worker.cancel()


async def test_many_idle_streams_share_a_few_redis_connections(
    running: RunningBroker, redis_client: redis.Redis
) -> None:
    before = len(redis_client.client_list())
    workers = [await LeaseStream(running.stub).open(["emails"], credits=5) for _ in range(50)]
    (task_id,) = await enqueue(running.stub, spec())
    await asyncio.sleep(0.3)
    assert len(redis_client.client_list()) - before < 10
    delivered = [w.deliveries.get_nowait() for w in workers if not w.deliveries.empty()]
    assert [d.task.id for d in delivered] == [task_id]  # pushed to exactly one stream
    for w in workers:
        w.cancel()


async def first_frame_error(stub: Stub, *frames: lease_pb2.LeaseRequest) -> grpc.aio.AioRpcError:
    call = stub.Lease()
    for frame in frames:
        await call.write(frame)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while await call.read() is not grpc.aio.EOF:
            pass
    return err.value


async def test_stream_whose_first_frame_is_not_open_is_invalid_argument(stub: Stub) -> None:
    credit = lease_pb2.LeaseRequest(credit=lease_pb2.LeaseCredit(credits=1))
    err = await first_frame_error(stub, credit)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "first frame must be open" in (err.details() or "")


async def test_stream_that_never_opens_is_closed_after_the_open_timeout(stub: Stub) -> None:
    started = time.monotonic()
    err = await first_frame_error(stub)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 0.9 < time.monotonic() - started < 3.0  # open_timeout_s is 1 s in the test settings


@pytest.mark.parametrize(
    ("open_frame", "field"),
    [
        (lease_pb2.LeaseOpen(), "open.queues"),
        (lease_pb2.LeaseOpen(queues=["a{b}"]), "open.queues[0]"),
        (lease_pb2.LeaseOpen(queues=["a", "a"]), "open.queues"),
        (lease_pb2.LeaseOpen(queues=["a"], credits=-1), "open.credits"),
        (lease_pb2.LeaseOpen(queues=["a"], credits=10_001), "open.credits"),
        (lease_pb2.LeaseOpen(queues=["a"], worker_id="w\n1"), "open.worker_id"),
    ],
)
async def test_bad_open_frame_is_invalid_argument_naming_the_field(
    stub: Stub, open_frame: lease_pb2.LeaseOpen, field: str
) -> None:
    err = await first_frame_error(stub, lease_pb2.LeaseRequest(open=open_frame))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (err.details() or "")


async def test_bad_frames_after_open_end_the_stream_with_invalid_argument(stub: Stub) -> None:
    opened = lease_pb2.LeaseRequest(open=lease_pb2.LeaseOpen(queues=["a"], credits=1))
    for bad, text in [
        (lease_pb2.LeaseRequest(open=lease_pb2.LeaseOpen(queues=["a"])), "sent twice"),
        (lease_pb2.LeaseRequest(credit=lease_pb2.LeaseCredit(credits=0)), "credit.credits"),
        (lease_pb2.LeaseRequest(), "empty frame"),
    ]:
        err = await first_frame_error(stub, opened, bad)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert text in (err.details() or "")


async def test_malformed_frame_bytes_are_invalid_argument(running: RunningBroker) -> None:
    # Raw bytes in and out, so a frame can be malformed.
    call: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = running.channel.stream_stream(
        "/taskbroker.v1.BrokerService/Lease"
    )
    raw = call()
    await raw.write(b"\xff\xff\xff\xff\x0f")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw.read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_task_gone_before_its_large_payload_is_read_is_not_delivered(
    running: RunningBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A payload over FETCH_PAYLOAD_BYTES is read after lease.lua, by HGET. A task trimmed in
    # between (finished meanwhile) must not reach a worker with an empty payload, and the
    # worker's credit must come back for the next task.
    store = running.broker.store
    read_payloads = store._read_payloads
    deleted: list[str] = []

    async def trimmed_in_between(found: list[Task], positions: Sequence[int]) -> frozenset[int]:
        if not deleted:
            task = found[positions[0]]
            await store.client.delete(QueueKeys(task.ref.queue).task_prefix + task.ref.local_id)
            deleted.append(task.ref.task_id)
        return await read_payloads(found, positions)

    monkeypatch.setattr(store, "_read_payloads", trimmed_in_between)
    big = bytes(FETCH_PAYLOAD_BYTES + 1)
    [first] = await enqueue(running.stub, spec(payload=big))
    worker = await LeaseStream(running.stub).open(["emails"], credits=1)
    await asyncio.sleep(0.2)  # the first lease call, and its trim, happen now
    [second] = await enqueue(running.stub, spec(payload=b"next" + big))
    (delivery,) = await worker.take(1)
    assert deleted == [first]
    assert (delivery.task.id, delivery.task.payload) == (second, b"next" + big)
    await worker.close()
