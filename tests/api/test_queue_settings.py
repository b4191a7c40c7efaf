"""Queue settings through real gRPC: the AdminService RPCs, their statuses, and what a Lease
stream sees under max_concurrency, rate_limit and enqueue_rate_limit."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from taskbroker.v1 import admin_service_pb2 as ad
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import queue_settings_pb2 as qs
from tests.api.test_admin_and_reads import QUIET_S, stats_of, worker
from tests.support.tasks import enqueue, error_reason, spec

if TYPE_CHECKING:
    from taskbroker.v1.admin_service_pb2_grpc import AdminServiceAsyncStub as Admin
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub as Stub


async def update(admin: Admin, queue: str, *mask: str, **values: object) -> qs.QueueSettings:
    request = ad.UpdateQueueSettingsRequest(
        queue=queue,
        settings=qs.QueueSettings(**values),  # type: ignore[arg-type]
        update_mask=field_mask_pb2.FieldMask(paths=list(mask)),
    )
    return (await admin.UpdateQueueSettings(request)).settings


def bad_field(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return str(bad.field_violations[0].field)
    raise AssertionError("no BadRequest detail")


def retry_delay_s(error: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    raise AssertionError("no RetryInfo detail")


async def test_settings_are_read_back_and_shown_in_stats(stub: Stub, admin: Admin) -> None:
    q = "configured"
    got = await admin.GetQueueSettings(ad.GetQueueSettingsRequest(queue=q))
    assert got.settings == qs.QueueSettings()
    after = await update(
        admin, q, "rate_limit", "max_concurrency",
        rate_limit=qs.RateLimit(per_second=50), max_concurrency=4,
    )  # fmt: skip
    want = qs.QueueSettings(rate_limit=qs.RateLimit(per_second=50, burst=50), max_concurrency=4)
    assert after == want
    assert (await admin.GetQueueSettings(ad.GetQueueSettingsRequest(queue=q))).settings == want
    s = await stats_of(stub, q)
    assert s.settings == want and s.rate_limit_tokens == 50


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"rate_limit": qs.RateLimit(per_second=-5)}, "settings.rate_limit.per_second"),
        ({"rate_limit": qs.RateLimit(per_second=5, burst=-1)}, "settings.rate_limit.burst"),
        ({"max_concurrency": -3}, "settings.max_concurrency"),
    ],
)
async def test_a_bad_setting_is_invalid_argument_naming_its_field(
    admin: Admin, values: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await update(admin, "bad-settings", **values)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_field(refused.value) == field
    got = await admin.GetQueueSettings(ad.GetQueueSettingsRequest(queue="bad-settings"))
    assert got.settings == qs.QueueSettings()  # nothing stored


async def test_an_unknown_mask_path_and_a_bad_queue_name_are_refused(admin: Admin) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await update(admin, "q", "max_concurency", max_concurrency=1)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert bad_field(refused.value) == "update_mask"
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.GetQueueSettings(ad.GetQueueSettingsRequest(queue="no:colons"))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_stream_gets_no_more_than_max_concurrency_and_more_as_slots_free(
    stub: Stub, admin: Admin
) -> None:
    q = "capped"
    await update(admin, q, max_concurrency=2)
    await enqueue(stub, *(spec(queue=q) for _ in range(5)))
    async with worker(stub, [q], credits=10) as w:
        first = await w.take(2)
        await asyncio.sleep(QUIET_S)
        assert w.deliveries.empty()  # held back at the cap
        await w.ack(first[0])
        (third,) = await w.take(1, wait_s=2.0)  # the freed slot's wake, not a poll
        await asyncio.sleep(QUIET_S)
        assert w.deliveries.empty()
        await update(admin, q, "max_concurrency")  # lifted: the wake lets the rest go
        rest = await w.take(2, wait_s=2.0)
        assert len({d.task.id for d in [*first, third, *rest]}) == 5


async def test_a_stream_is_paced_by_rate_limit(stub: Stub, admin: Admin) -> None:
    q = "paced"
    await update(admin, q, rate_limit=qs.RateLimit(per_second=20, burst=1))
    await enqueue(stub, *(spec(queue=q) for _ in range(11)))
    async with worker(stub, [q], credits=20) as w:
        await w.take(1)
        started = time.monotonic()
        await w.take(10, wait_s=3.0)
        elapsed = time.monotonic() - started
    assert 0.45 <= elapsed <= 1.0, elapsed  # 10 tokens at 20/s: 0.5 s


async def test_enqueue_over_its_rate_is_resource_exhausted_with_retry_info(
    stub: Stub, admin: Admin
) -> None:
    q = "throttled"
    await update(admin, q, enqueue_rate_limit=qs.RateLimit(per_second=1, burst=2))
    await enqueue(stub, spec(queue=q), spec(queue=q))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await enqueue(stub, spec(queue=q))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_reason(refused.value) == "ENQUEUE_RATE_LIMITED"
    assert 0 < retry_delay_s(refused.value) <= 1.0
    assert (await stats_of(stub, q)).pending == 2
    response = await stub.Stats(bs.StatsRequest(queues=[q]))
    assert response.queues[0].settings.enqueue_rate_limit.burst == 2
