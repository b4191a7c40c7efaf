"""StatsSampler: the cached snapshot behind /metrics and the dashboard: the `top_n` queues with
the largest backlog (tasks held: pending, scheduled, leased, dead, waiting) and totals over all
queues, with rates computed from successive snapshots and a short history for the charts.

A snapshot is taken only when someone asks (a scrape, a dashboard poll) and the last one is
older than `max_age_s`: however many scrapers and browsers watch however many replicas, each
replica reads Redis at most once per `max_age_s`. It re-reads the top queues of the last
snapshot; every queue (the census, which picks the top queues and sums the totals) is re-read
at most once per `max_age_s` or per CENSUS_QUEUES_PER_S queues, whichever is longer, so 100,000
queues cost a pipelined read every 100 s rather than every scrape. The totals of queues outside
the top are therefore up to that old; nothing here outlives the next census.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from broker.errors import BrokerError, StoreUnavailable
from broker.models import QueueStats
from broker.timings import WAIT_BUCKETS, Buckets

if TYPE_CHECKING:
    from broker.queue import TaskQueue

#: Snapshots are reused for this long ("refreshed at most every few seconds").
MAX_AGE_S: Final = 2.0
#: Rates are taken over at least this long when older snapshots allow (less noise).
RATE_WINDOW_S: Final = 10.0
#: A reference snapshot older than this gives no rate: it would not say what happens now.
RATE_HORIZON_S: Final = 300.0
#: The census reads at most this many queues per second of its age (see the module docstring).
CENSUS_QUEUES_PER_S: Final = 1000.0
#: Queues shown by default (Settings.metrics_top_queues).
TOP_N: Final = 100
#: Chart history kept.
HISTORY_S: Final = 15 * 60.0
#: A gap between snapshots longer than this is drawn as a gap, not as an average.
HISTORY_GAP_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class QueueRates:
    """Per-second rates of one queue between two snapshots; None when not known yet."""

    enqueued_per_s: float | None
    completed_per_s: float | None  # succeeded + dead-lettered


@dataclass(frozen=True, slots=True)
class Point:
    """One point of the charts: all queues together, since the snapshot before."""

    time_ms: int
    enqueued_per_s: float | None
    completed_per_s: float | None
    wait_mean_s: float | None  # tasks leased through this replica
    wait_p95_s: float | None


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every queue's stats at one moment."""

    taken: float  # local monotonic time
    time_ms: int  # Redis time (ms) of the snapshot
    queues: list[QueueStats]  # the top_n queues by backlog, by name
    totals: QueueStats  # summed over every queue (queue ''; oldest_ready_ms: the oldest)
    queue_count: int  # every registered queue
    rates: dict[str, QueueRates]
    wait: Buckets  # this replica's queue-wait histogram, all queues, at the time

    def by_queue(self) -> dict[str, QueueStats]:
        return {s.queue: s for s in self.queues}


def _completed(s: QueueStats) -> int:
    return s.succeeded_total + s.dead_lettered_total


def _backlog(s: QueueStats) -> int:
    return s.pending + s.scheduled + s.leased + s.dead + s.waiting


def _sum(queues: list[QueueStats], now_ms: int) -> QueueStats:
    """All queues as one: counts and totals summed, the oldest pending task of any."""
    ages = [s.oldest_ready_ms for s in queues if s.oldest_ready_ms is not None]
    return QueueStats(
        queue="",
        now_ms=now_ms,
        pending=sum(s.pending for s in queues),
        scheduled=sum(s.scheduled for s in queues),
        leased=sum(s.leased for s in queues),
        dead=sum(s.dead for s in queues),
        waiting=sum(s.waiting for s in queues),
        paused=False,
        oldest_ready_ms=min(ages, default=None),
        enqueued_total=sum(s.enqueued_total for s in queues),
        succeeded_total=sum(s.succeeded_total for s in queues),
        retried_total=sum(s.retried_total for s in queues),
        reclaimed_total=sum(s.reclaimed_total for s in queues),
        dead_lettered_total=sum(s.dead_lettered_total for s in queues),
        cancelled_total=sum(s.cancelled_total for s in queues),
        failed_total=sum(s.failed_total for s in queues),
    )


def _rate(new: int, old: int, seconds: float) -> float | None:
    if new < old or seconds <= 0:  # totals went back: Redis lost them
        return None
    return (new - old) / seconds


class StatsSampler:
    """Caches stats snapshots; one refresh at a time, at most one per `max_age_s`."""

    def __init__(
        self,
        tasks: TaskQueue,
        max_age_s: float = MAX_AGE_S,
        top_n: int = TOP_N,
        wait: Callable[[], Mapping[str, Buckets]] | None = None,
    ) -> None:
        self._tasks = tasks
        #: The queue-wait histograms the chart reads: this process's, or every serving
        #: process's (broker/web/peers.py).
        self._wait = wait if wait is not None else (lambda: tasks.timings.wait)
        self._max_age_s = max_age_s
        self._top_n = top_n
        self._census: dict[str, QueueStats] = {}
        self._census_taken: float | None = None
        self._lock = asyncio.Lock()
        self._latest: Snapshot | None = None
        self._failed: tuple[float, str] | None = None  # (monotonic time, message)
        self._expired = False
        self._expired_census = False
        self._recent: deque[Snapshot] = deque()  # references for rates
        self.history: deque[Point] = deque()

    @property
    def top_n(self) -> int:
        return self._top_n

    @property
    def latest(self) -> Snapshot | None:
        """The last snapshot, unless the last refresh failed (its counts may be long stale)."""
        return None if self._failed else self._latest

    async def snapshot(self) -> Snapshot:
        """A snapshot at most `max_age_s` old.

        Raises:
            StoreUnavailable: Redis did not answer (the failure is cached for `max_age_s` too).
        """
        async with self._lock:
            now = time.monotonic()
            if self._failed and now - self._failed[0] < self._max_age_s:
                raise StoreUnavailable(self._failed[1])
            latest = self._latest
            reusable = latest and not (self._failed or self._expired)
            if reusable and latest and now - latest.taken < self._max_age_s:
                return latest
            self._expired = False
            try:
                queues = await self._read(now)
            except BrokerError as exc:
                self._failed = (time.monotonic(), str(exc))
                raise
            self._failed = None
            return self._add(queues)

    async def _read(self, now: float) -> list[QueueStats]:
        """Every queue's stats as last read: all of them when the census is due, else the
        last snapshot's top queues afresh (over the census)."""
        age = max(self._max_age_s, len(self._census) / CENSUS_QUEUES_PER_S)
        if self._census_taken is None or self._expired_census or now - self._census_taken >= age:
            self._census = {s.queue: s for s in await self._tasks.all_stats()}
            self._census_taken = now
            self._expired_census = False
        elif self._latest is not None and self._latest.queues:
            fresh = await self._tasks.stats([s.queue for s in self._latest.queues])
            self._census.update((s.queue, s) for s in fresh)
        return list(self._census.values())

    def visible_to(self, snapshot: Snapshot, visible: Callable[[str], bool]) -> Snapshot:
        """The snapshot as seen by a principal who may read only some queues: the top of
        those queues (from the census, so a small queue is not hidden behind others' big
        ones) and totals over those only."""
        queues = [s for s in self._census.values() if visible(s.queue)]
        top = sorted(queues, key=lambda q: (-_backlog(q), q.queue))[: self._top_n]
        top.sort(key=lambda q: q.queue)
        return replace(
            snapshot,
            queues=top,
            totals=_sum(queues, snapshot.time_ms),
            queue_count=len(queues),
            rates={q.queue: r for q in top if (r := snapshot.rates.get(q.queue)) is not None},
        )

    def expire(self) -> None:
        """The next snapshot is taken afresh (after an admin action changed the counts)."""
        self._expired = True
        self._expired_census = True

    def _add(self, queues: list[QueueStats]) -> Snapshot:
        taken = time.monotonic()
        time_ms = max((s.now_ms for s in queues), default=int(time.time() * 1000))
        wait = Buckets(WAIT_BUCKETS)
        for h in self._wait().values():
            wait.add(h)
        # Keep the newest snapshot at least RATE_WINDOW_S old (else the oldest) and those after.
        while len(self._recent) >= 2 and taken - self._recent[1].taken >= RATE_WINDOW_S:
            self._recent.popleft()
        reference = self._recent[0] if self._recent else None
        if reference and taken - reference.taken > RATE_HORIZON_S:
            reference = None
        top = sorted(queues, key=lambda q: (-_backlog(q), q.queue))[: self._top_n]
        top.sort(key=lambda q: q.queue)
        rates = self._rates(top, reference)
        snapshot = Snapshot(taken, time_ms, top, _sum(queues, time_ms), len(queues), rates, wait)
        if self._latest is not None:
            self._chart(self._latest, snapshot)
        self._recent.append(snapshot)
        self._latest = snapshot
        return snapshot

    @staticmethod
    def _rates(queues: list[QueueStats], reference: Snapshot | None) -> dict[str, QueueRates]:
        before = reference.by_queue() if reference else {}
        rates = {}
        for s in queues:
            old = before.get(s.queue)
            if old is None:
                rates[s.queue] = QueueRates(None, None)
                continue
            seconds = (s.now_ms - old.now_ms) / 1000
            rates[s.queue] = QueueRates(
                _rate(s.enqueued_total, old.enqueued_total, seconds),
                _rate(_completed(s), _completed(old), seconds),
            )
        return rates

    def _chart(self, old: Snapshot, new: Snapshot) -> None:
        seconds = (new.time_ms - old.time_ms) / 1000
        if seconds <= 0:
            return
        point = Point(new.time_ms, None, None, None, None)
        if seconds <= HISTORY_GAP_S:
            before = old.by_queue()
            enqueued = completed = 0
            for s in new.queues:
                prior = before.get(s.queue)
                if prior is None:  # a queue's first snapshot: everything so far, not a rate
                    continue
                enqueued += max(s.enqueued_total - prior.enqueued_total, 0)
                completed += max(_completed(s) - _completed(prior), 0)
            waits = new.wait.count - old.wait.count
            point = Point(
                new.time_ms,
                enqueued / seconds,
                completed / seconds,
                (new.wait.total - old.wait.total) / waits if waits > 0 else None,
                new.wait.quantile(0.95, since=old.wait),
            )
        self.history.append(point)
        while self.history and self.history[0].time_ms < new.time_ms - HISTORY_S * 1000:
            self.history.popleft()

    def points_since(self, since_ms: int) -> list[Point]:
        return [p for p in self.history if p.time_ms > since_ms]
