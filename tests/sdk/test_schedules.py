"""Client's and SyncClient's schedule methods through a real in-process broker: every call's
round trip, a `@every 1s` schedule whose tick becomes a task, errors as the SDK's classes, and
payload codecs applied to the task template."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from taskbroker import (
    AesGcmCodec,
    AlreadyExistsError,
    CatchUp,
    Client,
    InvalidArgumentError,
    Keyring,
    NewTask,
    Schedule,
    ScheduleNotFoundError,
    SyncClient,
    TaskState,
)
from tests.conftest import TEST_SETTINGS, RunningBroker

#: A schedule that never ticks during a test: 03:00 once a year.
YEARLY = "0 3 1 1 *"
REPORT = NewTask(
    "reports",
    "build",
    b'{"kind": "daily"}',
    priority=3,
    max_attempts=2,
    headers={"team": "ops"},
    group_key="acme",
    lease_duration=timedelta(seconds=40),
    initial_backoff=timedelta(seconds=2),
    max_backoff=timedelta(minutes=1),
)


@pytest.fixture
async def client(running: RunningBroker) -> AsyncIterator[Client]:
    async with Client(running.target) as client:
        yield client


async def names(client: Client, page_size: int = 100) -> list[str]:
    return [s.name async for s in client.schedules(page_size=page_size)]


async def test_create_returns_the_stored_schedule_with_every_field(client: Client) -> None:
    before = datetime.now(UTC)
    created = await client.create_schedule(
        "nightly-report",
        YEARLY,
        REPORT,
        time_zone="Europe/Berlin",
        jitter=timedelta(seconds=5),
        catch_up="latest",
    )

    assert isinstance(created, Schedule)
    assert (created.name, created.cron, created.time_zone) == (
        "nightly-report",
        YEARLY,
        "Europe/Berlin",
    )
    assert created.task == REPORT  # every option given comes back as it was given
    assert created.jitter == timedelta(seconds=5)
    assert created.catch_up is CatchUp.LATEST
    assert not created.paused
    assert created.next_fire_time is not None and created.next_fire_time > before
    assert created.next_fire_time.tzinfo is UTC
    local = created.next_fire_time.astimezone(ZoneInfo("Europe/Berlin"))
    assert (local.month, local.day, local.hour, local.minute) == (1, 1, 3, 0)
    assert (created.last_fire_time, created.last_task_id) == (None, "")
    assert created.create_time is not None and created.create_time >= before - timedelta(seconds=5)
    assert created.update_time == created.create_time
    assert await client.get_schedule("nightly-report") == created


async def test_the_broker_fills_in_the_template_defaults_and_utc(client: Client) -> None:
    created = await client.create_schedule("plain", YEARLY, NewTask("reports", "build"))

    assert created.time_zone == "UTC"
    assert created.jitter is None and created.catch_up is CatchUp.SKIP
    assert created.task.max_attempts == 5  # the broker's default, filled in
    assert created.task.initial_backoff == timedelta(seconds=TEST_SETTINGS.backoff_initial_s)
    assert created.task.group_key is None and created.task.headers is None


async def test_schedules_lists_every_page_by_name(client: Client) -> None:
    for name in ["e", "c", "a", "d", "b"]:
        await client.create_schedule(name, YEARLY, NewTask("reports", "build"))

    assert await names(client, page_size=2) == ["a", "b", "c", "d", "e"]
    assert await names(client) == ["a", "b", "c", "d", "e"]


async def test_update_replaces_the_definition_and_keeps_paused_state_and_history(
    client: Client,
) -> None:
    created = await client.create_schedule(
        "digest", YEARLY, REPORT, jitter=timedelta(seconds=9), catch_up="latest"
    )
    await client.pause_schedule("digest")
    task_id = await client.trigger_schedule("digest")

    updated = await client.update_schedule(
        "digest", "@every 1h", NewTask("reports", "digest", b"v2"), time_zone="Asia/Tokyo"
    )

    assert (updated.cron, updated.time_zone, updated.task.type) == (
        "@every 1h",
        "Asia/Tokyo",
        "digest",
    )
    assert updated.task.payload == b"v2" and updated.task.priority == 0
    # Full replace: the options left out are back to their defaults.
    assert updated.jitter is None and updated.catch_up is CatchUp.SKIP
    assert updated.task.headers is None and updated.task.group_key is None
    assert updated.paused and updated.next_fire_time is None
    assert updated.last_task_id == task_id
    assert updated.create_time == created.create_time
    assert updated.update_time is not None and created.update_time is not None
    assert updated.update_time >= created.update_time


async def test_update_cannot_move_a_schedule_to_another_queue(client: Client) -> None:
    await client.create_schedule("digest", YEARLY, NewTask("reports", "build"))

    with pytest.raises(InvalidArgumentError, match=r"schedule\.task_template\.queue"):
        await client.update_schedule("digest", YEARLY, NewTask("emails", "build"))
    assert (await client.get_schedule("digest")).task.queue == "reports"


async def test_pause_resume_and_trigger(client: Client) -> None:
    await client.create_schedule("hourly", "@hourly", NewTask("reports", "build", b"x"))

    paused = await client.pause_schedule("hourly")
    assert paused.paused and paused.next_fire_time is None
    task_id = await client.trigger_schedule("hourly")  # paused or not
    resumed = await client.resume_schedule("hourly")

    assert not resumed.paused and resumed.next_fire_time is not None
    assert resumed.next_fire_time.minute == 0 and resumed.next_fire_time.second == 0
    assert resumed.last_task_id == task_id
    task = await client.get_task(task_id)
    assert (task.queue, task.type, task.payload, task.state) == (
        "reports",
        "build",
        b"x",
        TaskState.PENDING,
    )
    assert task.headers["taskbroker-schedule"] == "hourly"


async def test_a_schedule_created_paused_enqueues_nothing_until_resumed(client: Client) -> None:
    created = await client.create_schedule(
        "later", "@every 1s", NewTask("ticks", "tick"), paused=True
    )
    await asyncio.sleep(1.5)

    assert created.paused and created.next_fire_time is None
    assert (await client.get_schedule("later")).last_task_id == ""
    assert (await client.stats("ticks"))[0].enqueued_total == 0


async def test_delete_leaves_the_tasks_already_enqueued(client: Client) -> None:
    await client.create_schedule("once", YEARLY, NewTask("reports", "build"))
    task_id = await client.trigger_schedule("once")

    await client.delete_schedule("once")

    assert await names(client) == []
    with pytest.raises(ScheduleNotFoundError):
        await client.get_schedule("once")
    assert (await client.get_task(task_id)).state is TaskState.PENDING


@pytest.mark.timeout(30)
async def test_every_second_schedule_enqueues_its_ticks_as_tasks(client: Client) -> None:
    await client.create_schedule("heartbeat", "@every 1s", NewTask("ticks", "tick", b"beat"))

    schedule = await client.get_schedule("heartbeat")
    while not schedule.last_task_id:
        await asyncio.sleep(0.1)
        schedule = await client.get_schedule("heartbeat")
    await client.pause_schedule("heartbeat")

    task = await client.get_task(schedule.last_task_id)
    assert (task.queue, task.type, task.payload) == ("ticks", "tick", b"beat")
    assert schedule.last_fire_time is not None
    tick_ms = int(task.headers["taskbroker-tick"])
    assert tick_ms == round(schedule.last_fire_time.timestamp() * 1000)
    assert tick_ms % 1000 == 0  # @every counts from the Unix epoch
    assert task.headers["taskbroker-schedule"] == "heartbeat"
    assert schedule.next_fire_time is not None
    assert schedule.next_fire_time > schedule.last_fire_time


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cron", "time_zone", "task", "jitter", "field"),
    [
        ("61 * * * *", "UTC", NewTask("reports", "build"), None, "schedule.cron"),
        ("@every 500ms", "UTC", NewTask("reports", "build"), None, "schedule.cron"),
        (YEARLY, "Mars/Olympus", NewTask("reports", "build"), None, "schedule.time_zone"),
        (YEARLY, "UTC", NewTask("reports", "build"), timedelta(days=2), "schedule.jitter"),
        (YEARLY, "UTC", NewTask("bad queue", "build"), None, "schedule.task_template.queue"),
        (
            YEARLY,
            "UTC",
            NewTask("reports", "build", idempotency_key="k"),
            None,
            "schedule.task_template.idempotency_key",
        ),
        (
            YEARLY,
            "UTC",
            NewTask("reports", "build", priority=5000),
            None,
            "schedule.task_template.priority",
        ),
    ],
)
async def test_a_bad_definition_is_refused_naming_the_field_and_stores_nothing(
    client: Client,
    cron: str,
    time_zone: str,
    task: NewTask,
    jitter: timedelta | None,
    field: str,
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await client.create_schedule("bad", cron, task, time_zone=time_zone, jitter=jitter)

    assert str(caught.value).startswith(f"{field}:"), str(caught.value)
    assert await names(client) == []


async def test_a_bad_name_is_refused_naming_the_field(client: Client) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^schedule\.name:"):
        await client.create_schedule("no spaces", YEARLY, NewTask("reports", "build"))
    with pytest.raises(InvalidArgumentError, match=r"^name:"):
        await client.get_schedule("no spaces")


async def test_a_taken_name_is_already_exists_even_on_another_queue(client: Client) -> None:
    await client.create_schedule("nightly", YEARLY, NewTask("reports", "build"))

    with pytest.raises(AlreadyExistsError, match="nightly"):
        await client.create_schedule("nightly", YEARLY, NewTask("emails", "send"))
    assert (await client.get_schedule("nightly")).task.queue == "reports"


async def test_every_call_on_an_unknown_name_is_schedule_not_found(client: Client) -> None:
    calls = [
        client.get_schedule("ghost"),
        client.update_schedule("ghost", YEARLY, NewTask("reports", "build")),
        client.delete_schedule("ghost"),
        client.pause_schedule("ghost"),
        client.resume_schedule("ghost"),
        client.trigger_schedule("ghost"),
    ]
    for call in calls:
        with pytest.raises(ScheduleNotFoundError, match="'ghost' not found"):
            await call


async def test_a_bad_catch_up_is_a_value_error_before_any_call(client: Client) -> None:
    with pytest.raises(ValueError, match="catch_up: 'never' is not 'skip' or 'latest'"):
        await client.create_schedule(
            "x",
            YEARLY,
            NewTask("reports", "build"),
            catch_up="never",  # type: ignore[arg-type]
        )


# --- codec and SyncClient -------------------------------------------------------------------


async def test_a_codec_encodes_the_template_so_tick_tasks_decode_like_any_other(
    running: RunningBroker, client: Client
) -> None:
    codec = AesGcmCodec(Keyring({"k1": os.urandom(32)}))
    async with Client(running.target, codec=codec) as sealed:
        created = await sealed.create_schedule(
            "secret", YEARLY, NewTask("vault", "open", b"the secret")
        )
        task_id = await sealed.trigger_schedule("secret")

        assert created.task.payload == b"the secret"
        assert (await sealed.get_task(task_id)).payload == b"the secret"
    stored = await client.get_schedule("secret")  # read without the key
    assert b"the secret" not in stored.task.payload
    assert b"the secret" not in (await client.get_task(task_id)).payload


async def test_sync_client_round_trip(running: RunningBroker) -> None:
    await asyncio.to_thread(sync_round_trip, running.target)


def sync_round_trip(target: str) -> None:
    with SyncClient(target) as client:
        created = client.create_schedule("sync", YEARLY, NewTask("reports", "build"))
        assert client.get_schedule("sync") == created
        assert [s.name for s in client.schedules()] == ["sync"]
        updated = client.update_schedule("sync", "@daily", NewTask("reports", "build"))
        assert updated.cron == "@daily"
        assert client.pause_schedule("sync").paused
        assert not client.resume_schedule("sync").paused
        task_id = client.trigger_schedule("sync")
        assert client.get_task(task_id).headers["taskbroker-schedule"] == "sync"
        client.delete_schedule("sync")
        assert client.schedules() == []
