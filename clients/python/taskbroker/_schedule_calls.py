"""ScheduleCalls: the Client methods for ScheduleService, mixed into Client (their own module
to keep _client.py a readable size)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import TYPE_CHECKING, Literal, TypeVar

from taskbroker._codec_hooks import decode_schedule, encode_specs
from taskbroker._convert import schedule_from_proto, schedule_to_proto, task_spec
from taskbroker._models import CatchUp, NewTask, Schedule
from taskbroker.v1 import schedule_service_pb2 as sched

if TYPE_CHECKING:
    import grpc

    from taskbroker.encryption import PayloadCodec
    from taskbroker.v1.schedule_service_pb2_grpc import ScheduleServiceAsyncStub

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

#: How `catch_up` may be given: the enum, or its value.
CatchUpArg = CatchUp | Literal["skip", "latest"]


def catch_up_policy(value: CatchUpArg) -> CatchUp:
    """The CatchUp for a value given as the enum or its string.

    Raises:
        ValueError: It is neither "skip" nor "latest".
    """
    try:
        return CatchUp(value)
    except ValueError:
        raise ValueError(f"catch_up: {value!r} is not 'skip' or 'latest'") from None


class ScheduleCalls:
    """Create, read, change, pause, resume, trigger and delete schedules: tasks the broker
    enqueues on a cron expression, each tick exactly once across every replica."""

    codec: PayloadCodec | None

    if TYPE_CHECKING:  # provided by Client

        @property
        def schedule_stub(self) -> ScheduleServiceAsyncStub: ...

        async def _unary(
            self,
            method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response],
            request: _Request,
        ) -> _Response: ...

    async def create_schedule(
        self,
        name: str,
        cron: str,
        task: NewTask,
        *,
        time_zone: str = "UTC",
        jitter: timedelta | None = None,
        catch_up: CatchUpArg = CatchUp.SKIP,
        paused: bool = False,
    ) -> Schedule:
        """Creates a schedule: `task` is enqueued at each tick of `cron`, read in `time_zone`.

        Args:
            name: Unique across the broker: 1-128 characters of [A-Za-z0-9_.-].
            cron: Five fields (minute hour day-of-month month day-of-week), six with seconds
                first, a nickname (`@hourly`, `@daily`, ...) or `@every <duration>` (such as
                `@every 90s`; at least 1 s).
            task: The task each tick enqueues. It may not set schedule_time or
                idempotency_key (each tick's task gets the key `schedule:<name>:<tick ms>`);
                a delay is added to the tick.
            time_zone: An IANA zone, such as "Europe/Berlin".
            jitter: Delay each tick's task by a pseudo-random amount up to this (at most 1
                day). None: no jitter.
            catch_up: Ticks missed while no broker ran: "skip" them, or run the "latest" once.
            paused: Create it paused: it ticks once resumed.

        Returns:
            The schedule as stored, with its next fire time.

        Raises:
            InvalidArgumentError: A bad expression, zone, jitter or task; the message names
                the field (such as `schedule.cron`) and nothing was stored.
            AlreadyExistsError: A schedule of that name exists (on any queue).
            PermissionDeniedError: The caller is not an admin of the task's queue.
            UnavailableError: The broker or its Redis could not be reached.
            ValueError: catch_up is not "skip" or "latest", or task.schedule_time is naive.
        """
        definition = self._definition(name, cron, task, time_zone, jitter, catch_up, paused)
        request = sched.CreateScheduleRequest(schedule=definition)
        response = await self._unary(self.schedule_stub.CreateSchedule, request)
        return self._decoded(response.schedule)

    async def get_schedule(self, name: str) -> Schedule:
        """Returns a schedule, with its next and last fire times and last task.

        Raises:
            ScheduleNotFoundError: No schedule has this name.
            InvalidArgumentError: The name is malformed.
            PermissionDeniedError: The caller may not read the schedule's queue.
            UnavailableError: The broker or its Redis could not be reached.
        """
        request = sched.GetScheduleRequest(name=name)
        response = await self._unary(self.schedule_stub.GetSchedule, request)
        return self._decoded(response.schedule)

    async def schedules(self, *, page_size: int = 100) -> AsyncIterator[Schedule]:
        """Yields every schedule (on queues the caller may read), by name, fetching a page
        at a time.

        Args:
            page_size: Schedules per call, 1 to 1,000.

        Raises:
            UnavailableError: The broker or its Redis could not be reached.
        """
        token = ""
        while True:
            request = sched.ListSchedulesRequest(page_size=page_size, page_token=token)
            response = await self._unary(self.schedule_stub.ListSchedules, request)
            for schedule in response.schedules:
                yield self._decoded(schedule)
            token = response.next_page_token
            if not token:
                return

    async def update_schedule(
        self,
        name: str,
        cron: str,
        task: NewTask,
        *,
        time_zone: str = "UTC",
        jitter: timedelta | None = None,
        catch_up: CatchUpArg = CatchUp.SKIP,
    ) -> Schedule:
        """Replaces a schedule's whole definition, as the UpdateSchedule RPC does (it has no
        field mask): an option left out returns to its default. Its paused state, last fire
        time and last task are kept. A changed expression or zone restarts from the next tick
        after now. To change one field, pass the others from `get_schedule`'s answer.

        Args:
            name: The schedule's name.
            cron, task, time_zone, jitter, catch_up: As in `create_schedule`; task.queue must
                be the schedule's queue (delete and create to move it).

        Returns:
            The schedule as stored.

        Raises:
            ScheduleNotFoundError: No schedule has this name.
            InvalidArgumentError: A bad expression, zone, jitter or task, or another queue;
                the message names the field and nothing was changed.
            PermissionDeniedError: The caller is not an admin of the schedule's queue.
            UnavailableError: The broker or its Redis could not be reached.
            ValueError: catch_up is not "skip" or "latest", or task.schedule_time is naive.
        """
        definition = self._definition(name, cron, task, time_zone, jitter, catch_up, False)
        request = sched.UpdateScheduleRequest(schedule=definition)
        response = await self._unary(self.schedule_stub.UpdateSchedule, request)
        return self._decoded(response.schedule)

    async def delete_schedule(self, name: str) -> None:
        """Deletes a schedule; the tasks it already enqueued are not touched.

        Raises:
            ScheduleNotFoundError: No schedule has this name.
            PermissionDeniedError: The caller is not an admin of the schedule's queue.
            UnavailableError: The broker or its Redis could not be reached.
        """
        await self._unary(self.schedule_stub.DeleteSchedule, sched.DeleteScheduleRequest(name=name))

    async def pause_schedule(self, name: str) -> Schedule:
        """Stops a schedule's ticks until it is resumed; ticks while paused are never
        enqueued. Pausing a paused schedule changes nothing.

        Raises:
            ScheduleNotFoundError: No schedule has this name.
            PermissionDeniedError: The caller is not an admin of the schedule's queue.
            UnavailableError: The broker or its Redis could not be reached.
        """
        request = sched.PauseScheduleRequest(name=name)
        response = await self._unary(self.schedule_stub.PauseSchedule, request)
        return self._decoded(response.schedule)

    async def resume_schedule(self, name: str) -> Schedule:
        """Resumes a schedule from its next tick after now (missed ticks are not enqueued).

        Raises:
            ScheduleNotFoundError: No schedule has this name.
            PermissionDeniedError: The caller is not an admin of the schedule's queue.
            UnavailableError: The broker or its Redis could not be reached.
        """
        request = sched.ResumeScheduleRequest(name=name)
        response = await self._unary(self.schedule_stub.ResumeSchedule, request)
        return self._decoded(response.schedule)

    async def trigger_schedule(self, name: str) -> str:
        """Enqueues the schedule's task now, once, outside its ticks (paused or not); the
        next tick is unchanged.

        Returns:
            The id of the task enqueued.

        Raises:
            ScheduleNotFoundError: No schedule has this name.
            PermissionDeniedError: The caller is not an admin of the schedule's queue.
            UnavailableError: The broker or its Redis could not be reached.
        """
        request = sched.TriggerScheduleRequest(name=name)
        response = await self._unary(self.schedule_stub.TriggerSchedule, request)
        return response.task_id

    def _definition(
        self,
        name: str,
        cron: str,
        task: NewTask,
        time_zone: str,
        jitter: timedelta | None,
        catch_up: CatchUpArg,
        paused: bool,
    ) -> sched.Schedule:
        template = task_spec(task)
        encode_specs(self.codec, [template])  # workers decode tick tasks as any other
        return schedule_to_proto(
            name,
            cron,
            template,
            time_zone=time_zone,
            jitter=jitter,
            catch_up=catch_up_policy(catch_up),
            paused=paused,
        )

    def _decoded(self, pb: sched.Schedule) -> Schedule:
        schedule = schedule_from_proto(pb)
        return decode_schedule(self.codec, schedule)
