"""ScheduleBook: the rules of schedules (validation, next ticks, catch-up, jitter) over the
ScheduleStore, and the firer's pass that enqueues every due tick exactly once.

Exactly once: a replica reads a due schedule's next tick T, works out what to do, and runs one
script that checks the next tick is still T (by Redis's clock, due), stores the tick's task and
sets the next tick. Replicas that race on T find it moved and do nothing; a replica that dies
before its script leaves T due for the others. The tick's task also carries the idempotency key
"schedule:<name>:<tick ms>", so a tick is never stored twice even if an update puts T back.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

from broker.cron import Cron, parse
from broker.errors import InvalidArgument, ScheduleExists, ScheduleNotFound
from broker.ids import IdGenerator, check_name
from broker.queue import TaskQueue, TaskRequest, _hash_key
from broker.schedule_models import CatchUp, FireOutcome, FireStep, Schedule, TaskTemplate
from broker.store.schedule_store import ScheduleStore

#: A tick found more than this late was missed (no broker ran): the catch-up policy decides.
#: Later ticks within it are merely late (a slow pass, a failover) and are all enqueued.
MISSED_AFTER_MS: Final = 5000
MAX_JITTER_MS: Final = 86_400_000
#: A create's name claim older than this with no schedule written died half way: it may be
#: taken over.
STALE_CLAIM_MS: Final = 10_000
#: Due schedules taken per round of a pass, and rounds per pass.
FIRE_BATCH: Final = 100
FIRE_ROUNDS: Final = 10
MAX_PAGE: Final = 1000
DEFAULT_PAGE: Final = 100


@dataclass(frozen=True, slots=True)
class ScheduleRequest:
    """A schedule as a caller asked for it, before validation."""

    name: str
    cron: str
    time_zone: str
    template: TaskRequest
    jitter_ms: int | None = None
    catch_up: CatchUp = CatchUp.SKIP


def jitter_for(name: str, tick_ms: int, jitter_ms: int) -> int:
    """A delay in [0, jitter_ms) that every replica computes alike for a tick."""
    if jitter_ms <= 0:
        return 0
    digest = hashlib.sha256(f"{name}\0{tick_ms}".encode()).digest()
    return int.from_bytes(digest[:8], "big") * jitter_ms >> 64


def tick_key(name: str) -> str:
    """The body-hash stand-in of tick tasks (a producer reusing a tick's key conflicts)."""
    return f"schedule:{name}"


class ScheduleBook:
    """Schedules in domain terms; knows nothing of gRPC or key names."""

    def __init__(self, store: ScheduleStore, tasks: TaskQueue) -> None:
        self._store = store
        self._tasks = tasks
        self._ids = IdGenerator()

    # --- validation -------------------------------------------------------------------------

    def validate(self, request: ScheduleRequest) -> tuple[Schedule, Cron]:
        """Raises InvalidArgument naming the field (schedule.<field>)."""
        check_name("schedule.name", request.name)
        cron = parse("schedule", request.cron, request.time_zone)
        jitter = request.jitter_ms or 0
        if not 0 <= jitter <= MAX_JITTER_MS:
            raise InvalidArgument("schedule.jitter", f"must be 0 to {MAX_JITTER_MS} ms")
        t = request.template
        f = "schedule.task_template"
        if t.schedule_ms is not None:
            raise InvalidArgument(f"{f}.schedule_time", "not allowed: each tick sets its own")
        if t.idempotency_key:
            raise InvalidArgument(
                f"{f}.idempotency_key", "not allowed: each tick's task gets its own"
            )
        try:
            task = self._tasks.validate(0, t)
        except InvalidArgument as exc:
            problem = str(exc)[len(exc.field) + 2 :]
            raise InvalidArgument(exc.field.replace("tasks[0]", f, 1), problem) from None
        template = TaskTemplate(
            queue=task.ref.queue,
            type=task.type,
            payload=task.payload,
            headers=task.headers,
            priority=task.priority,
            max_attempts=task.max_attempts,
            lease_ms=task.lease_ms,
            initial_backoff_ms=task.initial_backoff_ms,
            max_backoff_ms=task.max_backoff_ms,
            delay_ms=task.delay_ms,
            group_key=task.group_key,
        )
        schedule = Schedule(
            name=request.name,
            cron=request.cron.strip(),
            time_zone=request.time_zone,
            template=template,
            jitter_ms=jitter,
            catch_up=request.catch_up,
        )
        return schedule, cron

    # --- management -------------------------------------------------------------------------

    async def create(self, request: ScheduleRequest, paused: bool = False) -> Schedule:
        """Raises InvalidArgument (nothing stored) or ScheduleExists."""
        schedule, cron = self.validate(request)
        queue = schedule.template.queue
        now = await self._store.now_ms()
        holder = await self._store.claim(schedule.name, queue, now)
        if holder is not None:
            if not await self._abandoned(schedule.name, holder, now):
                raise ScheduleExists(schedule.name, holder)
            await self._store.take_over(schedule.name, queue, now)
        next_ms = None if paused else cron.next_after(now)
        schedule = replace(schedule, paused=paused, next_ms=next_ms)
        if not await self._store.put_definition(schedule, create=True, with_next=True):
            raise ScheduleExists(schedule.name, queue)
        await self._store.settle_claim(schedule.name)
        await self._store.index(schedule.name, next_ms)
        return await self.get(schedule.name)

    async def _abandoned(self, name: str, holder: str, now: int) -> bool:
        """Whether the name's holder has no schedule and no create under way: a create or
        delete died between the registry and the schedule."""
        if await self._store.get(holder, name) is not None:
            return False
        since = await self._store.claim_since(name)
        return since is None or since < now - STALE_CLAIM_MS

    async def queue_of(self, name: str) -> str:
        """The queue a schedule's tasks go to. Raises ScheduleNotFound."""
        check_name("name", name)
        queue = await self._store.queue_of(name)
        if queue is None:
            raise ScheduleNotFound(name)
        return queue

    async def get(self, name: str) -> Schedule:
        """Raises ScheduleNotFound."""
        schedule = await self._store.get(await self.queue_of(name), name)
        if schedule is None:
            raise ScheduleNotFound(name)
        return schedule

    async def page(
        self, page_size: int, after: str, visible: Callable[[str], bool]
    ) -> tuple[list[Schedule], str]:
        """One page of schedules by name on queues `visible` allows, and the last name read
        ('' when the list ended)."""
        size = DEFAULT_PAGE if page_size <= 0 else min(page_size, MAX_PAGE)
        names = await self._store.names_after(after, size)
        queues = await self._store.queues_of(names)
        found = await asyncio.gather(
            *(self._store.get(q, n) for n, q in zip(names, queues, strict=True) if q is not None)
        )
        shown = [s for s in found if s is not None and visible(s.template.queue)]
        return shown, (names[-1] if len(names) == size else "")

    async def update(self, request: ScheduleRequest) -> Schedule:
        """Replaces the definition; paused state and history stay. Raises ScheduleNotFound,
        InvalidArgument."""
        old = await self.get(request.name)
        schedule, cron = self.validate(request)
        if schedule.template.queue != old.template.queue:
            raise InvalidArgument(
                "schedule.task_template.queue",
                f"cannot change (it is {old.template.queue!r}): delete and create the schedule",
            )
        retimed = (schedule.cron, schedule.time_zone) != (old.cron, old.time_zone)
        next_ms = None
        if retimed and not old.paused:
            next_ms = cron.next_after(await self._store.now_ms())
        schedule = replace(schedule, paused=old.paused, next_ms=next_ms)
        if not await self._store.put_definition(schedule, create=False, with_next=retimed):
            raise ScheduleNotFound(request.name)
        if retimed:
            await self._store.index(schedule.name, next_ms)
        return await self.get(request.name)

    async def delete(self, name: str) -> None:
        """Raises ScheduleNotFound. The hash goes first, the name last (a delete that dies
        half way leaves a name that a create may take over)."""
        queue = await self.queue_of(name)
        existed = await self._store.delete(queue, name)
        await self._store.release(name)
        if not existed:
            raise ScheduleNotFound(name)

    async def pause(self, name: str) -> Schedule:
        queue = await self.queue_of(name)
        if not await self._store.set_paused(queue, name, True, None):
            raise ScheduleNotFound(name)
        await self._store.index(name, None)
        return await self.get(name)

    async def resume(self, name: str) -> Schedule:
        """From the next tick after now: ticks while paused are never enqueued."""
        schedule = await self.get(name)
        cron = parse("schedule", schedule.cron, schedule.time_zone)
        next_ms = cron.next_after(await self._store.now_ms())
        if not await self._store.set_paused(schedule.template.queue, name, False, next_ms):
            raise ScheduleNotFound(name)
        await self._store.index(name, next_ms)
        return await self.get(name)

    async def trigger(self, name: str) -> str:
        """Enqueues the schedule's task now; returns its id. The next tick is unchanged."""
        schedule = await self.get(name)
        now = await self._store.now_ms()
        local_id = self._ids.new()
        delay = schedule.template.delay_ms
        result = await self._store.fire(
            schedule.template.queue,
            name,
            FireStep(
                expected_next_ms=None,
                new_next_ms=None,
                tick_ms=now,
                due_ms=now + delay if delay else None,
                local_id=local_id,
                idempotency_key=self._key(schedule, f"trigger:{local_id}"),
                body_hash=tick_key(name),
            ),
        )
        if result.outcome is FireOutcome.GONE or result.task_id is None:
            raise ScheduleNotFound(name)
        return result.task_id

    # --- firing -----------------------------------------------------------------------------

    async def fire_due(self) -> int:
        """One firer pass: every schedule whose next tick is due by Redis's clock advances
        once. Returns how many ticks' tasks were enqueued."""
        fired = 0
        for _ in range(FIRE_ROUNDS):
            now = await self._store.now_ms()
            due = await self._store.due(now, FIRE_BATCH)
            outcomes = await asyncio.gather(*(self._fire_one(name, now) for name, _ in due))
            fired += sum(outcomes)
            if len(due) < FIRE_BATCH:
                break
        return fired

    async def _fire_one(self, name: str, now: int) -> int:
        queue = await self._store.queue_of(name)
        schedule = None if queue is None else await self._store.get(queue, name)
        if schedule is None or schedule.paused or schedule.next_ms is None:
            await self._store.index(name, None)  # deleted or paused meanwhile
            return 0
        if schedule.next_ms > now:  # the index was early (another replica fired it)
            await self._store.index(name, schedule.next_ms)
            return 0
        step = self.plan(schedule, now)
        result = await self._store.fire(schedule.template.queue, name, step)
        if result.outcome in (FireOutcome.PAUSED, FireOutcome.GONE):
            await self._store.index(name, None)
        else:
            await self._store.index(name, result.next_ms)
        return 1 if result.outcome is FireOutcome.FIRED else 0

    def plan(self, schedule: Schedule, now: int) -> FireStep:
        """What to do with a schedule whose next tick is due at `now`: enqueue it (late by
        at most MISSED_AFTER_MS), or, when it was missed, apply the catch-up policy to the
        latest tick at or before now and go on after it."""
        assert schedule.next_ms is not None
        cron = parse("schedule", schedule.cron, schedule.time_zone)
        expected = schedule.next_ms
        tick = expected
        if expected < now - MISSED_AFTER_MS:
            latest = cron.latest_at_or_before(now)
            tick = expected if latest is None or latest < expected else latest
            on_time = tick >= now - MISSED_AFTER_MS
            if not on_time and schedule.catch_up is CatchUp.SKIP:
                return self._step(schedule, expected, cron.next_after(tick), None)
        return self._step(schedule, expected, cron.next_after(tick), tick)

    def _step(self, schedule: Schedule, expected: int, new_next: int, tick: int | None) -> FireStep:
        due = None
        if tick is not None:
            offset = jitter_for(schedule.name, tick, schedule.jitter_ms)
            offset += schedule.template.delay_ms or 0
            due = tick + offset if offset else None
        return FireStep(
            expected_next_ms=expected,
            new_next_ms=new_next,
            tick_ms=tick,
            due_ms=due,
            local_id=self._ids.new(),
            idempotency_key=self._key(schedule, str(tick)),
            body_hash=tick_key(schedule.name),
        )

    @staticmethod
    def _key(schedule: Schedule, suffix: str) -> str:
        """The stored (hashed) idempotency key "schedule:<name>:<suffix>" of the queue."""
        key = _hash_key(schedule.template.queue, f"schedule:{schedule.name}:{suffix}")
        assert key is not None
        return key
