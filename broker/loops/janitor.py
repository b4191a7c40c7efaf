"""Janitor: deletes finished tasks and dead letters past their retention (idempotency keys
expire by themselves through their TTL)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.queue import TaskQueue


class Janitor:
    """Trims what is past retention."""

    name = "janitor"

    def __init__(self, tasks: TaskQueue) -> None:
        self._tasks = tasks

    async def run_once(self) -> int:
        """One pass over every queue. Returns how many tasks were deleted."""
        return sum([await self._tasks.trim(q) for q in await self._tasks.queues()])
