"""`taskbroker schedule ...`, run as a real subprocess against an in-process broker."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from taskbroker import CatchUp, Client, NewTask, ScheduleNotFoundError, TaskState
from taskbroker.codec import from_json
from tests.conftest import RunningBroker
from tests.sdk.test_cli import run_cli

YEARLY = "0 3 1 1 *"


@pytest.fixture
async def client(running: RunningBroker) -> AsyncIterator[Client]:
    async with Client(running.target) as client:
        yield client


async def test_create_with_every_option_prints_the_stored_schedule(
    running: RunningBroker, client: Client
) -> None:
    result = await run_cli(
        running.target, "--json", "schedule", "create", "nightly", YEARLY, "reports", "build",
        "--payload", '{"kind": "daily"}', "--tz", "Europe/Berlin", "--jitter", "5s",
        "--catch-up", "latest", "--priority", "7", "--max-attempts", "3",
        "--header", "team=ops", "--group-key", "acme", "--delay", "2m",
    )  # fmt: skip

    assert result.code == 0, result.stderr
    doc = result.json()
    assert isinstance(doc, dict)
    assert (doc["name"], doc["cron"], doc["time_zone"]) == ("nightly", YEARLY, "Europe/Berlin")
    assert (doc["jitter_s"], doc["catch_up"], doc["paused"]) == (5.0, "latest", False)
    assert doc["next_fire_time"] and doc["last_task_id"] is None
    assert doc["task"]["payload"] == {"size": 16, "text": '{"kind":"daily"}'}
    assert (doc["task"]["priority"], doc["task"]["max_attempts"]) == (7, 3)
    assert (doc["task"]["group_key"], doc["task"]["delay_s"]) == ("acme", 120.0)
    stored = await client.get_schedule("nightly")
    assert stored.time_zone == "Europe/Berlin" and stored.catch_up is CatchUp.LATEST
    assert from_json(stored.task.payload) == {"kind": "daily"}
    assert stored.task.headers == {"team": "ops"} and stored.task.delay == timedelta(minutes=2)


async def test_get_and_list_show_tables_and_json(running: RunningBroker, client: Client) -> None:
    empty = await run_cli(running.target, "schedule", "list")
    await client.create_schedule("b-hourly", "@hourly", NewTask("reports", "build"))
    await client.create_schedule("a-yearly", YEARLY, NewTask("emails", "send"), paused=True)

    shown = await run_cli(running.target, "schedule", "get", "b-hourly")
    listed = await run_cli(running.target, "schedule", "list")
    listed_json = await run_cli(running.target, "--json", "schedule", "list")

    assert (empty.code, empty.stdout.strip()) == (0, "no schedules")
    assert shown.code == 0, shown.stderr
    for field in ("b-hourly", "@hourly", "reports", "build", "next fire", "catch-up"):
        assert field in shown.stdout, field
    assert listed.code == 0, listed.stderr
    assert listed.stdout.index("a-yearly") < listed.stdout.index("b-hourly")
    assert "paused" in listed.stdout
    doc = listed_json.json()
    assert isinstance(doc, dict)
    assert [s["name"] for s in doc["schedules"]] == ["a-yearly", "b-hourly"]
    assert [s["paused"] for s in doc["schedules"]] == [True, False]


async def test_update_replaces_the_options_given_and_keeps_the_others(
    running: RunningBroker, client: Client
) -> None:
    await client.create_schedule(
        "digest",
        YEARLY,
        NewTask("reports", "build", b"v1", priority=7, headers={"a": "1"}, group_key="acme"),
        time_zone="Asia/Tokyo",
        jitter=timedelta(seconds=9),
        catch_up="latest",
    )

    changed = await run_cli(
        running.target, "schedule", "update", "digest", "--cron", "@daily", "--priority", "2",
        "--type", "digest", "--jitter", "0", "--group-key", "",
    )  # fmt: skip

    assert changed.code == 0, changed.stderr
    stored = await client.get_schedule("digest")
    assert (stored.cron, stored.task.type, stored.task.priority) == ("@daily", "digest", 2)
    assert stored.jitter is None and stored.task.group_key is None  # cleared
    assert stored.time_zone == "Asia/Tokyo" and stored.catch_up is CatchUp.LATEST  # kept
    assert (stored.task.payload, stored.task.headers) == (b"v1", {"a": "1"})  # kept


async def test_pause_resume_trigger_and_delete(running: RunningBroker, client: Client) -> None:
    await client.create_schedule("hourly", "@hourly", NewTask("reports", "build"))

    paused = await run_cli(running.target, "schedule", "pause", "hourly")
    resumed = await run_cli(running.target, "--json", "schedule", "resume", "hourly")
    triggered = await run_cli(running.target, "schedule", "trigger", "hourly")
    deleted = await run_cli(running.target, "--json", "schedule", "delete", "hourly")

    assert (paused.code, paused.stdout.strip()) == (0, "hourly paused")
    resumed_doc = resumed.json()
    assert isinstance(resumed_doc, dict)
    assert resumed_doc["paused"] is False and resumed_doc["next_fire_time"]
    assert triggered.code == 0, triggered.stderr
    task = await client.get_task(triggered.stdout.strip())
    assert task.state is TaskState.PENDING and task.headers["taskbroker-schedule"] == "hourly"
    assert deleted.json() == {"name": "hourly", "deleted": True}
    with pytest.raises(ScheduleNotFoundError):
        await client.get_schedule("hourly")


async def test_bad_input_exits_1_with_the_brokers_message(
    running: RunningBroker, client: Client
) -> None:
    await client.create_schedule("taken", YEARLY, NewTask("reports", "build"))

    bad_cron = await run_cli(running.target, "schedule", "create", "x", "61 * * * *", "q", "t")
    bad_zone = await run_cli(
        running.target, "--json", "schedule", "create", "x", YEARLY, "q", "t", "--tz", "Mars/Base"
    )
    taken = await run_cli(running.target, "schedule", "create", "taken", YEARLY, "q", "t")
    missing = await run_cli(running.target, "schedule", "get", "ghost")
    missing_update = await run_cli(
        running.target, "schedule", "update", "ghost", "--cron", "@daily"
    )
    bad_choice = await run_cli(
        running.target, "schedule", "create", "x", YEARLY, "q", "t", "--catch-up", "all"
    )

    assert bad_cron.code == 1 and bad_cron.stderr.startswith("error: schedule.cron:")
    assert bad_zone.code == 1
    error = json.loads(bad_zone.stderr)
    assert error["code"] == "INVALID_ARGUMENT" and error["error"].startswith("schedule.time_zone:")
    assert taken.code == 1 and "exists already" in taken.stderr
    assert missing.code == 1 and "schedule 'ghost' not found" in missing.stderr
    assert missing_update.code == 1 and "schedule 'ghost' not found" in missing_update.stderr
    assert bad_choice.code == 2 and "--catch-up" in bad_choice.stderr
    assert "Traceback" not in bad_cron.stderr + taken.stderr + missing.stderr
    assert [s.name async for s in client.schedules()] == ["taken"]  # nothing else stored
