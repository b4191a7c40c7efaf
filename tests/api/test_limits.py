"""Resource limits: Lease streams per connection, client and broker; unary calls and their
request bytes in flight; settlements frames (size, queues, backpressure). Past a limit the
caller gets a clear status, the count goes back down however a call ends, and others are served."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

import grpc
import pytest
import redis

from broker.api.frame_scan import SCAN_FROM_BYTES
from broker.api.lease_session import LARGE_FRAMES_PER_CLIENT, LIGHT_FRAME_ITEMS, LeaseSession
from broker.api.limits import Pacer, StreamLimits, UnaryLimits, client_of_peer
from broker.config import Settings
from broker.errors import LimitExceeded
from broker.ids import IdGenerator
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, lease_pb2
from tests.conftest import RunningBroker, start_broker
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, error_reason, spec

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub as Stub


@asynccontextmanager
async def broker(settings: Settings, **overrides: object) -> AsyncIterator[RunningBroker]:
    running = await start_broker(settings, **overrides)
    try:
        yield running
    finally:
        await running.close()


@contextmanager
def redis_writes_paused(client: redis.Redis) -> Iterator[None]:
    """Holds every Redis write (and so every Enqueue and settlement) until the block ends."""
    client.client_pause(10_000, all=False)
    try:
        yield
    finally:
        client.client_unpause()


async def until(condition: Callable[[], bool], what: str, wait_s: float = 5.0) -> None:
    deadline = time.monotonic() + wait_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def refused(stub: Stub) -> grpc.aio.AioRpcError:
    """Opens a Lease stream that the broker must refuse; its error."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await LeaseStream(stub).open(["emails"], credits=1)
    return caught.value


# --- Lease streams ----------------------------------------------------------------------------


async def test_streams_are_limited_per_connection_and_per_client(settings: Settings) -> None:
    async with broker(settings, max_streams_per_connection=3, max_streams_per_client=5) as b:
        first = [await LeaseStream(b.stub).open(["emails"], credits=1) for _ in range(3)]
        error = await refused(b.stub)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_connection" in str(error.details())
        assert error_reason(error) == "LIMIT_EXCEEDED"

        # Another connection from the same client: up to the client's limit of 5 in all.
        # (its own subchannel pool: grpc would otherwise share the first channel's connection)
        channel = grpc.aio.insecure_channel(b.target, [("grpc.use_local_subchannel_pool", 1)])
        other = broker_service_pb2_grpc.BrokerServiceStub(channel)
        second = [await LeaseStream(other).open(["emails"], credits=1) for _ in range(2)]
        error = await refused(other)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_client" in str(error.details())

        # Admitted streams work: they get tasks.
        await enqueue(b.stub, spec())
        deliveries = [s.deliveries for s in first + second]
        await until(lambda: any(not d.empty() for d in deliveries), "a delivery")

        # A stream that ends makes room.
        await first[0].close()
        await until(lambda: b.broker.streams.open == 4, "the closed stream to be released")
        replacement = await LeaseStream(other).open(["emails"], credits=1)
        for s in [*first[1:], *second, replacement]:
            await s.close()
        await until(lambda: b.broker.streams.open == 0, "every stream to be released")
        await channel.close()


async def test_stream_counts_return_to_zero_however_streams_end(settings: Settings) -> None:
    async with broker(settings, max_streams_per_connection=4, max_streams_per_client=4) as b:
        await enqueue(b.stub, spec(), spec())
        closed = await LeaseStream(b.stub).open(["emails"], credits=1)
        cancelled = await LeaseStream(b.stub).open(["emails"], credits=1)
        aborted = await LeaseStream(b.stub).open(["emails"], credits=1)
        silent = LeaseStream(b.stub)  # never sends its open frame: open_timeout_s ends it
        await until(lambda: b.broker.streams.open == 4, "four streams counted")
        assert (await refused(b.stub)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        await closed.close()
        cancelled.cancel()
        await aborted.call.write(lease_pb2.LeaseRequest())  # an empty frame: INVALID_ARGUMENT
        await asyncio.wait_for(aborted.ended.wait(), 5)
        assert aborted.error is not None
        assert aborted.error.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(silent.call.read(), 5)
        await until(lambda: b.broker.streams.open == 0, "every stream released")

        # The tasks the ended streams held went back and are served to the next stream.
        again = await LeaseStream(b.stub).open(["emails"], credits=2)
        assert len(await again.take(2)) == 2
        await again.close()


def test_stream_limits_count_per_connection_client_and_total() -> None:
    by_ip = StreamLimits(per_connection=2, per_client=3, total=4)
    held = [by_ip.admit("ipv4:10.0.0.1:1000"), by_ip.admit("ipv4:10.0.0.1:1000")]
    with pytest.raises(LimitExceeded, match="max_streams_per_connection"):
        by_ip.admit("ipv4:10.0.0.1:1000")
    held.append(by_ip.admit("ipv4:10.0.0.1:2000"))
    with pytest.raises(LimitExceeded, match="max_streams_per_client"):
        by_ip.admit("ipv4:10.0.0.1:3000")
    held.append(by_ip.admit("ipv6:[::1]:1000"))
    with pytest.raises(LimitExceeded, match=r"max_streams\)"):
        by_ip.admit("ipv4:10.0.0.2:1000")
    assert by_ip.open == 4
    for release in held:
        release.release()
        release.release()  # twice is once
    assert by_ip.open == 0 and by_ip.of_client("ipv4:10.0.0.1:9") == 0
    assert client_of_peer("ipv6:[::1]:5") == "ipv6:[::1]"
    assert client_of_peer("unix:/tmp/s") == "unix:/tmp/s"

    # The client key is a function: a later principal can replace the IP address.
    by_tenant = StreamLimits(1, 1, 10, client_key=lambda peer: "one tenant")
    with (
        by_tenant.admit("ipv4:10.0.0.1:1"),
        pytest.raises(LimitExceeded, match="max_streams_per_client"),
    ):
        by_tenant.admit("ipv4:10.0.0.9:1")
    assert by_tenant.open == 0


# --- unary calls ------------------------------------------------------------------------------


async def test_request_bytes_in_flight_are_capped(
    settings: Settings, redis_client: redis.Redis
) -> None:
    payload = b"x" * (600 * 1024)
    async with broker(settings, max_inflight_request_bytes=1024 * 1024) as b:
        limits = b.broker.unary
        with redis_writes_paused(redis_client):
            first = asyncio.create_task(enqueue(b.stub, spec(payload=payload)))
            await until(lambda: limits.calls == 1, "the first Enqueue in flight")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await enqueue(b.stub, spec(payload=payload))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_inflight_request_bytes" in str(caught.value.details())
            # Small calls still fit beside it.
            small = asyncio.create_task(enqueue(b.stub, spec(payload=b"small")))
            await until(lambda: limits.calls == 2, "the small Enqueue in flight")
        assert len(await first) == len(await small) == 1
        stats = (await b.stub.Stats(bs.StatsRequest(queues=["emails"]))).queues[0]
        assert stats.pending == 2  # the refused call stored nothing, the others everything
        await until(lambda: (limits.calls, limits.bytes) == (0, 0), "the counts to return")


async def test_concurrent_unary_calls_are_capped_and_released_on_cancel(
    settings: Settings, redis_client: redis.Redis
) -> None:
    async with broker(settings, max_concurrent_unary_rpcs=2) as b:
        limits = b.broker.unary
        with redis_writes_paused(redis_client):
            held = [asyncio.create_task(enqueue(b.stub, spec())) for _ in range(2)]
            await until(lambda: limits.calls == 2, "two calls in flight")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await b.stub.GetTask(bs.GetTaskRequest(task_id="emails:x"))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_concurrent_unary_rpcs" in str(caught.value.details())
            held[0].cancel()  # the client gives up: its slot is freed
            await until(lambda: limits.calls == 1, "the cancelled call released")
        await held[1]
        await until(lambda: (limits.calls, limits.bytes) == (0, 0), "the counts to return")


def test_one_request_larger_than_the_budget_is_served_alone() -> None:
    limits = UnaryLimits(
        max_calls=10, max_bytes=100, max_calls_per_client=10, max_bytes_per_client=100
    )
    with limits.admit("ipv4:10.0.0.1:1", 500), pytest.raises(LimitExceeded, match="max_inflight"):
        limits.admit("ipv4:10.0.0.2:1", 1)
    with limits.admit("ipv4:10.0.0.1:1", 60):
        with pytest.raises(LimitExceeded):
            limits.admit("ipv4:10.0.0.2:1", 41)
        with limits.admit("ipv4:10.0.0.2:1", 40):
            assert (limits.calls, limits.bytes) == (2, 100)
    assert (limits.calls, limits.bytes) == (0, 0)


def test_one_client_cannot_take_the_whole_unary_budget() -> None:
    limits = UnaryLimits(
        max_calls=4, max_bytes=100, max_calls_per_client=2, max_bytes_per_client=50
    )
    noisy, victim = "ipv4:10.0.0.1:1", "ipv4:10.0.0.2:1"
    held = [limits.admit(noisy, 30)]
    with pytest.raises(LimitExceeded, match="max_inflight_request_bytes_per_client"):
        limits.admit("ipv4:10.0.0.1:2", 30)  # another connection of the same client
    held.append(limits.admit(noisy, 10))
    with pytest.raises(LimitExceeded, match="max_concurrent_unary_rpcs_per_client"):
        limits.admit(noisy, 1)
    held += [limits.admit(victim, 50), limits.admit("ipv4:10.0.0.3:1", 10)]  # room for others
    with pytest.raises(LimitExceeded, match=r"max_concurrent_unary_rpcs\)"):
        limits.admit("ipv4:10.0.0.4:1", 1)
    for release in held:
        release.release()
    assert (limits.calls, limits.bytes) == (0, 0)


async def test_bulk_work_steps_aside_while_unary_calls_are_served() -> None:
    # A large settlements frame pauses between slices (Pacer); while a unary call is being
    # served it waits for the call's answer, so the call does not queue behind it at every hop.
    limits = UnaryLimits(
        max_calls=10, max_bytes=100, max_calls_per_client=10, max_bytes_per_client=100
    )
    pacer = Pacer(1.0, limits.foreground)  # share 1: no rest, only the deferral
    call = limits.admit("ipv4:10.0.0.1:1", 10)
    paused = asyncio.create_task(pacer.pause())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not paused.done()  # waits while the call is served
    call.release()
    await asyncio.wait_for(paused, 1)
    await asyncio.wait_for(pacer.pause(), 1)  # no call: it goes on at once


async def test_bulk_work_still_moves_under_a_steady_flow_of_calls() -> None:
    limits = UnaryLimits(
        max_calls=10, max_bytes=100, max_calls_per_client=10, max_bytes_per_client=100
    )
    pacer = Pacer(1.0, limits.foreground)
    with limits.admit("ipv4:10.0.0.1:1", 10):  # a call that is never answered meanwhile
        started = time.perf_counter()
        await asyncio.wait_for(pacer.pause(), 5)  # bounded: MAX_DEFER_S, not forever
        assert time.perf_counter() - started >= Pacer.MAX_DEFER_S * 0.9


# --- settlements frames -----------------------------------------------------------------------


def _acks(task_ids: list[str]) -> lease_pb2.LeaseRequest:
    acks = [lease_pb2.AckRequest(task_id=t, lease_id="0" * 32) for t in task_ids]
    return lease_pb2.LeaseRequest(settlements=lease_pb2.Settlements(acks=acks))


@pytest.mark.parametrize(
    ("task_ids", "setting"),
    [
        ([f"emails:{i}" for i in range(6)], "max_settlements_per_frame"),
        (["a:1", "b:1", "c:1"], "max_queues_per_settlements_frame"),
    ],
)
async def test_an_oversized_settlements_frame_fails_the_stream(
    settings: Settings, task_ids: list[str], setting: str
) -> None:
    async with broker(
        settings, max_settlements_per_frame=5, max_queues_per_settlements_frame=2
    ) as b:
        worker = await LeaseStream(b.stub).open(["emails"], credits=1)
        await worker.call.write(_acks(task_ids))
        await asyncio.wait_for(worker.ended.wait(), 5)
        assert worker.error is not None
        assert worker.error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert setting in str(worker.error.details())
        assert str(worker.error.details()).startswith("settlements:")
        assert worker.results.empty()


async def test_a_large_frame_far_past_the_item_limit_is_refused_before_it_is_parsed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Parsing 150,000 acks took 14-26 ms of the event loop only to refuse them: a large frame's
    # items are counted from its bytes first (broker/api/frame_scan.py).
    parsed: list[int] = []
    parse = LeaseSession._parse

    def spy(raw: object) -> lease_pb2.LeaseRequest | None:
        parsed.append(len(raw))  # type: ignore[arg-type]
        return parse(raw)

    monkeypatch.setattr(LeaseSession, "_parse", staticmethod(spy))
    async with broker(settings, max_settlements_per_frame=100) as b:
        worker = await LeaseStream(b.stub).open(["emails"], credits=1)
        frame = _acks([f"emails:{i}" for i in range(2000)])
        assert frame.ByteSize() > SCAN_FROM_BYTES
        await worker.call.write(frame)
        await asyncio.wait_for(worker.ended.wait(), 5)
        assert worker.error is not None
        assert worker.error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert str(worker.error.details()).startswith(
            "settlements: more than 100 acks, nacks and extensions in one frame; at most 100"
        )
        assert parsed and max(parsed) < SCAN_FROM_BYTES  # the open frame alone was parsed


async def test_a_large_frame_over_many_queues_is_applied_whole(stub: Stub) -> None:
    queues = [f"q{i}" for i in range(20)]  # more queue groups than one chunk applies at once
    ids = await enqueue(stub, *[spec(queue=q) for q in queues for _ in range(3)])
    worker = await LeaseStream(stub).open(queues, credits=60)
    deliveries = await worker.take(60)
    acks = [lease_pb2.AckRequest(task_id=d.task.id, lease_id=d.lease_id) for d in deliveries]
    bogus = [
        lease_pb2.AckRequest(task_id=f"q{i % 20}:nope{i}", lease_id="0" * 32) for i in range(1500)
    ]
    frame = lease_pb2.Settlements(acks=bogus[:700] + acks + bogus[700:])
    await worker.call.write(lease_pb2.LeaseRequest(settlements=frame))
    results = [await asyncio.wait_for(worker.results.get(), 10) for _ in range(1560)]
    # Every item is answered once (answers match items by lease and kind, not by position).
    assert sorted(r.task_id for r in results) == sorted(a.task_id for a in frame.acks)
    outcomes = {r.task_id: r.outcome for r in results}
    assert all(outcomes[a.task_id] == lease_pb2.SETTLE_OUTCOME_OK for a in acks)
    assert all(outcomes[a.task_id] != lease_pb2.SETTLE_OUTCOME_OK for a in bogus)
    stats = await stub.Stats(bs.StatsRequest(queues=queues))
    assert sum(s.succeeded_total for s in stats.queues) == len(ids) == 60
    await worker.close()


async def test_the_broker_stops_reading_a_stream_at_its_settlements_bound(
    settings: Settings, redis_client: redis.Redis
) -> None:
    async with broker(settings, max_settle_batches_per_stream=1) as b:
        await enqueue(b.stub, spec())
        worker = await LeaseStream(b.stub).open(["emails"], credits=1)
        (delivery,) = await worker.take(1)
        with redis_writes_paused(redis_client):
            ack = lease_pb2.AckRequest(task_id=delivery.task.id, lease_id=delivery.lease_id)
            await worker.call.write(lease_pb2.LeaseRequest(ack=ack))  # held by the pause
            # A frame that would fail the stream at once, were it read.
            await worker.call.write(lease_pb2.LeaseRequest(open=lease_pb2.LeaseOpen()))
            await asyncio.sleep(0.5)
            assert not worker.ended.is_set()  # not read: the first frame is still being applied
        result = await asyncio.wait_for(worker.results.get(), 5)
        assert result.outcome == lease_pb2.SETTLE_OUTCOME_OK
        await asyncio.wait_for(worker.ended.wait(), 5)  # then read: the duplicate open fails it
        assert worker.error is not None
        assert worker.error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_clients_large_frames_left_by_a_cut_stream_hold_back_its_other_streams(
    settings: Settings, redis_client: redis.Redis
) -> None:
    # A client that cuts a stream with large settlements frames still being applied, and sends
    # more on another, must wait for them: else cutting and reopening piles up work unbounded.
    async with broker(settings) as b:
        cut = await LeaseStream(b.stub).open(["emails"], credits=0)
        other = await LeaseStream(b.stub).open(["emails"], credits=0)
        with redis_writes_paused(redis_client):
            ids = IdGenerator()  # well-formed ids of no task: each ack needs its script call
            for _ in range(LARGE_FRAMES_PER_CLIENT):  # large: each waits for a lane
                await cut.call.write(
                    _acks([f"emails:{ids.new()}" for _ in range(LIGHT_FRAME_ITEMS + 1)])
                )
            await asyncio.sleep(0.3)  # read by the broker, held by the pause
            cut.call.cancel()
            credit = lease_pb2.LeaseRequest(credit=lease_pb2.LeaseCredit(credits=1))
            await other.call.write(credit)  # read at once: the stream was waiting for a frame
            # A frame that would fail the stream at once, were it read.
            await other.call.write(lease_pb2.LeaseRequest(open=lease_pb2.LeaseOpen()))
            await asyncio.sleep(0.5)
            assert not other.ended.is_set(), other.error  # not read: the cut stream's go first
        await asyncio.wait_for(other.ended.wait(), 10)  # applied: then it is read, and fails
        assert other.error is not None
        assert other.error.code() == grpc.StatusCode.INVALID_ARGUMENT
