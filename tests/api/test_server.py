"""The server as operators see it: health, reflection, graceful shutdown, Redis outages, and
refusing an unsafe Redis."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from broker.app import Broker, UnsafeRedis
from broker.config import Settings
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import lease_pb2, task_pb2
from tests.conftest import TEST_SETTINGS, RunningBroker, start_broker
from tests.support.lease_stream import LeaseStream
from tests.support.redis_server import RedisServer
from tests.support.tasks import enqueue, error_reason, get, spec


async def health_status(running: RunningBroker, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(running.channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
    return int(response.status)


async def test_health_is_serving(running: RunningBroker) -> None:
    for _ in range(20):
        if await health_status(running) == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.1)
    assert await health_status(running, "taskbroker.v1.BrokerService") == (
        health_pb2.HealthCheckResponse.SERVING
    )


async def test_health_is_serving_as_soon_as_start_returns(
    settings: Settings, redis_client: redis.Redis
) -> None:
    """A readiness probe right after start sees SERVING, not NOT_FOUND, even while the health
    monitor's first pass waits for Redis (held here by CLIENT PAUSE)."""
    broker = Broker(replace(settings, listen="127.0.0.1:0"))
    await broker.start()
    redis_client.client_pause(300)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "taskbroker.v1.BrokerService", "taskbroker.v1.AdminService"):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    finally:
        await broker.stop(grace_s=0.1)


def _reflected_services(target: str) -> list[str]:
    with grpc.insecure_channel(target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        return sorted(database.get_services())


async def test_reflection_lists_the_services(running: RunningBroker) -> None:
    services = await asyncio.to_thread(_reflected_services, running.target)
    assert "taskbroker.v1.BrokerService" in services
    assert "taskbroker.v1.AdminService" in services
    assert "grpc.health.v1.Health" in services


async def test_graceful_shutdown_drains_then_returns_what_is_still_held(
    settings: Settings,
) -> None:
    running = await start_broker(settings, shutdown_grace_s=1.0)
    ids = await enqueue(running.stub, spec(), spec())
    worker = await LeaseStream(running.stub).open(["emails"], credits=2, lease=timedelta(minutes=5))
    finished, unfinished = await worker.take(2)
    stopping = asyncio.create_task(running.broker.stop())

    drain = await asyncio.wait_for(worker.drains.get(), 2)
    assert drain.deadline.seconds > 0
    assert await health_status(running) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await enqueue(running.stub, spec())
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_reason(err.value) == "DRAINING"
    # Settlements are still accepted during the grace period.
    assert (await worker.ack(finished)).outcome == lease_pb2.SETTLE_OUTCOME_OK
    await worker.credit(5)
    await asyncio.wait_for(stopping, 5)
    assert worker.deliveries.empty()  # no new leases after the drain notice
    await running.channel.close()

    after = await start_broker(settings)
    assert (await get(after.stub, ids[0])).state == task_pb2.TASK_STATE_SUCCEEDED
    # Still held when the grace ran out: it waits the resume window, then goes back to pending.
    deadline = time.monotonic() + 2.0
    while (back := await get(after.stub, unfinished.task.id)).state != task_pb2.TASK_STATE_PENDING:
        assert time.monotonic() < deadline, task_pb2.TaskState.Name(back.state)
        await asyncio.sleep(0.05)
    assert [e.message for e in back.errors] == ["lease stream closed"]
    await after.close()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis this test may kill: AOF always, so acknowledged writes survive the kill."""
    with RedisServer(appendonly=True, appendfsync="always") as server:
        yield server


async def test_redis_outage_is_unavailable_and_the_broker_recovers_by_itself(
    own_redis: RedisServer,
) -> None:
    running = await start_broker(replace(TEST_SETTINGS, redis_url=own_redis.url))
    (kept,) = await enqueue(running.stub, spec())
    worker = await LeaseStream(running.stub).open(["emails"], credits=5)
    assert len(await worker.take(1)) == 1
    own_redis.kill()

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await running.stub.Enqueue(bs.EnqueueRequest(tasks=[spec()]), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - started < 5
    assert "Traceback" not in (err.value.details() or "")
    for _ in range(40):
        if await health_status(running) == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.1)
    assert await health_status(running) == health_pb2.HealthCheckResponse.NOT_SERVING
    # Liveness is about the process: a restart would not bring Redis back.
    liveness = await health_status(running, "liveness")
    assert liveness == health_pb2.HealthCheckResponse.SERVING

    own_redis.start()
    for _ in range(50):  # the broker reconnects on its own
        try:
            (new,) = await enqueue(running.stub, spec())
            break
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the broker did not recover after Redis came back")
    (d,) = await worker.take(1, wait_s=5)  # the idle stream is served again, pushed
    assert d.task.id == new
    assert (await get(running.stub, kept)).state == task_pb2.TASK_STATE_LEASED  # AOF kept it
    await worker.close()
    await running.close()


async def test_broker_refuses_a_redis_that_evicts_keys() -> None:
    with RedisServer(maxmemory_policy="allkeys-lru") as server:
        broker = Broker(replace(TEST_SETTINGS, redis_url=server.url))
        with pytest.raises(UnsafeRedis, match="noeviction"):
            await broker.start()


async def test_a_taken_grpc_address_stops_the_broker_and_leaves_nothing_running(
    running: RunningBroker, tmp_path: Path
) -> None:
    taken = f"127.0.0.1:{running.broker.port}"
    broker = Broker(replace(TEST_SETTINGS, redis_url=None, data_dir=tmp_path, listen=taken))
    with pytest.raises(RuntimeError, match=f"cannot listen on {taken}"):
        await broker.start()
    assert broker.embedded is not None
    with pytest.raises(redis.ConnectionError):  # its embedded redis-server was stopped
        redis.Redis(port=broker.embedded.port, socket_connect_timeout=1).ping()
    assert broker.http_port  # its HTTP port was bound, and is free again
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", broker.http_port), timeout=1).close()
    assert await enqueue(running.stub, spec("emails"))  # the first broker is untouched
