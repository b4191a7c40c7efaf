"""ScheduleService through gRPC on a real broker, on standalone Redis and on the 3-master
Cluster: CRUD, validation that stores nothing, pause/resume/trigger, ticks enqueued as
ordinary tasks with their idempotency key, and both catch-up policies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import grpc
import pytest
from google.protobuf import duration_pb2

from broker.schedule_models import CatchUp, FireOutcome
from broker.schedules import MISSED_AFTER_MS
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import schedule_service_pb2 as sched
from taskbroker.v1 import schedule_service_pb2_grpc, task_pb2
from tests.conftest import TEST_SETTINGS, RunningBroker, start_broker
from tests.support.redis_server import RedisCluster, RedisServer


@pytest.fixture(params=["standalone", "cluster"])
async def running(request: pytest.FixtureRequest) -> AsyncIterator[RunningBroker]:
    if request.param == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        client = cluster.client()
        client.flushall()
        client.close()
        settings = replace(TEST_SETTINGS, redis_url=cluster.url, redis_cluster=True)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        plain = server.client()
        plain.flushall()
        plain.close()
        settings = replace(TEST_SETTINGS, redis_url=server.url)
    broker = await start_broker(settings)
    yield broker
    await broker.close()


def stub(running: RunningBroker) -> schedule_service_pb2_grpc.ScheduleServiceAsyncStub:
    return schedule_service_pb2_grpc.ScheduleServiceStub(running.channel)


def schedule(name: str = "nightly", cron: str = "0 3 * * *", **fields: object) -> sched.Schedule:
    template = task_pb2.TaskSpec(queue="reports", type="build", payload=b"{}", priority=3)
    return sched.Schedule(name=name, cron=cron, task_template=template, **fields)  # type: ignore[arg-type]


async def refused(call: object, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    return caught.value.details() or ""


async def test_create_get_list_update_delete(running: RunningBroker) -> None:
    s = stub(running)
    created = (await s.CreateSchedule(sched.CreateScheduleRequest(
        schedule=schedule(time_zone="Europe/Berlin")))).schedule  # fmt: skip
    assert created.name == "nightly" and created.time_zone == "Europe/Berlin"
    assert created.HasField("next_fire_time") and not created.paused
    assert created.task_template.queue == "reports" and created.task_template.priority == 3
    assert created.task_template.max_attempts == 5  # the broker's default, filled in
    got = (await s.GetSchedule(sched.GetScheduleRequest(name="nightly"))).schedule
    assert got == created
    await s.CreateSchedule(sched.CreateScheduleRequest(schedule=schedule("a-first")))
    page = await s.ListSchedules(sched.ListSchedulesRequest(page_size=1))
    assert [x.name for x in page.schedules] == ["a-first"] and page.next_page_token
    rest = await s.ListSchedules(sched.ListSchedulesRequest(page_token=page.next_page_token))
    assert [x.name for x in rest.schedules] == ["nightly"] and not rest.next_page_token
    updated = (await s.UpdateSchedule(sched.UpdateScheduleRequest(
        schedule=schedule(cron="@every 1h", time_zone="Europe/Berlin")))).schedule  # fmt: skip
    assert updated.cron == "@every 1h"
    assert updated.next_fire_time.seconds % 3600 == 0
    await s.DeleteSchedule(sched.DeleteScheduleRequest(name="nightly"))
    await refused(
        s.GetSchedule(sched.GetScheduleRequest(name="nightly")), grpc.StatusCode.NOT_FOUND
    )
    await refused(
        s.DeleteSchedule(sched.DeleteScheduleRequest(name="nightly")), grpc.StatusCode.NOT_FOUND
    )
    listed = await s.ListSchedules(sched.ListSchedulesRequest())
    assert [x.name for x in listed.schedules] == ["a-first"]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        (schedule(name=""), "schedule.name"),
        (schedule(name="no spaces"), "schedule.name"),
        (schedule(cron="61 * * * *"), "schedule.cron"),
        (schedule(cron="@every 0s"), "schedule.cron"),
        (schedule(time_zone="Mars/Olympus"), "schedule.time_zone"),
        (schedule(jitter=duration_pb2.Duration(seconds=-1)), "schedule.jitter"),
        (sched.Schedule(name="x", cron="* * * * *"), "schedule.task_template.queue"),
        (
            sched.Schedule(
                name="x",
                cron="* * * * *",
                task_template=task_pb2.TaskSpec(queue="q", type="t", priority=5000),
            ),
            "schedule.task_template.priority",
        ),
        (
            sched.Schedule(
                name="x",
                cron="* * * * *",
                task_template=task_pb2.TaskSpec(queue="q", type="t", idempotency_key="k"),
            ),
            "schedule.task_template.idempotency_key",
        ),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field_and_nothing_is_stored(
    running: RunningBroker, bad: sched.Schedule, field: str
) -> None:
    s = stub(running)
    details = await refused(
        s.CreateSchedule(sched.CreateScheduleRequest(schedule=bad)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert details.startswith(field), details
    assert not (await s.ListSchedules(sched.ListSchedulesRequest())).schedules
    assert await running.broker.schedules._store.queue_of(bad.name or "x") is None


async def test_duplicate_create_is_already_exists_and_leaves_the_first(
    running: RunningBroker,
) -> None:
    s = stub(running)
    await s.CreateSchedule(sched.CreateScheduleRequest(schedule=schedule()))
    other = schedule(cron="@every 5s")
    other.task_template.queue = "elsewhere"
    await refused(
        s.CreateSchedule(sched.CreateScheduleRequest(schedule=other)),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    got = (await s.GetSchedule(sched.GetScheduleRequest(name="nightly"))).schedule
    assert got.cron == "0 3 * * *" and got.task_template.queue == "reports"
    await refused(
        s.UpdateSchedule(sched.UpdateScheduleRequest(schedule=other)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    for call in (s.PauseSchedule(sched.PauseScheduleRequest(name="ghost")),
                 s.TriggerSchedule(sched.TriggerScheduleRequest(name="ghost"))):  # fmt: skip
        await refused(call, grpc.StatusCode.NOT_FOUND)


async def test_ticks_enqueue_ordinary_tasks_and_pause_resume_and_trigger(
    running: RunningBroker,
) -> None:
    s = stub(running)
    await s.CreateSchedule(sched.CreateScheduleRequest(schedule=schedule("every", "@every 1s")))
    await asyncio.sleep(2.6)
    got = (await s.GetSchedule(sched.GetScheduleRequest(name="every"))).schedule
    assert got.last_task_id.startswith("reports:")
    task = (await running.stub.GetTask(bs.GetTaskRequest(task_id=got.last_task_id))).task
    assert task.type == "build" and task.priority == 3 and task.payload == b"{}"
    assert task.headers["taskbroker-schedule"] == "every"
    tick_ms = int(task.headers["taskbroker-tick"])
    assert tick_ms == got.last_fire_time.ToMilliseconds() and tick_ms % 1000 == 0
    # Fired late by at most a second by Redis's clock.
    assert 0 <= task.create_time.ToMilliseconds() - tick_ms <= 1000
    paused = (await s.PauseSchedule(sched.PauseScheduleRequest(name="every"))).schedule
    assert paused.paused and not paused.HasField("next_fire_time")
    stats = await running.stub.Stats(bs.StatsRequest(queues=["reports"]))
    before = stats.queues[0].enqueued_total
    assert before >= 2
    await asyncio.sleep(1.5)
    stats = await running.stub.Stats(bs.StatsRequest(queues=["reports"]))
    assert stats.queues[0].enqueued_total == before  # nothing while paused
    triggered = await s.TriggerSchedule(sched.TriggerScheduleRequest(name="every"))
    assert triggered.task_id.startswith("reports:")
    stats = await running.stub.Stats(bs.StatsRequest(queues=["reports"]))
    assert stats.queues[0].enqueued_total == before + 1
    resumed = (await s.ResumeSchedule(sched.ResumeScheduleRequest(name="every"))).schedule
    assert not resumed.paused and resumed.HasField("next_fire_time")
    await asyncio.sleep(1.5)
    stats = await running.stub.Stats(bs.StatsRequest(queues=["reports"]))
    assert stats.queues[0].enqueued_total > before + 1


@pytest.mark.parametrize("policy", [CatchUp.SKIP, CatchUp.LATEST])
async def test_catch_up_after_every_broker_was_down(
    running: RunningBroker, policy: CatchUp
) -> None:
    """A schedule whose next tick is a minute in the past (as if no broker ran): SKIP goes on
    after now without a task; LATEST enqueues the latest missed tick once, then goes on."""
    book = running.broker.schedules
    proto_policy = {CatchUp.SKIP: sched.CATCH_UP_POLICY_SKIP,
                    CatchUp.LATEST: sched.CATCH_UP_POLICY_LATEST}[policy]  # fmt: skip
    created = schedule("minutely", "@every 10s", catch_up=proto_policy, paused=True)
    await stub(running).CreateSchedule(sched.CreateScheduleRequest(schedule=created))
    store = book._store
    now = await store.now_ms()
    missed = (now - 60_000) // 10_000 * 10_000
    await store.set_paused("reports", "minutely", False, missed)  # as if down for a minute
    current = await book.get("minutely")
    step = book.plan(current, now)
    latest = now // 10_000 * 10_000
    assert step.expected_next_ms == missed and step.new_next_ms == latest + 10_000
    if latest < now - MISSED_AFTER_MS:
        assert step.tick_ms == (latest if policy is CatchUp.LATEST else None)
    else:
        assert step.tick_ms == latest  # the latest tick is merely late: on time
    # The broker's own firer races this step (every replica does): one of the two wins.
    result = await store.fire("reports", "minutely", step)
    done = FireOutcome.FIRED if step.tick_ms else FireOutcome.SKIPPED
    assert result.outcome in (done, FireOutcome.MOVED)
    # The same step again (a second replica) finds the tick moved: nothing more.
    again = await store.fire("reports", "minutely", step)
    assert again.outcome is FireOutcome.MOVED
    assert (await book.get("minutely")).next_ms == step.new_next_ms
    stats = await running.stub.Stats(bs.StatsRequest(queues=["reports"]))
    assert stats.queues[0].enqueued_total == (1 if step.tick_ms else 0)


async def test_a_tick_is_never_stored_twice_even_when_its_next_tick_is_put_back(
    running: RunningBroker,
) -> None:
    """The idempotency key of a tick: an update that resets the next tick to a tick already
    fired does not enqueue it again."""
    book = running.broker.schedules
    latest = sched.CATCH_UP_POLICY_LATEST  # the tick below may be long past: still enqueued
    created = schedule("once", "@every 1h", paused=True, catch_up=latest)
    await stub(running).CreateSchedule(sched.CreateScheduleRequest(schedule=created))
    store = book._store
    now = await store.now_ms()
    tick = now // 3_600_000 * 3_600_000
    task_ids = set()
    for _ in range(2):  # the second time: the next tick put back, as by a racing update
        await store.set_paused("reports", "once", False, tick)
        step = book.plan(await book.get("once"), now)
        assert step.tick_ms == tick
        result = await store.fire("reports", "once", step)  # or the broker's firer first
        assert result.outcome in (FireOutcome.FIRED, FireOutcome.MOVED)
        task_ids.add((await book.get("once")).last_task_id)
    assert len(task_ids) == 1
    stats = await running.stub.Stats(bs.StatsRequest(queues=["reports"]))
    assert stats.queues[0].enqueued_total == 1
