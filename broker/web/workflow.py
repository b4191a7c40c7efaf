"""A task's place in a workflow (issue 17) for the dashboard's task view: its parents (state and
result size) and its children (state), each a link to walk on, within the caller's read roles.

A principal sees nothing of a queue it may not read: parents and children in such queues are
left out (ids carry their queue, so nothing of them is read), and so is the total of children,
which would count them. Results are shown by their size only, as payloads are.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

from broker.errors import BrokerError, TaskNotFound

if TYPE_CHECKING:
    from broker.models import Task
    from broker.queue import TaskQueue

Json = dict[str, Any]

#: Parents, and children, listed at most (a fan-in may have 1,000 parents).
MAX_LISTED: Final = 100
#: Task reads at once while listing them.
READ_CONCURRENCY: Final = 16


def _queue_of(tasks: TaskQueue, task_id: str) -> str | None:
    try:
        return tasks.ref("task_id", task_id).queue
    except BrokerError:
        return None


async def _read(tasks: TaskQueue, task_ids: Sequence[str]) -> dict[str, Task]:
    """The tasks that still exist among these (a finished one may have been trimmed)."""
    gate = asyncio.Semaphore(READ_CONCURRENCY)

    async def one(task_id: str) -> Task | None:
        async with gate:
            try:
                return await tasks.get(task_id)
            except TaskNotFound:
                return None

    found = await asyncio.gather(*(one(t) for t in task_ids))
    return {t.ref.task_id: t for t in found if t is not None}


async def workflow_json(
    tasks: TaskQueue, task: Task, may_read: Callable[[str], bool], sees_every_queue: bool
) -> Json | None:
    """{"parent_failure_policy", "parent_count", "waiting_for_count", "parents": [{"task_id",
    "queue", "state", "result_size", "awaited"}], "child_count", "children": [{"task_id",
    "queue", "state"}]}, or None for a task with neither parents nor children. A state is null
    for a task no longer stored; a result_size null when unknown."""
    links = await tasks.links(task)
    if not links.parent_ids and not links.child_count:
        return None

    def visible(ids: Sequence[str]) -> list[tuple[str, str]]:
        out = []
        for task_id in ids:
            queue = _queue_of(tasks, task_id)
            if queue is not None and may_read(queue):
                out.append((task_id, queue))
        return out

    parents, children = visible(links.parent_ids), visible(links.child_ids)
    ended = {p.task_id: p for p in links.parent_results}
    awaited = set(links.waiting_for)
    listed_parents, listed_children = parents[:MAX_LISTED], children[:MAX_LISTED]
    # A parent that ended is known from the child's record, unless its result was too large to
    # keep there; the others, and the children, are read.
    to_read = [t for t, _ in listed_parents if t not in ended or ended[t].result_omitted]
    read = await _read(tasks, to_read + [t for t, _ in listed_children])

    def parent_json(task_id: str, queue: str) -> Json:
        outcome, current = ended.get(task_id), read.get(task_id)
        state = current.state.name if current else outcome.state.name if outcome else None
        size = None
        if current is not None:
            size = len(current.result)
        elif outcome is not None and not outcome.result_omitted:
            size = len(outcome.result)
        return {
            "task_id": task_id,
            "queue": queue,
            "state": state,
            "result_size": size,
            "awaited": task_id in awaited,
        }

    def child_json(task_id: str, queue: str) -> Json:
        current = read.get(task_id)
        return {
            "task_id": task_id,
            "queue": queue,
            "state": current.state.name if current else None,
        }

    return {
        "parent_failure_policy": task.parent_policy.name if links.parent_ids else None,
        "parent_count": len(parents),
        "waiting_for_count": sum(1 for t, _ in parents if t in awaited),
        "parents": [parent_json(t, q) for t, q in listed_parents],
        # The total counts children beyond those listed (up to 1,000 are): only for a caller
        # who may read every queue, as it would count the ones hidden from others.
        "child_count": links.child_count if sees_every_queue else len(children),
        "children": [child_json(t, q) for t, q in listed_children],
    }
