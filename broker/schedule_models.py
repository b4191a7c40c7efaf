"""Schedules as plain data: what the API, the rules (schedules.py) and the store exchange."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class CatchUp(StrEnum):
    """What to do with ticks missed while no broker ran (stored by value)."""

    SKIP = "skip"
    LATEST = "latest"


class FireOutcome(StrEnum):
    """What one fire step did (fire_schedule.lua's first reply field)."""

    FIRED = "fired"  # the tick's task was stored (or its idempotency key named an earlier one)
    SKIPPED = "skipped"  # advanced past missed ticks without a task (CatchUp.SKIP)
    PAUSED = "paused"
    MOVED = "moved"  # another replica (or an update) moved the next tick first
    EARLY = "early"  # not due yet by Redis's clock
    GONE = "gone"  # deleted


@dataclass(frozen=True, slots=True)
class TaskTemplate:
    """The task each tick enqueues, validated and with the broker's defaults filled in."""

    queue: str
    type: str
    payload: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    priority: int = 0
    max_attempts: int = 1
    lease_ms: int | None = None
    initial_backoff_ms: int = 1000
    max_backoff_ms: int = 600_000
    delay_ms: int | None = None
    group_key: str = ""


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule as stored. next_ms is None while paused."""

    name: str
    cron: str
    time_zone: str
    template: TaskTemplate
    jitter_ms: int = 0
    catch_up: CatchUp = CatchUp.SKIP
    paused: bool = False
    next_ms: int | None = None
    last_tick_ms: int | None = None
    last_task_id: str = ""
    create_ms: int = 0
    update_ms: int = 0


@dataclass(frozen=True, slots=True)
class FireStep:
    """One atomic step of a schedule: check its next tick is still `expected_next_ms` (None:
    a trigger, which checks nothing), store the task of `tick_ms` (None: none) due at
    `due_ms` (None: now), and set the next tick to `new_next_ms` (None: unchanged)."""

    expected_next_ms: int | None
    new_next_ms: int | None
    tick_ms: int | None
    due_ms: int | None
    local_id: str
    idempotency_key: str
    body_hash: str


@dataclass(frozen=True, slots=True)
class FireResult:
    outcome: FireOutcome
    task_id: str | None
    now_ms: int
    next_ms: int | None
