"""ScheduleService: schedules by name. Managing one is an admin action on its template's queue
(every change is recorded in the audit trail); reading one takes read or admin. Calls that
name a schedule rather than a queue are checked here, once the name's queue is known
(access.py lists them as checked by this service)."""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

import grpc

from broker.api import convert
from broker.audit import AuditTrail
from broker.auth.authorize import Authorizer
from broker.auth.principal import Role
from broker.errors import InvalidArgument
from broker.page_tokens import decode_schedule_token, encode_schedule_token
from broker.schedule_models import CatchUp, Schedule
from broker.schedules import ScheduleBook, ScheduleRequest
from taskbroker.v1 import schedule_service_pb2 as sched

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

Context = grpc.aio.ServicerContext[bytes, bytes]
T = TypeVar("T")
ADMIN = (Role.ADMIN,)
READERS = (Role.READ, Role.ADMIN)

_CATCH_UP_IN = {
    sched.CATCH_UP_POLICY_UNSPECIFIED: CatchUp.SKIP,
    sched.CATCH_UP_POLICY_SKIP: CatchUp.SKIP,
    sched.CATCH_UP_POLICY_LATEST: CatchUp.LATEST,
}
_CATCH_UP_OUT = {
    CatchUp.SKIP: sched.CATCH_UP_POLICY_SKIP,
    CatchUp.LATEST: sched.CATCH_UP_POLICY_LATEST,
}


class ScheduleService:
    """The schedule RPCs: convert, check, call the ScheduleBook, convert back."""

    def __init__(self, book: ScheduleBook, authorizer: Authorizer, audit: AuditTrail) -> None:
        self._book = book
        self._authorizer = authorizer
        self._audit = audit

    async def CreateSchedule(
        self, request: sched.CreateScheduleRequest, context: Context
    ) -> sched.CreateScheduleResponse:
        wanted = schedule_request(request.schedule)
        created = await self._audit.admin_action(
            "CreateSchedule",
            _target(wanted.template.queue, wanted.name),
            lambda: self._book.create(wanted, request.schedule.paused),
            detail=f"cron={wanted.cron!r} zone={wanted.time_zone!r}",
        )
        return sched.CreateScheduleResponse(schedule=schedule_to_proto(created))

    async def GetSchedule(
        self, request: sched.GetScheduleRequest, context: Context
    ) -> sched.GetScheduleResponse:
        await self._check(request.name, READERS, "read schedules")
        return sched.GetScheduleResponse(
            schedule=schedule_to_proto(await self._book.get(request.name))
        )

    async def ListSchedules(
        self, request: sched.ListSchedulesRequest, context: Context
    ) -> sched.ListSchedulesResponse:
        found, last = await self._book.page(
            request.page_size,
            decode_schedule_token(request.page_token),
            lambda queue: self._authorizer.permitted(queue, READERS),
        )
        return sched.ListSchedulesResponse(
            schedules=[schedule_to_proto(s) for s in found],
            next_page_token=encode_schedule_token(last),
        )

    async def UpdateSchedule(
        self, request: sched.UpdateScheduleRequest, context: Context
    ) -> sched.UpdateScheduleResponse:
        wanted = schedule_request(request.schedule)
        queue = await self._check(wanted.name, ADMIN, "manage schedules")
        updated = await self._audit.admin_action(
            "UpdateSchedule",
            _target(queue, wanted.name),
            lambda: self._book.update(wanted),
            detail=f"cron={wanted.cron!r} zone={wanted.time_zone!r}",
        )
        return sched.UpdateScheduleResponse(schedule=schedule_to_proto(updated))

    async def DeleteSchedule(
        self, request: sched.DeleteScheduleRequest, context: Context
    ) -> sched.DeleteScheduleResponse:
        await self._admin("DeleteSchedule", request.name, lambda: self._book.delete(request.name))
        return sched.DeleteScheduleResponse()

    async def PauseSchedule(
        self, request: sched.PauseScheduleRequest, context: Context
    ) -> sched.PauseScheduleResponse:
        paused = await self._admin(
            "PauseSchedule", request.name, lambda: self._book.pause(request.name)
        )
        return sched.PauseScheduleResponse(schedule=schedule_to_proto(paused))

    async def ResumeSchedule(
        self, request: sched.ResumeScheduleRequest, context: Context
    ) -> sched.ResumeScheduleResponse:
        resumed = await self._admin(
            "ResumeSchedule", request.name, lambda: self._book.resume(request.name)
        )
        return sched.ResumeScheduleResponse(schedule=schedule_to_proto(resumed))

    async def TriggerSchedule(
        self, request: sched.TriggerScheduleRequest, context: Context
    ) -> sched.TriggerScheduleResponse:
        task_id = await self._admin(
            "TriggerSchedule", request.name, lambda: self._book.trigger(request.name)
        )
        return sched.TriggerScheduleResponse(task_id=task_id)

    async def _check(self, name: str, roles: tuple[Role, ...], action: str) -> str:
        """The schedule's queue, once the caller is found to hold one of roles on it."""
        queue = await self._book.queue_of(name)
        self._authorizer.require(roles, [queue], action)
        return queue

    async def _admin(self, action: str, name: str, run: Callable[[], Awaitable[T]]) -> T:
        queue = await self._check(name, ADMIN, "manage schedules")
        return await self._audit.admin_action(action, _target(queue, name), run)


def _target(queue: str, name: str) -> str:
    return f"{queue}/schedule:{name}"


def schedule_request(proto: sched.Schedule) -> ScheduleRequest:
    if proto.catch_up not in _CATCH_UP_IN:
        raise InvalidArgument("schedule.catch_up", f"unknown policy {proto.catch_up}")
    jitter = convert.optional_duration_ms(proto, "jitter")
    if jitter is not None and jitter < 0:
        raise InvalidArgument("schedule.jitter", "must not be negative")
    return ScheduleRequest(
        name=proto.name,
        cron=proto.cron,
        time_zone=proto.time_zone,
        template=convert.task_request(proto.task_template),
        jitter_ms=jitter,
        catch_up=_CATCH_UP_IN[proto.catch_up],
    )


def schedule_to_proto(s: Schedule) -> sched.Schedule:
    t = s.template
    out = sched.Schedule(
        name=s.name,
        cron=s.cron,
        time_zone=s.time_zone,
        catch_up=_CATCH_UP_OUT[s.catch_up],
        paused=s.paused,
        last_task_id=s.last_task_id,
        create_time=convert.to_timestamp(s.create_ms),
        update_time=convert.to_timestamp(s.update_ms),
    )
    spec = out.task_template
    spec.queue, spec.type, spec.payload, spec.priority = t.queue, t.type, t.payload, t.priority
    spec.headers.update(t.headers)
    spec.max_attempts = t.max_attempts
    spec.group_key = t.group_key
    if t.lease_ms is not None:
        spec.lease_duration.CopyFrom(convert.to_duration(t.lease_ms))
    if t.delay_ms is not None:
        spec.delay.CopyFrom(convert.to_duration(t.delay_ms))
    spec.retry_policy.initial_backoff.CopyFrom(convert.to_duration(t.initial_backoff_ms))
    spec.retry_policy.max_backoff.CopyFrom(convert.to_duration(t.max_backoff_ms))
    if s.jitter_ms:
        out.jitter.CopyFrom(convert.to_duration(s.jitter_ms))
    if s.next_ms is not None:
        out.next_fire_time.CopyFrom(convert.to_timestamp(s.next_ms))
    if s.last_tick_ms is not None:
        out.last_fire_time.CopyFrom(convert.to_timestamp(s.last_tick_ms))
    return out
