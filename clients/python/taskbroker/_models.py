"""Plain data the SDK takes and returns: tasks to enqueue, tasks, queue statistics and
schedules, with datetimes and timedeltas."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Literal, TypeAlias, Unpack

from taskbroker._options import TaskOptions, checked_options, warn_renamed, with_options_doc


@with_options_doc
@dataclass(frozen=True, slots=True, init=False)
class NewTask:
    """A task to enqueue with `Client.enqueue_many`, or the task a schedule enqueues at each
    tick (`Client.create_schedule`): `NewTask(queue, type, payload, **options)`, with the
    options of `Client.enqueue`.

    Attributes:
        queue: Queue name, 1-128 characters of [A-Za-z0-9_.-].
        type: Task type, which picks the worker's handler; same alphabet as queue.
        payload: Opaque bytes handed to the handler unchanged.
        **options: The options (`TaskOptions`), each an attribute (None or 0 when left out):
    """

    queue: str
    type: str
    payload: bytes = b""
    priority: int = 0
    delay: timedelta | None = None
    schedule_time: datetime | None = None
    max_attempts: int | None = None
    lease_duration: timedelta | None = None
    idempotency_key: str | None = None
    headers: Mapping[str, str] | None = None
    initial_backoff: timedelta | None = None
    max_backoff: timedelta | None = None
    group_key: str | None = None
    depends_on: Sequence[str] | None = None  # kept as a tuple
    parent_failure_policy: ParentFailurePolicy | None = None

    def __init__(
        self, queue: str, type: str, payload: bytes = b"", **options: Unpack[TaskOptions]
    ) -> None:
        checked = checked_options(options)
        given: dict[str, object] = {"queue": queue, "type": type, "payload": payload}
        given.update(checked)
        depends_on = checked.get("depends_on")
        if isinstance(depends_on, str):
            raise TypeError("depends_on takes a sequence of task ids, not one str")
        if depends_on is not None:
            given["depends_on"] = tuple(depends_on)
        if (policy := checked.get("parent_failure_policy")) is not None:
            given["parent_failure_policy"] = ParentFailurePolicy(policy)
        for spec in fields(self):  # as a frozen dataclass's own __init__ sets its fields
            object.__setattr__(self, spec.name, given.get(spec.name, spec.default))

    @property
    def retry_initial(self) -> timedelta | None:
        """Deprecated name of initial_backoff."""
        warn_renamed("retry_initial")
        return self.initial_backoff

    @property
    def retry_max(self) -> timedelta | None:
        """Deprecated name of max_backoff."""
        warn_renamed("retry_max")
        return self.max_backoff


class ParentFailurePolicy(enum.StrEnum):
    """What a task that depends on others does when one of them ends DEAD or CANCELLED
    (taskbroker.v1.ParentFailurePolicy). A str: `"cancel"`, `"run"` and `"wait"` may be given
    instead."""

    CANCEL = "cancel"  #: it is cancelled, and in turn its own waiting children (the default)
    RUN = "run"  #: it runs once every parent has ended, and sees each one's state
    WAIT = "wait"  #: a DEAD parent keeps it waiting until redriven; a CANCELLED one cancels it


#: A ParentFailurePolicy or its value as a str.
ParentFailurePolicyArg: TypeAlias = ParentFailurePolicy | Literal["cancel", "run", "wait"]


class TaskId(str):
    """A task's id as `Client.enqueue` returns it: a `str`, which also tells whether the call
    was a duplicate.

    It compares, hashes, formats and serializes (JSON, pickle) as the plain id, so code that
    treats the result as a `str` keeps working.

    ```python
    task_id = await client.enqueue("emails", "send", b"42", idempotency_key="welcome-42")
    if task_id.duplicate:
        ...  # nothing new was enqueued: this is the earlier task's id
    ```

    Attributes:
        duplicate: True when the idempotency key matched an earlier task within the broker's
            window (default 24 h): nothing new was stored, and the id is that earlier task's,
            whatever state it is in now (it may have finished or be dead). False for a new task.
    """

    duplicate: bool

    def __new__(cls, value: str, *, duplicate: bool = False) -> TaskId:
        task_id = super().__new__(cls, value)
        task_id.duplicate = duplicate
        return task_id

    def __getnewargs_ex__(self) -> tuple[tuple[str], dict[str, bool]]:
        # Pickle and copy rebuild it with its flag.
        return (str(self),), {"duplicate": self.duplicate}


class TaskState(enum.IntEnum):
    """Where a task is in its life (taskbroker.v1.TaskState)."""

    SCHEDULED = 1
    PENDING = 2
    LEASED = 3
    SUCCEEDED = 4
    DEAD = 5
    CANCELLED = 6
    WAITING = 7  #: waiting for the tasks it depends on (`depends_on`)

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
class ParentResult:
    """How one task that another depends on ended (taskbroker.v1.ParentResult).

    Attributes:
        task_id: The parent's id.
        state: SUCCEEDED, DEAD or CANCELLED.
        result: The bytes its worker acked with (b"" when it did not succeed).
        result_omitted: True when the broker left the result out: the results carried with
            one task total at most 1 MiB, in parent order. Read the parent with
            `Client.get_task` for it.
        type: The parent's task type (with its queue, what an encrypted result is bound to).
    """

    task_id: str
    state: TaskState
    result: bytes
    result_omitted: bool = False
    type: str = ""


@dataclass(frozen=True, slots=True)
class Task:
    """A task as the broker holds it. Times are timezone-aware UTC; None when unset.

    Its dependencies: `parent_ids` are the tasks it depends on, in order; `waiting_for` those
    that have not yet ended as it needs (while WAITING, what it waits for); `parent_results`
    how each parent that ended did; `child_ids` the tasks that depend on it (the first 1,000;
    `child_count` says how many).
    """

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
    group_key: str = ""  # "": the queue's default group
    parent_ids: tuple[str, ...] = ()
    waiting_for: tuple[str, ...] = ()
    parent_results: tuple[ParentResult, ...] = ()
    child_ids: tuple[str, ...] = ()
    child_count: int = 0
    parent_failure_policy: ParentFailurePolicy = ParentFailurePolicy.CANCEL


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: `per_second` tokens added each second, at most `burst` held (0 when
    asking: the rate rounded up)."""

    per_second: float
    burst: int = 0


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """A queue's limits, applied by every broker replica; None or 0 is off.

    Attributes:
        rate_limit: At most this many leases start per second; tasks over it wait.
        max_concurrency: At most this many tasks of the queue leased at once.
        enqueue_rate_limit: At most this many tasks enqueued per second; a call over it is
            refused with RESOURCE_EXHAUSTED and a retry time, and stores nothing (Client's
            enqueue calls wait and retry for up to 30 s before raising).
        per_key_max_concurrency: At most this many tasks of each group key leased at once.
        per_key_rate_limit: At most this many leases per second for each group key.
        priority_aging: A waiting task gains one priority point per this much waiting.
    """

    rate_limit: RateLimit | None = None
    max_concurrency: int = 0
    enqueue_rate_limit: RateLimit | None = None
    per_key_max_concurrency: int = 0
    per_key_rate_limit: RateLimit | None = None
    priority_aging: timedelta | None = None


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
    settings: QueueSettings = QueueSettings()
    #: With a rate_limit: the tokens in its bucket now (below 1: the next lease waits).
    rate_limit_tokens: float = 0.0
    #: Tasks WAITING for the tasks they depend on.
    waiting: int = 0


class GroupKeyState(enum.IntEnum):
    """Where a group key is in its queue's turns (taskbroker.v1.GroupKeyState). New states may
    be added."""

    UNSPECIFIED = 0  #: a state this SDK does not know yet
    READY = 1  #: has pending tasks and takes its turns
    PARKED = 2  #: at per_key_max_concurrency, until one of its leases ends
    RATE_LIMITED = 3  #: waits for its per_key_rate_limit token
    LEASED_ONLY = 4  #: nothing pending; some of its tasks are leased


@dataclass(frozen=True, slots=True)
class GroupKeyStats:
    """One group key of a queue: its pending and leased tasks and its oldest pending age."""

    group_key: str
    state: GroupKeyState
    pending: int
    leased: int
    oldest_pending_age: timedelta | None  # None: nothing pending


@dataclass(frozen=True, slots=True)
class GroupKeyPage:
    """A page of a queue's group keys, the largest backlog first, with the queue's key counts.

    One call ranks at most 10,000 keys (`scanned_keys`); the counts cover every key. Pass
    `next_page_token` to Client.group_keys for the next page ('' when this was the last).
    """

    keys: list[GroupKeyStats]
    next_page_token: str
    ready_keys: int
    parked_keys: int
    rate_limited_keys: int
    keys_with_leases: int
    scanned_keys: int


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One entry of the broker's audit trail: an admin action, a permission denial or an
    authentication failure. `outcome` is "ok" or the reason it failed or was refused."""

    time: datetime
    principal: str
    action: str
    target: str
    outcome: str
    detail: str


class CatchUp(enum.StrEnum):
    """What a schedule does with ticks missed while no broker ran (ticks found more than 5 s
    late). A str: `"skip"` and `"latest"` may be given instead."""

    SKIP = "skip"  # drop them and go on with the next tick after now
    LATEST = "latest"  # enqueue the latest missed tick once, then go on


@dataclass(frozen=True, slots=True)
class Schedule:
    """A schedule: a cron expression in a time zone, and the task enqueued at each tick.
    Times are timezone-aware UTC; None when unset.

    Attributes:
        name: Unique across the broker: 1-128 characters of [A-Za-z0-9_.-].
        cron: Five fields, six with seconds first, a nickname (`@daily`, ...) or
            `@every <duration>` (at least 1 s).
        time_zone: The IANA zone the expression is read in ("" or "UTC": UTC).
        task: The task each tick enqueues, with the broker's defaults filled in (its
            max_attempts and backoffs); its delay, if any, is added to the tick.
        jitter: Each tick's task is delayed by up to this (the same on every replica for a
            tick). None: no jitter.
        catch_up: What to do with ticks missed while no broker ran.
        paused: Paused schedules enqueue nothing; ticks while paused are never enqueued.
        next_fire_time: The next tick (None while paused).
        last_fire_time: The tick whose task was enqueued last (a trigger counts at its own
            time). None before the first.
        last_task_id: The id of the task enqueued last; "" before the first.
        create_time: When the schedule was created.
        update_time: When its definition last changed.
    """

    name: str
    cron: str
    time_zone: str
    task: NewTask
    jitter: timedelta | None
    catch_up: CatchUp
    paused: bool
    next_fire_time: datetime | None
    last_fire_time: datetime | None
    last_task_id: str
    create_time: datetime | None
    update_time: datetime | None
