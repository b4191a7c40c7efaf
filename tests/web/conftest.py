"""Fixtures for the HTTP side: plain HTTP clients against the in-process broker's http_port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING

import aiohttp
import pytest

from broker.config import Settings
from tests.conftest import RunningBroker, start_broker
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, spec

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub


def base_url(running: RunningBroker) -> str:
    assert running.broker.http_port, "the test broker serves HTTP on a free port"
    return f"http://127.0.0.1:{running.broker.http_port}"


@pytest.fixture
async def admin_running(settings: Settings) -> AsyncIterator[RunningBroker]:
    """A broker whose dashboard may pause, resume, redrive and delete."""
    running = await start_broker(settings, dashboard_admin=True)
    yield running
    await running.close()


@pytest.fixture
async def http(running: RunningBroker) -> AsyncIterator[aiohttp.ClientSession]:
    """HTTP client for the read-only broker of `running`."""
    async with aiohttp.ClientSession(base_url=base_url(running)) as session:
        yield session


@pytest.fixture
async def admin_http(admin_running: RunningBroker) -> AsyncIterator[aiohttp.ClientSession]:
    """HTTP client for the broker of `admin_running`."""
    async with aiohttp.ClientSession(base_url=base_url(admin_running)) as session:
        yield session


async def make_dead(
    stub: BrokerServiceAsyncStub, queue: str, count: int, errors: int = 1
) -> list[str]:
    """Enqueues `count` tasks with `errors` attempts each and fails every attempt, so they end
    in the dead letters with that many errors. Returns their ids in order."""
    ids = await enqueue(
        stub, *(spec(queue, "deliver", b"p", max_attempts=errors) for _ in range(count))
    )
    stream = await LeaseStream(stub).open([queue], credits=count, worker_id="failing-worker")
    try:
        for attempt in range(1, errors + 1):
            for d in await stream.take(count):
                await stream.nack(d, f"HTTP 503 on attempt {attempt}", retry_delay=timedelta(0))
            if attempt < errors:
                await stream.credit(count)
    finally:
        await stream.close()
    return ids
