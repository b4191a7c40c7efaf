"""The dashboard's view of task dependencies (issue 17): WAITING counts per queue, and a task's
parents (state, result size) and children in /api/tasks/{id}, within the caller's read roles."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from broker.config import Settings
from tests.conftest import RunningBroker, start_broker
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, spec
from tests.web.test_security import Dashboard, ops_stub, write_policy


async def task_view(http: aiohttp.ClientSession, task_id: str) -> dict[str, Any]:
    async with http.get(f"/api/tasks/{task_id}") as response:
        assert response.status == 200, await response.text()
        task: dict[str, Any] = (await response.json())["task"]
    return task


async def eventually(
    read: Callable[[], Awaitable[dict[str, Any]]],
    done: Callable[[dict[str, Any]], bool],
    wait_s: float = 5.0,
) -> dict[str, Any]:
    """Reads until `done` holds (the outbox mover links and releases within moments)."""
    deadline = time.monotonic() + wait_s
    while True:
        got = await read()
        if done(got):
            return got
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.05)


async def test_queues_count_the_tasks_waiting_for_their_parents(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    await enqueue(
        running.stub,
        spec("resize"),
        spec("album", depends_on_positions=[0]),
        spec("album", depends_on_positions=[0]),
    )
    assert running.broker.web is not None
    running.broker.web.sampler.expire()
    async with http.get("/api/queues") as response:
        body = await response.json()
    counts = {q["queue"]: q["counts"] for q in body["queues"]}
    assert (counts["album"]["waiting"], counts["album"]["pending"]) == (2, 0)
    assert (counts["resize"]["waiting"], counts["resize"]["pending"]) == (0, 1)
    assert body["all_queues"]["counts"]["waiting"] == 2


async def test_a_task_shows_its_parents_and_children_to_walk_the_workflow(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    a, x, b, plain = await enqueue(
        running.stub,
        spec("resize", payload=b"secret payload"),
        spec("resize"),
        spec("album", depends_on_positions=[0, 1]),
        spec("other"),
    )
    view = await task_view(http, b)
    assert view["state"] == "WAITING"
    flow = view["workflow"]
    assert flow["parents"] == [
        {"task_id": a, "queue": "resize", "state": "PENDING", "result_size": 0, "awaited": True},
        {"task_id": x, "queue": "resize", "state": "PENDING", "result_size": 0, "awaited": True},
    ]
    assert (flow["parent_count"], flow["waiting_for_count"]) == (2, 2)
    assert flow["parent_failure_policy"] == "CANCEL"
    assert (flow["children"], flow["child_count"]) == ([], 0)

    stream = await LeaseStream(running.stub).open(["resize"], credits=2)
    try:
        deliveries = {d.task.id: d for d in await stream.take(2)}
        await stream.ack(deliveries[a], result=b"resized!!")
        view = await eventually(
            lambda: task_view(http, b), lambda t: t["workflow"]["waiting_for_count"] == 1
        )
        first, second = view["workflow"]["parents"]
        assert (first["state"], first["result_size"], first["awaited"]) == ("SUCCEEDED", 9, False)
        assert (second["state"], second["awaited"]) == ("LEASED", True)
        # A parent's result is shown by its size only.
        assert "resized!!" not in json.dumps(view) and "secret payload" not in json.dumps(view)

        parent = await eventually(
            lambda: task_view(http, a), lambda t: t["workflow"]["child_count"] == 1
        )
        assert parent["workflow"]["children"] == [
            {"task_id": b, "queue": "album", "state": "WAITING"}
        ]
        assert (parent["workflow"]["parents"], parent["workflow"]["parent_count"]) == ([], 0)
        assert parent["workflow"]["parent_failure_policy"] is None

        await stream.ack(deliveries[x])
        view = await eventually(lambda: task_view(http, b), lambda t: t["state"] == "PENDING")
        assert view["workflow"]["waiting_for_count"] == 0
    finally:
        await stream.close()
    assert (await task_view(http, plain))["workflow"] is None


async def test_a_principal_sees_no_parent_or_child_in_a_queue_it_may_not_read(
    settings: Settings, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    write_policy(policy)
    running = await start_broker(settings, dashboard_admin=True, policy_file=policy)
    dashboard = Dashboard(running, policy)
    try:
        async with ops_stub(dashboard) as stub:
            billing, hr, child, hr_child = await enqueue(
                stub,
                spec("billing-a"),
                spec("hr-payroll"),
                spec("billing-b", depends_on_positions=[0, 1]),
                spec("hr-review", depends_on_positions=[0]),
            )
        async with dashboard.session() as http:
            await dashboard.login(http, "ops")
            parent = await eventually(
                lambda: task_view(http, billing), lambda t: t["workflow"]["child_count"] == 2
            )
            assert [c["task_id"] for c in parent["workflow"]["children"]] == sorted(
                [child, hr_child]
            )
        async with dashboard.session() as http:
            await dashboard.login(http, "viewer")  # read on billing-* only
            view = await task_view(http, child)
            flow = view["workflow"]
            assert [p["task_id"] for p in flow["parents"]] == [billing]
            assert (flow["parent_count"], flow["waiting_for_count"]) == (1, 1)
            parent = await task_view(http, billing)
            assert parent["workflow"]["children"] == [
                {"task_id": child, "queue": "billing-b", "state": "WAITING"}
            ]
            assert parent["workflow"]["child_count"] == 1  # the hr child is not counted
            for body in (view, parent):
                assert hr not in json.dumps(body) and hr_child not in json.dumps(body)
                assert "hr-" not in json.dumps(body)
            async with http.get(f"/api/tasks/{hr_child}") as response:
                assert response.status == 403
    finally:
        await running.close()
