"""Worker faults against an in-process broker, with workers as real processes (so SIGKILL and
SIGSTOP hit only them): a worker killed -9 while holding tasks, a worker paused past its leases
(a zombie whose late acks must be refused), a poison task and a task that kills its worker.

Every test records a history (tests.support.history), drains the queue, reads every task's final
state and runs the checker: nothing lost, nothing completed twice, no settlement accepted through
a stale lease.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from taskbroker import Client
from tests.conftest import RunningBroker
from tests.faults.harness import Harness
from tests.faults.observe import (
    deliveries,
    final_tasks,
    outcome,
    queue_stats,
    settlements,
    stale_worker_changed_nothing,
    until_stats,
)
from tests.support.history import (
    Delivered,
    Enqueued,
    History,
    HistoryWriter,
    Report,
    Settled,
)
from tests.support.worker_process import CRASH_EXIT_CODE


@pytest.fixture
async def client(running: RunningBroker) -> AsyncIterator[Client]:
    async with Client(running.target) as client:
        yield client


@pytest.fixture
def harness(running: RunningBroker, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(running.target, tmp_path)
    yield harness
    harness.close()


# --- fault 1: kill -9 -------------------------------------------------------------------------

TASKS = 400
HELD = 64


async def test_a_worker_killed_while_holding_tasks_hands_them_back_at_once(
    client: Client, harness: Harness
) -> None:
    ids = await harness.enqueue(client, TASKS, "job")
    # Leases of 30 s, handlers of 60 s: the doomed worker's tasks can only come back through
    # its stream breaking.
    doomed = harness.start("doomed", {"job": "sleep"}, concurrency=HELD)
    held = {d.task_id for d in await deliveries(doomed, HELD)}
    survivor = harness.start("survivor", {"job": "ok"}, concurrency=16)
    await until_stats(
        client, lambda s: s.succeeded_total == TASKS - HELD, 20, "the rest done by the survivor"
    )
    before = await queue_stats(client)
    assert (before.leased, before.reclaimed_total) == (HELD, 0)

    doomed.kill()
    returned_s = await until_stats(
        client, lambda s: s.reclaimed_total == HELD, 10, "the killed worker's tasks returned"
    )
    assert returned_s < 1.0, f"tasks came back {returned_s:.2f}s after the kill"
    await until_stats(client, lambda s: s.succeeded_total == TASKS, 10, "all tasks done")
    assert await survivor.aterminate() == 0, survivor.log_text()

    tasks = await final_tasks(client, ids)
    assert Counter((t.id in held, outcome(t)) for t in tasks.values()) == {
        (True, ("SUCCEEDED", 2, b"survivor", ((1, "lease stream closed"),))): HELD,
        (False, ("SUCCEEDED", 1, b"survivor", ())): TASKS - HELD,
    }
    report = harness.check(tasks)
    assert (report.lost, report.unexpected, report.completed_twice, report.stale_accepted) == (
        (),
        (),
        (),
        (),
    ), report.render()
    # Each task the dead worker held ran once more; nothing else ran twice.
    assert report.duplicate_deliveries == HELD, report.render()
    assert Counter((s.kind, s.outcome) for s in settlements(survivor)) == {("ack", "ok"): TASKS}


# --- fault 2: SIGSTOP past the lease ----------------------------------------------------------

PAUSED_TASKS = 32
SHORT_LEASE = timedelta(seconds=1)


async def test_a_worker_paused_past_its_leases_has_its_late_acks_refused(
    client: Client, harness: Harness
) -> None:
    ids = await harness.enqueue(client, PAUSED_TASKS, "job")
    zombie = harness.start(
        "zombie",
        {"job": "sleep"},
        sleep=timedelta(seconds=1.5),
        lease=SHORT_LEASE,
        concurrency=PAUSED_TASKS,
    )
    await deliveries(zombie, PAUSED_TASKS)
    zombie.stop()  # no more lease extensions: its leases run out and are reclaimed
    rescuer = harness.start("rescuer", {"job": "ok"}, concurrency=16)
    await until_stats(
        client, lambda s: s.succeeded_total == PAUSED_TASKS, 15, "tasks done by the rescuer"
    )

    zombie.cont()  # its handlers finish and it acks with leases that are no longer current

    await stale_worker_changed_nothing(
        client, harness.history, zombie, rescuer, ids, PAUSED_TASKS, 10
    )


# --- fault 10: poison tasks and tasks that kill their worker ------------------------------------

GOOD_TASKS = 200
POISON_TASKS = 50
MAX_ATTEMPTS = 3


async def test_a_poison_task_is_dead_lettered_after_its_attempts_with_every_error(
    client: Client, harness: Harness
) -> None:
    good = await harness.enqueue(client, GOOD_TASKS, "job")
    poison = await harness.enqueue(client, POISON_TASKS, "poison", max_attempts=MAX_ATTEMPTS)
    worker = harness.start("worker", {"job": "ok", "poison": "fail"}, concurrency=16)
    await until_stats(
        client,
        lambda s: (s.succeeded_total, s.dead_lettered_total) == (GOOD_TASKS, POISON_TASKS),
        20,
        "good tasks done and poison tasks dead-lettered",
    )
    assert await worker.aterminate() == 0, worker.log_text()

    tasks = await final_tasks(client, good + poison)
    errors = tuple((n, f"PoisonError: attempt {n} failed") for n in range(1, MAX_ATTEMPTS + 1))
    assert Counter(outcome(t) for t in tasks.values()) == {
        ("SUCCEEDED", 1, b"worker", ()): GOOD_TASKS,
        ("DEAD", MAX_ATTEMPTS, b"", errors): POISON_TASKS,
    }
    history = harness.history()
    per_task = history.deliveries_per_task()
    assert Counter(per_task[t] for t in poison) == {MAX_ATTEMPTS: POISON_TASKS}
    assert Counter(per_task[t] for t in good) == {1: GOOD_TASKS}
    assert Counter((s.kind, s.outcome) for s in history.settlements) == {
        ("ack", "ok"): GOOD_TASKS,
        ("nack", "ok"): POISON_TASKS * MAX_ATTEMPTS,
    }
    stats = await queue_stats(client)
    assert (stats.pending, stats.scheduled, stats.leased, stats.dead) == (0, 0, 0, POISON_TASKS)
    report = harness.check(tasks)
    assert report.ok, report.render()


async def test_a_task_that_kills_its_worker_is_dead_lettered_after_its_attempts(
    client: Client, harness: Harness
) -> None:
    (task_id,) = await harness.enqueue(client, 1, "crash", max_attempts=MAX_ATTEMPTS)
    for n in range(1, MAX_ATTEMPTS + 1):
        crasher = harness.start(f"crasher-{n}", {"crash": "crash"}, concurrency=1)
        assert await crasher.wait_exit(20) == CRASH_EXIT_CODE, crasher.log_text()

    task = await client.wait(task_id, timeout=5)
    errors = tuple((n, "lease stream closed") for n in range(1, MAX_ATTEMPTS + 1))
    assert outcome(task) == ("DEAD", MAX_ATTEMPTS, b"", errors)
    # One delivery per attempt, each to the next worker: no hot loop.
    assert [(d.attempt, d.worker) for d in harness.history().deliveries] == [
        (n, f"crasher-{n}") for n in range(1, MAX_ATTEMPTS + 1)
    ]
    stats = await queue_stats(client)
    assert (stats.pending, stats.leased, stats.dead, stats.reclaimed_total) == (
        0,
        0,
        1,
        MAX_ATTEMPTS,
    )
    report = harness.check({task_id: task})
    assert report.ok, report.render()


# --- the checker itself -------------------------------------------------------------------------


def test_the_checker_finds_lost_unexpected_twice_completed_and_fenced_through_tasks(
    tmp_path: Path,
) -> None:
    """Two writers' files merged by time; a torn last line (a writer killed mid-write) skipped."""
    producer, a, b = (tmp_path / f"{name}.jsonl" for name in ("producer", "a", "b"))
    with HistoryWriter(producer) as w:
        for n, task_id in enumerate(["q:lost", "q:twice", "q:fenced", "q:retried", "q:nacked"]):
            w.write(Enqueued(n, task_id))
    with HistoryWriter(a) as w:
        w.write(Delivered(10, "q:twice", "L1", 1, "a"))
        w.write(Settled(13, "q:twice", "L1", "ack", "ok", "a"))  # after L2 was delivered
        w.write(Delivered(20, "q:fenced", "L3", 1, "a"))
        w.write(Settled(23, "q:fenced", "L3", "ack", "stale", "a"))
        w.write(Delivered(30, "q:ghost", "L5", 1, "a"))
        # A nack's retry may be recorded before the nack's answer: fenced by when it was sent.
        w.write(Delivered(50, "q:retried", "L6", 1, "a"))
        w.write(Settled(53, "q:retried", "L6", "nack", "ok", "a", sent_ns=51))
        w.write(Delivered(60, "q:nacked", "L8", 1, "a"))
        w.write(Settled(63, "q:nacked", "L8", "nack", "ok", "a", sent_ns=62))  # sent after L9
    with HistoryWriter(b) as w:
        w.write(Delivered(11, "q:twice", "L2", 2, "b"))
        w.write(Settled(12, "q:twice", "L2", "ack", "ok", "b"))
        w.write(Delivered(21, "q:fenced", "L4", 2, "b"))
        w.write(Settled(22, "q:fenced", "L4", "ack", "ok", "b"))
        w.write(Settled(24, "q:fenced", "L4", "ack", "already", "b"))
        w.write(Delivered(52, "q:retried", "L7", 2, "b"))
        w.write(Settled(54, "q:retried", "L7", "ack", "ok", "b"))
        w.write(Delivered(61, "q:nacked", "L9", 2, "b"))  # L8 expired and was reclaimed
        w.write(Settled(64, "q:nacked", "L9", "ack", "ok", "b"))
    with b.open("a") as torn:
        torn.write('{"record":"delivered","at_ns":40,"task_id":"q:tw')

    history = History.load([producer, a, b, tmp_path / "missing.jsonl"])
    assert [r.at_ns for r in history.records] == sorted(r.at_ns for r in history.records)
    done = {t: "SUCCEEDED" for t in ("q:twice", "q:fenced", "q:retried", "q:nacked")}
    report = history.check({"q:lost": "PENDING", "q:ghost": "DEAD", **done})
    assert report == Report(
        enqueued=5,
        deliveries=9,
        tasks_delivered=5,
        lost=("q:lost",),
        unexpected=("q:ghost",),
        completed_twice=("q:twice",),
        stale_accepted=("q:nacked", "q:twice"),
        duplicate_deliveries=4,
        stale_refused=1,
    )
    assert not report.ok
    rows = [re.split(r"\s{2,}", line.strip()) for line in report.render().splitlines()]
    assert ["completed twice", "1", "q:twice"] in rows
    assert ["lost", "1", "q:lost"] in rows
