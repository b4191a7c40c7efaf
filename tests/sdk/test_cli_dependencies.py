"""The `taskbroker` command line and task dependencies: `enqueue --depends-on` and
`--on-parent-failure`, and `task` showing a task's parents, what it waits for and its children.
Run as a real subprocess against an in-process broker."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from taskbroker import Client, ParentFailurePolicy, TaskState, chord, group
from taskbroker._models import NewTask
from tests.conftest import RunningBroker
from tests.faults.observe import eventually
from tests.sdk.test_cli import run_cli
from tests.support.lease_stream import LeaseStream

#: A well-formed id of a task that was never enqueued.
UNKNOWN_ID = "albums:01J0000000000000000000000A"


@pytest.fixture
async def client(running: RunningBroker) -> AsyncIterator[Client]:
    async with Client(running.target) as client:
        yield client


async def test_enqueue_depends_on_each_id_given_with_the_policy_given(
    running: RunningBroker, client: Client
) -> None:
    first = await client.enqueue("albums", "resize", b"1.jpg")
    second = await client.enqueue("albums", "resize", b"2.jpg")

    result = await run_cli(
        running.target,
        "enqueue",
        "albums",
        "send_album",
        "--depends-on",
        first,
        "--depends-on",
        second,
        "--on-parent-failure",
        "run",
    )

    assert result.code == 0, result.stderr
    task = await client.get_task(result.stdout.strip())
    assert task.state is TaskState.WAITING
    assert (task.parent_ids, set(task.waiting_for)) == ((first, second), {first, second})
    assert task.parent_failure_policy is ParentFailurePolicy.RUN
    stats = await run_cli(running.target, "--json", "stats", "albums")
    (queue,) = stats.json()["queues"]  # type: ignore[index]
    assert (queue["pending"], queue["waiting"]) == (2, 1)


async def test_on_parent_failure_needs_depends_on_and_a_known_policy(
    running: RunningBroker,
) -> None:
    alone = await run_cli(running.target, "enqueue", "albums", "x", "--on-parent-failure", "run")
    unknown = await run_cli(
        running.target,
        "enqueue",
        "albums",
        "x",
        "--depends-on",
        UNKNOWN_ID,
        "--on-parent-failure",
        "sometimes",
    )

    assert alone.code == 2 and "--on-parent-failure applies to a task given --depends-on" in (
        alone.stderr
    )
    assert unknown.code == 2 and "'sometimes' is not one of" in unknown.stderr


async def test_enqueue_with_an_unknown_parent_is_an_error(running: RunningBroker) -> None:
    result = await run_cli(
        running.target,
        "enqueue",
        "albums",
        "x",
        "--depends-on",
        UNKNOWN_ID,
    )

    assert result.code == 1 and result.stderr.startswith("error: ")
    assert "Traceback" not in result.stderr


async def test_task_shows_parents_what_it_waits_for_and_children(
    running: RunningBroker, client: Client
) -> None:
    flow = await client.enqueue_workflow(
        chord(
            group(NewTask("albums", "resize", b"1.jpg"), NewTask("albums", "resize", b"2.jpg")),
            NewTask("albums", "send_album", b"ada@example.com"),
        )
    )
    one, two, album = flow.task_ids
    # The first resize succeeds; the album then waits for the second only.
    stream = await LeaseStream(running.stub).open(["albums"], credits=1)
    (delivery,) = await stream.take(1)
    await stream.ack(delivery, result=b"1-small.jpg")
    await stream.close()
    done, still = (one, two) if delivery.task.id == one else (two, one)

    async def waits_for_one() -> bool:
        return (await client.get_task(album)).waiting_for == (still,)

    await eventually(waits_for_one, 10.0, "the album waits for one resize")

    shown = await run_cli(running.target, "task", album)
    as_json = await run_cli(running.target, "--json", "task", album)
    parent = await run_cli(running.target, "--json", "task", done)

    assert shown.code == 0, shown.stderr
    assert "WAITING" in shown.stdout and "waiting for" in shown.stdout
    assert "parents" in shown.stdout and "1-small.jpg" in shown.stdout
    assert shown.stdout.count(still) == 2  # in "waiting for" and in the parents table
    doc = as_json.json()
    assert isinstance(doc, dict)
    assert (doc["state"], doc["parent_ids"], doc["waiting_for"]) == (
        "WAITING",
        [one, two],
        [still],
    )
    assert doc["parent_failure_policy"] == "cancel"
    assert doc["parent_results"] == [
        {
            "task_id": done,
            "state": "SUCCEEDED",
            "result": {"size": 11, "text": "1-small.jpg"},
            "result_omitted": False,
        }
    ]
    parent_doc = parent.json()
    assert isinstance(parent_doc, dict)
    assert (parent_doc["child_ids"], parent_doc["child_count"]) == ([album], 1)
    shown_parent = await run_cli(running.target, "task", done)
    assert "children" in shown_parent.stdout and album in shown_parent.stdout


async def test_cancel_cancels_a_task_and_its_waiting_children_follow(
    running: RunningBroker, client: Client
) -> None:
    flow = await client.enqueue_workflow(
        chord([NewTask("albums", "resize", b"1.jpg")], NewTask("albums", "send_album", b"ada"))
    )
    resize, album = flow.task_ids

    shown = await run_cli(running.target, "cancel", resize)
    again = await run_cli(running.target, "cancel", resize)

    assert shown.code == 0, shown.stderr
    assert "CANCELLED" in shown.stdout

    async def album_cancelled() -> bool:
        return (await client.get_task(album)).state is TaskState.CANCELLED

    await eventually(album_cancelled, 10.0, "the waiting album cancelled in turn")
    assert again.code != 0 and "already" in (again.stderr + again.stdout).lower()
