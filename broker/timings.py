"""In-process timings on the hot path: queue wait (ready → lease) and processing (lease → ack).

TaskQueue calls `leased` with every lease batch and `acked`/`nacked` with every settlement, at
up to tens of thousands of tasks a second, so the cost is a bisect and two integer additions per
task, with no locks (everything runs on the broker's event loop) and no per-task objects beyond
one dict slot for the lease's start time. The Prometheus exposition reads the counts at scrape
time (broker/web/metrics.py).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

from broker.models import LeaseBatch, SettleStatus

#: Seconds; a queue wait spans sub-millisecond pushes to hours of backlog.
WAIT_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                       60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)  # fmt: skip
#: Seconds; handlers run from milliseconds up to the 12 h lease ceiling.
PROCESSING_BUCKETS: Final = WAIT_BUCKETS
#: Seconds; unary RPCs take milliseconds, a Lease stream lives as long as its worker.
RPC_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                      2.5, 5.0, 10.0, 60.0, 300.0, 3600.0)  # fmt: skip
#: Lease start times kept per generation. Leases that are never acked here (reclaimed, released,
#: or acked through another replica) age out when a generation fills, two generations on.
MAX_TRACKED_LEASES: Final = 100_000


class Buckets:
    """A histogram as plain counters: counts[i] holds observations <= bounds[i] (and above
    bounds[i - 1]); the last count is the +Inf bucket."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs in Prometheus order, ending with +Inf."""
        out = []
        running = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), running))
        return out

    def add(self, other: Buckets) -> None:
        """Adds another histogram with the same bounds into this one."""
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.total += other.total

    def copy(self) -> Buckets:
        twin = Buckets(self.bounds)
        twin.counts = list(self.counts)
        twin.total = self.total
        return twin

    def quantile(self, q: float, since: Buckets | None = None) -> float | None:
        """The q-quantile of the observations (since an earlier copy), interpolated within its
        bucket as Prometheus's histogram_quantile does. None without observations."""
        counts = self.counts
        if since is not None:
            counts = [a - b for a, b in zip(self.counts, since.counts, strict=True)]
        total = sum(counts)
        if total <= 0:
            return None
        rank = q * total
        running = 0
        for i, n in enumerate(counts):
            if n and running + n >= rank:
                if i == len(self.bounds):  # the +Inf bucket: the highest finite bound
                    return self.bounds[-1]
                low = self.bounds[i - 1] if i else 0.0
                return low + (self.bounds[i] - low) * (rank - running) / n
            running += n
        return self.bounds[-1]


class TaskTimings:
    """Queue wait and processing time per queue, observed on this replica."""

    def __init__(self, max_tracked: int = MAX_TRACKED_LEASES) -> None:
        self.wait: dict[str, Buckets] = {}
        self.processing: dict[str, Buckets] = {}
        self._max_tracked = max_tracked
        self._started: dict[str, float] = {}  # lease id -> monotonic time the lease was taken
        self._older: dict[str, float] = {}  # the previous generation

    def leased(self, queue: str, batch: LeaseBatch) -> None:
        """Observes the wait of every task in a lease batch (Redis time of the lease minus the
        task's ready time) and remembers when each lease started."""
        if not batch.leases:
            return
        wait = self.wait.get(queue)
        if wait is None:
            wait = self.wait[queue] = Buckets(WAIT_BUCKETS)
        now_ms = batch.now_ms
        started = time.monotonic()  # one float shared by the whole batch
        tracked = self._started
        bounds, counts = wait.bounds, wait.counts
        total = 0.0
        for lease in batch.leases:  # Buckets.observe, inlined
            seconds = (now_ms - lease.task.schedule_ms) / 1000
            if seconds < 0:
                seconds = 0.0
            counts[bisect_left(bounds, seconds)] += 1
            total += seconds
            tracked[lease.lease_id] = started
        wait.total += total
        if len(tracked) > self._max_tracked:
            self._older, self._started = tracked, {}

    def acked(self, queue: str, lease_id: str, status: SettleStatus) -> None:
        """Observes lease → ack for a lease taken on this replica and acked for the first time."""
        self.acked_many(queue, (lease_id,), (status,))

    def acked_many(
        self, queue: str, lease_ids: Sequence[str], statuses: Sequence[SettleStatus]
    ) -> None:
        """`acked` for acks applied together: one clock read for them all."""
        now = time.monotonic()
        tracked, older = self._started, self._older
        processing = self.processing.get(queue)
        for lease_id, status in zip(lease_ids, statuses, strict=True):
            started = tracked.pop(lease_id, None)
            if started is None:
                started = older.pop(lease_id, None) if older else None
                if started is None:
                    continue
            if status is not SettleStatus.OK:
                continue
            if processing is None:
                processing = self.processing[queue] = Buckets(PROCESSING_BUCKETS)
            processing.observe(now - started)

    def nacked(self, lease_id: str) -> None:
        """Forgets a lease that failed: processing time counts successful attempts only."""
        self._pop(lease_id)

    def _pop(self, lease_id: str) -> float | None:
        started = self._started.pop(lease_id, None)
        if started is None and self._older:
            started = self._older.pop(lease_id, None)
        return started

    @property
    def tracked(self) -> int:
        """Lease start times held (for tests and the curious)."""
        return len(self._started) + len(self._older)
