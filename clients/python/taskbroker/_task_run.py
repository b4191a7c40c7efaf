"""Task runs: one delivery's handler, lease keeper and settlement, and the registry of them.

`TaskRunner` holds what every run of a worker session shares (handlers, slots, threads, the
settler); `TaskRun` is one delivery; `RunRegistry` tracks the runs in flight.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from opentelemetry import context as otel_context

from taskbroker._codec_hooks import open_payload, seal_outcome
from taskbroker._convert import parent_results_from_proto, to_duration
from taskbroker._handler import Handler, HandlerOutcome, OutcomeKind, TaskContext, invoke
from taskbroker._lease_keeper import KeeperClock, LeaseKeeper
from taskbroker._lease_stream import Ack, LeaseStream, Nack, Settlement
from taskbroker._tracing import end_process, start_process
from taskbroker.v1 import lease_pb2

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from taskbroker._connector import Capacity, Settler
    from taskbroker._lifecycle import Lifecycle
    from taskbroker._worker_options import WorkerOptions

log = logging.getLogger("taskbroker.worker")

#: Settle outcomes that mean the lease is no longer this worker's.
STALE_OUTCOMES: Final = frozenset(
    {lease_pb2.SETTLE_OUTCOME_LEASE_STALE, lease_pb2.SETTLE_OUTCOME_NOT_FOUND}
)
#: Handler outcomes logged as a warning (a retry the handler asked for, RetryLater, is not).
_FAILED_KINDS: Final[frozenset[OutcomeKind]] = frozenset({"error", "dead"})


@dataclass(slots=True)
class Stats:
    """A worker's counters over all its runs."""

    processed: int = 0
    stale_settlements: int = 0


def settlement_for(delivery: lease_pb2.Delivery, outcome: HandlerOutcome) -> Settlement:
    """The ack or nack that settles a delivery with `outcome`."""
    task_id, lease_id = delivery.task.id, delivery.lease_id
    if outcome.kind == "ack":
        return Ack(lease_pb2.AckRequest(task_id=task_id, lease_id=lease_id, result=outcome.result))
    nack = lease_pb2.NackRequest(
        task_id=task_id, lease_id=lease_id, error=outcome.error, dead_letter=outcome.kind == "dead"
    )
    if outcome.kind == "retry" and outcome.retry_delay is not None:
        nack.retry_delay.CopyFrom(to_duration(outcome.retry_delay))
    return Nack(nack)


class RunRegistry:
    """The deliveries a session is running or settling, by lease id, and their asyncio tasks."""

    def __init__(self) -> None:
        self.runs: dict[str, TaskRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        #: Set while nothing is running.
        self.idle = asyncio.Event()
        self.idle.set()
        #: Set whenever a task finishes (retiring streams wait for their last one).
        self.settled = asyncio.Event()
        #: Tasks finished in this session (any outcome).
        self.processed = 0
        #: When a task last arrived or finished (monotonic s).
        self.last_activity_s = time.monotonic()

    def start(self, run: TaskRun) -> None:
        lease_id = run.delivery.lease_id
        self.runs[lease_id] = run
        task = run.task = asyncio.create_task(run.run(), name=f"task {run.ctx.task_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def arrived(self) -> None:
        """Deliveries came: the session is busy."""
        self.idle.clear()
        self.last_activity_s = time.monotonic()

    def finish(self, run: TaskRun) -> None:
        self.runs.pop(run.delivery.lease_id, None)
        self.processed += 1
        self.last_activity_s = time.monotonic()
        if not self.runs:
            self.idle.set()
        self.settled.set()

    async def cancel_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class TaskRunner:
    """What all runs of a session share: the handlers and where they run, how outcomes are
    settled, and the bookkeeping when a run ends.

    Args:
        options: The worker's options.
        handlers: Handler per task type.
        tracer: For `process` spans; None: not traced (costs nothing per task).
        lifecycle: Whether the run is aborting (handlers not started then fail at once).
        settler: Sends the settlements.
        keeper_clock: Starts lease keepers when due.
        registry: The runs in flight.
        capacity: Frees a slot when a run ends.
        request_credit: Asks the broker for a task to fill a freed slot.
        stats: The worker's counters.
    """

    def __init__(
        self,
        options: WorkerOptions,
        handlers: dict[str, Handler],
        tracer: Tracer | None,
        lifecycle: Lifecycle,
        settler: Settler,
        keeper_clock: KeeperClock,
        registry: RunRegistry,
        capacity: Capacity,
        request_credit: Callable[[], None],
        stats: Stats,
    ) -> None:
        self.options = options
        self.handlers = handlers
        self.tracer = tracer
        self.lifecycle = lifecycle
        self.settler = settler
        self.keeper_clock = keeper_clock
        self._registry = registry
        self._capacity = capacity
        self._request_credit = request_credit
        self._stats = stats
        self.slots = asyncio.Semaphore(options.concurrency)
        self.executor = ThreadPoolExecutor(
            max_workers=options.concurrency, thread_name_prefix="taskbroker-handler"
        )

    async def settle(self, run: TaskRun, outcome: HandlerOutcome) -> None:
        outcome = seal_outcome(self.options.codec, run.ctx, outcome)
        settlement = settlement_for(run.delivery, outcome)
        if self._capacity.hand_back_early():
            run.slot_handed_back = True
            self._request_credit()  # queued before the settlement: one frame carries both
        result = await self.settler.send(run.origin, settlement)
        if (
            isinstance(settlement, Ack)
            and result.outcome == lease_pb2.SETTLE_OUTCOME_INVALID_ARGUMENT
        ):
            # For example a result over the broker's size limit: fail the attempt instead of
            # leaving the task leased until its lease runs out.
            log.error("task %s: ack refused: %s", run.ctx.task_id, result.message)
            outcome = HandlerOutcome("error", error=f"ack refused: {result.message}")
            result = await self.settler.send(run.origin, settlement_for(run.delivery, outcome))
        self._report(run, outcome, result)

    def _report(
        self, run: TaskRun, outcome: HandlerOutcome, result: lease_pb2.SettleResult
    ) -> None:
        ctx = run.ctx
        if result.outcome == lease_pb2.SETTLE_OUTCOME_OK:
            log.log(
                logging.WARNING if outcome.kind in _FAILED_KINDS else logging.INFO,
                "task %s (%s) attempt %d: %s%s",
                ctx.task_id,
                ctx.type,
                ctx.attempt,
                outcome.kind,
                f" ({outcome.error})" if outcome.error else "",
            )
        elif result.outcome in STALE_OUTCOMES:
            self._stats.stale_settlements += 1
            log.warning(
                "task %s: %s refused, the lease is no longer current (%s); it may run again",
                ctx.task_id,
                outcome.kind,
                result.message,
            )
        else:
            log.error(
                "task %s: %s failed: %s %s",
                ctx.task_id,
                outcome.kind,
                lease_pb2.SettleOutcome.Name(result.outcome),
                result.message,
            )

    def finished(self, run: TaskRun) -> None:
        run.origin.held.discard(run.delivery.lease_id)
        self._stats.processed += 1
        self._registry.finish(run)
        if run.slot_handed_back:
            self._capacity.settled()
        else:
            self._capacity.held -= 1
            self._request_credit()


class TaskRun:
    """One delivery: its context, its lease keeper, its handler and its settlement."""

    def __init__(self, runner: TaskRunner, origin: LeaseStream, delivery: lease_pb2.Delivery):
        self._runner = runner
        self.origin = origin
        self.delivery = delivery
        task = delivery.task
        self.ctx = TaskContext(
            task_id=task.id,
            type=task.type,
            queue=task.queue,
            attempt=task.attempt,
            max_attempts=task.max_attempts,
            headers=task.headers,
            payload=task.payload,
            lease_id=delivery.lease_id,
            group_key=task.group_key,
            parent_ids=task.parent_ids,
            parent_results=parent_results_from_proto(task.parent_results),
        )
        self.revoked = False
        #: The asyncio task running `run` (set by the registry right after creating it).
        self.task: asyncio.Task[None] | None = None
        self._keeper: LeaseKeeper | None = None
        self._keeper_task: asyncio.Task[None] | None = None
        #: When the keeper clock should start extending this lease (monotonic s).
        self.keeper_due_s = math.inf
        self._handler_running = False
        self._aborted = False
        #: Whether the run's slot was granted again before its settlement was answered.
        self.slot_handed_back = False

    def _lease_s(self) -> float:
        task = self.delivery.task
        if task.HasField("lease_duration"):
            return task.lease_duration.ToTimedelta().total_seconds()
        return self.origin.lease_s or self._runner.options.lease_duration.total_seconds()

    async def run(self) -> None:
        runner = self._runner
        self._keeper = LeaseKeeper(runner.settler, self, self._lease_s())
        runner.keeper_clock.track(self, time.monotonic() + self._keeper.next_delay_s())
        try:
            outcome = await self._execute()
            self._stop_keeper()
            if self.revoked:
                log.info(
                    "task %s: lease revoked (%s); not settled",
                    self.ctx.task_id,
                    self.ctx.cancel_reason,
                )
            else:
                await runner.settle(self, outcome)
        except Exception:  # a bug here must not take the worker down
            log.exception("task %s: worker error", self.ctx.task_id)
        finally:
            self._stop_keeper()
            runner.finished(self)

    def lease_renewed(self, expire_s: float) -> None:
        """The lease was moved to a new stream and its expiry renewed (epoch seconds)."""
        if self._keeper is not None:
            self._keeper.renewed(expire_s)

    def start_keeper(self) -> None:
        """Called by the keeper clock when the first extension is due."""
        if self._keeper is not None and self._keeper_task is None:
            self._keeper_task = asyncio.create_task(
                self._keeper.run(), name=f"lease keeper {self.ctx.task_id}"
            )

    def _stop_keeper(self) -> None:
        self._keeper = None
        self.keeper_due_s = math.inf
        if self._keeper_task is not None:
            self._keeper_task.cancel()

    async def _execute(self) -> HandlerOutcome:
        """Runs the handler in this task (no task of its own: one less per delivery)."""
        runner = self._runner
        async with runner.slots:
            if runner.lifecycle.aborted:
                return HandlerOutcome("error", error="worker shut down")
            h = runner.handlers.get(self.ctx.type)
            if h is None:
                return HandlerOutcome(
                    "dead",
                    error=f"no handler for task type {self.ctx.type!r} on worker "
                    f"{runner.options.worker_id!r} (handles {sorted(runner.handlers)})",
                )
            if (undecodable := open_payload(runner.options.codec, self.ctx)) is not None:
                return undecodable
            self._handler_running = True
            try:
                if runner.tracer is not None:
                    return await self._traced(runner.tracer, h)
                return await invoke(
                    h,
                    self.ctx,
                    self.ctx.payload,
                    executor=runner.executor,
                    non_retryable=runner.options.non_retryable,
                )
            except asyncio.CancelledError:
                task = asyncio.current_task()
                # Only abort()'s own cancellation is turned into a nack; any other (the final
                # cancel_all, or a second abort) goes on.
                if not self._aborted or task is None or task.cancelling() != 1:
                    raise
                task.uncancel()
                return HandlerOutcome("error", error="worker shut down")
            finally:
                self._handler_running = False

    async def _traced(self, tracer: Tracer, h: Handler) -> HandlerOutcome:
        """Runs the handler inside its `process` span, which is current meanwhile (sync
        handlers too: `invoke` copies the context into the thread)."""
        options = self._runner.options
        span, current = start_process(tracer, self.ctx, options.worker_id, options.trace_parent)
        token = otel_context.attach(current)
        outcome: HandlerOutcome | None = None
        try:
            outcome = await invoke(
                h,
                self.ctx,
                self.ctx.payload,
                executor=self._runner.executor,
                non_retryable=options.non_retryable,
            )
            return outcome
        finally:
            otel_context.detach(token)
            end_process(span, outcome)

    def abort(self) -> None:
        """Cancels the handler (worker shutdown); the attempt is nacked for a retry."""
        self.ctx._cancel("worker shut down")
        if self._handler_running and not self._aborted and self.task is not None:
            self._aborted = True
            self.task.cancel()

    def revoke(self, reason: str) -> None:
        """The broker revoked the lease (the task was cancelled): tell the handler, skip the ack."""
        self.revoked = True
        self.ctx._cancel(reason or "revoked")
