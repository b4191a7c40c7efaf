"""Plain data the broker passes between layers: tasks, specs, leases and settlement outcomes."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, NamedTuple, TypeAlias


class TaskState(enum.IntEnum):
    """Where a task is in its life; values match taskbroker.v1.TaskState and the Lua scripts."""

    SCHEDULED = 1  #: waiting for its due time (a delay or a retry backoff)
    PENDING = 2  #: ready to be leased
    LEASED = 3  #: held by a worker until its lease expires
    SUCCEEDED = 4  #: acked
    DEAD = 5  #: out of attempts or dead-lettered by the worker
    CANCELLED = 6  #: cancelled before it finished
    WAITING = 7  #: waiting for its parents (TaskSpec.depends_on) to succeed


class ParentPolicy(enum.StrEnum):
    """What a WAITING task does when a parent ends DEAD or CANCELLED (ParentFailurePolicy); the
    values are what the scripts store (the task hash's `fpol`)."""

    CANCEL = "c"  #: a failed parent cancels it
    RUN = "r"  #: a failed parent counts as ended: it runs once every parent has
    WAIT = "w"  #: a DEAD parent keeps it waiting for a redrive; a CANCELLED one cancels it


FINISHED_STATES: Final = frozenset({TaskState.SUCCEEDED, TaskState.DEAD, TaskState.CANCELLED})


@dataclass(frozen=True, slots=True)
class TaskRef:
    """A task's address: its queue and its id within the queue. The public id joins them."""

    queue: str
    local_id: str

    @property
    def task_id(self) -> str:
        return f"{self.queue}:{self.local_id}"


class NewTask(NamedTuple):
    """A validated task to store; every default is already filled in. A NamedTuple, as Task:
    one is built per task enqueued, at a third of a frozen dataclass's cost."""

    ref: TaskRef
    type: str
    payload: bytes
    headers: dict[str, str]
    priority: int
    max_attempts: int
    lease_ms: int | None  # None: the worker's lease length
    initial_backoff_ms: int
    max_backoff_ms: int
    delay_ms: int | None  # None: no delay
    schedule_ms: int | None  # None: no schedule time
    idempotency_key: str | None  # None: none
    body_hash: str | None  # None: no idempotency key, nothing to compare
    group_key: str = ""  # "": the queue's default group
    parents: tuple[str, ...] = ()  # ids of the tasks it waits for (stored WAITING)
    parent_policy: ParentPolicy = ParentPolicy.CANCEL


class EnqueueOutcome(NamedTuple):
    """What happened to one enqueued task (a NamedTuple: one per task enqueued)."""

    task_id: str
    duplicate: bool


@dataclass(frozen=True, slots=True)
class AttemptError:
    """One failed attempt's error."""

    attempt: int
    message: str
    time_ms: int


class Task(NamedTuple):
    """A task as stored. A NamedTuple, not a frozen dataclass: one is built per delivery, and
    a tuple is built about five times faster (immutable all the same)."""

    ref: TaskRef
    type: str
    payload: bytes
    headers: dict[str, str]
    priority: int
    state: TaskState
    attempt: int
    max_attempts: int
    create_ms: int
    schedule_ms: int
    lease_expire_ms: int | None  # None unless leased
    finish_ms: int | None  # None until finished
    last_error: str
    errors: tuple[AttemptError, ...]
    result: bytes
    lease_ms: int | None  # None: the worker's lease length
    initial_backoff_ms: int
    max_backoff_ms: int
    lease_id: str | None = None  # None unless leased
    group_key: str = ""  # "": the queue's default group
    parent_count: int = 0  # how many tasks it depends on (TaskLinks says which)
    parent_policy: ParentPolicy = ParentPolicy.CANCEL
    has_children: bool = False  # some task depends on it


@dataclass(frozen=True, slots=True)
class ParentOutcome:
    """How one parent of a task ended (ParentResult)."""

    task_id: str
    state: TaskState
    result: bytes
    result_omitted: bool = False
    type: str = ""  # the parent's type (with its queue, what an encrypted result is bound to)


@dataclass(frozen=True, slots=True)
class TaskLinks:
    """A task's place in a workflow (issue 17): read beside the task, for tasks that have
    parents or children."""

    parent_ids: tuple[str, ...] = ()
    waiting_for: tuple[str, ...] = ()
    parent_results: tuple[ParentOutcome, ...] = ()
    child_ids: tuple[str, ...] = ()
    child_count: int = 0


class Lease(NamedTuple):
    """A task leased to a worker, fenced by a random lease id (a NamedTuple, as Task)."""

    task: Task
    lease_id: str
    expire_ms: int
    links: TaskLinks | None = None  # parents' results, for a task that has parents


#: One lease to make: (fresh lease id, lease ms for a task without its own, stream id, the
#: principal the lease is bound to or '' without a policy).
LeaseSlot: TypeAlias = tuple[str, int, str, str]


@dataclass(frozen=True, slots=True)
class LeaseBatch:
    """The result of one lease call on one queue."""

    now_ms: int
    next_due_ms: int | None  # None: nothing scheduled (nor a token due)
    paused: bool
    leases: list[Lease] = field(default_factory=list)
    #: The queue's rate_limit held tasks back: nothing more can lease before next_due_ms.
    rate_limited: bool = False
    #: Positions in leases of tasks deleted before their large payload was read (they were
    #: finished and trimmed meanwhile): nothing is delivered for them.
    gone: frozenset[int] = frozenset()


class SettleStatus(enum.Enum):
    """How a settlement (ack, nack, extension) went."""

    OK = "ok"  #: applied
    AGAIN = "again"  #: a repeat of a settlement already applied with this lease
    STALE = "stale"  #: the lease is not current: refused
    NOT_FOUND = "nf"  #: no such task
    FOREIGN = "foreign"  #: the lease is current but another principal holds it: refused


@dataclass(frozen=True, slots=True)
class AckItem:
    """One ack to apply."""

    ref: TaskRef
    lease_id: str
    result: bytes
    #: The principal presenting the lease ('' without a policy): a current lease held by
    #: another principal is refused (SettleStatus.FOREIGN).
    holder: str = ""


@dataclass(frozen=True, slots=True)
class NackItem:
    """One nack to apply."""

    ref: TaskRef
    lease_id: str
    error: str
    retry_delay_ms: int | None  # None: the task's backoff
    dead_letter: bool
    jitter: float  # uniform in [0, 1): the equal-jitter draw of the backoff (nack.lua)
    #: The principal presenting the lease ('' without a policy): a current lease held by
    #: another principal is refused (SettleStatus.FOREIGN).
    holder: str = ""


@dataclass(frozen=True, slots=True)
class HeldLease:
    """A lease as a stream holds it: the task and its lease id (to resume, detach or undo)."""

    ref: TaskRef
    lease_id: str


@dataclass(frozen=True, slots=True)
class ExtendItem:
    """One lease extension to apply."""

    ref: TaskRef
    lease_id: str
    duration_ms: int | None  # None: the length the task was leased with
    #: The principal presenting the lease ('' without a policy): a current lease held by
    #: another principal is refused (SettleStatus.FOREIGN).
    holder: str = ""


@dataclass(frozen=True, slots=True)
class SettleResult:
    """The outcome of one ack, nack or extension."""

    status: SettleStatus
    state: TaskState | None = None  # nack: where the task went
    time_ms: int | None = None  # nack: retry time (None when dead); extension: new expiry

    @property
    def expire_ms(self) -> int:
        """An extension's or a resume's new lease expiry (their scripts always give one)."""
        if self.time_ms is None:
            raise ValueError(f"a {self.status.name} settlement result without an expiry")
        return self.time_ms


class CancelStatus(enum.Enum):
    """How a cancel went (values: cancel.lua's reply)."""

    CANCELLED = "ok"  #: cancelled now
    FINISHED = "final"  #: already finished: refused
    NOT_FOUND = "nf"  #: no such task


@dataclass(frozen=True, slots=True)
class CancelResult:
    """The outcome of one cancel."""

    status: CancelStatus
    revoked_lease_id: str | None = None  # CANCELLED: the lease it revoked, if one was held
    final_state: TaskState | None = None  # FINISHED: the state the task finished in


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A token bucket: per_second tokens added, at most burst held."""

    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """A queue's limits (taskbroker.v1.QueueSettings); None / 0 is off."""

    rate_limit: RateLimit | None = None
    max_concurrency: int = 0
    enqueue_rate_limit: RateLimit | None = None
    per_key_max_concurrency: int = 0
    per_key_rate_limit: RateLimit | None = None
    priority_aging_ms: int = 0  # 0: strict priority


#: The settings an update may name (taskbroker.v1.UpdateQueueSettingsRequest.update_mask).
QUEUE_SETTING_NAMES: Final = (
    "rate_limit",
    "max_concurrency",
    "enqueue_rate_limit",
    "per_key_max_concurrency",
    "per_key_rate_limit",
    "priority_aging",
)


@dataclass(frozen=True, slots=True)
class QueueStats:
    """One queue's counts and totals."""

    queue: str
    now_ms: int
    pending: int
    scheduled: int
    leased: int
    dead: int
    paused: bool
    oldest_ready_ms: int | None  # None: nothing pending
    enqueued_total: int
    succeeded_total: int
    retried_total: int
    reclaimed_total: int
    dead_lettered_total: int
    cancelled_total: int
    failed_total: int
    settings: QueueSettings = QueueSettings()
    rate_tokens: float = 0.0  # in the rate_limit's bucket now; 0 without one
    group_keys_pending: int = 0  # group keys with pending tasks (in any of their states)
    group_keys_parked: int = 0  # of those, parked at per_key_max_concurrency
    waiting: int = 0  # WAITING for their parents


@dataclass(frozen=True, slots=True)
class DeadPage:
    """One page of dead letters."""

    tasks: list[Task]
    next_cursor: tuple[int, str] | None  # (dead time ms, local id) of the last task, if more


class GroupKeyState(enum.IntEnum):
    """Where a group key is in the turns; values match taskbroker.v1.GroupKeyState."""

    READY = 1  #: has pending tasks and takes its turns
    PARKED = 2  #: at per_key_max_concurrency: sits out until one of its leases ends
    RATE_LIMITED = 3  #: waits for its per_key_rate_limit token
    LEASED_ONLY = 4  #: nothing pending; some of its tasks are leased


@dataclass(frozen=True, slots=True)
class GroupKeyStats:
    """One group key of a queue."""

    group_key: str
    state: GroupKeyState
    pending: int
    leased: int
    oldest_ready_ms: int | None  # None: nothing pending


@dataclass(frozen=True, slots=True)
class GroupKeyPage:
    """A page of a queue's group keys, the largest backlog first, and the queue's key counts."""

    now_ms: int
    keys: list[GroupKeyStats]
    #: (pending, key) of the page's last key when another page follows.
    next_cursor: tuple[int, str] | None
    ready_keys: int  # keys taking turns
    parked_keys: int
    rate_limited_keys: int
    keys_with_leases: int
    #: Keys read to rank them. At the store's scan limit, keys beyond it may be left out.
    scanned_keys: int


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the broker learned about its Redis at startup."""

    version: str
    maxmemory_policy: str | None  # None when CONFIG is not permitted
    aof_enabled: bool
    appendfsync: str | None
    cluster: bool
    hash_value_bytes: int | None = None  # hash-max-listpack-value; None when CONFIG is refused


@dataclass(frozen=True, slots=True)
class Hint:
    """Tells the due index a queue may have work due: at an absolute Redis time, or after a
    delay from Redis's now (None: not given); the earlier of the two counts."""

    queue: str
    at_ms: int | None = None
    delay_ms: int | None = None


@dataclass(frozen=True, slots=True)
class DueEntry:
    """A queue whose time to look has come, with the index generation read with it."""

    queue: str
    gen: str


@dataclass(frozen=True, slots=True)
class Maintained:
    """What one maintenance call did to a queue."""

    queue: str
    reclaimed: int
    promoted: int
    trimmed: int
    next_due_ms: int | None  # None: nothing will come due
    empty: bool  # no task at all, not paused
    outbox: int = 0  # workflow outbox entries waiting to be moved

    @property
    def work(self) -> int:
        return self.reclaimed + self.promoted + self.trimmed


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One entry of the audit trail (broker/audit.py): who did or tried what, on what, and how
    it ended. Never a payload, a header or a credential."""

    time_ms: int
    principal: str
    action: str
    target: str
    outcome: str
    detail: str = ""
    #: The Redis stream entry id ("" before it is stored); pages continue after it.
    record_id: str = ""


@dataclass(frozen=True, slots=True)
class Wake:
    """A replica announced work on a queue (an enqueue, a retry come due, a resume)."""

    queue: str


@dataclass(frozen=True, slots=True)
class Echo:
    """This broker's enqueue, which leased in the same write, is about to wake the queue: the
    wake right after this on the subscription is that enqueue's, and its lease already looked
    (RedisStore.enqueue_and_lease)."""

    queue: str


@dataclass(frozen=True, slots=True)
class Flow:
    """A queue's workflow outbox gained entries: the outbox mover should drain it."""

    queue: str


@dataclass(frozen=True, slots=True)
class Revoke:
    """A replica cancelled a leased task: the stream holding the lease should stop its handler."""

    task_id: str
    lease_id: str
