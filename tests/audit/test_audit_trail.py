"""The audit trail: admin RPCs recorded with principal, target and outcome, read back newest
first through ListAuditRecords and `taskbroker audit`, capped in Redis; a flood of denials is
bounded; a Redis failure while recording never fails the action's call."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING

import aiohttp
import grpc
import pytest
import redis

from broker.audit import AuditTrail
from broker.auth.principal import Principal
from broker.config import Settings
from broker.store.audit_log import AuditLog
from broker.store.keys import AUDIT_KEY
from taskbroker.v1 import admin_service_pb2 as ad
from tests.conftest import RunningBroker, start_broker
from tests.sdk.test_cli import run_cli
from tests.support.audit import audit_entries
from tests.support.tasks import enqueue, error_reason, spec
from tests.web.conftest import make_dead

if TYPE_CHECKING:
    from taskbroker.v1.admin_service_pb2_grpc import AdminServiceAsyncStub as Admin

SECRET_PAYLOAD = b"card=4111-1111-1111-1111"


async def records(admin: Admin, page_size: int = 100) -> list[ad.AuditRecord]:
    reply = await admin.ListAuditRecords(ad.ListAuditRecordsRequest(page_size=page_size))
    return list(reply.records)


async def test_admin_rpcs_are_recorded_newest_first_with_outcome_and_counts(
    running: RunningBroker,
) -> None:
    admin = running.admin
    dead = await make_dead(running.stub, "billing", 3)
    before_ms = int(time.time() * 1000)
    await admin.PauseQueue(ad.PauseQueueRequest(queue="billing"))
    await admin.ResumeQueue(ad.ResumeQueueRequest(queue="billing"))
    await admin.RedriveDeadTasks(ad.RedriveDeadTasksRequest(queue="billing", task_ids=dead[:2]))
    await admin.DeleteDeadTasks(ad.DeleteDeadTasksRequest(queue="billing", all=True))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await admin.PauseQueue(ad.PauseQueueRequest(queue="bad queue"))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    got = await records(admin)
    assert [(r.action, r.target, r.outcome) for r in got] == [
        ("PauseQueue", "bad queue", "INVALID_ARGUMENT"),
        ("DeleteDeadTasks", "billing", "ok"),
        ("RedriveDeadTasks", "billing", "ok"),
        ("ResumeQueue", "billing", "ok"),
        ("PauseQueue", "billing", "ok"),
    ]
    assert got[1].detail == "all deleted=1"
    assert got[2].detail == "task_ids=2 redriven=2"  # a count, never the ids themselves
    assert "queue" in got[0].detail  # the refusal's message
    assert {r.principal for r in got} == {"anonymous"}  # no policy: every caller is anonymous
    for r in got:
        assert before_ms - 1000 <= r.time.ToMilliseconds() <= int(time.time() * 1000) + 1000


async def test_records_are_paged_and_a_foreign_token_is_invalid_argument(
    running: RunningBroker,
) -> None:
    admin = running.admin
    for i in range(5):
        await admin.PauseQueue(ad.PauseQueueRequest(queue=f"q{i}"))
    seen: list[str] = []
    token = ""
    while True:
        reply = await admin.ListAuditRecords(
            ad.ListAuditRecordsRequest(page_size=2, page_token=token)
        )
        assert len(reply.records) <= 2
        seen += [r.target for r in reply.records]
        token = reply.next_page_token
        if not token:
            break
    assert seen == ["q4", "q3", "q2", "q1", "q0"]
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await admin.ListAuditRecords(ad.ListAuditRecordsRequest(page_token="bm90LWEtdG9rZW4="))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_reason(bad.value) == "INVALID_ARGUMENT"


async def test_each_record_is_one_json_log_line_without_payloads(
    running: RunningBroker, caplog: pytest.LogCaptureFixture
) -> None:
    dead = await enqueue(running.stub, spec("cards", payload=SECRET_PAYLOAD))
    caplog.set_level(logging.INFO, logger="taskbroker.audit")
    await running.admin.DeleteDeadTasks(ad.DeleteDeadTasksRequest(queue="cards", task_ids=dead))
    with pytest.raises(grpc.aio.AioRpcError):
        await running.admin.PauseQueue(ad.PauseQueueRequest(queue="evil\nforged=line"))
    lines = [r.getMessage() for r in caplog.records if r.name == "taskbroker.audit"]
    assert len(lines) == 2
    for line in lines:
        assert "\n" not in line and SECRET_PAYLOAD.decode() not in line
    first = json.loads(lines[0].removeprefix("audit "))
    assert first["action"] == "DeleteDeadTasks" and first["outcome"] == "ok"
    assert first["principal"] == "anonymous" and first["detail"] == "task_ids=1 deleted=0"
    assert json.loads(lines[1].removeprefix("audit "))["target"] == "evil\nforged=line"


async def test_the_cli_prints_the_records_as_a_table_and_as_json(running: RunningBroker) -> None:
    await running.admin.PauseQueue(ad.PauseQueueRequest(queue="reports"))
    with pytest.raises(grpc.aio.AioRpcError):  # a bad name, shown as it is, not as markup
        await running.admin.PauseQueue(ad.PauseQueueRequest(queue="[bold]reports"))
    table = await run_cli(running.target, "audit")
    assert table.code == 0, table.stderr
    assert "PauseQueue" in table.stdout and "[bold]reports" in table.stdout
    assert "INVALID_ARGUMENT" in table.stdout
    as_json = await run_cli(running.target, "--json", "audit", "--limit", "2")
    assert as_json.code == 0, as_json.stderr
    doc = as_json.json()
    assert isinstance(doc, dict)
    assert [(r["action"], r["target"], r["outcome"], r["principal"]) for r in doc["records"]] == [
        ("PauseQueue", "[bold]reports", "INVALID_ARGUMENT", "anonymous"),
        ("PauseQueue", "reports", "ok", "anonymous"),
    ]


async def test_the_stream_is_capped_at_about_audit_max_records(
    settings: Settings, redis_client: redis.Redis
) -> None:
    running = await start_broker(settings, audit_max_records=100)
    try:
        for _ in range(10):
            await asyncio.gather(
                *(running.admin.PauseQueue(ad.PauseQueueRequest(queue="q")) for _ in range(50))
            )
        # MAXLEN ~ trims whole stream nodes (100 entries each): about the cap, never all 500.
        assert 100 <= redis_client.xlen(AUDIT_KEY) < 250
    finally:
        await running.close()


async def test_a_redis_failure_while_recording_does_not_fail_the_action(
    running: RunningBroker, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    redis_client.set(AUDIT_KEY, "not a stream")  # every XADD now fails (WRONGTYPE)
    await running.admin.PauseQueue(ad.PauseQueueRequest(queue="billing"))
    stats = await running.broker.tasks.stats(["billing"])
    assert stats[0].paused
    assert any("not stored in Redis" in r.getMessage() for r in caplog.records)


async def test_a_flood_of_denials_neither_blocks_nor_grows_memory(
    running: RunningBroker, redis_client: redis.Redis
) -> None:
    trail = AuditTrail(AuditLog(running.broker.store.client, 100_000), buffer_size=200)
    trail.start()
    try:
        mallory = Principal("mallory", "token")
        started = time.perf_counter()
        for i in range(100_000):
            trail.denied(mallory, "Lease", f"victim-{i}", "needs role 'consume'")
            trail.unauthenticated("ipv4:10.0.0.9:5555", "unknown bearer token")
        elapsed = time.perf_counter() - started
        assert elapsed < 2.0, f"200,000 refusals took {elapsed:.2f}s to record"
        assert len(trail._buffer) <= 200  # bounded, whatever the flood
        # The broker still answers promptly meanwhile.
        call_started = time.perf_counter()
        await running.admin.ListQueues(ad.ListQueuesRequest())
        assert time.perf_counter() - call_started < 1.0
    finally:
        await trail.stop()
    assert trail.dropped == 200_000 - 200
    entries = audit_entries(redis_client)
    assert len(entries) == 201  # the buffer, and one note of what was dropped
    note = entries[-1]
    assert note[b"action"] == b"audit.dropped" and note[b"detail"] == b"count=199800"
    outcomes = {e[b"outcome"] for e in entries[:-1]}
    assert outcomes == {b"PERMISSION_DENIED", b"UNAUTHENTICATED"}


async def test_dashboard_actions_are_recorded_and_listed_on_its_api(settings: Settings) -> None:
    running = await start_broker(settings, dashboard_admin=True)
    try:
        dead = await make_dead(running.stub, "hooks", 2)
        base = f"http://127.0.0.1:{running.broker.http_port}"
        async with aiohttp.ClientSession(base_url=base) as http:
            for path, body in [
                ("/api/queues/hooks/pause", {}),
                ("/api/queues/hooks/dead/redrive", {"task_ids": dead[:1]}),
                ("/api/queues/hooks/dead/delete", {"all": True}),
            ]:
                async with http.post(path, json=body) as response:
                    assert response.status == 200
            async with http.get("/api/audit", params={"page_size": "2"}) as response:
                page = await response.json()
        assert [(r["action"], r["target"], r["outcome"], r["detail"]) for r in page["records"]] == [
            ("dashboard.delete", "hooks", "ok", "all deleted=1"),
            ("dashboard.redrive", "hooks", "ok", "task_ids=1 redriven=1"),
        ]
        assert page["next_page_token"]
        got = await records(running.admin)
        assert [(r.action, r.principal) for r in got][-1] == ("dashboard.pause", "anonymous")
    finally:
        await running.close()
