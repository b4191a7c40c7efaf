"""proto ⇄ models: Timestamps and Durations become integer milliseconds at this border."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Final

from google.protobuf import duration_pb2, timestamp_pb2

from broker.models import (
    GroupKeyPage,
    Lease,
    ParentPolicy,
    QueueSettings,
    QueueStats,
    RateLimit,
    Task,
    TaskLinks,
)
from broker.queue import TaskRequest
from taskbroker.v1 import admin_service_pb2 as admin
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import lease_pb2, queue_settings_pb2, task_pb2


def duration_ms(d: duration_pb2.Duration) -> int:
    """A Duration in whole milliseconds (rounded up, so 1 ns is not 0); negative stays negative."""
    total_ns = d.seconds * 1_000_000_000 + d.nanos
    return -((-total_ns) // 1_000_000)


def optional_duration_ms(message: object, field: str) -> int | None:
    if not message.HasField(field):  # type: ignore[attr-defined]
        return None
    return duration_ms(getattr(message, field))


#: A Timestamp's valid range, 0001-01-01 to 9999-12-31 (google/protobuf/timestamp.proto): a
#: time stored outside it (written before enqueue bounded schedule_time) is answered clamped,
#: never as an error, and every client library can turn it into a date.
MIN_TIMESTAMP_MS = -62_135_596_800_000
MAX_TIMESTAMP_MS = 253_402_300_799_999
#: A Duration's valid range, +-10,000 years.
MAX_DURATION_MS = 315_576_000_000_000


def timestamp_ms(t: timestamp_pb2.Timestamp) -> int:
    return t.seconds * 1000 + t.nanos // 1_000_000


def to_timestamp(ms: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(**_ts(ms))


def to_duration(ms: int) -> duration_pb2.Duration:
    return duration_pb2.Duration(**_dur(ms))


def task_request(spec: task_pb2.TaskSpec) -> TaskRequest:
    """A TaskSpec as a TaskRequest. Runs for every task enqueued, so it reads only the fields
    the producer set (ListFields: one call, where reading all sixteen costs sixteen): a plain
    task sets three. A field left at its zero value is not listed; TaskRequest's defaults are
    those zero values."""
    found: dict[str, Any] = {"queue": "", "type": ""}  # required by TaskRequest, checked later
    for field, value in spec.ListFields():
        name = field.name
        if name in _AS_IS:
            found[name] = value
        elif name == "retry_policy":
            found["initial_backoff_ms"] = optional_duration_ms(value, "initial_backoff")
            found["max_backoff_ms"] = optional_duration_ms(value, "max_backoff")
        else:
            target, read = _CONVERTED[name]
            found[target] = read(value)
    return TaskRequest(**found)


#: A call's tasks are read this many payload bytes at a time, the event loop free in between:
#: reading four 1 MiB payloads in one step held every other client for up to 25 ms when the
#: copies landed on fresh memory (docs/benchmarks.md, "2026-12-06, night").
READ_SLICE_BYTES: Final = 512 * 1024


async def task_requests(specs: Sequence[task_pb2.TaskSpec]) -> list[TaskRequest]:
    """task_request for each spec, yielding to the event loop after each READ_SLICE_BYTES of
    payloads (a call of small tasks never yields)."""
    requests = []
    unyielded = 0
    for spec in specs:
        request = task_request(spec)
        requests.append(request)
        unyielded += len(request.payload)
        if unyielded >= READ_SLICE_BYTES:
            unyielded = 0
            await asyncio.sleep(0)
    return requests


def _ts(ms: int) -> dict[str, int]:
    """A Timestamp as constructor input: upb builds a sub-message from a dict about three times
    faster than from a message object, and these run for every delivery."""
    ms = min(max(ms, MIN_TIMESTAMP_MS), MAX_TIMESTAMP_MS)
    return {"seconds": ms // 1000, "nanos": (ms % 1000) * 1_000_000}


def _dur(ms: int) -> dict[str, int]:
    """A Duration as constructor input (see _ts). Durations here are never negative."""
    ms = min(max(ms, 0), MAX_DURATION_MS)
    return {"seconds": ms // 1000, "nanos": (ms % 1000) * 1_000_000}


def task_to_proto(task: Task, links: TaskLinks | None = None) -> task_pb2.Task:
    return task_pb2.Task(**_task_fields(task, links))


#: ParentFailurePolicy numbers by the stored policy.
_POLICY_NUMBERS: Final = {ParentPolicy.CANCEL: 1, ParentPolicy.RUN: 2, ParentPolicy.WAIT: 3}
#: And back: UNSPECIFIED is CANCEL.
POLICIES: Final = {0: ParentPolicy.CANCEL, **{n: p for p, n in _POLICY_NUMBERS.items()}}

#: TaskSpec fields that TaskRequest holds under the same name and type.
_AS_IS: Final = frozenset(
    {"queue", "type", "payload", "priority", "max_attempts", "idempotency_key", "group_key"}
)


#: The other TaskSpec fields (but retry_policy): TaskRequest's name, and how to read the value.
_CONVERTED: Final[dict[str, tuple[str, Callable[[Any], Any]]]] = {
    "headers": ("headers", dict),
    "delay": ("delay_ms", duration_ms),
    "schedule_time": ("schedule_ms", timestamp_ms),
    "lease_duration": ("lease_ms", duration_ms),
    "depends_on": ("depends_on", tuple),
    "depends_on_positions": ("depends_on_positions", tuple),
    "parent_failure_policy": ("parent_policy", POLICIES.get),
}


def _links_fields(fields: dict[str, Any], task: Task, links: TaskLinks | None) -> None:
    if task.parent_count:
        fields["parent_failure_policy"] = _POLICY_NUMBERS[task.parent_policy]
    if links is None:
        return
    fields["parent_ids"] = links.parent_ids
    fields["waiting_for"] = links.waiting_for
    fields["parent_results"] = [
        {
            "task_id": p.task_id,
            "state": p.state,
            "result": p.result,
            "result_omitted": p.result_omitted,
            "type": p.type,
        }
        for p in links.parent_results
    ]
    fields["child_ids"] = links.child_ids
    fields["child_count"] = links.child_count


def _task_fields(task: Task, links: TaskLinks | None = None) -> dict[str, Any]:
    """A Task as constructor input (typed Any: the stubs do not know upb takes dicts). Runs for
    every delivery, so fields at their proto3 default (no presence: never encoded) are left
    out rather than set, and values shared by most tasks come from caches."""
    ref = task.ref
    fields: dict[str, Any] = {
        "id": f"{ref.queue}:{ref.local_id}",  # TaskRef.task_id, without the property call
        "queue": ref.queue,
        "type": task.type,
        "payload": task.payload,
        "state": task.state,  # an IntEnum: upb takes it as the number
        "attempt": task.attempt,
        "max_attempts": task.max_attempts,
        "retry_policy": _retry_policy(task.initial_backoff_ms, task.max_backoff_ms),
        "create_time": _ts(task.create_ms),
    }
    if task.headers:
        fields["headers"] = task.headers
    if task.group_key:
        fields["group_key"] = task.group_key
    if task.priority:
        fields["priority"] = task.priority
    if task.last_error:
        fields["last_error"] = task.last_error
    if task.result:
        fields["result"] = task.result
    if task.schedule_ms:
        same = task.schedule_ms == task.create_ms  # a task due at once
        fields["schedule_time"] = fields["create_time"] if same else _ts(task.schedule_ms)
    if task.lease_expire_ms is not None:
        fields["lease_expire_time"] = _ts(task.lease_expire_ms)
    if task.finish_ms is not None:
        fields["finish_time"] = _ts(task.finish_ms)
    if task.lease_ms is not None:
        fields["lease_duration"] = _dur(task.lease_ms)
    if task.errors:
        fields["errors"] = [
            {"attempt": e.attempt, "message": e.message, "time": _ts(e.time_ms)}
            for e in task.errors
        ]
    if task.parent_count or links is not None:
        _links_fields(fields, task, links)
    return fields


#: RetryPolicy inputs by (initial, max) backoff ms: nearly every task has the defaults. upb
#: only reads these dicts, so one may serve many messages.
_RETRY_POLICIES: dict[tuple[int, int], dict[str, Any]] = {}


def _retry_policy(initial_ms: int, max_ms: int) -> dict[str, Any]:
    policy = _RETRY_POLICIES.get((initial_ms, max_ms))
    if policy is None:
        if len(_RETRY_POLICIES) >= 256:
            _RETRY_POLICIES.clear()
        policy = {"initial_backoff": _dur(initial_ms), "max_backoff": _dur(max_ms)}
        _RETRY_POLICIES[initial_ms, max_ms] = policy
    return policy


def _delivery_fields(lease: Lease) -> dict[str, Any]:
    fields = _task_fields(lease.task, lease.links)
    expire = fields.get("lease_expire_time")  # lease.lua sets it to the lease's expiry
    if expire is None or lease.task.lease_expire_ms != lease.expire_ms:
        expire = _ts(lease.expire_ms)
    return {"task": fields, "lease_id": lease.lease_id, "lease_expire_time": expire}


def delivery(lease: Lease) -> lease_pb2.Delivery:
    return lease_pb2.Delivery(**_delivery_fields(lease))


def deliveries(leases: Sequence[Lease]) -> bytes:
    """The encoding of a Deliveries message of these leases. Built as one message from dicts:
    a message per task, copied into the list, cost a third more."""
    items: Any = [_delivery_fields(lease) for lease in leases]
    return lease_pb2.Deliveries(deliveries=items).SerializeToString()


def stats_to_proto(s: QueueStats) -> bs.QueueStats:
    out = bs.QueueStats(
        queue=s.queue,
        pending=s.pending,
        scheduled=s.scheduled,
        leased=s.leased,
        dead=s.dead,
        paused=s.paused,
        enqueued_total=s.enqueued_total,
        succeeded_total=s.succeeded_total,
        retried_total=s.retried_total,
        reclaimed_total=s.reclaimed_total,
        dead_lettered_total=s.dead_lettered_total,
        cancelled_total=s.cancelled_total,
        failed_total=s.failed_total,
        read_time=to_timestamp(s.now_ms),
        settings=settings_to_proto(s.settings),
        rate_limit_tokens=s.rate_tokens,
        waiting=s.waiting,
    )
    if s.oldest_ready_ms is not None:
        out.oldest_pending_age.CopyFrom(to_duration(max(0, s.now_ms - s.oldest_ready_ms)))
    return out


def _rate_from_proto(message: queue_settings_pb2.QueueSettings, field: str) -> RateLimit | None:
    if not message.HasField(field):  # type: ignore[arg-type]
        return None
    limit: queue_settings_pb2.RateLimit = getattr(message, field)
    return RateLimit(limit.per_second, limit.burst)


def settings_from_proto(message: queue_settings_pb2.QueueSettings) -> QueueSettings:
    """Unchecked: queue_settings.checked_settings checks the values."""
    return QueueSettings(
        rate_limit=_rate_from_proto(message, "rate_limit"),
        max_concurrency=message.max_concurrency,
        enqueue_rate_limit=_rate_from_proto(message, "enqueue_rate_limit"),
        per_key_max_concurrency=message.per_key_max_concurrency,
        per_key_rate_limit=_rate_from_proto(message, "per_key_rate_limit"),
        priority_aging_ms=optional_duration_ms(message, "priority_aging") or 0,
    )


def _rate_to_proto(limit: RateLimit | None) -> queue_settings_pb2.RateLimit | None:
    if limit is None:
        return None
    return queue_settings_pb2.RateLimit(per_second=limit.per_second, burst=limit.burst)


def settings_to_proto(settings: QueueSettings) -> queue_settings_pb2.QueueSettings:
    return queue_settings_pb2.QueueSettings(
        rate_limit=_rate_to_proto(settings.rate_limit),
        max_concurrency=settings.max_concurrency,
        enqueue_rate_limit=_rate_to_proto(settings.enqueue_rate_limit),
        per_key_max_concurrency=settings.per_key_max_concurrency,
        per_key_rate_limit=_rate_to_proto(settings.per_key_rate_limit),
        priority_aging=to_duration(settings.priority_aging_ms)
        if settings.priority_aging_ms
        else None,
    )


def group_key_page_to_proto(
    page: GroupKeyPage, next_page_token: str
) -> admin.ListGroupKeysResponse:
    out = admin.ListGroupKeysResponse(
        next_page_token=next_page_token,
        ready_key_count=page.ready_keys,
        parked_key_count=page.parked_keys,
        rate_limited_key_count=page.rate_limited_keys,
        leasing_key_count=page.keys_with_leases,
        scanned_key_count=page.scanned_keys,
        read_time=to_timestamp(page.now_ms),
    )
    for k in page.keys:
        row = out.keys.add(
            group_key=k.group_key, state=int(k.state), pending=k.pending, leased=k.leased
        )
        if k.oldest_ready_ms is not None:
            row.oldest_pending_age.CopyFrom(to_duration(max(0, page.now_ms - k.oldest_ready_ms)))
    return out
