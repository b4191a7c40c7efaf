"""Which role each RPC needs on which queues: one table, checked after a request is parsed and
before its method runs (docs/security.md shows the same table to users).

Every method of BrokerService, AdminService and ScheduleService has an entry: a method
without one is refused when the server is built, so a new RPC cannot ship unchecked. Calls
that name no queue (ListQueues, Stats without queues) are not refused; their services show
only the queues the principal holds a role on. The Lease stream checks its open frame and
each settlement in lease_session.py (a stream has no single request to check here).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from broker.auth.authorize import Authorizer
from broker.auth.principal import Role
from broker.ids import parse_task_id


@dataclass(frozen=True, slots=True)
class Rule:
    """One of `roles` is needed on every queue `queues` finds in the request."""

    roles: tuple[Role, ...]
    action: str
    queues: Callable[[Any], Iterable[str]]

    def check(self, authorizer: Authorizer, request: Any) -> None:
        """Raises PermissionDenied, or InvalidArgument for a malformed task id."""
        authorizer.require(self.roles, self.queues(request), self.action)


def _task_queue(request: Any) -> list[str]:
    return [parse_task_id("task_id", request.task_id).queue]


def _enqueued(request: Any) -> list[str]:
    """The queues enqueued to, and those of the tasks depended on: a child receives its
    parents' results, so depending on a task needs the same role as enqueueing beside it."""
    tasks = request.tasks
    queues = dict.fromkeys([task.queue for task in tasks])  # each once, in order
    for i, task in enumerate(tasks):
        if task.depends_on:  # rare: reading the list costs more than the test
            for j, parent in enumerate(task.depends_on):
                queues[parse_task_id(f"tasks[{i}].depends_on[{j}]", parent).queue] = None
    return list(queues)


def _named(request: Any) -> list[str]:
    return [request.queue]


def _stats_queues(request: Any) -> list[str]:
    return list(request.queues)  # none named: a page of the permitted queues


def _none(request: Any) -> list[str]:
    return []


def _template_queue(request: Any) -> list[str]:
    return [request.schedule.task_template.queue]


def _every_queue(request: Any) -> list[str]:
    return ["*"]  # the trail spans every queue: admin granted on "*" itself


PRODUCE, CONSUME, READ, ADMIN = Role.PRODUCE, Role.CONSUME, Role.READ, Role.ADMIN

#: Method name ("Service/Method" without the package) → what it needs.
RULES: Final[dict[str, Rule]] = {
    "BrokerService/Enqueue": Rule((PRODUCE,), "enqueue", _enqueued),
    "BrokerService/Lease": Rule((CONSUME,), "lease", _none),  # lease_session.py checks
    "BrokerService/Ack": Rule((CONSUME,), "ack", _task_queue),
    "BrokerService/Nack": Rule((CONSUME,), "nack", _task_queue),
    "BrokerService/ExtendLease": Rule((CONSUME,), "extend a lease", _task_queue),
    "BrokerService/GetTask": Rule((PRODUCE, READ), "read tasks", _task_queue),
    "BrokerService/CancelTask": Rule((PRODUCE,), "cancel tasks", _task_queue),
    "BrokerService/WatchTask": Rule((PRODUCE, READ), "read tasks", _task_queue),
    "BrokerService/Stats": Rule((READ,), "read stats", _stats_queues),
    # Any role on a queue shows it; the service filters.
    "AdminService/ListQueues": Rule(tuple(Role), "list queues", _none),
    "AdminService/ListDeadTasks": Rule((READ,), "read dead letters", _named),
    "AdminService/RedriveDeadTasks": Rule((ADMIN,), "redrive dead letters", _named),
    "AdminService/DeleteDeadTasks": Rule((ADMIN,), "delete dead letters", _named),
    "AdminService/PauseQueue": Rule((ADMIN,), "pause queues", _named),
    "AdminService/ResumeQueue": Rule((ADMIN,), "resume queues", _named),
    "AdminService/GetQueueSettings": Rule((READ, ADMIN), "read queue settings", _named),
    "AdminService/UpdateQueueSettings": Rule((ADMIN,), "change queue settings", _named),
    "AdminService/ListGroupKeys": Rule((READ,), "read group keys", _named),
    "AdminService/ListAuditRecords": Rule((ADMIN,), "read the audit trail", _every_queue),
    # Calls naming a schedule are checked by schedule_service.py on the schedule's queue, once
    # its name is looked up; a create names its queue in the request.
    "ScheduleService/CreateSchedule": Rule((ADMIN,), "manage schedules", _template_queue),
    "ScheduleService/UpdateSchedule": Rule((ADMIN,), "manage schedules", _template_queue),
    "ScheduleService/GetSchedule": Rule((READ, ADMIN), "read schedules", _none),
    "ScheduleService/ListSchedules": Rule(tuple(Role), "list schedules", _none),
    "ScheduleService/DeleteSchedule": Rule((ADMIN,), "manage schedules", _none),
    "ScheduleService/PauseSchedule": Rule((ADMIN,), "manage schedules", _none),
    "ScheduleService/ResumeSchedule": Rule((ADMIN,), "manage schedules", _none),
    "ScheduleService/TriggerSchedule": Rule((ADMIN,), "manage schedules", _none),
}


def rule_for(service: str, method: str) -> Rule:
    """The rule of a method (service is the short name, e.g. "BrokerService").

    Raises:
        LookupError: the method has no rule; the server refuses to start.
    """
    try:
        return RULES[f"{service}/{method}"]
    except KeyError:
        raise LookupError(
            f"{service}/{method} has no access rule in broker/api/access.py"
        ) from None
