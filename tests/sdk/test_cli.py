"""The `taskbroker` command line, run as a real subprocess against an in-process broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

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
    ids = [await client.enqueue(queue, "run", f'{{"n":{i}}}'.encode()) for i in range(n)]
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
    assert cells[:5] == ["emails", "3", "1", "0", "0"]  # pending, scheduled, leased, dead
    assert cells[-1] == "paused"
    assert "scheduled" in table.stdout and "lettered" in table.stdout
    assert as_json.code == 0, as_json.stderr
    doc = as_json.json()
    assert isinstance(doc, dict)
    (emails,) = doc["queues"]
    assert (emails["queue"], emails["pending"], emails["scheduled"]) == ("emails", 3, 1)
    assert emails["paused"] is True and emails["oldest_pending_age_s"] >= 0


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
    assert listed_json.json() == {"queues": ["emails", "sms"]}


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


def make(client):
    return Worker(client, queues=["words"], handlers=[shout], shutdown_grace=timedelta(seconds=1))
"""


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
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(process.communicate(), 10)

    assert (task.state, task.result) == (TaskState.SUCCEEDED, b"HELLO")
    assert process.returncode == 0, stderr.decode()
