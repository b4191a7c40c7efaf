"""The dashboard's JSON API and /healthz over real HTTP against the in-process broker."""

from __future__ import annotations

import asyncio
import base64
import os
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import aiohttp
import pytest

from broker.app import Broker
from broker.config import Settings
from taskbroker import AesGcmCodec, Client, Keyring, TaskContext, Worker, handler
from taskbroker.v1 import admin_service_pb2 as ad
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import task_pb2
from tests.conftest import RunningBroker, start_broker
from tests.support.lease_stream import LeaseStream
from tests.support.tasks import enqueue, get, spec
from tests.web.conftest import make_dead

UNKNOWN_TASK = "emails:01J0000000000000000000000Z"


async def call(
    http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, path, **kwargs) as response:
        assert response.content_type == "application/json", await response.text()
        return response.status, await response.json()


def assert_error(status: int, body: Any, want_status: int, *, field: str = "") -> str:
    """The error shape every failure has; returns the message."""
    assert status == want_status, body
    error = body["error"]
    assert error["code"] == want_status and error["status"] and error["message"]
    assert "Traceback" not in error["message"]
    if field:
        assert error["field"] == field, error
    return str(error["message"])


# --- health -------------------------------------------------------------------------------------


async def test_healthz_is_200_while_serving_and_503_once_draining(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    assert await call(http, "GET", "/healthz") == (
        200,
        {"status": "serving", "redis": "reachable", "draining": False},
    )
    # A stream holding a task keeps the shutdown in its drain phase for the grace period.
    await enqueue(running.stub, spec("emails"))
    stream = await LeaseStream(running.stub).open(["emails"], credits=1)
    await stream.take(1)
    stopping = asyncio.create_task(running.broker.stop(grace_s=2.0))
    try:
        await asyncio.wait_for(stream.drains.get(), 5)
        status, body = await call(http, "GET", "/healthz")
        assert (status, body["status"], body["draining"]) == (503, "not_serving", True)
    finally:
        stream.cancel()
        await stopping


# --- queues and workers -------------------------------------------------------------------------


async def test_queues_show_counts_totals_age_paused_and_rates(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    await enqueue(running.stub, *(spec("emails") for _ in range(3)))
    await enqueue(running.stub, spec("emails", delay=timedelta(minutes=5)))
    await enqueue(running.stub, spec("reports"))
    await running.admin.PauseQueue(ad.PauseQueueRequest(queue="reports"))

    status, body = await call(http, "GET", "/api/queues")
    assert status == 200
    queues = {q["queue"]: q for q in body["queues"]}
    assert set(queues) == {"emails", "reports"}
    emails = queues["emails"]
    assert emails["counts"] == {"pending": 3, "waiting": 0, "scheduled": 1, "leased": 0, "dead": 0}
    assert emails["totals"] == {
        "enqueued": 4,
        "succeeded": 0,
        "retried": 0,
        "reclaimed": 0,
        "dead_lettered": 0,
        "cancelled": 0,
        "failed": 0,
    }
    assert emails["paused"] is False and queues["reports"]["paused"] is True
    assert 0 <= emails["oldest_pending_age_s"] < 5
    # Rates need two snapshots; the first has none.
    assert emails["rates"] == {"enqueued_per_s": None, "completed_per_s": None}
    assert abs(body["time_ms"] - time.time() * 1000) < 5000

    await asyncio.sleep(0.05)
    await enqueue(running.stub, *(spec("emails") for _ in range(5)))
    assert running.broker.web is not None
    running.broker.web.sampler.expire()
    _, body = await call(http, "GET", "/api/queues")
    emails = {q["queue"]: q for q in body["queues"]}["emails"]
    assert emails["totals"]["enqueued"] == 9
    assert emails["rates"]["enqueued_per_s"] > 0
    assert emails["rates"]["completed_per_s"] == 0

    status, body = await call(http, "GET", "/api/history")
    assert status == 200 and len(body["points"]) == 1
    point = body["points"][0]
    assert point["enqueued_per_s"] > 0 and point["completed_per_s"] == 0
    _, later = await call(http, "GET", f"/api/history?since_ms={point['time_ms']}")
    assert later["points"] == []


async def test_snapshots_are_cached_so_scrapes_do_not_multiply_redis_reads(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    await enqueue(running.stub, spec("emails"))
    _, first = await call(http, "GET", "/api/queues")
    await enqueue(running.stub, spec("emails"))
    _, second = await call(http, "GET", "/api/queues")
    assert second == first  # the same snapshot, at most 2 s old
    assert first["queues"][0]["totals"]["enqueued"] == 1


async def test_workers_lists_the_lease_streams_of_this_replica(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    assert await call(http, "GET", "/api/workers") == (200, {"workers": []})
    await enqueue(running.stub, spec("emails"), spec("emails"))
    before = int(time.time() * 1000)
    stream = await LeaseStream(running.stub).open(["emails", "sms"], credits=5, worker_id="w-1")
    try:
        await stream.take(2)
        worker: dict[str, Any] = {}
        for _ in range(100):  # the pump may still hold the unused credits for a lease call
            status, body = await call(http, "GET", "/api/workers")
            assert status == 200
            (worker,) = body["workers"]
            if worker["credits"] == 3:
                break
            await asyncio.sleep(0.02)
        assert stream.opened is not None
        assert worker["stream_id"] == stream.opened.stream_id
        assert (worker["worker_id"], worker["queues"]) == ("w-1", ["emails", "sms"])
        assert (worker["credits"], worker["in_flight"]) == (3, 2)
        assert before - 1000 <= worker["connected_since_ms"] <= time.time() * 1000
    finally:
        await stream.close()
    assert await call(http, "GET", "/api/workers") == (200, {"workers": []})


# --- dead letters and tasks ---------------------------------------------------------------------


async def test_dead_letters_are_paged_with_type_attempts_and_every_error(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    ids = await make_dead(running.stub, "hooks", 5, errors=2)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        status, body = await call(
            http, "GET", "/api/queues/hooks/dead", params={"page_size": "2", "page_token": token}
        )
        assert status == 200 and len(body["tasks"]) <= 2
        pages += 1
        for task in body["tasks"]:
            assert (task["type"], task["state"]) == ("deliver", "DEAD")
            assert (task["attempt"], task["max_attempts"]) == (2, 2)
            assert [(e["attempt"], e["message"]) for e in task["errors"]] == [
                (1, "HTTP 503 on attempt 1"),
                (2, "HTTP 503 on attempt 2"),
            ]
            assert task["payload_size"] == 1 and "payload" not in task
            seen.append(task["task_id"])
        token = body["next_page_token"]
        if not token:
            break
    assert sorted(seen) == sorted(ids) and pages == 3

    _, empty = await call(http, "GET", "/api/queues/other/dead")
    assert empty == {"tasks": [], "next_page_token": ""}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("page_size=abc", "page_size"),
        ("page_size=0", "page_size"),
        ("page_size=1001", "page_size"),
        ("page_token=not-a-token", "page_token"),
        (f"page_token={base64.urlsafe_b64encode(b'x:y').decode()}", "page_token"),
    ],
)
async def test_bad_dead_letter_queries_are_400_naming_the_parameter(
    http: aiohttp.ClientSession, query: str, field: str
) -> None:
    status, body = await call(http, "GET", f"/api/queues/hooks/dead?{query}")
    assert_error(status, body, 400, field=field)


async def test_a_bad_queue_name_is_400(http: aiohttp.ClientSession) -> None:
    status, body = await call(http, "GET", "/api/queues/bad%20name/dead")
    assert "only letters" in assert_error(status, body, 400, field="queue")


async def test_task_detail_shows_sizes_and_a_result_preview_never_the_payload(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    text_id, binary_id = await enqueue(
        running.stub,
        spec("emails", "send", b"secret payload", headers={"traceparent": "00-abc-def-01"}),
        spec("emails", "resize", b"\x00\x01"),
    )
    stream = await LeaseStream(running.stub).open(["emails"], credits=2)
    try:
        deliveries = {d.task.id: d for d in await stream.take(2)}
        await stream.ack(deliveries[text_id], b'{"sent": true}')
        await stream.ack(deliveries[binary_id], b"\x89PNG\x00" + b"x" * 2000)
    finally:
        await stream.close()

    status, body = await call(http, "GET", f"/api/tasks/{text_id}")
    assert status == 200
    task = body["task"]
    assert (task["task_id"], task["queue"], task["type"]) == (text_id, "emails", "send")
    assert (task["state"], task["attempt"], task["errors"]) == ("SUCCEEDED", 1, [])
    assert (task["payload_size"], task["result_size"]) == (14, 14)
    assert task["result_preview"] == {
        "encoding": "utf-8",
        "text": '{"sent": true}',
        "truncated": False,
    }
    assert task["headers"] == {"traceparent": "00-abc-def-01"}
    assert task["finish_time_ms"] >= task["create_time_ms"] > 0
    assert "secret payload" not in str(body) and "payload" not in task

    _, body = await call(http, "GET", f"/api/tasks/{binary_id}")
    preview = body["task"]["result_preview"]
    assert (preview["encoding"], preview["truncated"]) == ("hex", True)
    assert preview["text"].startswith("89504e4700") and len(preview["text"]) == 2048


async def test_unknown_task_is_404_and_a_malformed_id_400(http: aiohttp.ClientSession) -> None:
    status, body = await call(http, "GET", f"/api/tasks/{UNKNOWN_TASK}")
    assert assert_error(status, body, 404) == f"task {UNKNOWN_TASK} not found"
    assert body["error"]["reason"] == "TASK_NOT_FOUND"
    status, body = await call(http, "GET", "/api/tasks/not-a-task-id")
    assert_error(status, body, 400, field="task_id")


async def test_unknown_paths_and_methods_get_json_errors(http: aiohttp.ClientSession) -> None:
    status, body = await call(http, "GET", "/api/nothing-here")
    assert_error(status, body, 404)
    status, body = await call(http, "GET", "/api/queues/emails/pause")
    assert_error(status, body, 405)
    status, body = await call(http, "DELETE", "/api/queues")
    assert_error(status, body, 405)


async def test_the_page_and_its_assets_are_served_with_a_strict_policy(
    http: aiohttp.ClientSession,
) -> None:
    async with http.get("/") as response:
        assert response.status == 200 and response.content_type == "text/html"
        assert "<title>taskbroker</title>" in await response.text()
        policy = response.headers["Content-Security-Policy"]
        assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for asset in ("app.js", "style.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css"):
        async with http.get(f"/static/{asset}") as response:
            assert response.status == 200, asset
    status, body = await call(http, "GET", "/static/../server.py")
    assert status in (403, 404) and "error" in body
    assert await call(http, "GET", "/api/info") == (200, {"admin_enabled": False})


# --- admin actions ------------------------------------------------------------------------------

ADMIN_POSTS = [
    ("/api/queues/hooks/pause", {}),
    ("/api/queues/hooks/resume", {}),
    ("/api/queues/hooks/dead/redrive", {"all": True}),
    ("/api/queues/hooks/dead/delete", {"all": True}),
]


@pytest.mark.parametrize(("path", "body"), ADMIN_POSTS)
async def test_admin_actions_are_refused_with_403_unless_enabled(
    running: RunningBroker, http: aiohttp.ClientSession, path: str, body: dict[str, Any]
) -> None:
    (task_id,) = await make_dead(running.stub, "hooks", 1)
    status, reply = await call(http, "POST", path, json=body)
    assert "TASKBROKER_DASHBOARD_ADMIN" in assert_error(status, reply, 403)
    assert (await get(running.stub, task_id)).state == task_pb2.TASK_STATE_DEAD
    stats = await running.stub.Stats(bs.StatsRequest(queues=["hooks"]))
    assert not stats.queues[0].paused


async def test_pause_and_resume(
    admin_running: RunningBroker, admin_http: aiohttp.ClientSession
) -> None:
    assert await call(admin_http, "GET", "/api/info") == (200, {"admin_enabled": True})
    status, body = await call(admin_http, "POST", "/api/queues/emails/pause", json={})
    assert (status, body) == (200, {"queue": "emails", "paused": True})
    _, queues = await call(admin_http, "GET", "/api/queues")
    assert queues["queues"][0]["paused"] is True  # the snapshot is retaken after an action
    stats = await admin_running.stub.Stats(bs.StatsRequest(queues=["emails"]))
    assert stats.queues[0].paused
    status, body = await call(admin_http, "POST", "/api/queues/emails/resume", json={})
    assert (status, body) == (200, {"queue": "emails", "paused": False})
    stats = await admin_running.stub.Stats(bs.StatsRequest(queues=["emails"]))
    assert not stats.queues[0].paused


async def test_redrive_and_delete_by_id_and_all(
    admin_running: RunningBroker, admin_http: aiohttp.ClientSession
) -> None:
    stub = admin_running.stub
    ids = await make_dead(stub, "hooks", 6)
    status, body = await call(
        admin_http, "POST", "/api/queues/hooks/dead/redrive", json={"task_ids": ids[:1]}
    )
    assert (status, body) == (200, {"redriven": 1})
    assert (await get(stub, ids[0])).state == task_pb2.TASK_STATE_PENDING
    status, body = await call(
        admin_http, "POST", "/api/queues/hooks/dead/delete", json={"task_ids": ids[1:3]}
    )
    assert (status, body) == (200, {"deleted": 2})
    status, body = await call(
        admin_http, "POST", "/api/queues/hooks/dead/redrive", json={"all": True}
    )
    assert (status, body) == (200, {"redriven": 3})
    assert {(await get(stub, t)).state for t in ids[3:]} == {task_pb2.TASK_STATE_PENDING}

    await make_dead(stub, "other", 2)
    status, body = await call(
        admin_http, "POST", "/api/queues/other/dead/delete", json={"all": True}
    )
    assert (status, body) == (200, {"deleted": 2})
    _, page = await call(admin_http, "GET", "/api/queues/other/dead")
    assert page["tasks"] == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "task_ids"),
        ({"task_ids": []}, "task_ids"),
        ({"all": "yes"}, "all"),
        ({"task_ids": "hooks:01J0000000000000000000000Z"}, "task_ids"),
        ({"task_ids": [1, 2]}, "task_ids"),
        ({"task_ids": ["nope"]}, "task_ids[0]"),
        ({"task_ids": [UNKNOWN_TASK]}, "task_ids[0]"),  # a task of another queue
        ({"task_ids": ["hooks:01J0000000000000000000000Z"], "all": True}, "task_ids"),
        ({"every": True}, "every"),
        ([1], "body"),
    ],
)
async def test_bad_redrive_bodies_are_400_naming_the_field(
    admin_http: aiohttp.ClientSession, body: object, field: str
) -> None:
    status, reply = await call(admin_http, "POST", "/api/queues/hooks/dead/redrive", json=body)
    assert_error(status, reply, 400, field=field)


async def test_admin_posts_must_be_json_from_the_same_origin(
    admin_http: aiohttp.ClientSession,
) -> None:
    status, body = await call(admin_http, "POST", "/api/queues/hooks/dead/delete", data="{}")
    assert_error(status, body, 415)
    status, body = await call(
        admin_http,
        "POST",
        "/api/queues/hooks/dead/delete",
        data="not json",
        headers={"Content-Type": "application/json"},
    )
    assert_error(status, body, 400, field="body")
    status, body = await call(
        admin_http,
        "POST",
        "/api/queues/hooks/pause",
        json={},
        headers={"Origin": "https://evil.example"},
    )
    assert "cross-origin" in assert_error(status, body, 403)
    status, body = await call(admin_http, "POST", "/api/queues/bad%20name/pause", json={})
    assert_error(status, body, 400, field="queue")


# --- the listener -------------------------------------------------------------------------------


async def test_a_taken_http_address_stops_the_broker_from_starting(
    running: RunningBroker, settings: Settings
) -> None:
    taken = f"127.0.0.1:{running.broker.http_port}"
    broker = Broker(replace(settings, http_listen=taken))
    with pytest.raises(RuntimeError, match=f"http: cannot listen on {taken}"):
        await broker.start()
    assert await enqueue(running.stub, spec("emails"))  # the first broker is untouched


async def test_an_empty_http_address_serves_no_http(settings: Settings) -> None:
    quiet = await start_broker(settings, http_listen="")
    try:
        assert quiet.broker.http_port == 0
        assert await enqueue(quiet.stub, spec("emails"))
    finally:
        await quiet.close()


async def test_an_encrypted_task_shows_its_key_id_and_sizes_never_a_preview(
    running: RunningBroker, http: aiohttp.ClientSession
) -> None:
    codec = AesGcmCodec(Keyring({"k1": os.urandom(32), "k2": os.urandom(32)}, "k2"))

    @handler("charge")
    async def charge(ctx: TaskContext, payload: bytes) -> bytes:
        return b"charged " + payload

    async with Client(running.target, codec=codec) as client:
        task_id = await client.enqueue("billing", "charge", b"card 4111")
        worker = Worker(client, queues=["billing"], handlers=[charge], concurrency=1)
        assert await worker.run_until_idle() == 1

    status, body = await call(http, "GET", f"/api/tasks/{task_id}")
    task = body["task"]
    assert (status, task["payload_key_id"], task["result_key_id"]) == (200, "k2", "k2")
    assert task["payload_size"] > len(b"card 4111") and task["result_preview"] is None
    assert "card 4111" not in str(body)

    (plain_id,) = await enqueue(running.stub, spec("emails", "send", b"\x89TBE but not sealed"))
    _, body = await call(http, "GET", f"/api/tasks/{plain_id}")
    assert (body["task"]["payload_key_id"], body["task"]["result_key_id"]) == (None, None)
