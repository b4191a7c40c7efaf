"""Plain data the SDK returns: tasks and queue statistics, with datetimes and timedeltas."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta


class TaskState(enum.IntEnum):
    """Where a task is in its life (taskbroker.v1.TaskState)."""

    SCHEDULED = 1
    PENDING = 2
    LEASED = 3
    SUCCEEDED = 4
    DEAD = 5
    CANCELLED = 6

    @property
    def finished(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED)


@dataclass(frozen=True, slots=True)
class AttemptError:
    """One failed attempt."""

    attempt: int
    message: str
    time: datetime


@dataclass(frozen=True, slots=True)
class Task:
    """A task as the broker holds it. Times are timezone-aware UTC; None when unset."""

    id: str
    queue: str
    type: str
    payload: bytes
    headers: dict[str, str]
    priority: int
    state: TaskState
    attempt: int
    max_attempts: int
    create_time: datetime | None
    schedule_time: datetime | None
    lease_expire_time: datetime | None
    finish_time: datetime | None
    last_error: str
    errors: tuple[AttemptError, ...]
    result: bytes


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue's counts and totals."""

    queue: str
    pending: int
    scheduled: int
    leased: int
    dead: int
    paused: bool
    enqueued_total: int
    succeeded_total: int
    retried_total: int
    reclaimed_total: int
    dead_lettered_total: int
    cancelled_total: int
    failed_total: int
    oldest_pending_age: timedelta | None
