"""/metrics after a scripted run: names, labels and values, parsed as Prometheus parses them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from taskbroker import Client, NewTask, NonRetryable, RateLimit, TaskContext, Worker, handler
from taskbroker.v1 import broker_service_pb2 as bs
from tests.conftest import RunningBroker
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, spec

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@handler("send")
async def send(ctx: TaskContext, payload: bytes) -> bytes:
    if payload.startswith(b"fail"):
        raise NonRetryable("mailbox unavailable")
    return b"result-marker"


async def scrape(http: aiohttp.ClientSession) -> tuple[str, Samples]:
    async with http.get("/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = await response.text()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert isinstance(s, Sample)
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def scraped(http: aiohttp.ClientSession, name: str, want: float, **labels: str) -> None:
    """Scrapes until the sample has the value: the server observes an RPC as it ends, which
    may be just after the client saw the end."""
    for _ in range(100):
        _, samples = await scrape(http)
        if samples.get((name, tuple(sorted(labels.items())))) == want:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{name}{labels} never became {want}")


@pytest.fixture
async def client(running: RunningBroker) -> AsyncIterator[Client]:
    async with Client(running.target) as client:
        yield client


async def test_a_scripted_run_of_50_tasks_45_succeeded_5_dead(
    running: RunningBroker, http: aiohttp.ClientSession, client: Client
) -> None:
    tasks = [
        NewTask("jobs", "send", b"fail-secret-%d" % i if i % 10 == 0 else b"secret-%d" % i)
        for i in range(50)
    ]
    await client.enqueue_many(tasks)
    worker = Worker(
        client,
        queues=["jobs"],
        handlers=[send],
        worker_id="metrics-worker",
        shutdown_grace=timedelta(seconds=1),
    )
    assert await worker.run_until_idle() == 50
    with pytest.raises(Exception, match="not found"):
        await client.get_task("jobs:01J0000000000000000000000Z")

    text, samples = await scrape(http)
    q = {"queue": "jobs"}
    assert value(samples, "taskbroker_tasks_enqueued_total", **q) == 50
    assert value(samples, "taskbroker_tasks_succeeded_total", **q) == 45
    assert value(samples, "taskbroker_tasks_dead_lettered_total", **q) == 5
    assert value(samples, "taskbroker_tasks_failed_total", **q) == 5
    assert value(samples, "taskbroker_tasks_retried_total", **q) == 0
    assert value(samples, "taskbroker_tasks_reclaimed_total", **q) == 0
    assert value(samples, "taskbroker_tasks_cancelled_total", **q) == 0
    for state, count in (("pending", 0), ("scheduled", 0), ("leased", 0), ("dead", 5)):
        assert value(samples, "taskbroker_queue_tasks", state=state, **q) == count
    assert value(samples, "taskbroker_queue_oldest_pending_age_seconds", **q) == 0
    assert value(samples, "taskbroker_queue_paused", **q) == 0

    # In-process histograms: every task waited once and 45 were acked.
    assert value(samples, "taskbroker_queue_wait_seconds_count", **q) == 50
    assert value(samples, "taskbroker_queue_wait_seconds_bucket", le="+Inf", **q) == 50
    assert 0 <= value(samples, "taskbroker_queue_wait_seconds_sum", **q) < 50 * 5
    assert value(samples, "taskbroker_task_processing_seconds_count", **q) == 45
    assert value(samples, "taskbroker_task_processing_seconds_bucket", le="+Inf", **q) == 45
    assert running.broker.tasks.timings.tracked == 0  # every lease start was settled

    rpc = "taskbroker_rpc_duration_seconds_count"
    enqueue_ok = {"method": "taskbroker.v1.BrokerService/Enqueue", "code": "OK"}
    assert value(samples, rpc, **enqueue_ok) >= 1
    get_nf = {"method": "taskbroker.v1.BrokerService/GetTask", "code": "NOT_FOUND"}
    assert value(samples, rpc, **get_nf) == 1
    lease_ok = {"method": "taskbroker.v1.BrokerService/Lease", "code": "OK"}
    assert value(samples, rpc, **lease_ok) >= 1  # the worker's stream, timed when it ended

    assert value(samples, "taskbroker_workers_connected") == 0
    assert value(samples, "taskbroker_lease_streams_open") == 0
    assert value(samples, "taskbroker_redis_up") == 1
    assert ("process_cpu_seconds_total", ()) in samples
    # Payload and result bytes never reach the metrics.
    assert "secret" not in text and "result-marker" not in text


async def test_streams_and_workers_are_counted_while_open(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    streams = [
        await LeaseStream(running.stub).open(["a"], credits=1, worker_id=worker)
        for worker in ("w-1", "w-1", "w-2")
    ]
    try:
        _, samples = await scrape(http)
        assert value(samples, "taskbroker_lease_streams_open") == 3
        assert value(samples, "taskbroker_workers_connected") == 2
    finally:
        for stream in streams:
            await stream.close()


async def test_a_rejected_lease_stream_is_timed_with_its_status(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await LeaseStream(running.stub).open(["bad queue"], credits=1)
    assert error.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    lease_bad = {"method": "taskbroker.v1.BrokerService/Lease", "code": "INVALID_ARGUMENT"}
    await scraped(http, "taskbroker_rpc_duration_seconds_count", 1, **lease_bad)


async def test_redis_derived_series_come_from_a_cached_snapshot(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    await enqueue(running.stub, spec("jobs"))
    _, first = await scrape(http)
    await enqueue(running.stub, spec("jobs"))
    _, second = await scrape(http)  # within the 2 s the snapshot is reused
    total = "taskbroker_tasks_enqueued_total"
    assert value(first, total, queue="jobs") == value(second, total, queue="jobs") == 1
    assert running.broker.web is not None
    running.broker.web.sampler.expire()
    _, third = await scrape(http)
    assert value(third, total, queue="jobs") == 2


async def test_each_queue_s_limits_and_group_keys_are_gauges(
    running: RunningBroker, http: aiohttp.ClientSession, client: Client
) -> None:
    await client.update_queue_settings(
        "tenants",
        max_concurrency=20,
        rate_limit=RateLimit(0.5, 10),
        per_key_max_concurrency=1,
        per_key_rate_limit=RateLimit(2, 1),
    )
    await enqueue(running.stub, *(spec("tenants", group_key=k) for k in ("a", "a", "b", "b", "c")))
    worker = await LeaseStream(running.stub).open(["tenants"], credits=5)
    try:
        assert len(await worker.take(3, wait_s=2)) == 3  # one per key: "a" and "b" park
        await asyncio.sleep(0.1)
        _, samples = await scrape(http)
    finally:
        await worker.close()
    q = {"queue": "tenants"}
    assert value(samples, "taskbroker_queue_max_concurrency", **q) == 20
    assert value(samples, "taskbroker_queue_per_key_max_concurrency", **q) == 1
    rate = "taskbroker_queue_rate_limit_per_second"
    assert value(samples, rate, kind="lease", **q) == 0.5
    assert value(samples, rate, kind="per_key", **q) == 2
    assert value(samples, rate, kind="enqueue", **q) == 0
    assert 7 <= value(samples, "taskbroker_queue_rate_limit_tokens", **q) < 7.5  # 10 less 3
    assert value(samples, "taskbroker_queue_group_keys_pending", **q) == 2
    assert value(samples, "taskbroker_queue_group_keys_parked", **q) == 2
    assert not any(name.startswith("taskbroker_") and ("group_key", "a") in labels
                   for name, labels in samples)  # fmt: skip


async def test_openmetrics_is_served_when_asked_for(http: aiohttp.ClientSession) -> None:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
    async with http.get("/metrics", headers=headers) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        text = await response.text()
    assert text.rstrip().endswith("# EOF") and "taskbroker_workers_connected" in text


async def test_health_rpc_and_reflection_still_work_through_the_interceptor(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest())  # a server stream (async generator)
    first = await watch.read()
    assert isinstance(first, health_pb2.HealthCheckResponse)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    stats = await running.stub.Stats(bs.StatsRequest())
    assert list(stats.queues) == []
    check = {"method": "grpc.health.v1.Health/Check", "code": "OK"}
    await scraped(http, "taskbroker_rpc_duration_seconds_count", 1, **check)
    watched = {"method": "grpc.health.v1.Health/Watch", "code": "CANCELLED"}
    await scraped(http, "taskbroker_rpc_duration_seconds_count", 1, **watched)
