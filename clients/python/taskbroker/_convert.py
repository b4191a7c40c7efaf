"""proto ⇄ SDK models (tasks, stats, settings, schedules): Timestamps become aware UTC
datetimes and Durations become timedeltas."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from taskbroker._models import (
    AttemptError,
    AuditRecord,
    CatchUp,
    GroupKeyPage,
    GroupKeyState,
    GroupKeyStats,
    NewTask,
    ParentFailurePolicy,
    ParentResult,
    QueueSettings,
    QueueStats,
    RateLimit,
    Schedule,
    Task,
    TaskState,
)
from taskbroker._options import TaskOptions
from taskbroker.v1 import (
    admin_service_pb2,
    broker_service_pb2,
    queue_settings_pb2,
    schedule_service_pb2,
    task_pb2,
)


def to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime as a Timestamp.

    Raises:
        ValueError: `value` is naive; the SDK never guesses a time zone.
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"datetime must be timezone-aware, got naive {value.isoformat()}")
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def from_timestamp(value: timestamp_pb2.Timestamp) -> datetime:
    """A Timestamp as an aware UTC datetime."""
    return value.ToDatetime(tzinfo=UTC)


def to_duration(value: timedelta) -> duration_pb2.Duration:
    """A timedelta as a Duration (microsecond precision, as timedelta has)."""
    out = duration_pb2.Duration()
    out.FromTimedelta(value)
    return out


def from_duration(value: duration_pb2.Duration) -> timedelta:
    """A Duration as a timedelta (nanoseconds below a microsecond are dropped)."""
    return value.ToTimedelta()


def _optional_time(present: bool, value: timestamp_pb2.Timestamp) -> datetime | None:
    return from_timestamp(value) if present else None


_POLICY_TO_PROTO = {
    ParentFailurePolicy.CANCEL: task_pb2.PARENT_FAILURE_POLICY_CANCEL,
    ParentFailurePolicy.RUN: task_pb2.PARENT_FAILURE_POLICY_RUN,
    ParentFailurePolicy.WAIT: task_pb2.PARENT_FAILURE_POLICY_WAIT,
}
_POLICY_FROM_PROTO: dict[int, ParentFailurePolicy] = {
    value: policy for policy, value in _POLICY_TO_PROTO.items()
}


def policy_from_proto(value: int) -> ParentFailurePolicy:
    """A taskbroker.v1.ParentFailurePolicy; unspecified (or one this SDK does not know) is
    CANCEL, the broker's default."""
    return _POLICY_FROM_PROTO.get(value, ParentFailurePolicy.CANCEL)


def parent_results_from_proto(
    results: Iterable[task_pb2.ParentResult],
) -> tuple[ParentResult, ...]:
    """A task's taskbroker.v1.ParentResults, in parent order."""
    if not results:  # most tasks: read once per delivery, where a generator cost 1.5 us
        return ()
    return tuple(
        ParentResult(
            task_id=r.task_id,
            state=TaskState(r.state),
            result=r.result,
            result_omitted=r.result_omitted,
            type=r.type,
        )
        for r in results
    )


def task_spec(task: NewTask) -> task_pb2.TaskSpec:
    """A NewTask as a taskbroker.v1.TaskSpec (unset options stay unset)."""
    spec = task_pb2.TaskSpec(
        queue=task.queue,
        type=task.type,
        payload=task.payload,
        headers=dict(task.headers or {}),
        priority=task.priority,
        max_attempts=task.max_attempts or 0,
        idempotency_key=task.idempotency_key or "",
        group_key=task.group_key or "",
    )
    if task.depends_on:  # set only when given: this runs for every task enqueued
        spec.depends_on.extend(task.depends_on)
    if task.parent_failure_policy is not None:
        spec.parent_failure_policy = _POLICY_TO_PROTO[task.parent_failure_policy]
    if task.delay is not None:
        spec.delay.CopyFrom(to_duration(task.delay))
    if task.schedule_time is not None:
        spec.schedule_time.CopyFrom(to_timestamp(task.schedule_time))
    if task.lease_duration is not None:
        spec.lease_duration.CopyFrom(to_duration(task.lease_duration))
    if task.initial_backoff is not None:
        spec.retry_policy.initial_backoff.CopyFrom(to_duration(task.initial_backoff))
    if task.max_backoff is not None:
        spec.retry_policy.max_backoff.CopyFrom(to_duration(task.max_backoff))
    return spec


def new_task_from_spec(pb: task_pb2.TaskSpec) -> NewTask:
    """A taskbroker.v1.TaskSpec as a NewTask (unset options stay None)."""
    options: TaskOptions = {
        "priority": pb.priority,
        "max_attempts": pb.max_attempts or None,
        "idempotency_key": pb.idempotency_key or None,
        "headers": dict(pb.headers) or None,
        "group_key": pb.group_key or None,
        "depends_on": tuple(pb.depends_on) or None,
    }
    if pb.parent_failure_policy in _POLICY_FROM_PROTO:
        options["parent_failure_policy"] = _POLICY_FROM_PROTO[pb.parent_failure_policy]
    if pb.HasField("delay"):
        options["delay"] = from_duration(pb.delay)
    if pb.HasField("schedule_time"):
        options["schedule_time"] = from_timestamp(pb.schedule_time)
    if pb.HasField("lease_duration"):
        options["lease_duration"] = from_duration(pb.lease_duration)
    if pb.retry_policy.HasField("initial_backoff"):
        options["initial_backoff"] = from_duration(pb.retry_policy.initial_backoff)
    if pb.retry_policy.HasField("max_backoff"):
        options["max_backoff"] = from_duration(pb.retry_policy.max_backoff)
    return NewTask(pb.queue, pb.type, pb.payload, **options)


def task_from_proto(pb: task_pb2.Task) -> Task:
    """A taskbroker.v1.Task as an SDK Task; unset times become None."""
    return Task(
        id=pb.id,
        queue=pb.queue,
        type=pb.type,
        payload=pb.payload,
        headers=dict(pb.headers),
        priority=pb.priority,
        state=TaskState(pb.state),
        attempt=pb.attempt,
        max_attempts=pb.max_attempts,
        create_time=_optional_time(pb.HasField("create_time"), pb.create_time),
        schedule_time=_optional_time(pb.HasField("schedule_time"), pb.schedule_time),
        lease_expire_time=_optional_time(pb.HasField("lease_expire_time"), pb.lease_expire_time),
        finish_time=_optional_time(pb.HasField("finish_time"), pb.finish_time),
        last_error=pb.last_error,
        errors=tuple(
            AttemptError(attempt=e.attempt, message=e.message, time=from_timestamp(e.time))
            for e in pb.errors
        ),
        result=pb.result,
        group_key=pb.group_key,
        parent_ids=tuple(pb.parent_ids),
        waiting_for=tuple(pb.waiting_for),
        parent_results=parent_results_from_proto(pb.parent_results),
        child_ids=tuple(pb.child_ids),
        child_count=pb.child_count,
        parent_failure_policy=policy_from_proto(pb.parent_failure_policy),
    )


def stats_from_proto(pb: broker_service_pb2.QueueStats) -> QueueStats:
    """A taskbroker.v1.QueueStats as SDK QueueStats; no pending task means no oldest age."""
    return QueueStats(
        queue=pb.queue,
        pending=pb.pending,
        scheduled=pb.scheduled,
        leased=pb.leased,
        dead=pb.dead,
        paused=pb.paused,
        enqueued_total=pb.enqueued_total,
        succeeded_total=pb.succeeded_total,
        retried_total=pb.retried_total,
        reclaimed_total=pb.reclaimed_total,
        dead_lettered_total=pb.dead_lettered_total,
        cancelled_total=pb.cancelled_total,
        failed_total=pb.failed_total,
        oldest_pending_age=(
            from_duration(pb.oldest_pending_age) if pb.HasField("oldest_pending_age") else None
        ),
        settings=settings_from_proto(pb.settings),
        rate_limit_tokens=pb.rate_limit_tokens,
        waiting=pb.waiting,
    )


def _rate_from_proto(pb: queue_settings_pb2.QueueSettings, name: str) -> RateLimit | None:
    if not pb.HasField(name):  # type: ignore[arg-type]
        return None
    limit: queue_settings_pb2.RateLimit = getattr(pb, name)
    return RateLimit(limit.per_second, limit.burst)


def settings_from_proto(pb: queue_settings_pb2.QueueSettings) -> QueueSettings:
    return QueueSettings(
        rate_limit=_rate_from_proto(pb, "rate_limit"),
        max_concurrency=pb.max_concurrency,
        enqueue_rate_limit=_rate_from_proto(pb, "enqueue_rate_limit"),
        per_key_max_concurrency=pb.per_key_max_concurrency,
        per_key_rate_limit=_rate_from_proto(pb, "per_key_rate_limit"),
        priority_aging=from_duration(pb.priority_aging) if pb.HasField("priority_aging") else None,
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
        priority_aging=(
            to_duration(settings.priority_aging) if settings.priority_aging is not None else None
        ),
    )


def audit_record_from_proto(pb: admin_service_pb2.AuditRecord) -> AuditRecord:
    return AuditRecord(
        time=from_timestamp(pb.time),
        principal=pb.principal,
        action=pb.action,
        target=pb.target,
        outcome=pb.outcome,
        detail=pb.detail,
    )


def _group_key_state(value: int) -> GroupKeyState:
    try:
        return GroupKeyState(value)
    except ValueError:  # a state added after this SDK
        return GroupKeyState.UNSPECIFIED


def group_key_page_from_proto(pb: admin_service_pb2.ListGroupKeysResponse) -> GroupKeyPage:
    return GroupKeyPage(
        keys=[
            GroupKeyStats(
                group_key=k.group_key,
                state=_group_key_state(k.state),
                pending=k.pending,
                leased=k.leased,
                oldest_pending_age=(
                    from_duration(k.oldest_pending_age)
                    if k.HasField("oldest_pending_age")
                    else None
                ),
            )
            for k in pb.keys
        ],
        next_page_token=pb.next_page_token,
        ready_keys=pb.ready_key_count,
        parked_keys=pb.parked_key_count,
        rate_limited_keys=pb.rate_limited_key_count,
        keys_with_leases=pb.leasing_key_count,
        scanned_keys=pb.scanned_key_count,
    )


_CATCH_UP_TO_PROTO = {
    CatchUp.SKIP: schedule_service_pb2.CATCH_UP_POLICY_SKIP,
    CatchUp.LATEST: schedule_service_pb2.CATCH_UP_POLICY_LATEST,
}


def schedule_to_proto(
    name: str,
    cron: str,
    template: task_pb2.TaskSpec,
    *,
    time_zone: str,
    jitter: timedelta | None,
    catch_up: CatchUp,
    paused: bool = False,
) -> schedule_service_pb2.Schedule:
    """A schedule's definition as a taskbroker.v1.Schedule (its output-only fields unset)."""
    out = schedule_service_pb2.Schedule(
        name=name,
        cron=cron,
        time_zone=time_zone,
        task_template=template,
        catch_up=_CATCH_UP_TO_PROTO[catch_up],
        paused=paused,
    )
    if jitter is not None:
        out.jitter.CopyFrom(to_duration(jitter))
    return out


def schedule_from_proto(pb: schedule_service_pb2.Schedule) -> Schedule:
    """A taskbroker.v1.Schedule as an SDK Schedule; an unspecified catch-up is SKIP (the
    broker's default)."""
    latest = pb.catch_up == schedule_service_pb2.CATCH_UP_POLICY_LATEST
    return Schedule(
        name=pb.name,
        cron=pb.cron,
        time_zone=pb.time_zone,
        task=new_task_from_spec(pb.task_template),
        jitter=from_duration(pb.jitter) if pb.HasField("jitter") else None,
        catch_up=CatchUp.LATEST if latest else CatchUp.SKIP,
        paused=pb.paused,
        next_fire_time=_optional_time(pb.HasField("next_fire_time"), pb.next_fire_time),
        last_fire_time=_optional_time(pb.HasField("last_fire_time"), pb.last_fire_time),
        last_task_id=pb.last_task_id,
        create_time=_optional_time(pb.HasField("create_time"), pb.create_time),
        update_time=_optional_time(pb.HasField("update_time"), pb.update_time),
    )
