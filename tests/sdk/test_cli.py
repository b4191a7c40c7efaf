"""The `taskbroker` command line, run as a real subprocess against an in-process broker."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from taskbroker._client import Client
from taskbroker._models import TaskState
from taskbroker.codec import from_json
from tests.conftest import RunningBroker
from tests.support.lease_stream import LeaseStream
from tests.support.redis_server import free_port

#: A well-formed id of a task that was never enqueued.
UNKNOWN_ID = "emails:01J0000000000000000000000A"
#: Environment variables that would make rich treat a pipe as a terminal.
TERMINAL_OVERRIDES = ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "COLUMNS")


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> object:
        return json.loads(self.stdout)


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TERMINAL_OVERRIDES}
    env.pop("TASKBROKER_TARGET", None)
    return env


async def run_cli(target: str, *args: str, cwd: Path | None = None) -> Result:
    """Runs `python -m taskbroker.cli --target TARGET ARGS...` and collects its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskbroker.cli",
        "--target",
        target,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=cwd,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return Result(process.returncode, stdout.decode(), stderr.decode())


@pytest.fixture
async def client(running: RunningBroker) -> AsyncIterator[Client]:
    async with Client(running.target) as client:
        yield client


async def dead_letters(running: RunningBroker, client: Client, queue: str, n: int) -> list[str]:
    """Enqueues n tasks and dead-letters them through a raw Lease stream."""
    ids: list[str] = [await client.enqueue(queue, "run", f'{{"n":{i}}}'.encode()) for i in range(n)]
    stream = await LeaseStream(running.stub).open([queue], credits=n)
    for delivery in await stream.take(n):
        await stream.nack(delivery, error="bad input", dead_letter=True)
    await stream.close()
    return ids


# --- enqueue --------------------------------------------------------------------------------


async def test_enqueue_prints_the_id_of_a_task_stored_with_every_option(
    running: RunningBroker, client: Client
) -> None:
    result = await run_cli(
        running.target,
        "enqueue",
        "emails",
        "send",
        "--payload",
        '{"to": "ana@example.com"}',
        "--priority",
        "7",
        "--max-attempts",
        "3",
        "--idempotency-key",
        "k1",
        "--header",
        "traceparent=00-ab",
        "--header",
        "tenant=a=b",
    )

    assert result.code == 0, result.stderr
    task_id = result.stdout.strip()
    task = await client.get_task(task_id)
    assert (task.queue, task.type, task.state) == ("emails", "send", TaskState.PENDING)
    assert from_json(task.payload) == {"to": "ana@example.com"}
    assert task.payload == b'{"to":"ana@example.com"}'  # the SDK codec's compact encoding
    assert (task.priority, task.max_attempts) == (7, 3)
    assert task.headers == {"traceparent": "00-ab", "tenant": "a=b"}


async def test_enqueue_count_with_json_returns_every_id(
    running: RunningBroker, client: Client
) -> None:
    result = await run_cli(running.target, "--json", "enqueue", "bulk", "job", "--count", "250")

    assert result.code == 0, result.stderr
    doc = result.json()
    assert isinstance(doc, dict) and list(doc) == ["task_ids"]
    assert len(set(doc["task_ids"])) == 250
    (stats,) = await client.stats("bulk")
    assert stats.pending == 250
    assert result.stderr == ""  # no progress bar off a terminal


async def test_enqueue_with_delay_and_file_payload_schedules_the_raw_bytes(
    running: RunningBroker, client: Client, tmp_path: Path
) -> None:
    blob = bytes(range(256))
    (tmp_path / "blob.bin").write_bytes(blob)

    result = await run_cli(
        running.target,
        "--json",
        "enqueue",
        "emails",
        "send",
        "--delay",
        "5m",
        "--payload",
        f"@{tmp_path / 'blob.bin'}",
    )

    assert result.code == 0, result.stderr
    doc = result.json()
    assert isinstance(doc, dict)
    (task_id,) = doc["task_ids"]
    task = await client.get_task(task_id)
    assert task.state is TaskState.SCHEDULED and task.payload == blob
    assert task.create_time is not None and task.schedule_time is not None
    delay = task.schedule_time - task.create_time
    assert timedelta(minutes=4, seconds=59) <= delay <= timedelta(minutes=5, seconds=1)

    shown = await run_cli(running.target, "--json", "task", task_id)
    payload = shown.json()["payload"]  # type: ignore[index]
    assert payload == {"size": 256, "hex": blob.hex()}


# --- task -----------------------------------------------------------------------------------


async def test_task_shows_state_and_every_attempts_error(
    running: RunningBroker, client: Client
) -> None:
    task_id = await client.enqueue("jobs", "run", b'{"n":1}', max_attempts=3)
    stream = await LeaseStream(running.stub).open(["jobs"], credits=2)
    (first,) = await stream.take(1)
    await stream.nack(first, error="timeout talking to smtp", retry_delay=timedelta(0))
    (second,) = await stream.take(1)
    await stream.nack(second, error="bad [bold]input[/bold]", dead_letter=True)
    await stream.close()

    shown = await run_cli(running.target, "task", task_id)
    as_json = await run_cli(running.target, "--json", "task", task_id)

    assert shown.code == 0, shown.stderr
    assert task_id in shown.stdout and "DEAD" in shown.stdout
    assert "2 of 3" in shown.stdout
    assert "timeout talking to smtp" in shown.stdout
    assert "bad [bold]input[/bold]" in shown.stdout  # user text is never read as markup
    assert '{"n":1}' in shown.stdout  # a printable payload is shown as text
    assert as_json.code == 0, as_json.stderr
    doc = as_json.json()
    assert isinstance(doc, dict)
    assert (doc["id"], doc["state"], doc["attempt"]) == (task_id, "DEAD", 2)
    assert [e["message"] for e in doc["errors"]] == [
        "timeout talking to smtp",
        "bad [bold]input[/bold]",
    ]
    assert doc["last_error"] == "bad [bold]input[/bold]"
    assert doc["payload"] == {"size": 7, "text": '{"n":1}'}
    assert doc["result"] == {"size": 0, "text": ""}


async def test_unknown_task_is_an_error_without_traceback(running: RunningBroker) -> None:
    plain = await run_cli(running.target, "task", UNKNOWN_ID)
    as_json = await run_cli(running.target, "--json", "task", UNKNOWN_ID)

    assert plain.code == 1 and plain.stdout == ""
    assert plain.stderr.startswith("error: ") and "Traceback" not in plain.stderr
    assert as_json.code == 1 and as_json.stdout == ""
    error = json.loads(as_json.stderr)
    assert (error["code"], error["reason"]) == ("NOT_FOUND", "TASK_NOT_FOUND")
    assert error["error"]


# --- stats ----------------------------------------------------------------------------------


async def test_stats_table_and_json_show_counts_per_queue(
    running: RunningBroker, client: Client
) -> None:
    for _ in range(3):
        await client.enqueue("emails", "send")
    await client.enqueue("emails", "send", delay=timedelta(hours=1))
    await client.pause("emails")

    table = await run_cli(running.target, "stats", "emails")
    as_json = await run_cli(running.target, "--json", "stats")

    assert table.code == 0, table.stderr
    (row,) = [line for line in table.stdout.splitlines() if "emails" in line]
    cells = row.split()
    # pending, scheduled, leased, dead; enqueued, succeeded, failed
    assert cells[:8] == ["emails", "3", "1", "0", "0", "4", "0", "0"]
    assert cells[-1] == "paused"
    assert "scheduled" in table.stdout and "lettered" in table.stdout
    assert "enqueued" in table.stdout and "failed" in table.stdout
    assert as_json.code == 0, as_json.stderr
    doc = as_json.json()
    assert isinstance(doc, dict)
    (emails,) = doc["queues"]
    assert (emails["queue"], emails["pending"], emails["scheduled"]) == ("emails", 3, 1)
    assert emails["paused"] is True and emails["oldest_pending_age_s"] >= 0
    assert (emails["enqueued_total"], emails["failed_total"]) == (4, 0)


async def test_stats_counts_failed_attempts(running: RunningBroker, client: Client) -> None:
    await dead_letters(running, client, "jobs", 2)

    table = await run_cli(running.target, "stats", "jobs")

    assert table.code == 0, table.stderr
    (row,) = [line for line in table.stdout.splitlines() if "jobs" in line]
    # pending, scheduled, leased, dead; enqueued, succeeded, failed
    assert row.split()[:8] == ["jobs", "0", "0", "0", "2", "2", "0", "2"]


async def test_empty_lists_say_so_instead_of_empty_tables(running: RunningBroker) -> None:
    dead = await run_cli(running.target, "dead", "list", "jobs")
    queues = await run_cli(running.target, "queue", "list")
    stats = await run_cli(running.target, "stats")

    assert (dead.code, dead.stdout) == (0, "no dead letters in jobs\n")
    assert (queues.code, queues.stdout) == (0, "no queues\n")
    assert (stats.code, stats.stdout) == (0, "no queues\n")


async def test_stats_watch_streams_json_lines_until_interrupted(
    running: RunningBroker, client: Client
) -> None:
    await client.enqueue("emails", "send")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskbroker.cli",
        "--target",
        running.target,
        "--json",
        "stats",
        "--watch",
        "--interval",
        "100ms",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    assert process.stdout is not None
    lines = [await asyncio.wait_for(process.stdout.readline(), 10) for _ in range(2)]
    process.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(process.communicate(), 10)

    assert process.returncode == 0, stderr.decode()
    for line in lines:
        assert json.loads(line)["queues"][0]["pending"] == 1
    assert b"Traceback" not in stderr


# --- dead letters ---------------------------------------------------------------------------


async def test_dead_list_redrive_and_delete(running: RunningBroker, client: Client) -> None:
    ids = await dead_letters(running, client, "jobs", 3)

    listed = await run_cli(running.target, "dead", "list", "jobs")
    limited = await run_cli(running.target, "--json", "dead", "list", "jobs", "--limit", "2")
    redriven = await run_cli(running.target, "dead", "redrive", "jobs", ids[0])
    deleted = await run_cli(running.target, "--json", "dead", "delete", "jobs", "--all")

    assert listed.code == 0, listed.stderr
    assert all(task_id in listed.stdout for task_id in ids)
    assert listed.stdout.count("bad input") == 3
    assert limited.code == 0, limited.stderr
    doc = limited.json()
    assert isinstance(doc, dict)
    assert [t["id"] for t in doc["tasks"]] == ids[:2]
    assert all(t["state"] == "DEAD" for t in doc["tasks"])
    assert redriven.code == 0, redriven.stderr
    assert redriven.stdout.strip() == "1 dead letter of jobs redriven"
    assert (await client.get_task(ids[0])).state is TaskState.PENDING
    assert deleted.code == 0, deleted.stderr
    assert deleted.json() == {"queue": "jobs", "deleted": 2}
    assert [t async for t in client.dead_letters("jobs")] == []


async def test_dead_redrive_of_ids_gives_each_skipped_id_its_reason(
    running: RunningBroker, client: Client
) -> None:
    (dead_id,) = await dead_letters(running, client, "jobs", 1)
    pending_id = await client.enqueue("jobs", "run")
    other_id = await client.enqueue("mail", "send")
    unknown_id = "jobs:01J0000000000000000000000A"

    redriven = await run_cli(
        running.target, "dead", "redrive", "jobs", dead_id, pending_id, unknown_id, other_id
    )

    assert redriven.code == 1
    assert redriven.stdout == "1 dead letter of jobs redriven\n"
    assert redriven.stderr.splitlines() == [
        f"{pending_id}: not redriven: not dead (PENDING)",
        f"{unknown_id}: not redriven: not found",
        f"{other_id}: not redriven: a task of queue mail, not jobs",
    ]
    assert (await client.get_task(dead_id)).state is TaskState.PENDING
    assert (await client.get_task(other_id)).state is TaskState.PENDING


async def test_dead_delete_with_json_lists_the_skipped_ids(
    running: RunningBroker, client: Client
) -> None:
    pending_id = await client.enqueue("jobs", "run")

    deleted = await run_cli(running.target, "--json", "dead", "delete", "jobs", pending_id)

    assert deleted.code == 1
    assert deleted.json() == {
        "queue": "jobs",
        "deleted": 0,
        "skipped": [{"id": pending_id, "reason": "not dead (PENDING)"}],
    }
    assert (await client.get_task(pending_id)).state is TaskState.PENDING


async def test_dead_redrive_needs_ids_or_all_but_not_both(running: RunningBroker) -> None:
    neither = await run_cli(running.target, "dead", "redrive", "jobs")
    both = await run_cli(running.target, "dead", "delete", "jobs", UNKNOWN_ID, "--all")

    for result in (neither, both):
        assert result.code == 2
        assert "--all" in result.stderr and "Traceback" not in result.stderr


# --- queues ---------------------------------------------------------------------------------


async def test_queue_pause_resume_and_list(running: RunningBroker, client: Client) -> None:
    await client.enqueue("emails", "send")
    await client.enqueue("sms", "send")

    paused = await run_cli(running.target, "queue", "pause", "emails")
    paused_stats = await client.stats("emails")
    resumed = await run_cli(running.target, "--json", "queue", "resume", "emails")
    listed = await run_cli(running.target, "queue", "list")
    listed_json = await run_cli(running.target, "--json", "queue", "list")

    assert (paused.code, paused.stdout.strip()) == (0, "emails paused")
    assert paused_stats[0].paused
    assert resumed.json() == {"queue": "emails", "paused": False}
    assert not (await client.stats("emails"))[0].paused
    assert listed.stdout.split() == ["emails", "sms"]
    assert listed_json.json() == {"queues": ["emails", "sms"], "paused": []}


async def test_queue_list_shows_which_queues_are_paused(
    running: RunningBroker, client: Client
) -> None:
    await client.enqueue("emails", "send")
    await client.enqueue("sms", "send")
    await client.pause("sms")

    listed = await run_cli(running.target, "queue", "list")
    listed_json = await run_cli(running.target, "--json", "queue", "list")

    assert listed.stdout.splitlines() == ["emails", "sms paused"]
    assert listed_json.json() == {"queues": ["emails", "sms"], "paused": ["sms"]}


async def test_pausing_or_resuming_an_unknown_queue_is_refused_unless_create(
    running: RunningBroker, client: Client
) -> None:
    await client.enqueue("emails", "send")

    typo = await run_cli(running.target, "queue", "pause", "emials")
    resume = await run_cli(running.target, "--json", "queue", "resume", "emials")
    known_after_typo = await client.queues()
    created = await run_cli(running.target, "queue", "pause", "emials", "--create")

    assert (typo.code, typo.stdout) == (1, "")
    assert typo.stderr.startswith("error: unknown queue 'emials' (give --create")
    assert "known queues: emails" in typo.stderr
    assert resume.code == 1 and "unknown queue 'emials'" in json.loads(resume.stderr)["error"]
    assert known_after_typo == ["emails"]
    assert (created.code, created.stdout) == (0, "emials paused\n")
    assert (await client.stats("emials"))[0].paused


# --- usage errors and failures --------------------------------------------------------------


async def test_bad_option_values_are_usage_errors_naming_the_option(
    running: RunningBroker,
) -> None:
    delay = await run_cli(running.target, "enqueue", "emails", "send", "--delay", "5 minutes")
    payload = await run_cli(running.target, "enqueue", "emails", "send", "--payload", "{oops")
    interval = await run_cli(running.target, "stats", "--watch", "--interval", "1y")

    for result, option in ((delay, "--delay"), (payload, "--payload"), (interval, "--interval")):
        assert result.code == 2, result.stderr
        assert f"Invalid value for '{option}'" in result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""


async def test_duration_options_give_their_format_in_help() -> None:
    enqueue_help = await run_cli("127.0.0.1:1", "enqueue", "--help")
    stats_help = await run_cli("127.0.0.1:1", "stats", "--help")

    for result in (enqueue_help, stats_help):
        assert result.code == 0, result.stderr
        assert "250ms, 30s, 5m, 2h, 1d" in " ".join(result.stdout.split())


async def test_unreachable_broker_is_an_error_without_traceback() -> None:
    target = f"127.0.0.1:{free_port()}"

    result = await run_cli(target, "--timeout", "2s", "stats")

    assert result.code == 1 and result.stdout == ""
    assert result.stderr.startswith(f"error: broker at {target} is unavailable")
    assert "Traceback" not in result.stderr


async def test_worker_spec_errors_are_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("value = 42\n")
    target = "127.0.0.1:1"

    no_colon = await run_cli(target, "worker", "app", cwd=tmp_path)
    no_module = await run_cli(target, "worker", "nowhere_to_be_found:worker", cwd=tmp_path)
    no_attribute = await run_cli(target, "worker", "app:worker", cwd=tmp_path)

    assert no_colon.code == 2 and "is not module:attribute" in no_colon.stderr
    assert no_module.code == 2 and "cannot import 'nowhere_to_be_found'" in no_module.stderr
    assert no_attribute.code == 2 and "has no attribute 'worker'" in no_attribute.stderr
    for result in (no_colon, no_module, no_attribute):
        assert "Traceback" not in result.stderr


WORKER_MODULE = """
from datetime import timedelta

from taskbroker._handler import TaskContext, handler
from taskbroker._worker import Worker


@handler("shout")
async def shout(ctx: TaskContext, payload: bytes) -> bytes:
    return payload.upper()


@handler("broken")
async def broken(ctx: TaskContext, payload: bytes) -> bytes:
    return undefined_name  # noqa: F821


def make(client):
    return Worker(
        client,
        queues=["words"],
        handlers=[shout, broken],
        concurrency=3,
        shutdown_grace=timedelta(seconds=1),
    )
"""
#: A log line's leading timestamp, as logging's default asctime writes it.
TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


async def test_worker_runs_a_factory_from_the_current_directory_until_sigterm(
    running: RunningBroker, client: Client, tmp_path: Path
) -> None:
    (tmp_path / "words_app.py").write_text(WORKER_MODULE)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskbroker.cli",
        "worker",
        "words_app:make",
        "--target",
        running.target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=tmp_path,
    )
    try:
        task_id = await client.enqueue("words", "shout", b"hello")
        task = await client.wait(task_id, timeout=10)
        broken_id = await client.enqueue("words", "broken", max_attempts=1)
        broken = await client.wait(broken_id, timeout=10)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)

    assert (task.state, task.result) == (TaskState.SUCCEEDED, b"HELLO")
    assert broken.state is TaskState.DEAD
    assert process.returncode == 0, stderr.decode()
    # The worker says what it runs and what each task came to, with timestamps.
    log = stderr.decode()
    starting = rf"{TIMESTAMP} INFO taskbroker.worker: worker \S+ starting: broker {running.target}"
    assert re.search(rf"{starting}, queues words, concurrency 3, handlers broken,shout\n", log)
    ack = rf"{TIMESTAMP} INFO taskbroker.worker: task {task_id} \(shout\) attempt 1: ack\n"
    assert re.search(ack, log), log
    failed = rf"{TIMESTAMP} WARNING taskbroker.worker: task {broken_id} \(broken\) attempt 1: "
    assert re.search(rf"{failed}error \(NameError: name 'undefined_name' is not defined\)", log)


async def test_log_level_option_quiets_the_worker(
    running: RunningBroker, client: Client, tmp_path: Path
) -> None:
    (tmp_path / "words_app.py").write_text(WORKER_MODULE)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "taskbroker.cli",
        "--log-level",
        "warning",
        "worker",
        "words_app:make",
        "--target",
        running.target,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
        cwd=tmp_path,
    )
    try:
        task = await client.wait(await client.enqueue("words", "shout", b"hi"), timeout=10)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)

    assert task.state is TaskState.SUCCEEDED
    assert process.returncode == 0, stderr.decode()
    assert " INFO " not in stderr.decode()


async def test_queue_settings_shows_and_changes_limits(
    running: RunningBroker, client: Client
) -> None:
    shown = await run_cli(running.target, "queue", "settings", "emails")
    changed = await run_cli(
        running.target, "--json", "queue", "settings", "emails",
        "--rate-limit", "200/50", "--per-key-max-concurrency", "3",
    )  # fmt: skip
    kept = await run_cli(running.target, "queue", "settings", "emails", "--max-concurrency", "9")
    off = await run_cli(
        running.target, "--json", "queue", "settings", "emails", "--rate-limit", "off"
    )
    bad = await run_cli(running.target, "queue", "settings", "emails", "--rate-limit", "-5")
    typo = await run_cli(running.target, "queue", "settings", "emails", "--rate-limit", "fast")

    assert (shown.code, shown.stdout.splitlines()) == (0, [
        "rate_limit: off", "max_concurrency: off", "enqueue_rate_limit: off",
        "per_key_max_concurrency: off", "per_key_rate_limit: off", "priority_aging: off",
    ])  # fmt: skip
    assert changed.json() == {
        "queue": "emails", "rate_limit": {"per_second": 200.0, "burst": 50},
        "max_concurrency": 0, "enqueue_rate_limit": None, "per_key_max_concurrency": 3,
        "per_key_rate_limit": None, "priority_aging": None,
    }  # fmt: skip
    assert "rate_limit: 200/s, burst 50" in kept.stdout and "max_concurrency: 9" in kept.stdout
    assert off.json() == {
        "queue": "emails", "rate_limit": None, "max_concurrency": 9,
        "enqueue_rate_limit": None, "per_key_max_concurrency": 3, "per_key_rate_limit": None,
        "priority_aging": None,
    }  # fmt: skip
    assert bad.code == 1 and "settings.rate_limit.per_second" in bad.stderr
    assert typo.code == 2 and "RATE[/BURST]" in typo.stderr
    settings = await client.queue_settings("emails")
    assert (settings.rate_limit, settings.max_concurrency) == (None, 9)
    aged = await run_cli(running.target, "--json", "queue", "settings", "emails",
                         "--priority-aging", "30s")  # fmt: skip
    assert cast("dict[str, object]", aged.json())["priority_aging"] == 30.0
    assert (await client.queue_settings("emails")).priority_aging == timedelta(seconds=30)
    stats = await run_cli(running.target, "--json", "stats", "emails")
    [queue] = cast("dict[str, list[dict[str, Any]]]", stats.json())["queues"]
    assert queue["settings"]["max_concurrency"] == 9 and queue["settings"]["priority_aging"] == 30
