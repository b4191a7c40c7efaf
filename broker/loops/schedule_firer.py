"""ScheduleFirer: enqueues the due ticks of schedules, several times a second, on every replica
(the fire script lets one replica store each tick; the others find it moved)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.schedules import ScheduleBook


class ScheduleFirer:
    """One pass over the schedules due by Redis's clock (none scanned that are not due)."""

    name = "schedule-firer"

    def __init__(self, book: ScheduleBook) -> None:
        self._book = book

    async def run_once(self) -> int:
        """Returns how many ticks' tasks were enqueued."""
        return await self._book.fire_due()
