"""Reaper: returns tasks whose lease expired to pending, or dead-letters them."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.queue import TaskQueue


class Reaper:
    """Expired leases → pending again (or dead letters). Idempotent: every replica runs it."""

    name = "reaper"

    def __init__(self, tasks: TaskQueue) -> None:
        self._tasks = tasks

    async def run_once(self) -> int:
        """One pass over every queue. Returns how many tasks were reclaimed."""
        return sum([await self._tasks.reclaim_expired(q) for q in await self._tasks.queues()])
