"""Lease keeping: extends the leases of running tasks while their handlers run.

`LeaseKeeper` extends one lease; `KeeperClock` starts each keeper when its first extension is
due, so the many tasks that finish well inside their lease cost nothing here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from taskbroker._lease_stream import Extend, LeaseStream
from taskbroker._worker_options import MIN_LEASE
from taskbroker.v1 import lease_pb2

if TYPE_CHECKING:
    from google.protobuf import timestamp_pb2

    from taskbroker._connector import Settler
    from taskbroker._handler import TaskContext

log = logging.getLogger("taskbroker.worker")


class KeptRun(Protocol):
    """What lease keeping needs of a running task."""

    delivery: lease_pb2.Delivery
    #: The stream that holds the lease now (it moves on a resume).
    origin: LeaseStream
    ctx: TaskContext
    #: When the keeper clock should start extending this lease (monotonic s).
    keeper_due_s: float

    def start_keeper(self) -> None:
        """Called by the keeper clock when the first extension is due."""


def epoch_s(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


class LeaseKeeper:
    """Extends one lease at about half its remaining length while its handler runs. A lease the
    broker no longer knows (LEASE_STALE, NOT_FOUND) cancels the task's context.

    Nothing runs until the first extension is due: `KeeperClock` starts the keeper then."""

    def __init__(self, settler: Settler, run: KeptRun, lease_s: float) -> None:
        self._settler = settler
        self._run = run
        self._lease_s = max(lease_s, MIN_LEASE.total_seconds())
        # Without a stream, retry this often rather than spin on an expired lease.
        self._floor_s = self._lease_s / 10
        self._expire_s = epoch_s(run.delivery.lease_expire_time)

    def renewed(self, expire_s: float) -> None:
        self._expire_s = expire_s

    def _remaining_s(self) -> float:
        # The expiry is on the broker's (Redis) clock: clamping to the lease length bounds skew.
        return min(max(self._expire_s - time.time(), 0.0), self._lease_s)

    def next_delay_s(self) -> float:
        return max(self._remaining_s() / 2, self._floor_s)

    async def run(self) -> None:
        """Extends now, then whenever the next extension is due, until cancelled or refused."""
        delivery = self._run.delivery
        request = Extend(
            lease_pb2.ExtendLeaseRequest(task_id=delivery.task.id, lease_id=delivery.lease_id)
        )
        while True:
            try:
                async with asyncio.timeout(max(self._remaining_s(), self._floor_s)):
                    result = await self._settler.send(self._run.origin, request)
            except TimeoutError:
                result = None  # no stream in time; the next try may find one
            if result is None:
                pass
            elif result.outcome == lease_pb2.SETTLE_OUTCOME_OK:
                self._expire_s = epoch_s(result.lease_expire_time)
            elif result.outcome in (
                lease_pb2.SETTLE_OUTCOME_LEASE_STALE,
                lease_pb2.SETTLE_OUTCOME_NOT_FOUND,
            ):
                log.warning("task %s: lease lost (%s)", delivery.task.id, result.message or "stale")
                self._run.ctx._cancel("lease lost")
                return
            elif result.outcome == lease_pb2.SETTLE_OUTCOME_INVALID_ARGUMENT:
                log.error("task %s: extension refused: %s", delivery.task.id, result.message)
                return
            await asyncio.sleep(self.next_delay_s())


class KeeperClock:
    """Starts each running task's lease keeper when its first extension is due: one sweep over
    the running tasks when the earliest is due, rather than a timer per task (at thousands of
    tasks a second, the loop's timer heap would be the worker's largest cost)."""

    def __init__(self, runs: Mapping[str, KeptRun]) -> None:
        self._runs = runs
        self._wake = asyncio.Event()
        self._next_s = math.inf  # monotonic time of the next sweep

    def track(self, run: KeptRun, due_s: float) -> None:
        run.keeper_due_s = due_s
        if due_s < self._next_s:
            self._next_s = due_s
            self._wake.set()  # to sleep until the earlier time

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            # A sweep only once something is due: fast tasks end before their keeper is due,
            # so most wake-ups (a new, earliest task) just shorten the sleep. Sweeping on each
            # cost the worker about one visit of every running task per delivery frame.
            if now >= self._next_s:
                next_s = math.inf
                for run in list(self._runs.values()):
                    if run.keeper_due_s <= now:
                        run.keeper_due_s = math.inf
                        run.start_keeper()
                    else:
                        next_s = min(next_s, run.keeper_due_s)
                self._next_s = next_s
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                timeout = None if self._next_s == math.inf else self._next_s - now
                await asyncio.wait_for(self._wake.wait(), timeout)
