"""Scheduler: moves due scheduled and retrying tasks to pending when no worker is leasing (the
lease script promotes them itself when one is), so Stats shows them as pending on time."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.queue import TaskQueue


class Scheduler:
    """Due scheduled tasks → pending."""

    name = "scheduler"

    def __init__(self, tasks: TaskQueue) -> None:
        self._tasks = tasks

    async def run_once(self) -> int:
        """One pass over every queue. Returns how many tasks were promoted."""
        total = 0
        for queue in await self._tasks.queues():
            count, _ = await self._tasks.promote_due(queue)
            total += count
        return total
