"""TaskQueue: the broker's rules (validation, defaults, limits, backoff) over RedisStore."""

from __future__ import annotations

import asyncio
import contextvars
import hashlib
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, TypeAlias, cast

from broker.batching import Batcher
from broker.config import Settings
from broker.dependencies import check_parent_ids, waves
from broker.errors import (
    BrokerError,
    ForeignLease,
    IdempotencyConflict,
    InvalidArgument,
    LeaseStale,
    LimitExceeded,
    PartlyStored,
    RateLimited,
    TaskFinished,
)
from broker.errors import TaskNotFound as TaskNotFoundError
from broker.ids import (
    GROUP_KEY_PATTERN,
    LOCAL_ID_PATTERN,
    NAME_PATTERN,
    IdGenerator,
    check_name,
    parse_task_id,
)
from broker.models import (
    AckItem,
    CancelStatus,
    DeadPage,
    EnqueueOutcome,
    ExtendItem,
    GroupKeyPage,
    HeldLease,
    Hint,
    LeaseBatch,
    LeaseSlot,
    Maintained,
    NackItem,
    NewTask,
    ParentPolicy,
    QueueSettings,
    QueueStats,
    SettleResult,
    SettleStatus,
    Task,
    TaskLinks,
    TaskRef,
)
from broker.queue_settings import checked_mask, checked_settings
from broker.store.group_key_stats import group_key_page
from broker.store.redis_store import (
    FinishedEvents,
    IdempotencyConflictAt,
    RedisStore,
    WakeEvents,
)
from broker.store.workflow_store import WorkflowStore
from broker.timings import TaskTimings

MAX_TASKS_PER_CALL = 1000
#: Headers that carry trace context (W3C), left out of the idempotency comparison.
TRACE_HEADERS = frozenset({"traceparent", "tracestate", "baggage"})
_LEASE_ID = re.compile(r"[0-9a-f]{32}")
MAX_HEADERS = 64
#: Queue and type names a broker remembers as valid (TaskQueue._name), forgotten all at once
#: past this: names are checked per task, and a producer may use endless distinct ones.
MAX_REMEMBERED_NAMES = 4096
MAX_HEADER_VALUE_BYTES = 4096
MAX_IDEMPOTENCY_KEY_LENGTH = 256
MAX_PRIORITY = 1000
MAX_ATTEMPTS = 1000
MIN_LEASE_MS = 10
MAX_LEASE_MS = 12 * 3600 * 1000  # SQS's visibility-timeout ceiling
MAX_DELAY_MS = 365 * 86400 * 1000
MAX_BACKOFF_MS = 7 * 86400 * 1000
MAX_ERROR_BYTES = 4096
MAX_IDS_PER_CALL = 1000
#: Items per script call: 1,000 keeps one call to a few ms, so Redis stays responsive.
MAX_BATCH_ITEMS = 1000
#: Payload bytes per enqueue script call (one call's tasks may exceed it, alone): concurrent
#: calls of large tasks are not merged into one huge command that holds copies of them all and
#: outlasts the Redis socket timeout.
MAX_BATCH_BYTES = 8 * 1024 * 1024
#: Queues per Stats page (the RPC's documented cap) and per ListQueues page.
MAX_STATS_PAGE = 1000
MAX_QUEUE_PAGE = 10_000
#: Group keys per ListGroupKeys page: each costs its oldest-task walk (group_keys.lua).
MAX_GROUP_KEY_PAGE = 100
DEFAULT_GROUP_KEY_PAGE = 20
#: Work of each kind per maintenance call on one queue, and queues taken per index shard per pass.
MAINTAIN_LIMIT = 500
#: Take-maintain-settle rounds per pass at most. A pass goes on while more queues came due than
#: one round takes, or a queue had more work of a kind than one call does (MAINTAIN_LIMIT): so a
#: pass handles up to 8,000 due queues, or trims up to 8,000 finished tasks of one queue (32,000/s
#: at the default reap interval: above what one queue completes; one round per pass kept a busy
#: queue's trims at 2,000/s, and its finished tasks piled up).
MAINTAIN_ROUNDS = 16
#: A maintainer that takes a queue and dies delays it by at most this.
DUE_CLAIM_MS = 500
#: Finished tasks and dead letters are trimmed up to this late, so a busy queue's trims batch.
TRIM_SLACK_MS = 1000


#: The headers of a request that has none (read-only, so one may serve every request).
_NO_HEADERS: Mapping[str, str] = MappingProxyType({})


class TaskRequest(NamedTuple):
    """A task as a producer asked for it, before validation. Durations in ms; None = unset. A
    NamedTuple: one is built per task enqueued, at a third of a frozen dataclass's cost."""

    queue: str
    type: str
    payload: bytes = b""
    headers: Mapping[str, str] = _NO_HEADERS  # only read: validate copies it
    priority: int = 0
    delay_ms: int | None = None
    schedule_ms: int | None = None
    max_attempts: int = 0
    lease_ms: int | None = None
    idempotency_key: str = ""
    initial_backoff_ms: int | None = None
    max_backoff_ms: int | None = None
    group_key: str = ""
    depends_on: tuple[str, ...] = ()  # parents by id
    depends_on_positions: tuple[int, ...] = ()  # parents by position in the same call
    parent_policy: ParentPolicy | None = ParentPolicy.CANCEL  # None: a number the API lacks


def _check_size(index: int, request: TaskRequest, header_bytes: int, limit: int) -> None:
    """One limit on everything a task stores, so headers cannot carry what payload may not."""
    key_bytes = len(request.idempotency_key.encode()) if request.idempotency_key else 0
    total = len(request.payload) + header_bytes + len(request.type) + key_bytes
    if total > limit:
        raise InvalidArgument(
            f"tasks[{index}]",
            f"the task is {total} bytes (payload {len(request.payload)}, headers {header_bytes}, "
            f"type and idempotency key {len(request.type) + key_bytes}); "
            f"the limit is {limit} (max_task_bytes)",
        )


def _header_bytes(f: str, headers: Mapping[str, str]) -> int:
    """Checks the headers; returns the bytes of their keys and values."""
    if len(headers) > MAX_HEADERS:
        raise InvalidArgument(f"{f}.headers", f"more than {MAX_HEADERS} entries")
    total = 0
    for name, value in headers.items():
        check_name(f"{f}.headers key", name)
        value_bytes = len(value.encode())
        if value_bytes > MAX_HEADER_VALUE_BYTES:
            raise InvalidArgument(
                f"{f}.headers[{name}]", f"value over {MAX_HEADER_VALUE_BYTES} bytes"
            )
        total += len(name) + value_bytes  # names are ASCII (check_name)
    return total


def _check_start(f: str, delay_ms: int | None, schedule_ms: int | None) -> None:
    """delay and schedule_time: at most one, and neither more than MAX_DELAY_MS ahead."""
    if delay_ms is not None and schedule_ms is not None:
        raise InvalidArgument(f"{f}.delay", "set delay or schedule_time, not both")
    if delay_ms is not None:
        _check_range(f"{f}.delay", delay_ms, 0, MAX_DELAY_MS, " ms")
    if schedule_ms is not None:
        if schedule_ms < 0:
            raise InvalidArgument(f"{f}.schedule_time", "before 1970")
        if schedule_ms > time.time() * 1000 + MAX_DELAY_MS:
            raise InvalidArgument(
                f"{f}.schedule_time", f"more than {MAX_DELAY_MS // 86_400_000} days ahead of now"
            )


def _check_range(name: str, value: int, low: int, high: int, unit: str = "") -> int:
    if not low <= value <= high:
        raise InvalidArgument(name, f"must be {low}{unit} to {high}{unit}, got {value}{unit}")
    return value


def _in_range(index: int, field: str, value: int, low: int, high: int, unit: str = "") -> int:
    """_check_range for tasks[index].<field>, naming the field only when the check fails."""
    if low <= value <= high:
        return value
    return _check_range(f"tasks[{index}].{field}", value, low, high, unit)


def _hit_limit(done: Maintained) -> bool:
    """The maintenance call did as much of some kind of work as one call may: more may wait."""
    return max(done.reclaimed, done.promoted, done.trimmed) >= MAINTAIN_LIMIT


def _every(_: str) -> bool:
    return True


def _ready_now(call: tuple[NewTask, ...]) -> int:
    """Tasks of an Enqueue call that a worker may lease as soon as they are stored."""
    return sum(1 for t in call if not t.delay_ms and t.schedule_ms is None and not t.parents)


class InlineLease(Protocol):
    """Credits set aside for a lease sent with an enqueue (Dispatcher.reserve_inline)."""

    @property
    def slots(self) -> Sequence[LeaseSlot]:
        """The lease script's slots."""

    def leased(self, batch: LeaseBatch | Exception | None) -> None:
        """The lease's reply; an error or None (not sent) gives the credits back."""


class TaskQueue:
    """Operations on tasks in domain terms. Knows the rules; knows nothing of gRPC or Redis keys."""

    def __init__(self, store: RedisStore, settings: Settings) -> None:
        self._store = store
        self._settings = settings
        self._ids = IdGenerator()
        self._valid_names: set[str] = set()  # see _name
        self._enqueue = Batcher[tuple[NewTask, ...], list[EnqueueOutcome]](
            self._flush_enqueue, MAX_BATCH_ITEMS, _enqueue_cost
        )
        self._acks = Batcher[AckCall, list[SettleStatus]](
            self._flush_acks, MAX_BATCH_ITEMS, _ack_cost
        )
        self._nacks = Batcher[NackItem, SettleResult](self._store.nack, MAX_BATCH_ITEMS, _one)
        self._extends = Batcher[ExtendItem, SettleResult](self._store.extend, MAX_BATCH_ITEMS, _one)
        #: Queue wait and processing time, observed in-process for /metrics (O(1) per task).
        self.timings = TaskTimings()
        self.workflow = WorkflowStore(store)
        #: Called with a queue whose workflow outbox has entries (the app's OutboxMover.kick).
        self.on_outbox: Callable[[str], None] = lambda queue: None
        #: Set aside credits of this broker's streams for a lease sent with an enqueue, given
        #: a count of its tasks ready now, called only if needed (the app's
        #: Dispatcher.reserve_inline); None: nobody here can take one.
        self.reserve_inline: Callable[[str, Callable[[], int]], InlineLease | None] = (
            lambda queue, ready_tasks: None
        )
        #: Tasks that lease inline runs, kept referenced until done (the loop holds only weak
        #: references).
        self._inline: set[asyncio.Task[Any]] = set()

    @property
    def settings(self) -> Settings:
        return self._settings

    # --- enqueue ------------------------------------------------------------------------------

    def validate(
        self, index: int, request: TaskRequest, scope: str = "", local_id: str | None = None
    ) -> NewTask:
        """Checks one task and fills in its defaults; its idempotency key is `scope`'s
        (Principal.scope: keys of different principals never meet), its id `local_id` (a new
        one when None).

        Runs for every task enqueued, so a field's name (tasks[index].<field>) is only built
        for an error.

        Raises:
            InvalidArgument: naming the field, as tasks[index].<field>.
        """
        s = self._settings
        queue = self._name(index, "queue", request.queue)
        self._name(index, "type", request.type)
        header_bytes = _header_bytes(f"tasks[{index}]", request.headers) if request.headers else 0
        _check_size(index, request, header_bytes, s.max_task_bytes)
        _in_range(index, "priority", request.priority, -MAX_PRIORITY, MAX_PRIORITY)
        if request.delay_ms is not None or request.schedule_ms is not None:
            _check_start(f"tasks[{index}]", request.delay_ms, request.schedule_ms)
        max_attempts = request.max_attempts or s.default_max_attempts
        _in_range(index, "max_attempts", max_attempts, 1, MAX_ATTEMPTS)
        lease_ms = None
        if request.lease_ms is not None:
            lease_ms = _in_range(
                index, "lease_duration", request.lease_ms, MIN_LEASE_MS, MAX_LEASE_MS, " ms"
            )
        if request.group_key and not GROUP_KEY_PATTERN.fullmatch(request.group_key):
            raise InvalidArgument(
                f"tasks[{index}].group_key",
                "must be 1-128 characters of [A-Za-z0-9_.:@-], or empty",
            )
        if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
            raise InvalidArgument(
                f"tasks[{index}].idempotency_key",
                f"longer than {MAX_IDEMPOTENCY_KEY_LENGTH} characters",
            )
        initial = request.initial_backoff_ms
        if initial is None:
            initial = round(s.backoff_initial_s * 1000)
        _in_range(index, "retry_policy.initial_backoff", initial, 1, MAX_BACKOFF_MS, " ms")
        cap = request.max_backoff_ms
        if cap is None:
            cap = max(round(s.backoff_max_s * 1000), initial)
        _in_range(index, "retry_policy.max_backoff", cap, initial, MAX_BACKOFF_MS, " ms")
        if request.parent_policy is None:
            raise InvalidArgument(
                f"tasks[{index}].parent_failure_policy", "not a ParentFailurePolicy"
            )
        return NewTask(
            ref=TaskRef(queue, self._ids.new() if local_id is None else local_id),
            type=request.type,
            payload=request.payload,
            headers=dict(request.headers) if request.headers else {},
            priority=request.priority,
            max_attempts=max_attempts,
            lease_ms=lease_ms,
            initial_backoff_ms=initial,
            max_backoff_ms=cap,
            delay_ms=request.delay_ms,
            schedule_ms=request.schedule_ms,
            idempotency_key=_hash_key(queue, request.idempotency_key, scope),
            # Only a keyed task is ever compared (a JSON dump and a SHA-256 saved per task).
            body_hash=_body_hash(request) if request.idempotency_key else None,
            group_key=request.group_key,
            parents=request.depends_on,  # those named by position are added as stored
            parent_policy=request.parent_policy,
        )

    def _name(self, index: int, field: str, name: str) -> str:
        """check_name for tasks[index].<field>, remembering names that passed: a call's tasks
        mostly share their queue and type, and a name's check is a regular expression."""
        if name in self._valid_names:
            return name
        check_name(f"tasks[{index}].{field}", name)
        if len(self._valid_names) >= MAX_REMEMBERED_NAMES:
            self._valid_names.clear()
        self._valid_names.add(name)
        return name

    async def enqueue(
        self, requests: Sequence[TaskRequest], scope: str = ""
    ) -> list[EnqueueOutcome]:
        """Validates every task first (all or nothing), then stores each queue's tasks in one
        group-committed script call. Idempotency keys are `scope`'s (validate).

        Raises:
            InvalidArgument: nothing was stored.
            IdempotencyConflict: a key was reused with a different task; that queue's tasks of
                this call were not stored.
        """
        if not requests:
            raise InvalidArgument("tasks", "at least one task is required")
        if len(requests) > MAX_TASKS_PER_CALL:
            raise InvalidArgument("tasks", f"at most {MAX_TASKS_PER_CALL} tasks per call")
        ids = self._ids.new_many(len(requests))
        tasks = [self.validate(i, r, scope, ids[i]) for i, r in enumerate(requests)]
        if not any(r.depends_on or r.depends_on_positions for r in requests):
            stored = await self._store_by_queue(dict(enumerate(tasks)))
            return [stored[i] for i in range(len(tasks))]
        return await self._enqueue_graph(requests, tasks)

    async def _store_by_queue(
        self, tasks: dict[int, NewTask], stored_before: int = 0
    ) -> dict[int, EnqueueOutcome]:
        """Stores tasks (by their position in the call): one queue's in one group-committed
        script call; several queues' each in a script of its own, all in one write
        (RedisStore.enqueue_queues), not one round trip per queue. `stored_before`: tasks of
        this call stored already (the earlier waves of a graph).

        A queue that refuses its tasks does not stop the others: they are stored, and its
        refusal is raised (the first queue's, in the call's order). A rate refusal after
        anything of the call was stored is raised as PartlyStored, without RetryInfo: a client
        that resent the whole call on RetryInfo would store the rest twice.

        Raises:
            IdempotencyConflict: a key was reused with a different task (that queue's tasks
                were not stored).
            PartlyStored, LimitExceeded: a queue refused its tasks.
        """
        by_queue: dict[str, list[int]] = {}
        for i, task in tasks.items():
            by_queue.setdefault(task.ref.queue, []).append(i)
        if len(by_queue) == 1:
            ((queue, positions),) = by_queue.items()
            try:
                stored = await self._enqueue.submit(queue, tuple(tasks[i] for i in positions))
            except IdempotencyConflictAt as exc:
                raise IdempotencyConflict(positions[exc.positions[0]]) from None
            except RateLimited as exc:
                if stored_before:
                    raise PartlyStored(queue, exc, stored_before) from None
                raise
            return dict(zip(positions, stored, strict=True))
        window_ms = round(self._settings.idempotency_window_s * 1000)
        results = await self._store.enqueue_queues(
            [(queue, [tasks[i] for i in positions]) for queue, positions in by_queue.items()],
            window_ms,
        )
        outcomes: dict[int, EnqueueOutcome] = {}
        refusals: list[tuple[str, Exception]] = []
        for (queue, positions), result in zip(by_queue.items(), results, strict=True):
            if isinstance(result, IdempotencyConflictAt):
                refusals.append((queue, IdempotencyConflict(positions[result.positions[0]])))
            elif isinstance(result, Exception):
                refusals.append((queue, result))
            elif refused := next((o for o in result if isinstance(o, LimitExceeded)), None):
                refusals.append((queue, refused))  # a queue's rate refuses its tasks whole
            else:
                outcomes.update(zip(positions, cast("list[EnqueueOutcome]", result), strict=True))
        if not refusals:
            return outcomes
        queue, first = refusals[0]
        if isinstance(first, RateLimited) and (stored_before or outcomes):
            raise PartlyStored(queue, first, stored_before + len(outcomes))
        raise first

    async def _enqueue_graph(
        self, requests: Sequence[TaskRequest], tasks: list[NewTask]
    ) -> list[EnqueueOutcome]:
        """A call whose tasks depend on others (broker/dependencies.py): checked whole (ids
        well formed and existing, positions a DAG) before anything is stored, then stored wave
        by wave, each task with its parents' real ids (an idempotency duplicate's is the task
        stored before).

        Raises:
            InvalidArgument: nothing was stored.
        """
        check_parent_ids(requests)
        order = waves(requests)
        await self._check_parents_exist(requests)
        outcomes: dict[int, EnqueueOutcome] = {}
        for wave in order:
            ready = {
                i: tasks[i]._replace(
                    parents=tasks[i].parents
                    + tuple(outcomes[p].task_id for p in requests[i].depends_on_positions),
                )
                for i in wave
            }
            outcomes.update(await self._store_by_queue(ready, stored_before=len(outcomes)))
        return [outcomes[i] for i in range(len(tasks))]

    async def _check_parents_exist(self, requests: Sequence[TaskRequest]) -> None:
        """Raises InvalidArgument naming the first parent id that names no task."""
        named = {
            parent: f"tasks[{i}].depends_on[{j}]"
            for i, r in reversed(list(enumerate(requests)))
            for j, parent in reversed(list(enumerate(r.depends_on)))
        }
        found = await asyncio.gather(
            *(self.workflow.task_state(parse_task_id(f, p)) for p, f in named.items())
        )
        for (parent, f), state in zip(named.items(), found, strict=True):
            if state is None:
                raise InvalidArgument(f, f"no such task: {parent}")

    async def _flush_enqueue(
        self, queue: str, calls: Sequence[tuple[NewTask, ...]]
    ) -> list[list[EnqueueOutcome] | BaseException]:
        """One script call for many Enqueue calls. A call whose key conflicts fails alone."""
        live = list(range(len(calls)))
        results: list[list[EnqueueOutcome] | BaseException] = [[] for _ in calls]
        # Counted only when a stream here waits on the queue: most flushes have none.
        inline = self.reserve_inline(queue, lambda: sum(map(_ready_now, calls)))
        window_ms = round(self._settings.idempotency_window_s * 1000)
        while live:
            flat = [task for c in live for task in calls[c]]
            owner = [c for c in live for _ in calls[c]]
            sizes = [len(calls[c]) for c in live]
            try:
                if inline is not None:
                    reservation, inline = inline, None
                    stored = await self._enqueue_and_lease(
                        queue, flat, window_ms, sizes, reservation
                    )
                else:
                    stored = await self._store.enqueue(queue, flat, window_ms, sizes)
            except IdempotencyConflictAt as exc:
                bad = {owner[p] for p in exc.positions}
                for c in bad:
                    start = owner.index(c)
                    results[c] = IdempotencyConflictAt(
                        [p - start for p in exc.positions if owner[p] == c]
                    )
                live = [c for c in live if c not in bad]
                continue
            for c, outcome in zip(owner, stored, strict=True):
                cast_list = results[c]
                if isinstance(outcome, BaseException):  # the call was refused whole
                    results[c] = outcome
                elif isinstance(cast_list, list):
                    cast_list.append(outcome)
            break
        return results

    async def _enqueue_and_lease(
        self,
        queue: str,
        tasks: Sequence[NewTask],
        window_ms: int,
        sizes: Sequence[int],
        inline: InlineLease,
    ) -> list[EnqueueOutcome | LimitExceeded]:
        """store.enqueue with a lease for this broker's waiting streams in the same write. Runs
        in a task of its own that the caller's cancellation (a deadline) does not reach: once
        sent, the lease's reply must be handed out, or its tasks would wait for their lease to
        expire and lose an attempt. A fresh context: the leases serve streams, not the caller."""

        async def both() -> list[EnqueueOutcome | LimitExceeded]:
            batch: LeaseBatch | Exception | None = None
            try:
                outcomes, batch = await self._store.enqueue_and_lease(
                    queue, tasks, window_ms, sizes, inline.slots
                )
                if isinstance(batch, LeaseBatch):
                    try:
                        batch = await self._leased(queue, batch)
                    except Exception as exc:  # parents' results unreadable: as a failed lease
                        batch = exc
            finally:  # whatever happened, the credits go out as leases or come back
                inline.leased(batch)
            if isinstance(outcomes, Exception):
                raise outcomes
            return outcomes

        task = asyncio.create_task(both(), context=contextvars.Context())
        self._inline.add(task)
        task.add_done_callback(self._inline.discard)
        return await asyncio.shield(task)

    # --- leases and settlements ------------------------------------------------------------

    async def lease(self, queue: str, slots: Sequence[LeaseSlot]) -> LeaseBatch:
        """Leases up to len(slots) tasks; slot = (fresh lease id, lease ms for the worker, id of
        the stream it is for)."""
        return await self._leased(queue, await self._store.lease(queue, slots))

    async def _leased(self, queue: str, batch: LeaseBatch) -> LeaseBatch:
        """A lease call's batch, counted, with the parents' results of tasks that have any."""
        self.timings.leased(queue, batch)
        if any(lease.task.parent_count for lease in batch.leases):
            batch = await self._with_parent_results(queue, batch)
        return batch

    async def _with_parent_results(self, queue: str, batch: LeaseBatch) -> LeaseBatch:
        """Adds their parents' results to the deliveries of tasks that have parents."""
        having = [i for i, lease in enumerate(batch.leases) if lease.task.parent_count]
        links = await self.workflow.parent_results(
            queue, [batch.leases[i].task.ref.local_id for i in having]
        )
        leases = list(batch.leases)
        for i, found in zip(having, links, strict=True):
            leases[i] = leases[i]._replace(links=found)
        return replace(batch, leases=leases)

    def ref(self, field_name: str, task_id: str) -> TaskRef:
        return parse_task_id(field_name, task_id)

    @staticmethod
    def _check_lease_id(lease_id: str) -> None:
        if not lease_id:
            raise InvalidArgument("lease_id", "required")
        if not _LEASE_ID.fullmatch(lease_id):
            raise InvalidArgument("lease_id", "not a lease id (32 hex characters)")

    def ack_item(self, task_id: str, lease_id: str, result: bytes, holder: str = "") -> AckItem:
        """Checks an ack by `holder` (Principal.scope). Raises InvalidArgument."""
        ref = self.ref("task_id", task_id)
        self._check_lease_id(lease_id)
        limit = self._settings.max_task_bytes
        if len(result) > limit:
            raise InvalidArgument(
                "result", f"{len(result)} bytes exceeds the limit of {limit} (max_task_bytes)"
            )
        return AckItem(ref, lease_id, result, holder)

    def check_ack(self, task_id: str, lease_id: str, result: bytes) -> tuple[str, str]:
        """Checks an ack as ack_item does, building nothing: returns (queue, local id).
        Raises InvalidArgument."""
        queue, sep, local_id = task_id.rpartition(":")
        if not (sep and NAME_PATTERN.fullmatch(queue) and LOCAL_ID_PATTERN.fullmatch(local_id)):
            parse_task_id("task_id", task_id)  # raises, with the message
        if not _LEASE_ID.fullmatch(lease_id):
            self._check_lease_id(lease_id)  # raises, with the message
        if len(result) > self._settings.max_task_bytes:
            self.ack_item(task_id, lease_id, result)  # raises, with the message
        return queue, local_id

    def nack_item(
        self,
        task_id: str,
        lease_id: str,
        error: str,
        retry_delay_ms: int | None,
        dead_letter: bool,
        holder: str = "",
    ) -> NackItem:
        """Checks a nack by `holder` (Principal.scope). Raises InvalidArgument."""
        ref = self.ref("task_id", task_id)
        self._check_lease_id(lease_id)
        if retry_delay_ms is not None:
            _check_range("retry_delay", retry_delay_ms, 0, MAX_BACKOFF_MS, " ms")
        return NackItem(
            ref=ref,
            lease_id=lease_id,
            error=_truncate(error or "failed (no error message)", MAX_ERROR_BYTES),
            retry_delay_ms=retry_delay_ms,
            dead_letter=dead_letter,
            jitter=random.random(),  # equal jitter, applied in nack.lua
            holder=holder,
        )

    def extend_item(
        self, task_id: str, lease_id: str, duration_ms: int | None, holder: str = ""
    ) -> ExtendItem:
        """Checks an extension by `holder` (Principal.scope). Raises InvalidArgument."""
        ref = self.ref("task_id", task_id)
        self._check_lease_id(lease_id)
        if duration_ms is not None:
            _check_range("lease_duration", duration_ms, MIN_LEASE_MS, MAX_LEASE_MS, " ms")
        return ExtendItem(ref, lease_id, duration_ms, holder)

    async def ack(
        self, task_id: str, lease_id: str, result: bytes, holder: str = ""
    ) -> SettleResult:
        """Settles a lease as succeeded; a repeat with the same lease answers AGAIN."""
        item = self.ack_item(task_id, lease_id, result, holder)
        [status] = await self.ack_many(
            item.ref.queue, AckCall([item.lease_id], [item.ref.local_id, lease_id, result, holder])
        )
        return _raise_or_return([_fenced(item.ref, SettleResult(status))])

    async def nack(
        self,
        task_id: str,
        lease_id: str,
        error: str,
        retry_delay_ms: int | None,
        dead_letter: bool,
        holder: str = "",
    ) -> SettleResult:
        """Settles a lease as failed: retried after the backoff (or retry_delay_ms), or dead."""
        item = self.nack_item(task_id, lease_id, error, retry_delay_ms, dead_letter, holder)
        return _raise_or_return(await self.settle([item]))

    async def extend(
        self, task_id: str, lease_id: str, duration_ms: int | None, holder: str = ""
    ) -> SettleResult:
        """Pushes a lease's expiry to now + duration (default: its original length)."""
        item = self.extend_item(task_id, lease_id, duration_ms, holder)
        return _raise_or_return(await self.settle([item]))

    async def ack_many(self, queue: str, call: AckCall) -> list[SettleStatus]:
        """Applies checked acks of one queue (AckCall: no object per item) with concurrent
        callers' acks in one script call (group commit). Returns each ack's status, in order
        (STALE, NOT_FOUND and FOREIGN are refusals: see _fenced). Raises the store's error."""
        statuses = await self._acks.submit(queue, call)
        self.timings.acked_many(queue, call.lease_ids, statuses)
        return statuses

    async def _flush_acks(self, queue: str, calls: Sequence[AckCall]) -> list[list[SettleStatus]]:
        if len(calls) == 1:
            return [await self._store.ack(queue, calls[0].args)]
        statuses = await self._store.ack(queue, [arg for call in calls for arg in call.args])
        out, start = [], 0
        for call in calls:
            end = start + len(call.lease_ids)
            out.append(statuses[start:end])
            start = end
        return out

    async def settle(self, items: Sequence[SettleItem]) -> list[SettleResult | BrokerError]:
        """Applies checked acks, nacks and extensions: concurrent callers' items share one
        script call per queue and kind (group commit). Each item gets its result, or LeaseStale,
        TaskNotFound or the store's error, in order; only a bug raises."""
        groups: dict[tuple[type, str], list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault((type(item), item.ref.queue), []).append(i)
        results: list[SettleResult | BrokerError | None] = [None] * len(items)

        async def run(kind: type, queue: str, positions: list[int]) -> None:
            group = [items[i] for i in positions]
            outcomes: list[SettleResult | BaseException]
            if kind is AckItem:
                outcomes = await self._ack_outcomes(queue, cast(list[AckItem], group))
            else:
                outcomes = await self._batcher(kind).submit_many(queue, group)
            for i, item, outcome in zip(positions, group, outcomes, strict=True):
                results[i] = self._observe(item, outcome)

        if len(groups) == 1:  # the common case: no gather, no extra tasks
            [((kind, queue), positions)] = groups.items()
            await run(kind, queue, positions)
        else:
            await asyncio.gather(*(run(k, q, p) for (k, q), p in groups.items()))
        return [r for r in results if r is not None]

    async def _ack_outcomes(
        self, queue: str, items: list[AckItem]
    ) -> list[SettleResult | BaseException]:
        """Per-item acks (resume, tests) through ack_many; timings are fed there."""
        call = AckCall([i.lease_id for i in items], [])
        for i in items:
            call.args += (i.ref.local_id, i.lease_id, i.result, i.holder)
        try:
            statuses = await self.ack_many(queue, call)
        except BrokerError as exc:
            return [exc] * len(items)
        return [_ACKED[status] for status in statuses]

    def _batcher(self, kind: type) -> Batcher[Any, SettleResult]:
        if kind is NackItem:
            return self._nacks
        return self._extends

    def _observe(
        self, item: SettleItem, outcome: SettleResult | BaseException
    ) -> SettleResult | BrokerError:
        """Feeds the timings, and turns a refused fence into its error."""
        if isinstance(outcome, BaseException):
            if isinstance(outcome, BrokerError):
                return outcome
            raise outcome  # a bug, not an outcome
        if isinstance(item, NackItem):
            self.timings.nacked(item.lease_id)
        return _fenced(item.ref, outcome)

    def held_lease(self, field_name: str, task_id: str, lease_id: str) -> HeldLease:
        """Checks a lease a worker names (to resume it). Raises InvalidArgument."""
        ref = self.ref(f"{field_name}.task_id", task_id)
        if not _LEASE_ID.fullmatch(lease_id):
            raise InvalidArgument(f"{field_name}.lease_id", "not a lease id (32 hex characters)")
        return HeldLease(ref, lease_id)

    async def resume(
        self, stream_id: str, leases: Sequence[HeldLease], holder: str = ""
    ) -> list[SettleResult | BrokerError]:
        """Moves leases still current to the stream (same lease id and attempt, expiry renewed),
        if `holder` (Principal.scope) is the principal that leased them. Each gets its result,
        or LeaseStale, ForeignLease, TaskNotFound or the store's error, in order."""
        results: list[SettleResult | BrokerError | None] = [None] * len(leases)
        for queue, positions in _positions_by_queue([h.ref for h in leases]).items():
            for chunk in _chunks(positions, MAX_BATCH_ITEMS):
                items = [(leases[i].ref.local_id, leases[i].lease_id) for i in chunk]
                try:
                    outcomes: Sequence[SettleResult | BrokerError] = await self._store.resume(
                        queue, stream_id, items, holder
                    )
                except BrokerError as exc:
                    outcomes = [exc] * len(chunk)
                for i, outcome in zip(chunk, outcomes, strict=True):
                    results[i] = _fenced(leases[i].ref, outcome)
        return [r for r in results if r is not None]

    async def detach(
        self, stream_id: str, leases: Sequence[HeldLease], reason: str
    ) -> tuple[int, int]:
        """Detaches the leases an ended stream still holds: each waits the resume window for a
        new stream to claim it, then ends as a spent attempt with `reason`. Returns (how many,
        earliest expiry ms or -1)."""
        window_ms = round(self._settings.resume_window_s * 1000)
        count, earliest = 0, -1
        for queue, positions in _positions_by_queue([h.ref for h in leases]).items():
            for chunk in _chunks(positions, MAX_BATCH_ITEMS):
                items = [(leases[i].ref.local_id, leases[i].lease_id) for i in chunk]
                done, first = await self._store.detach(queue, stream_id, items, window_ms, reason)
                count += done
                if first >= 0 and (earliest < 0 or first < earliest):
                    earliest = first
        return count, earliest

    async def unlease(self, stream_id: str, leases: Sequence[HeldLease]) -> int:
        """Undoes leases whose tasks were never sent to the stream: no attempt is spent."""
        undone = 0
        for queue, positions in _positions_by_queue([h.ref for h in leases]).items():
            for chunk in _chunks(positions, MAX_BATCH_ITEMS):
                items = [(leases[i].ref.local_id, leases[i].lease_id) for i in chunk]
                undone += await self._store.unlease(queue, stream_id, items)
        return undone

    # --- maintenance (called by loops) ---------------------------------------------------------

    def wake_events(self) -> AbstractAsyncContextManager[WakeEvents]:
        """Every replica's wake and revoke announcements (Pub/Sub: lost while disconnected)."""
        return self._store.wake_events()

    def finished_events(self) -> AbstractAsyncContextManager[FinishedEvents]:
        """Ids of watched tasks that finished, from every replica (Pub/Sub: lost while
        disconnected, so a watcher re-reads its task on a timer as well)."""
        return self._store.finished_events()

    async def mark_watched(self, task_id: str) -> bool:
        """Asks the scripts to announce this task when it finishes (finished_events). False
        when it cannot be marked yet: a fresh task (its first transition makes it markable) or
        no such task. Raises InvalidArgument for a malformed id."""
        return await self._store.mark_watched(self.ref("task_id", task_id))

    async def queues(self) -> list[str]:
        return await self._store.list_queues()

    async def reclaim_expired(self, queue: str) -> int:
        """Reclaims every expired lease of a queue, in bounded script calls."""
        total = 0
        while True:
            count, _ = await self._store.reclaim_expired(queue, 100)
            total += count
            if count < 100:
                return total

    async def promote_due(self, queue: str) -> tuple[int, int | None]:
        """Promotes due tasks. Returns (count, next due ms or None)."""
        total = 0
        while True:
            count, next_due = await self._store.promote_due(queue, 1000)
            total += count
            if count < 1000:
                return total, next_due

    async def trim(self, queue: str) -> int:
        """Deletes finished tasks and dead letters past their retention."""
        s = self._settings
        total = 0
        while True:
            finished, dead = await self._store.trim_finished(
                queue, round(s.finished_retention_s * 1000), round(s.dead_retention_s * 1000), 500
            )
            total += finished + dead
            if finished < 500 and dead < 500:
                return total

    async def maintain_due(self) -> int:
        """One maintenance pass over the queues the due index says have work due: expired
        leases reclaimed, due tasks promoted, retention trimmed; each queue's index entry is
        then set to its next due time. Returns how much work was done."""
        store = self._store
        if store.unhinted:  # hints that failed after their state change succeeded
            lost = list(store.unhinted)
            store.unhinted.difference_update(lost)
            try:
                await store.hint([Hint(q, delay_ms=0) for q in lost])
            except BrokerError:
                store.unhinted.update(lost)
                raise
        work = 0
        for _ in range(MAINTAIN_ROUNDS):  # more rounds only while many queues came due at once
            entries = await store.take_due(MAINTAIN_LIMIT, DUE_CLAIM_MS)
            if not entries:
                break
            done = await store.maintain([e.queue for e in entries], MAINTAIN_LIMIT, TRIM_SLACK_MS)
            self._kick_outboxes(done)
            outcomes = [(e, d.next_due_ms) for e, d in zip(entries, done, strict=True)]
            await store.settle_due(outcomes)
            work += sum(d.work for d in done)
            behind = any(_hit_limit(d) for d in done)  # its index entry now says "due now"
            if len(entries) < MAINTAIN_LIMIT and not behind:
                break
        return work

    def _kick_outboxes(self, done: Sequence[Maintained]) -> None:
        for d in done:
            if d.outbox:
                self.on_outbox(d.queue)

    async def sweep(self, cursor: int, count: int) -> tuple[int, int]:
        """The backstop: maintains about `count` registered queues from `cursor` on, whatever
        the index says, lowers their index entries to their real next due times, and forgets
        queues that hold nothing. Returns (next cursor, 0 when the registry was covered; how
        many queues were swept)."""
        cursor, queues = await self._store.scan_queues(cursor, count)
        if not queues:
            return cursor, 0
        done = await self._store.maintain(queues, MAINTAIN_LIMIT, TRIM_SLACK_MS)
        self._kick_outboxes(done)
        hints = [Hint(d.queue, at_ms=d.next_due_ms) for d in done if d.next_due_ms is not None]
        if hints:
            await self._store.hint(hints)
        for d in done:
            if d.empty:
                await self._store.forget_queue(d.queue)
        return cursor, len(queues)

    async def count_queues(self) -> int:
        return await self._store.count_queues()

    # --- reads and management --------------------------------------------------------------

    async def get(self, task_id: str) -> Task:
        ref = self.ref("task_id", task_id)
        task = await self._store.get(ref)
        if task is None:
            raise TaskNotFoundError(task_id)
        return task

    async def links(self, task: Task) -> TaskLinks:
        """A task's parents (with how each ended) and children (no Redis call for a task in
        no workflow: most tasks)."""
        if not task.parent_count and not task.has_children:
            return TaskLinks()
        return await self.workflow.links(task.ref)

    async def cancel(self, task_id: str) -> tuple[Task, str | None]:
        """Cancels an unfinished task. Returns it and the lease id it revoked (None if none)."""
        ref = self.ref("task_id", task_id)
        outcome = await self._store.cancel(ref)
        if outcome.status is CancelStatus.NOT_FOUND:
            raise TaskNotFoundError(task_id)
        if outcome.status is CancelStatus.FINISHED:
            assert outcome.final_state is not None
            raise TaskFinished(task_id, outcome.final_state.name)
        revoked = outcome.revoked_lease_id
        if revoked is not None:
            await self._store.announce_revoked(task_id, revoked)
        return await self.get(task_id), revoked

    async def stats(self, queues: Sequence[str]) -> list[QueueStats]:
        """The named queues' stats; none named: the first page of all (stats_page)."""
        if len(queues) > MAX_IDS_PER_CALL:
            raise InvalidArgument("queues", f"at most {MAX_IDS_PER_CALL}")
        for i, q in enumerate(queues):
            check_name(f"queues[{i}]", q)
        if not queues:
            return (await self.stats_page(0, ""))[0]
        return await self._store.stats_many(queues)

    async def stats_page(
        self, page_size: int, after: str, keep: Callable[[str], bool] = _every
    ) -> tuple[list[QueueStats], str]:
        """Stats of up to page_size (0: MAX_STATS_PAGE) queues by name, after the queue named
        `after`, of those `keep` keeps. Returns them and the last name when there are more
        ('' otherwise)."""
        size = min(page_size or MAX_STATS_PAGE, MAX_STATS_PAGE)
        names, last = await self.queue_page(size, after, keep)
        return await self._store.stats_many(names), last

    async def queue_page(
        self, page_size: int, after: str, keep: Callable[[str], bool] = _every
    ) -> tuple[list[str], str]:
        """Up to page_size (0: MAX_QUEUE_PAGE) registered queue names, sorted, after `after`,
        of those `keep` keeps (the caller's permitted queues: a page is never short of them
        because of others). Returns them and the last name when there are more ('' otherwise)."""
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = min(page_size or MAX_QUEUE_PAGE, MAX_QUEUE_PAGE)
        names = [q for q in await self._store.list_queues() if q > after and keep(q)]
        page = names[:size]
        return page, page[-1] if len(names) > size else ""

    async def all_stats(self) -> list[QueueStats]:
        """Every registered queue's stats (pipelined): for the metrics census only."""
        return await self._store.stats_many(await self._store.list_queues())

    async def set_paused(self, queue: str, paused: bool) -> None:
        check_name("queue", queue)
        await self._store.register_queue(queue)
        await self._store.set_paused(queue, paused)

    async def queue_settings(self, queue: str) -> QueueSettings:
        check_name("queue", queue)
        return await self._store.queue_settings(queue)

    async def update_queue_settings(
        self, queue: str, settings: QueueSettings, mask: Sequence[str]
    ) -> QueueSettings:
        """Changes the settings `mask` names (every one when empty); all are checked first, so
        a bad value changes nothing. Returns the settings after the change."""
        check_name("queue", queue)
        names = checked_mask(mask)
        settings = checked_settings(settings)
        await self._store.register_queue(queue)
        return await self._store.update_queue_settings(queue, settings, names)

    async def list_dead(
        self, queue: str, page_size: int, cursor: tuple[int, str] | None
    ) -> DeadPage:
        check_name("queue", queue)
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = min(page_size or 100, 1000)
        return await self._store.list_dead(queue, size, cursor)

    async def group_keys(
        self, queue: str, page_size: int, cursor: tuple[int, str] | None
    ) -> GroupKeyPage:
        """A page of the queue's group keys, the most pending first (page_size 0: 20; more than
        MAX_GROUP_KEY_PAGE is lowered to it)."""
        check_name("queue", queue)
        if page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = min(page_size or DEFAULT_GROUP_KEY_PAGE, MAX_GROUP_KEY_PAGE)
        return await group_key_page(self._store, queue, size, cursor)

    def _dead_ids(self, queue: str, task_ids: Sequence[str]) -> list[str]:
        check_name("queue", queue)
        if len(task_ids) > MAX_IDS_PER_CALL:
            raise InvalidArgument("task_ids", f"at most {MAX_IDS_PER_CALL} per call")
        refs = [self.ref(f"task_ids[{i}]", t) for i, t in enumerate(task_ids)]
        for i, ref in enumerate(refs):
            if ref.queue != queue:
                raise InvalidArgument(f"task_ids[{i}]", f"not a task of queue {queue}")
        return [r.local_id for r in refs]

    async def redrive_dead(self, queue: str, task_ids: Sequence[str], every: bool) -> int:
        return await self._on_dead(queue, task_ids, every, self._store.redrive)

    async def delete_dead(self, queue: str, task_ids: Sequence[str], every: bool) -> int:
        return await self._on_dead(queue, task_ids, every, self._store.delete_dead)

    async def _on_dead(self, queue: str, task_ids: Sequence[str], every: bool, op: _DeadOp) -> int:
        if not every:  # with every, task_ids are ignored (as the API documents)
            local_ids = self._dead_ids(queue, task_ids)
            if not local_ids:
                raise InvalidArgument("task_ids", "name tasks, or set all")
            return await op(queue, local_ids)
        check_name("queue", queue)
        total = 0
        while chunk := await self._store.dead_ids(queue, 500):
            done = await op(queue, chunk)
            total += done
            if done == 0:  # the same ids came back: nothing more can be done
                break
        return total


#: Type of RedisStore.redrive / delete_dead.
_DeadOp: TypeAlias = Callable[[str, Sequence[str]], Awaitable[int]]


def _one(_: object) -> int:
    return 1


def _fenced(ref: TaskRef, outcome: SettleResult | BrokerError) -> SettleResult | BrokerError:
    """A refused fence as its error (see refusal)."""
    if isinstance(outcome, BrokerError):
        return outcome
    return refusal(ref.task_id, outcome.status) or outcome


def refusal(task_id: str, status: SettleStatus) -> BrokerError | None:
    """A refused fence's error: the lease is not current, is another principal's, or the task
    does not exist. None: the settlement was applied (or repeated)."""
    if status is SettleStatus.STALE:
        return LeaseStale(task_id)
    if status is SettleStatus.NOT_FOUND:
        return TaskNotFoundError(task_id)
    if status is SettleStatus.FOREIGN:
        return ForeignLease(task_id)
    return None


def _positions_by_queue(refs: Sequence[TaskRef]) -> dict[str, list[int]]:
    by_queue: dict[str, list[int]] = {}
    for i, ref in enumerate(refs):
        by_queue.setdefault(ref.queue, []).append(i)
    return by_queue


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _enqueue_cost(call: tuple[NewTask, ...]) -> int:
    """An Enqueue call's share of a batch: its tasks, or its payload bytes in units of
    MAX_BATCH_BYTES / MAX_BATCH_ITEMS, whichever is more."""
    size = sum(len(t.payload) for t in call)
    return max(len(call), -(-size * MAX_BATCH_ITEMS // MAX_BATCH_BYTES))


#: Acks, nacks and extensions, checked and ready for the store.
SettleItem: TypeAlias = AckItem | NackItem | ExtendItem


@dataclass(slots=True)
class AckCall:
    """Checked acks of one queue as columns, not an object per item: their lease ids, and the
    ack script's per-item arguments (store/argv.py AckItem: id, lease_id, result, holder)."""

    lease_ids: list[str]
    args: list[str | bytes]


def _ack_cost(call: AckCall) -> int:
    return len(call.lease_ids)


#: One SettleResult per ack status (they carry nothing else), shared.
_ACKED: dict[SettleStatus, SettleResult] = {s: SettleResult(s) for s in SettleStatus}


def _raise_or_return(results: list[SettleResult | BrokerError]) -> SettleResult:
    [result] = results
    if isinstance(result, BrokerError):
        raise result
    return result


def _truncate(text: str, limit: int) -> str:
    data = text.encode()
    return text if len(data) <= limit else data[:limit].decode(errors="ignore") + "…"


def _hash_key(queue: str, key: str, scope: str = "") -> str | None:
    """Idempotency keys are hashed: any string is safe in a key name, and the length is fixed.

    A key is a queue's and, with a policy in force, a principal's (scope): one principal
    cannot squat another's key. Without one (scope '') the hash is what it always was, so an
    upgrade keeps deduplicating keys stored before. A scoped input starts with NUL, which no
    queue name does, so it never meets an unscoped one."""
    if not key:
        return None
    text = f"\0{scope}\0{queue}\0{key}" if scope else f"{queue}\0{key}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _body_hash(r: TaskRequest) -> str:
    """Identifies the task's content, so a key reused for a different task is caught."""
    digest = hashlib.sha256()
    # Trace context differs on every retry of the same enqueue: it is not part of the task.
    headers = sorted((k, v) for k, v in r.headers.items() if k not in TRACE_HEADERS)
    meta = [r.queue, r.type, headers, r.priority, r.delay_ms, r.schedule_ms,
            r.max_attempts, r.lease_ms, r.initial_backoff_ms, r.max_backoff_ms]  # fmt: skip
    if r.group_key:  # added to the list only when set: stored hashes of older tasks still match
        meta.append(r.group_key)
    if r.depends_on or r.depends_on_positions:  # the same, for dependencies (as stated)
        meta += [list(r.depends_on), list(r.depends_on_positions), str(r.parent_policy)]
    digest.update(json.dumps(meta).encode())
    digest.update(r.payload)
    return digest.hexdigest()[:32]
