"""Waiting on and reading back what the fault tests observe: polls, queue stats, worker
histories and final task states. Shared by the fault test modules."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from taskbroker import Client, QueueStats, Task
from tests.support.history import Delivered, History, Report, Settled
from tests.support.worker_process import WorkerProcess

#: The queue every fault test uses.
QUEUE: Final = "jobs"
#: How often a condition is re-checked while waiting for it.
POLL_S: Final = 0.02


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str
) -> float:
    """Polls `check` (plain or async) until it holds; returns how long that took.

    Raises:
        AssertionError: It did not hold within `timeout_s`.
    """

    async def holds() -> bool:
        result = check()
        return await result if inspect.isawaitable(result) else result

    start = time.monotonic()
    while not await holds():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"not within {timeout_s}s: {what}")
        await asyncio.sleep(POLL_S)
    return time.monotonic() - start


async def queue_stats(client: Client) -> QueueStats:
    """The fault queue's stats."""
    (stats,) = await client.stats(QUEUE)
    return stats


async def until_stats(
    client: Client, holds: Callable[[QueueStats], bool], timeout_s: float, what: str
) -> float:
    """Waits until the fault queue's stats satisfy `holds`; returns how long that took."""

    async def check() -> bool:
        return holds(await queue_stats(client))

    return await eventually(check, timeout_s, what)


async def deliveries(worker: WorkerProcess, count: int, timeout_s: float = 15.0) -> list[Delivered]:
    """Waits until the worker has started `count` handlers; returns those deliveries."""

    async def check() -> bool:
        assert worker.returncode is None, worker.log_text()
        return len(History.load([worker.history]).deliveries) >= count

    await eventually(check, timeout_s, f"{count} deliveries to {worker.worker_id}")
    return History.load([worker.history]).deliveries


def settlements(worker: WorkerProcess) -> list[Settled]:
    """The settlements the worker recorded so far."""
    return History.load([worker.history]).settlements


async def final_tasks(client: Client, task_ids: Iterable[str]) -> dict[str, Task]:
    """Every task by id, as the broker holds it now."""
    tasks = await asyncio.gather(*(client.get_task(t) for t in task_ids))
    return {t.id: t for t in tasks}


def outcome(task: Task) -> tuple[str, int, bytes, tuple[tuple[int, str], ...]]:
    """What a user reads back: state, attempts, result, and every attempt's error."""
    errors = tuple((e.attempt, e.message) for e in task.errors)
    return task.state.name, task.attempt, task.result, errors


async def stale_worker_changed_nothing(
    client: Client,
    history: Callable[[], History],
    stale: WorkerProcess,
    rescuer: WorkerProcess,
    task_ids: Iterable[str],
    count: int,
    answered_within_s: float,
) -> Report:
    """Checks the end of a lost-lease fault: every one of the `count` acks the stale worker sent
    with its lost leases was refused as stale, both workers exit cleanly, and every task
    succeeded exactly once, with the rescuer's result, after one lease expiry. Returns the
    history check, for the caller's own further assertions."""

    async def stale_settled() -> bool:
        return len(settlements(stale)) >= count

    await eventually(stale_settled, answered_within_s, f"{stale.worker_id}'s acks answered")
    assert Counter((s.kind, s.outcome) for s in settlements(stale)) == {("ack", "stale"): count}
    assert await stale.aterminate() == 0, stale.log_text()
    assert await rescuer.aterminate() == 0, rescuer.log_text()
    (stale_exit,) = [e for e in history().exits if e.worker == stale.worker_id]
    assert stale_exit.stale_settlements == count

    # The stale worker changed nothing, neither by its acks nor by its stream closing.
    after = await queue_stats(client)
    assert (after.succeeded_total, after.reclaimed_total, after.leased, after.pending) == (
        count,
        count,
        0,
        0,
    )
    tasks = await final_tasks(client, task_ids)
    assert Counter(outcome(t) for t in tasks.values()) == {
        ("SUCCEEDED", 2, b"rescuer", ((1, "lease expired"),)): count
    }
    report = history().check({t.id: t.state.name for t in tasks.values()})
    assert (report.lost, report.completed_twice, report.stale_accepted) == ((), (), ()), (
        report.render()
    )
    assert report.stale_refused == count, report.render()
    return report
