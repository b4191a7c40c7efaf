"""The broker's errors, one class per outcome a client must tell apart.

BrokerError
├── InvalidArgument        bad input, naming the field          → INVALID_ARGUMENT
├── TaskNotFound           no such task                         → NOT_FOUND
├── LeaseStale             the lease is not current             → FAILED_PRECONDITION (LEASE_STALE)
├── TaskFinished           the task already finished            → FAILED_PRECONDITION
├── IdempotencyConflict    key reused for a different task      → ALREADY_EXISTS
├── ScheduleNotFound       no schedule of that name             → NOT_FOUND
├── ScheduleExists         a schedule of that name exists       → ALREADY_EXISTS
├── Unauthenticated        missing or unknown credentials       → UNAUTHENTICATED
├── PermissionDenied       the principal lacks a role on a queue → PERMISSION_DENIED
│   └── ForeignLease       the lease is another principal's     → PERMISSION_DENIED (LEASE_FOREIGN)
├── LimitExceeded          too many streams, credits, ...       → RESOURCE_EXHAUSTED
│   ├── RateLimited        over a rate: retry after RetryInfo   → RESOURCE_EXHAUSTED (+ RetryInfo)
│   ├── PartlyStored       refused after the rest was stored    → RESOURCE_EXHAUSTED (no RetryInfo)
│   └── StoreFull          Redis reached its maxmemory          → RESOURCE_EXHAUSTED (STORE_FULL)
├── StoreUnavailable       Redis unreachable or failing over    → UNAVAILABLE
└── Draining               the broker is shutting down          → UNAVAILABLE (DRAINING)
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of every error the broker reports to a client. The message is safe to show."""

    reason: str = "BROKER_ERROR"


class InvalidArgument(BrokerError):
    """A request field is malformed or out of range."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class TaskNotFound(BrokerError):
    """The task does not exist (never did, or was trimmed after its retention)."""

    reason = "TASK_NOT_FOUND"

    def __init__(self, task_id: str) -> None:
        super().__init__(f"task {task_id} not found")


class LeaseStale(BrokerError):
    """The lease presented is not the task's current lease: the settlement is refused."""

    reason = "LEASE_STALE"

    def __init__(self, task_id: str) -> None:
        super().__init__(
            f"lease is no longer current for task {task_id} "
            "(it expired and was reclaimed, was released, or the task was settled or cancelled)"
        )


class TaskFinished(BrokerError):
    """The operation needs an unfinished task, and this one has finished."""

    reason = "TASK_FINISHED"

    def __init__(self, task_id: str, state_name: str) -> None:
        super().__init__(f"task {task_id} already finished ({state_name})")


class IdempotencyConflict(BrokerError):
    """An idempotency key was reused for a task with a different body."""

    reason = "IDEMPOTENCY_KEY_CONFLICT"

    def __init__(self, index: int) -> None:
        super().__init__(
            f"tasks[{index}].idempotency_key: already used for a different task within the window"
        )


class ScheduleNotFound(BrokerError):
    """No schedule has this name."""

    reason = "SCHEDULE_NOT_FOUND"

    def __init__(self, name: str) -> None:
        super().__init__(f"schedule {name!r} not found")


class ScheduleExists(BrokerError):
    """A schedule of this name exists already (names are unique across queues)."""

    reason = "SCHEDULE_EXISTS"

    def __init__(self, name: str, queue: str) -> None:
        super().__init__(f"schedule.name: a schedule {name!r} exists already (on queue {queue!r})")


class Unauthenticated(BrokerError):
    """The call carries no credential the policy knows. The message never echoes the
    credential."""

    reason = "UNAUTHENTICATED"


class PermissionDenied(BrokerError):
    """The caller is known but lacks the role the call needs on a queue; nothing was done."""

    reason = "PERMISSION_DENIED"

    def __init__(self, principal: str, role: str, queue: str, action: str) -> None:
        super().__init__(f"{principal} may not {action} on queue {queue!r}: needs role {role!r}")
        self.principal = principal
        self.role = role
        self.queue = queue
        self.action = action


class ForeignLease(PermissionDenied):
    """A current lease id presented by a principal other than the one that leased the task:
    a leaked lease id is not a capability. The holder is not named."""

    reason = "LEASE_FOREIGN"

    def __init__(self, task_id: str) -> None:
        BrokerError.__init__(
            self, f"the lease of task {task_id} belongs to another principal; nothing was done"
        )
        self.principal = ""
        self.role = ""
        self.queue = task_id.rpartition(":")[0]
        self.action = "settle or extend a lease"


class LimitExceeded(BrokerError):
    """A resource limit was reached."""

    reason = "LIMIT_EXCEEDED"


class RateLimited(LimitExceeded):
    """A client sent more request bytes than its rate allows; it may retry after a while."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EnqueueRateLimited(RateLimited):
    """An Enqueue call over its queue's enqueue_rate_limit: nothing was stored."""

    reason = "ENQUEUE_RATE_LIMITED"


class PartlyStored(LimitExceeded):
    """Part of an Enqueue call was refused for a rate (a queue over its enqueue_rate_limit)
    after the rest of it was stored: tasks of other queues, or earlier waves of a graph. It
    carries no RetryInfo, since sending the whole call again would store the rest twice."""

    reason = "ENQUEUE_PARTLY_STORED"

    def __init__(self, queue: str, refused: RateLimited, stored: int) -> None:
        super().__init__(
            f"queue {queue!r} is over its enqueue_rate_limit (retry in "
            f"{refused.retry_after_s:.3f} s) and its tasks were not stored, but the call's "
            f"other {stored} task(s) were: send only that queue's tasks again, or give every "
            "task an idempotency key so that sending the whole call again is harmless"
        )


class StoreFull(LimitExceeded):
    """Redis refused a write: it reached its maxmemory (the policy is noeviction)."""

    reason = "STORE_FULL"


class StoreUnavailable(BrokerError):
    """Redis could not be reached or refused the write; the call may be retried."""

    reason = "STORE_UNAVAILABLE"


class Draining(BrokerError):
    """The broker is shutting down and takes no new work; try another replica."""

    reason = "DRAINING"
