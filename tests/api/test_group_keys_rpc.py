"""AdminService.ListGroupKeys through real gRPC on standalone Redis and a Redis Cluster: the
ranking, paging by token, durations and counts on the wire, bad arguments named, and the SDK's
Client.group_keys over the same call."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import cast

import grpc
import pytest

from broker.config import Settings
from taskbroker import Client, GroupKeyState
from taskbroker.v1 import admin_service_pb2 as ad
from tests.api.test_queue_settings import bad_field
from tests.conftest import TEST_SETTINGS, RunningBroker, start_broker
from tests.support.redis_server import RedisCluster
from tests.support.tasks import enqueue, spec

Q = "tenants"


@pytest.fixture(params=["standalone", "cluster"])
async def broker(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[RunningBroker]:
    if request.param == "cluster":
        cluster = cast("RedisCluster", request.getfixturevalue("redis_cluster"))
        with cluster.client() as client:
            client.flushall()
        settings = replace(TEST_SETTINGS, redis_url=cluster.url, redis_cluster=True)
    running = await start_broker(settings)
    yield running
    await running.close()


async def enqueue_keys(running: RunningBroker, backlog: dict[str, int]) -> None:
    specs = [spec(Q, group_key=key) for key, n in backlog.items() for _ in range(n)]
    await enqueue(running.stub, *specs)


async def test_pages_rank_the_keys_by_backlog(broker: RunningBroker) -> None:
    await enqueue_keys(broker, {"acme": 2, "globex": 5, "initech": 1, "umbrella": 2})
    names: list[tuple[str, int]] = []
    token = ""
    while True:
        page = await broker.admin.ListGroupKeys(
            ad.ListGroupKeysRequest(queue=Q, page_size=3, page_token=token)
        )
        assert page.ready_key_count == 4 and page.scanned_key_count == 4
        names += [(k.group_key, k.pending) for k in page.keys]
        token = page.next_page_token
        if not token:
            break
    assert names == [("globex", 5), ("acme", 2), ("umbrella", 2), ("initech", 1)]
    first = (await broker.admin.ListGroupKeys(ad.ListGroupKeysRequest(queue=Q))).keys[0]
    assert first.state == ad.GROUP_KEY_STATE_READY
    assert first.HasField("oldest_pending_age")
    assert timedelta(0) <= first.oldest_pending_age.ToTimedelta() < timedelta(seconds=10)


async def test_the_sdk_reads_the_same_page(broker: RunningBroker) -> None:
    await enqueue_keys(broker, {"a": 1, "b": 3})
    async with Client(broker.target) as client:
        page = await client.group_keys(Q, page_size=1)
        assert [(k.group_key, k.pending, k.state) for k in page.keys] == [
            ("b", 3, GroupKeyState.READY)
        ]
        rest = await client.group_keys(Q, page_size=1, page_token=page.next_page_token)
    assert [k.group_key for k in rest.keys] == ["a"] and rest.next_page_token == ""
    assert rest.keys[0].oldest_pending_age is not None


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (ad.ListGroupKeysRequest(queue=""), "queue"),
        (ad.ListGroupKeysRequest(queue="a{b}"), "queue"),
        (ad.ListGroupKeysRequest(queue=Q, page_size=-1), "page_size"),
        (ad.ListGroupKeysRequest(queue=Q, page_token="bm9wZQ=="), "page_token"),
    ],
)
async def test_bad_arguments_are_refused_naming_the_field(
    broker: RunningBroker, request_: ad.ListGroupKeysRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await broker.admin.ListGroupKeys(request_)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_field(refused.value) == field
