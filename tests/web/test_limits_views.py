"""The dashboard's limits, per-key and schedule JSON: each queue's limits in /api/queues, a
queue's group keys by backlog (/api/queues/{queue}/keys) and the schedules (/api/schedules),
with the read role deciding what each principal sees."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from broker.config import Settings
from broker.queue import TaskRequest
from broker.schedules import ScheduleRequest
from taskbroker import Client, RateLimit
from tests.conftest import RunningBroker, start_broker
from tests.support.tasks import enqueue, spec
from tests.web.test_security import Dashboard, write_policy


async def add_schedule(running: RunningBroker, name: str, queue: str) -> None:
    request = ScheduleRequest(name, "0 3 * * *", "Europe/Berlin", TaskRequest(queue, "report"))
    await running.broker.schedules.create(request)


async def test_queues_show_each_queue_s_limits(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    async with Client(running.target) as client:
        await client.update_queue_settings(
            "tenants",
            max_concurrency=20,
            rate_limit=RateLimit(0.5, 4),
            enqueue_rate_limit=RateLimit(100, 100),
            per_key_max_concurrency=2,
        )
    await enqueue(running.stub, spec("tenants", group_key="a"), spec("plain"))
    async with http.get("/api/queues") as response:
        body = await response.json()
    by_queue = {q["queue"]: q["limits"] for q in body["queues"]}
    limits = by_queue["tenants"]
    assert limits["max_concurrency"] == 20 and limits["per_key_max_concurrency"] == 2
    assert limits["rate_limit"] == {"per_second": 0.5, "burst": 4}
    assert limits["rate_limit_tokens"] == 4
    assert limits["enqueue_rate_limit"] == {"per_second": 100, "burst": 100}
    assert limits["per_key_rate_limit"] is None
    assert (limits["group_keys_pending"], limits["group_keys_parked"]) == (1, 0)
    assert by_queue["plain"] == {
        "max_concurrency": 0,
        "rate_limit": None,
        "rate_limit_tokens": None,
        "enqueue_rate_limit": None,
        "per_key_max_concurrency": 0,
        "per_key_rate_limit": None,
        "group_keys_pending": 0,
        "group_keys_parked": 0,
    }


async def test_group_keys_come_by_backlog_a_page_at_a_time(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    backlog = {"acme": 1, "globex": 3, "initech": 2}
    await enqueue(
        running.stub, *(spec("t", group_key=k) for k, n in backlog.items() for _ in range(n))
    )
    async with http.get("/api/queues/t/keys", params={"page_size": "2"}) as response:
        first = await response.json()
    assert [(k["group_key"], k["pending"]) for k in first["keys"]] == [
        ("globex", 3),
        ("initech", 2),
    ]
    key = first["keys"][0]
    assert key["state"] == "READY" and key["leased"] == 0 and key["oldest_pending_age_s"] >= 0
    assert first["ready_keys"] == 3 and first["scanned_keys"] == 3
    token = first["next_page_token"]
    async with http.get("/api/queues/t/keys", params={"page_token": token}) as response:
        rest = await response.json()
    assert [k["group_key"] for k in rest["keys"]] == ["acme"] and rest["next_page_token"] == ""


async def test_bad_group_key_queries_are_400_naming_the_parameter(
    http: aiohttp.ClientSession,
) -> None:
    for query, field in (("page_size=0", "page_size"), ("page_size=101", "page_size"),
                         ("page_token=bm9wZQ==", "page_token")):  # fmt: skip
        async with http.get(f"/api/queues/t/keys?{query}") as response:
            body = await response.json()
            assert (response.status, body["error"]["field"]) == (400, field), query
    async with http.get("/api/queues/bad%20name/keys") as response:
        assert (response.status, (await response.json())["error"]["field"]) == (400, "queue")


async def test_schedules_show_cron_zone_next_fire_and_last_task(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    await add_schedule(running, "nightly", "reports")
    await add_schedule(running, "audit", "billing-eu")
    async with http.get("/api/schedules") as response:
        body = await response.json()
    assert [s["name"] for s in body["schedules"]] == ["audit", "nightly"]
    nightly = body["schedules"][1]
    assert nightly["queue"] == "reports" and nightly["task_type"] == "report"
    assert (nightly["cron"], nightly["time_zone"]) == ("0 3 * * *", "Europe/Berlin")
    assert nightly["paused"] is False and nightly["next_fire_time_ms"] > 1_700_000_000_000
    assert nightly["last_task_id"] is None and nightly["last_fire_time_ms"] is None
    assert "payload" not in nightly and body["next_page_token"] == ""
    async with http.get("/api/schedules", params={"page_size": "1"}) as response:
        page = await response.json()
    assert [s["name"] for s in page["schedules"]] == ["audit"] and page["next_page_token"]


async def test_a_principal_sees_the_keys_and_schedules_of_queues_it_may_read(
    settings: Settings, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    write_policy(policy)
    running = await start_broker(settings, policy_file=policy)
    dashboard = Dashboard(running, policy)
    try:
        await add_schedule(running, "billing-report", "billing-eu")
        await add_schedule(running, "ops-report", "ops")
        async with dashboard.session() as http:
            await dashboard.login(http, "viewer")  # read on billing-* only
            async with http.get("/api/schedules") as response:
                names = [s["name"] for s in (await response.json())["schedules"]]
            assert names == ["billing-report"]
            async with http.get("/api/queues/billing-eu/keys") as response:
                assert response.status == 200
            async with http.get("/api/queues/ops/keys") as response:
                body = await response.json()
                assert (response.status, body["error"]["status"]) == (403, "PERMISSION_DENIED")
    finally:
        await running.close()
