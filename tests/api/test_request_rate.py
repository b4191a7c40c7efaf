"""A client's request bytes per second (request_bytes_per_s_per_client): past its rate a call is
refused with RESOURCE_EXHAUSTED and RetryInfo before its request is read, nothing of it is
stored, other clients are served, and the SDK waits the delay out and sends again."""

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
from taskbroker.v1 import broker_service_pb2_grpc
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


def test_a_client_in_debt_is_refused_until_it_has_paid_and_others_are_not() -> None:
    clock = Clock()
    rate = ByteRate(1000, 500, clock)
    rate.check("a")
    rate.charge("a", 1500)  # 1.5 s worth at once; a burst of 0.5 s is allowed: 1 s of debt
    with pytest.raises(RateLimited, match="request_bytes_per_s_per_client") as caught:
        rate.check("a")
    assert caught.value.retry_after_s == pytest.approx(1.0)
    rate.check("b")
    clock.now += 0.5
    with pytest.raises(RateLimited) as caught:
        rate.check("a")
    assert caught.value.retry_after_s == pytest.approx(0.5)
    clock.now += 0.5
    rate.check("a")


def test_a_steady_client_within_its_rate_is_never_refused() -> None:
    clock = Clock()
    rate = ByteRate(1000, 1000, clock)
    for _ in range(100):
        rate.check("a")
        rate.charge("a", 100)
        clock.now += 0.1


def test_a_quiet_client_may_send_its_burst_at_once_and_no_more() -> None:
    clock = Clock()
    rate = ByteRate(1000, 1000, clock)
    for _ in range(10):  # 1,000 bytes at once: the burst
        rate.check("a")
        rate.charge("a", 100)
    rate.check("a")
    rate.charge("a", 1)
    with pytest.raises(RateLimited):
        rate.check("a")


def test_rate_zero_is_no_limit() -> None:
    rate = ByteRate(0, 0)
    rate.charge("a", 10**12)
    rate.check("a")


def test_clients_whose_allowance_refilled_are_forgotten() -> None:
    clock = Clock()
    rate = ByteRate(1000, 1000, clock)
    for i in range(ByteRate.PRUNE_AT):
        rate.charge(f"client-{i}", 10)
    clock.now += 1.0
    rate.charge("late", 2000)
    assert len(rate._full_at) == 1  # only the client still in debt is remembered
    with pytest.raises(RateLimited):
        rate.check("late")


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


def retry_delay_s(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError("no RetryInfo in the status details")


async def test_a_client_over_its_rate_is_told_when_to_retry_and_others_are_served(
    settings: Settings,
) -> None:
    async with broker(settings) as b:
        other = grpc.aio.insecure_channel(b.target, [("grpc.use_local_subchannel_pool", 1)])
        async with other:
            heavy = b.stub
            light = broker_service_pb2_grpc.BrokerServiceStub(other)
            big = bs.EnqueueRequest(tasks=[spec(payload=b"x" * (2 * RATE))])
            await heavy.Enqueue(big)  # admitted: the client owed nothing yet
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await heavy.Enqueue(bs.EnqueueRequest(tasks=[spec(payload=b"small")]))
            error = caught.value
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_reason(error) == "LIMIT_EXCEEDED"
            assert "request_bytes_per_s_per_client" in str(error.details())
            delay = retry_delay_s(error)
            assert 0.5 < delay <= 1.0  # 2 s of bytes, less the 1 s burst, some of it gone
            # Only calls that carry task data are held to the rate: reads are still served.
            await heavy.Stats(bs.StatsRequest(queues=["emails"]))
            await light.Enqueue(bs.EnqueueRequest(tasks=[spec(payload=b"other client")]))
            await asyncio.sleep(delay)
            await heavy.Enqueue(bs.EnqueueRequest(tasks=[spec(payload=b"after the delay")]))
            stats = (await heavy.Stats(bs.StatsRequest(queues=["emails"]))).queues[0]
            assert stats.pending == 3  # the refused call stored nothing


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
