"""Issue 11 §3: what the broker reports about queues is capped or paged, however many queues
there are: Stats and ListQueues page through them; /metrics and /api/queues show the queues with
the largest backlog, and totals over all of them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest

from broker.config import Settings
from taskbroker.v1 import admin_service_pb2 as admin
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import task_pb2
from tests.conftest import RunningBroker, start_broker
from tests.web.conftest import base_url
from tests.web.test_metrics import scrape, value

QUEUES = 1_200  # more than one Stats page (1,000)
TOP = 3


@pytest.fixture
async def capped(settings: Settings) -> AsyncIterator[RunningBroker]:
    running = await start_broker(settings, metrics_top_queues=TOP)
    yield running
    await running.close()


async def _fill(running: RunningBroker) -> None:
    """QUEUES queues with one task each; queue 'big-<k>' holds k + 1 more (k < 5)."""
    specs = [task_pb2.TaskSpec(queue=f"q{i:05d}", type="t") for i in range(QUEUES)]
    for k in range(5):
        specs += [task_pb2.TaskSpec(queue=f"big-{k}", type="t") for _ in range(k + 2)]
    for start in range(0, len(specs), 1000):
        await running.stub.Enqueue(bs.EnqueueRequest(tasks=specs[start : start + 1000]))


async def test_stats_and_list_queues_page_through_every_queue(capped: RunningBroker) -> None:
    await _fill(capped)
    names: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = await capped.stub.Stats(bs.StatsRequest(page_token=token))
        assert len(reply.queues) <= 1000
        names += [q.queue for q in reply.queues]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    assert pages == 2
    assert len(names) == len(set(names)) == QUEUES + 5
    assert names == sorted(names)

    listed: list[str] = []
    token = ""
    while True:
        page = await capped.admin.ListQueues(
            admin.ListQueuesRequest(page_size=500, page_token=token)
        )
        listed += page.queues
        token = page.next_page_token
        if not token:
            break
    assert listed == names

    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await capped.stub.Stats(bs.StatsRequest(page_token="not-a-token"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_metrics_and_api_show_the_top_queues_and_totals_of_all(
    capped: RunningBroker,
) -> None:
    await _fill(capped)
    async with aiohttp.ClientSession(base_url=base_url(capped)) as http:
        text, samples = await scrape(http)
        async with http.get("/api/queues") as response:
            body = await response.json()

    shown = {
        dict(labels)["queue"] for (name, labels) in samples if name == "taskbroker_queue_tasks"
    }
    assert shown == {"big-2", "big-3", "big-4"}
    held = QUEUES + sum(k + 2 for k in range(5))
    assert value(samples, "taskbroker_all_queues_tasks", state="pending") == held
    assert value(samples, "taskbroker_queues") == QUEUES + 5
    assert len(text) < 100_000

    assert [q["queue"] for q in body["queues"]] == ["big-2", "big-3", "big-4"]
    assert body["queue_count"] == QUEUES + 5
    assert body["limit"] == TOP
    assert body["all_queues"]["counts"]["pending"] == held
