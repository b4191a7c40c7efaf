"""A client's request bytes per second (request_bytes_per_s_per_client): past its rate its calls
wait, in turn, before their requests are read, and its streams are not read; a call that cannot
wait that long is refused with RESOURCE_EXHAUSTED and RetryInfo and nothing of it is stored;
other clients are served meanwhile, and the SDK waits a refusal out and sends again."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace

import grpc
import pytest
from google.protobuf import descriptor_pool
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from broker.api.limits import ByteRate
from broker.api.server import RATED_METHODS
from broker.app import Broker
from broker.config import Settings
from broker.errors import RateLimited
from taskbroker._client import Client
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, lease_pb2
from tests.conftest import RunningBroker
from tests.support.tasks import error_reason, spec

KIB = 1024
#: The smallest rate the setting takes: a few hundred KiB make a client wait.
RATE = 64 * KIB


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_client_in_debt_owes_time_until_it_has_paid_and_others_owe_nothing() -> None:
    clock = Clock()
    rate = ByteRate(1000, 500, clock)
    assert rate.debt_s("a") == 0
    rate.charge("a", 1500)  # 1.5 s worth at once; a burst of 0.5 s is allowed: 1 s of debt
    assert rate.debt_s("a") == pytest.approx(1.0)
    assert rate.debt_s("b") == 0
    clock.now += 0.5
    assert rate.debt_s("a") == pytest.approx(0.5)
    clock.now += 0.5
    assert rate.debt_s("a") == 0


async def test_a_call_that_cannot_wait_out_the_debt_is_refused_with_when_to_retry() -> None:
    clock = Clock()
    rate = ByteRate(1000, 500, clock)
    rate.charge("a", 1500)
    with pytest.raises(RateLimited, match="request_bytes_per_s_per_client") as caught:
        await rate.wait("a", max_wait_s=0.2)
    assert caught.value.retry_after_s == pytest.approx(1.0)
    with await rate.wait("b", max_wait_s=0):  # another client goes on at once
        pass


async def test_calls_in_debt_wait_their_turn_one_at_a_time_in_order() -> None:
    rate = ByteRate(1_000_000, 1_000_000)
    rate.charge("a", 1_050_000)  # 50 ms of debt
    order: list[int] = []

    async def call(n: int) -> None:
        with await rate.wait("a", max_wait_s=5):
            order.append(n)
            rate.charge("a", 20_000)  # each read puts the client 20 ms back in debt

    started = time.monotonic()
    await asyncio.gather(*(call(n) for n in range(5)))
    assert order == [0, 1, 2, 3, 4]
    # 50 ms, then 20 ms before each of the four others: no two read on the same payment.
    assert time.monotonic() - started >= 0.12


async def test_too_many_waiting_calls_of_one_client_are_refused() -> None:
    rate = ByteRate(1000, 1000)
    rate.charge("a", 3000)  # 2 s of debt
    waiting = [
        asyncio.create_task(rate.wait("a", max_wait_s=5)) for _ in range(ByteRate.MAX_WAITING)
    ]
    await asyncio.sleep(0.01)
    with pytest.raises(RateLimited, match="already wait"):
        await rate.wait("a", max_wait_s=5)
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    assert not rate._turns  # cancelled waiters leave nothing behind


def test_a_steady_client_within_its_rate_never_owes() -> None:
    clock = Clock()
    rate = ByteRate(1000, 1000, clock)
    for _ in range(100):
        assert rate.debt_s("a") == 0
        rate.charge("a", 100)
        clock.now += 0.1


def test_a_quiet_client_may_send_its_burst_at_once_and_no_more() -> None:
    clock = Clock()
    rate = ByteRate(1000, 1000, clock)
    for _ in range(10):  # 1,000 bytes at once: the burst
        assert rate.debt_s("a") == 0
        rate.charge("a", 100)
    assert rate.debt_s("a") == 0
    rate.charge("a", 1)
    assert rate.debt_s("a") > 0


def test_rate_zero_is_no_limit() -> None:
    rate = ByteRate(0, 0)
    rate.charge("a", 10**12)
    assert rate.debt_s("a") == 0


def test_clients_whose_allowance_refilled_are_forgotten() -> None:
    clock = Clock()
    rate = ByteRate(1000, 1000, clock)
    for i in range(ByteRate.PRUNE_AT):
        rate.charge(f"client-{i}", 10)
    clock.now += 1.0
    rate.charge("late", 2000)
    assert len(rate._full_at) == 1  # only the client still in debt is remembered
    assert rate.debt_s("late") > 0


@asynccontextmanager
async def broker(settings: Settings) -> AsyncIterator[RunningBroker]:
    # Every connection is its own client here (both come from 127.0.0.1).
    b = Broker(replace(settings, request_bytes_per_s_per_client=RATE), client_key=lambda p: p)
    await b.start()
    await b.wake_listener.connected.wait()
    running = RunningBroker(b)
    try:
        yield running
    finally:
        await running.close()


def frame(response: object) -> str | None:
    """Which frame a Lease stream answered with."""
    assert isinstance(response, lease_pb2.LeaseResponse), response
    return response.WhichOneof("frame")


def retry_delay_s(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError("no RetryInfo in the status details")


async def test_a_client_over_its_rate_waits_while_others_are_served_and_nothing_is_lost(
    settings: Settings,
) -> None:
    async with broker(settings) as b:
        other = grpc.aio.insecure_channel(b.target, [("grpc.use_local_subchannel_pool", 1)])
        async with other:
            heavy = b.stub
            light = broker_service_pb2_grpc.BrokerServiceStub(other)
            big = bs.EnqueueRequest(tasks=[spec(payload=b"x" * (2 * RATE))])
            await heavy.Enqueue(big)  # served at once: the client owed nothing yet
            held = asyncio.ensure_future(
                heavy.Enqueue(bs.EnqueueRequest(tasks=[spec(payload=b"held")]))
            )
            # The heavy client owes about a second: its call waits, while another client's
            # calls, and the heavy client's reads, are served meanwhile.
            await light.Enqueue(bs.EnqueueRequest(tasks=[spec(payload=b"other client")]))
            await heavy.Stats(bs.StatsRequest(queues=["emails"]))
            assert not held.done()
            await held
            stats = (await heavy.Stats(bs.StatsRequest(queues=["emails"]))).queues[0]
            assert stats.pending == 3


async def test_a_call_that_would_wait_past_its_deadline_is_told_when_to_retry(
    settings: Settings,
) -> None:
    async with broker(settings) as b:
        big = bs.EnqueueRequest(tasks=[spec(payload=b"x" * (2 * RATE))])
        await b.stub.Enqueue(big)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await b.stub.Enqueue(bs.EnqueueRequest(tasks=[spec(payload=b"small")]), timeout=0.3)
        error = caught.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # not DEADLINE_EXCEEDED
        assert error_reason(error) == "LIMIT_EXCEEDED"
        assert "request_bytes_per_s_per_client" in str(error.details())
        delay = retry_delay_s(error)
        assert 0.3 < delay <= 1.0  # 2 s of bytes, less the 1 s burst, some of it gone
        await asyncio.sleep(delay)
        await b.stub.Enqueue(bs.EnqueueRequest(tasks=[spec(payload=b"after the delay")]))
        stats = (await b.stub.Stats(bs.StatsRequest(queues=["emails"]))).queues[0]
        assert stats.pending == 2  # the refused call stored nothing


async def test_a_stream_is_not_read_while_its_client_is_over_its_rate(
    settings: Settings,
) -> None:
    async with broker(settings) as b:
        await b.stub.Enqueue(bs.EnqueueRequest(tasks=[spec(payload=b"for the worker")]))
        async with b.new_channel() as channel:  # a client of its own (see broker())
            stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
            call = stub.Lease()
            await call.write(
                lease_pb2.LeaseRequest(open=lease_pb2.LeaseOpen(queues=["emails"], credits=0))
            )
            assert frame(await call.read()) == "opened"
            # A frame of 2 s of the client's bytes (an ack of an unknown task with a large
            # result): the broker reads it, then reads nothing more for about a second.
            flood = lease_pb2.AckRequest(
                task_id="emails:nope", lease_id="0" * 32, result=b"r" * (2 * RATE)
            )
            await call.write(
                lease_pb2.LeaseRequest(settlements=lease_pb2.Settlements(acks=[flood]))
            )
            assert frame(await call.read()) == "settle_results"
            sent = time.monotonic()
            await call.write(lease_pb2.LeaseRequest(credit=lease_pb2.LeaseCredit(credits=1)))
            assert frame(await call.read()) == "deliveries"
            assert time.monotonic() - sent >= 0.5  # the credit waited for the debt
            call.cancel()


async def test_the_sdk_waits_out_the_rate_and_every_task_is_stored(settings: Settings) -> None:
    async with broker(settings) as b, Client(b.target) as client:
        started = time.monotonic()
        for _ in range(3):
            await client.enqueue("emails", "send", b"y" * RATE)
        elapsed = time.monotonic() - started
        # 3 s of bytes against a 1 s burst: the third call had to wait about a second.
        assert elapsed >= 0.8, elapsed
        stats = (await b.stub.Stats(bs.StatsRequest(queues=["emails"]))).queues[0]
        assert stats.pending == 3


def test_every_rated_method_is_a_method_of_the_api() -> None:
    pool = descriptor_pool.Default()
    for name in RATED_METHODS:
        service, _, method = name.rpartition(".")
        assert pool.FindServiceByName(service).methods_by_name[method].full_name == name
