"""Sweeper: the due index's backstop. Walks the queue registry, paced so every queue is visited
once per period, re-deriving its index entry and forgetting queues that hold nothing."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.queue import TaskQueue


class Sweeper:
    """Each pass sweeps the share of the registry that keeps one round per period. Passes are
    frequent and small (a few queues every 50 ms), so no request waits long behind one."""

    name = "sweeper"

    def __init__(self, tasks: TaskQueue, period_s: float, interval_s: float) -> None:
        self._tasks = tasks
        self._period_s = period_s
        self._interval_s = interval_s
        self._cursor = 0
        self._round_started: float | None = None
        self._share = 1  # queues per pass in this round

    def pause_s(self) -> float:
        """How long until the next round, once this one is done (for Periodic)."""
        if self._cursor != 0 or self._round_started is None:
            return 0.0
        return max(0.0, self._round_started + self._period_s - time.monotonic())

    async def run_once(self) -> int:
        """Returns how many queues were swept (0 while waiting for the next round)."""
        now = time.monotonic()
        if self._cursor == 0:
            if self._round_started is not None and now - self._round_started < self._period_s:
                return 0  # this round is done: the next starts one period after it began
            self._round_started = now
            total = await self._tasks.count_queues()
            self._share = max(1, math.ceil(total * self._interval_s / self._period_s))
        share = self._share
        swept = 0
        while swept < share:
            self._cursor, n = await self._tasks.sweep(self._cursor, share - swept)
            swept += n
            if self._cursor == 0:
                break
        return swept
