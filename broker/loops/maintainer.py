"""Maintainer: reclaims expired leases, promotes due tasks and trims retention, on the queues
the due index says have work due (and no others), every reap interval."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.queue import TaskQueue


class Maintainer:
    """One pass over due queues. Idempotent: every replica runs it (claims spread the work)."""

    name = "maintainer"

    def __init__(self, tasks: TaskQueue) -> None:
        self._tasks = tasks

    async def run_once(self) -> int:
        """Returns how many tasks were reclaimed, promoted or trimmed."""
        return await self._tasks.maintain_due()
