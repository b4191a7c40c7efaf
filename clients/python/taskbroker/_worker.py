"""Worker: runs handlers for the tasks a broker leases to it over one Lease stream.

The parts, each small: `_Capacity` turns free concurrency into credits, `_Connector` keeps a
stream open (reconnecting with backoff, moving on after a drain), `_Settler` delivers acks and
nacks on whichever stream is alive, `_LeaseKeeper` extends a running task's lease, `_TaskRun`
runs one delivery, `_Shutdown` stops a run gracefully, and `_Session` ties one run together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import timedelta
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Final, Self

import grpc
from google.protobuf import timestamp_pb2
from opentelemetry import context as otel_context

from taskbroker._codec_hooks import open_payload, seal_outcome
from taskbroker._convert import to_duration
from taskbroker._handler import (
    ExceptionTypes,
    Handler,
    HandlerOutcome,
    TaskContext,
    invoke,
)
from taskbroker._lease_stream import LeaseStream, Settlement, StreamLost
from taskbroker._status import error_from_rpc
from taskbroker._tracing import (
    TRACE_PARENTS,
    TraceParent,
    Tracing,
    end_process,
    start_process,
)
from taskbroker.v1 import lease_pb2

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer, TracerProvider

    from taskbroker._client import Client
    from taskbroker.encryption import PayloadCodec
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

log = logging.getLogger("taskbroker.worker")

#: Reconnect backoff: 0.1 s doubling to 5 s, with equal jitter.
RECONNECT_INITIAL_S: Final = 0.1
RECONNECT_MAX_S: Final = 5.0
#: A stream that lived this long before failing resets the backoff.
STABLE_STREAM_S: Final = 5.0
#: How long to wait for the broker's `opened` answer.
OPEN_TIMEOUT_S: Final = 10.0
#: Open failures that retrying cannot fix (a bad queue name, no such service, no access).
FATAL_OPEN_CODES: Final = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)
#: A settlement answered UNAVAILABLE ("outcome unknown, may be retried") is retried this often.
SETTLE_RETRIES: Final = 5
SETTLE_RETRY_S: Final = 0.2
#: After the grace period, how long aborted handlers get to have their nacks answered.
ABORT_SETTLE_S: Final = 5.0
#: How long a half-closed stream gets for the broker to answer what is in flight and end it.
CLOSE_TIMEOUT_S: Final = 5.0
#: The broker's limits for Lease streams (lease.proto).
MAX_CREDITS: Final = 10_000
MIN_LEASE: Final = timedelta(milliseconds=10)
MAX_LEASE: Final = timedelta(hours=12)

_OK: Final = lease_pb2.SETTLE_OUTCOME_OK
_STALE: Final = lease_pb2.SETTLE_OUTCOME_LEASE_STALE
_NOT_FOUND: Final = lease_pb2.SETTLE_OUTCOME_NOT_FOUND
_INVALID: Final = lease_pb2.SETTLE_OUTCOME_INVALID_ARGUMENT
_UNAVAILABLE: Final = lease_pb2.SETTLE_OUTCOME_UNAVAILABLE


def _default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


def _seconds(value: timedelta) -> float:
    return value.total_seconds()


async def _first(*waits: Awaitable[object]) -> None:
    """Waits until the first of `waits` finishes, and cancels the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


@dataclass(frozen=True, slots=True)
class _Options:
    queues: tuple[str, ...]
    worker_id: str
    concurrency: int
    lease_duration: timedelta
    shutdown_grace: timedelta
    non_retryable: ExceptionTypes
    trace_parent: TraceParent = "child"
    codec: PayloadCodec | None = None


@dataclass(slots=True)
class _Stats:
    processed: int = 0
    stale_settlements: int = 0


class _Backoff:
    """Exponential backoff with equal jitter (at least half the cap, so retries spread out)."""

    def __init__(self, initial_s: float = RECONNECT_INITIAL_S, max_s: float = RECONNECT_MAX_S):
        self._initial_s = initial_s
        self._max_s = max_s
        self._failures = 0

    def next(self) -> float:
        cap = min(self._max_s, self._initial_s * 2.0**self._failures)
        self._failures += 1
        return cap / 2 + random.uniform(0, cap / 2)

    def reset(self) -> None:
        self._failures = 0


class _Capacity:
    """Free concurrency, granted as credits: held tasks plus unused credits never exceed it."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        #: Deliveries accepted and not finished (running, or waiting for a slot).
        self.held = 0
        #: Set at shutdown: no more credits.
        self.closed = False

    def opening_credits(self) -> int:
        return 0 if self.closed else max(0, self.concurrency - self.held)

    def grant(self, stream: LeaseStream) -> int:
        """Credits to top the stream up with (called by its writer just before sending)."""
        if self.closed or stream.draining:
            return 0
        n = self.concurrency - self.held - stream.unused_credits
        if n <= 0:
            return 0
        stream.unused_credits += n
        return n


class _Connector:
    """Keeps one Lease stream open for deliveries: opens it, reconnects with backoff when it
    fails, and opens a new one at once when the broker drains the current one. A drained stream
    stays open for the settlements of what it delivered, and is half-closed once they are done.
    """

    def __init__(
        self,
        stub: BrokerServiceAsyncStub,
        options: _Options,
        capacity: _Capacity,
        session: _Session,
    ) -> None:
        self._stub = stub
        self._options = options
        self._capacity = capacity
        self._session = session
        self._changed = asyncio.Condition()
        self._retiring: set[asyncio.Task[None]] = set()
        self.active: LeaseStream | None = None
        self.streams: set[LeaseStream] = set()
        #: Set when a stream first opens.
        self.opened = asyncio.Event()

    async def run(self) -> None:
        """Runs until cancelled.

        Raises:
            TaskbrokerError: The broker refused the open frame (for example a bad queue name).
        """
        backoff = _Backoff()
        while True:
            stream = await self._open()
            if stream is None:
                delay = backoff.next()
                log.info("reconnecting in %.2fs", delay)
                await asyncio.sleep(delay)
                continue
            opened_at = time.monotonic()
            await self._activate(stream)
            drained = await self._wait(stream)
            await self._activate(None)
            if drained:
                log.info("broker is draining lease stream %s; opening another", stream.stream_id)
                self._retire(stream)
                backoff.reset()
                continue
            self.streams.discard(stream)
            if time.monotonic() - opened_at >= STABLE_STREAM_S:
                backoff.reset()
            delay = backoff.next()
            log.warning(
                "lease stream %s ended (%s); reconnecting in %.2fs",
                stream.stream_id,
                _describe_end(stream.error),
                delay,
            )
            await asyncio.sleep(delay)

    def _open_frame(self) -> lease_pb2.LeaseOpen:
        return lease_pb2.LeaseOpen(
            queues=list(self._options.queues),
            worker_id=self._options.worker_id,
            credits=self._capacity.opening_credits(),
            lease_duration=to_duration(self._options.lease_duration),
            # Leases of handlers still running move to the new stream, so a broken connection
            # or a broker's drain does not run their tasks a second time.
            resume=self._session.held_leases(),
        )

    async def _open(self) -> LeaseStream | None:
        stream = LeaseStream(self._stub, self._session, self._capacity.grant)
        frame = self._open_frame()
        try:
            await stream.open(frame, OPEN_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in FATAL_OPEN_CODES:
                raise error_from_rpc(exc) from None
            log.warning("cannot open a lease stream: %s", _describe_end(exc))
            return None
        except (TimeoutError, StreamLost) as exc:
            log.warning("cannot open a lease stream: %s", str(exc) or "timed out")
            return None
        log.info(
            "lease stream %s open on %s (credits %d)",
            stream.stream_id,
            ",".join(self._options.queues),
            stream.unused_credits,
        )
        self._session.resumed(stream, frame.resume, stream.resumed)
        self.streams.add(stream)
        self.opened.set()
        return stream

    async def _activate(self, stream: LeaseStream | None) -> None:
        async with self._changed:
            self.active = stream
            self._changed.notify_all()
        if stream is not None:
            stream.request_credit()  # tasks that finished while it was opening freed slots

    async def _wait(self, stream: LeaseStream) -> bool:
        """Waits until the stream ends (False) or is drained while the worker runs on (True)."""
        while True:
            if stream.ended.is_set():
                return False
            if stream.draining and not self._capacity.closed:
                return True
            waits = [stream.ended.wait()]
            if not stream.draining:
                waits.append(stream.drained.wait())
            await _first(*waits)

    def _retire(self, stream: LeaseStream) -> None:
        task = asyncio.create_task(self._close_when_done(stream))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_when_done(self, stream: LeaseStream) -> None:
        while stream.held and not stream.ended.is_set():
            await _first(stream.ended.wait(), self._session.settled.wait())
            self._session.settled.clear()
        await stream.close(CLOSE_TIMEOUT_S)
        self.streams.discard(stream)

    async def wait_active(self) -> LeaseStream:
        """Returns the current stream, waiting for one to open if needed."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.active is not None and self.active.usable)
            assert self.active is not None
            return self.active

    async def close(self) -> None:
        """Half-closes every stream and waits for the broker to end them."""
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        streams = list(self.streams)
        self.streams.clear()
        await asyncio.gather(*(s.close(CLOSE_TIMEOUT_S) for s in streams))


def _describe_end(error: BaseException | None) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return "ended by the broker" if error is None else str(error)


class _Settler:
    """Sends settlements until answered: on the stream that delivered the lease while it lives,
    else on the current one (after a reconnect: the broker accepts them on any stream)."""

    def __init__(self, connector: _Connector) -> None:
        self._connector = connector

    async def send(self, origin: LeaseStream, settlement: Settlement) -> lease_pb2.SettleResult:
        unavailable = 0
        while True:
            stream = origin if origin.usable else await self._connector.wait_active()
            try:
                result = await stream.settle(settlement)
            except StreamLost:
                continue
            if result.outcome == _UNAVAILABLE and unavailable < SETTLE_RETRIES:
                unavailable += 1
                await asyncio.sleep(SETTLE_RETRY_S * unavailable)
                continue
            return result


class _LeaseKeeper:
    """Extends one lease at about half its remaining length while its handler runs. A lease the
    broker no longer knows (LEASE_STALE, NOT_FOUND) cancels the task's context.

    Nothing runs until the first extension is due: `_KeeperClock` starts the keeper then, so the
    many tasks that finish well inside their lease cost nothing here."""

    def __init__(self, settler: _Settler, run: _TaskRun, lease_s: float) -> None:
        self._settler = settler
        self._run = run
        self._lease_s = max(lease_s, MIN_LEASE.total_seconds())
        # Without a stream, retry this often rather than spin on an expired lease.
        self._floor_s = self._lease_s / 10
        self._expire_s = _epoch_s(run.delivery.lease_expire_time)

    def renewed(self, expire_s: float) -> None:
        self._expire_s = expire_s

    def _remaining_s(self) -> float:
        # The expiry is on the broker's (Redis) clock: clamping to the lease length bounds skew.
        return min(max(self._expire_s - time.time(), 0.0), self._lease_s)

    def next_delay_s(self) -> float:
        return max(self._remaining_s() / 2, self._floor_s)

    async def run(self) -> None:
        """Extends now, then whenever the next extension is due, until cancelled or refused."""
        delivery = self._run.delivery
        request: Settlement = (
            "extend",
            lease_pb2.ExtendLeaseRequest(task_id=delivery.task.id, lease_id=delivery.lease_id),
        )
        while True:
            try:
                async with asyncio.timeout(max(self._remaining_s(), self._floor_s)):
                    result = await self._settler.send(self._run.origin, request)
            except TimeoutError:
                result = None  # no stream in time; the next try may find one
            if result is None:
                pass
            elif result.outcome == _OK:
                self._expire_s = _epoch_s(result.lease_expire_time)
            elif result.outcome in (_STALE, _NOT_FOUND):
                log.warning("task %s: lease lost (%s)", delivery.task.id, result.message or "stale")
                self._run.ctx._cancel("lease lost")
                return
            elif result.outcome == _INVALID:
                log.error("task %s: extension refused: %s", delivery.task.id, result.message)
                return
            await asyncio.sleep(self.next_delay_s())


class _KeeperClock:
    """Starts each running task's lease keeper when its first extension is due: one sweep over
    the running tasks when the earliest is due, rather than a timer per task (at thousands of
    tasks a second, the loop's timer heap would be the worker's largest cost)."""

    def __init__(self, runs: dict[str, _TaskRun]) -> None:
        self._runs = runs
        self._wake = asyncio.Event()
        self._next_s = math.inf  # monotonic time of the next sweep

    def track(self, run: _TaskRun, due_s: float) -> None:
        run.keeper_due_s = due_s
        if due_s < self._next_s:
            self._wake.set()

    async def run(self) -> None:
        while True:
            now = time.monotonic()
            next_s = math.inf
            for run in list(self._runs.values()):
                if run.keeper_due_s <= now:
                    run.keeper_due_s = math.inf
                    run.start_keeper()
                else:
                    next_s = min(next_s, run.keeper_due_s)
            self._next_s = next_s
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                timeout = None if next_s == math.inf else next_s - now
                await asyncio.wait_for(self._wake.wait(), timeout)


def _epoch_s(ts: timestamp_pb2.Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


def _settle_request(delivery: lease_pb2.Delivery, outcome: HandlerOutcome) -> Settlement:
    task_id, lease_id = delivery.task.id, delivery.lease_id
    if outcome.kind == "ack":
        return "ack", lease_pb2.AckRequest(
            task_id=task_id, lease_id=lease_id, result=outcome.result
        )
    nack = lease_pb2.NackRequest(
        task_id=task_id, lease_id=lease_id, error=outcome.error, dead_letter=outcome.kind == "dead"
    )
    if outcome.kind == "retry" and outcome.retry_delay is not None:
        nack.retry_delay.CopyFrom(to_duration(outcome.retry_delay))
    return "nack", nack


class _TaskRun:
    """One delivery: its context, its lease keeper, its handler and its settlement."""

    def __init__(self, session: _Session, origin: LeaseStream, delivery: lease_pb2.Delivery):
        self._session = session
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
        )
        self.revoked = False
        #: The asyncio task running `run` (set by the session right after creating it).
        self.task: asyncio.Task[None] | None = None
        self._keeper: _LeaseKeeper | None = None
        self._keeper_task: asyncio.Task[None] | None = None
        #: When the keeper clock should start extending this lease (monotonic s).
        self.keeper_due_s = math.inf
        self._handler_running = False
        self._aborted = False

    def _lease_s(self) -> float:
        task = self.delivery.task
        if task.HasField("lease_duration"):
            return _seconds(task.lease_duration.ToTimedelta())
        return self.origin.lease_s or _seconds(self._session.options.lease_duration)

    async def run(self) -> None:
        self._keeper = _LeaseKeeper(self._session.settler, self, self._lease_s())
        self._session.keeper_clock.track(self, time.monotonic() + self._keeper.next_delay_s())
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
                await self._session.settle(self, outcome)
        except Exception:  # a bug here must not take the worker down
            log.exception("task %s: worker error", self.ctx.task_id)
        finally:
            self._stop_keeper()
            self._session.finished(self)

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
        session = self._session
        async with session.slots:
            if session.aborting:
                return HandlerOutcome("error", error="worker shut down")
            h = session.handlers.get(self.ctx.type)
            if h is None:
                return HandlerOutcome(
                    "dead",
                    error=f"no handler for task type {self.ctx.type!r} on worker "
                    f"{session.options.worker_id!r} (handles {sorted(session.handlers)})",
                )
            if (undecodable := open_payload(session.options.codec, self.ctx)) is not None:
                return undecodable
            self._handler_running = True
            try:
                tracer = session.tracer
                if tracer is not None:
                    return await self._traced(tracer, h)
                return await invoke(
                    h,
                    self.ctx,
                    self.ctx.payload,
                    executor=session.executor,
                    non_retryable=session.options.non_retryable,
                )
            except asyncio.CancelledError:
                task = asyncio.current_task()
                # Only abort()'s own cancellation is turned into a nack; any other (the final
                # cancel_runs, or a second abort) goes on.
                if not self._aborted or task is None or task.cancelling() != 1:
                    raise
                task.uncancel()
                return HandlerOutcome("error", error="worker shut down")
            finally:
                self._handler_running = False

    async def _traced(self, tracer: Tracer, h: Handler) -> HandlerOutcome:
        """Runs the handler inside its `process` span, which is current meanwhile (sync
        handlers too: `invoke` copies the context into the thread)."""
        session = self._session
        options = session.options
        span, current = start_process(tracer, self.ctx, options.worker_id, options.trace_parent)
        token = otel_context.attach(current)
        outcome: HandlerOutcome | None = None
        try:
            outcome = await invoke(
                h,
                self.ctx,
                self.ctx.payload,
                executor=session.executor,
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


class _Shutdown:
    """Stops a run: no more credits, in-flight tasks finish within the grace period, the rest
    are cancelled and nacked, then the streams are half-closed."""

    def __init__(self, session: _Session) -> None:
        self._session = session
        self.requested = asyncio.Event()
        #: Set by a second signal: skip what is left of the grace period.
        self.hurry = asyncio.Event()

    def request(self, *, hurry: bool = False) -> None:
        self.requested.set()
        if hurry:
            self.hurry.set()

    async def _wait_idle(self, timeout_s: float, *, hurry: bool) -> None:
        """Waits until nothing runs (tasks may still arrive on unused credits meanwhile)."""
        session = self._session
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while session.runs and not (hurry and self.hurry.is_set()):
                    if hurry:
                        await _first(session.idle.wait(), self.hurry.wait())
                    else:
                        await session.idle.wait()

    async def perform(self, connector_task: asyncio.Task[None]) -> None:
        session = self._session
        session.capacity.closed = True
        grace_s = _seconds(session.options.shutdown_grace)
        if session.runs:
            log.info("shutting down: waiting up to %gs for %d tasks", grace_s, len(session.runs))
        await self._wait_idle(grace_s, hurry=True)
        if session.runs:
            log.warning("shutting down: cancelling %d unfinished tasks", len(session.runs))
            session.aborting = True
            for run in list(session.runs.values()):
                run.abort()
            await self._wait_idle(ABORT_SETTLE_S, hurry=False)
        session.closed = True  # synchronously with the last check, so no new run can start
        await session.cancel_runs()
        connector_task.cancel()
        await asyncio.gather(connector_task, return_exceptions=True)
        await session.connector.close()
        session.executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped", session.options.worker_id)


class _Session:
    """One run of a worker, from the first stream opened to the last one closed."""

    def __init__(
        self,
        stub: BrokerServiceAsyncStub,
        options: _Options,
        handlers: dict[str, Handler],
        stats: _Stats,
        tracer: Tracer | None,
    ) -> None:
        self.options = options
        self.handlers = handlers
        #: Looked up once per run: None (no provider configured) costs nothing per task.
        self.tracer = tracer
        self._stats = stats
        self.capacity = _Capacity(options.concurrency)
        self.slots = asyncio.Semaphore(options.concurrency)
        self.executor = ThreadPoolExecutor(
            max_workers=options.concurrency, thread_name_prefix="taskbroker-handler"
        )
        self.connector = _Connector(stub, options, self.capacity, self)
        self.settler = _Settler(self.connector)
        self.shutdown = _Shutdown(self)
        self.runs: dict[str, _TaskRun] = {}
        self.keeper_clock = _KeeperClock(self.runs)
        self._run_tasks: set[asyncio.Task[None]] = set()
        self.aborting = False
        #: Set once the streams are being closed: late deliveries are left to the broker.
        self.closed = False
        #: Set while nothing is running.
        self.idle = asyncio.Event()
        self.idle.set()
        #: Set whenever a task finishes (retiring streams wait for their last one).
        self.settled = asyncio.Event()
        self.done = asyncio.Event()
        self.processed = 0
        self._last_activity = time.monotonic()

    async def run(self) -> None:
        connector = asyncio.create_task(self.connector.run(), name="taskbroker lease connector")
        clock = asyncio.create_task(self.keeper_clock.run(), name="taskbroker lease keeper clock")
        requested = asyncio.create_task(self.shutdown.requested.wait())
        try:
            await asyncio.wait([connector, requested], return_when=asyncio.FIRST_COMPLETED)
        finally:
            requested.cancel()
            try:
                await self.shutdown.perform(connector)
            finally:
                clock.cancel()  # runs until here: tasks finishing in the grace keep their leases
                await asyncio.gather(clock, return_exceptions=True)
                self.done.set()
        if not connector.cancelled() and (error := connector.exception()) is not None:
            raise error

    async def wait_idle(self, idle_for_s: float) -> None:
        """Returns once a stream has opened and nothing ran or arrived for `idle_for_s`."""
        await self.connector.opened.wait()
        self._last_activity = max(self._last_activity, time.monotonic())
        while True:
            await self.idle.wait()
            quiet_s = time.monotonic() - self._last_activity
            if quiet_s >= idle_for_s:
                return
            await asyncio.sleep(idle_for_s - quiet_s)

    async def cancel_runs(self) -> None:
        for task in list(self._run_tasks):
            task.cancel()
        await asyncio.gather(*self._run_tasks, return_exceptions=True)

    # --- lease resume -------------------------------------------------------------------------

    def held_leases(self) -> list[lease_pb2.HeldLease]:
        """The leases of the tasks this session still runs or settles, to move to a new stream."""
        return [
            lease_pb2.HeldLease(task_id=run.ctx.task_id, lease_id=lease_id)
            for lease_id, run in self.runs.items()
            if not run.revoked
        ]

    def resumed(
        self,
        stream: LeaseStream,
        asked: Sequence[lease_pb2.HeldLease],
        answers: Sequence[lease_pb2.SettleResult],
    ) -> None:
        """Applies the broker's answers to a resume: a lease it moved is now the new stream's;
        a lease it refused was re-leased or settled elsewhere, so its handler is stopped and its
        outcome is not sent (it would be refused)."""
        for held, answer in zip(asked, answers, strict=False):
            run = self.runs.get(held.lease_id)
            if run is None:
                continue
            if answer.outcome == _OK:
                run.origin.held.discard(held.lease_id)
                run.origin = stream
                stream.held.add(held.lease_id)
                run.lease_renewed(_epoch_s(answer.lease_expire_time))
            elif answer.outcome in (_STALE, _NOT_FOUND):
                log.warning(
                    "task %s: lease lost while reconnecting (%s); stopping its handler",
                    run.ctx.task_id,
                    answer.message or "stale",
                )
                run.revoke("lease lost")
        if asked:
            moved = sum(1 for a in answers if a.outcome == _OK)
            log.info(
                "lease stream %s: resumed %d of %d leases", stream.stream_id, moved, len(asked)
            )
            self.settled.set()  # a retiring stream may now hold nothing: it can close

    # --- StreamListener -----------------------------------------------------------------------

    def on_deliveries(self, stream: LeaseStream, deliveries: Sequence[lease_pb2.Delivery]) -> None:
        if self.closed:
            # The stream is closing: the broker hands these back to the queue when it ends.
            log.debug("ignoring %d tasks delivered while closing", len(deliveries))
            return
        for delivery in deliveries:
            run = _TaskRun(self, stream, delivery)
            self.runs[delivery.lease_id] = run
            self.capacity.held += 1
            task = run.task = asyncio.create_task(run.run(), name=f"task {delivery.task.id}")
            self._run_tasks.add(task)
            task.add_done_callback(self._run_tasks.discard)
            log.debug(
                "task %s (%s) attempt %d delivered",
                delivery.task.id,
                delivery.task.type,
                delivery.task.attempt,
            )
        self.idle.clear()
        self._last_activity = time.monotonic()

    def on_revoked(self, stream: LeaseStream, leases: Sequence[lease_pb2.RevokedLease]) -> None:
        for lease in leases:
            if run := self.runs.get(lease.lease_id):
                log.info("task %s: lease revoked (%s)", lease.task_id, lease.reason)
                run.revoke(lease.reason)

    def on_drain(self, stream: LeaseStream) -> None:
        log.info("lease stream %s: the broker is shutting down", stream.stream_id)

    # --- settling -----------------------------------------------------------------------------

    async def settle(self, run: _TaskRun, outcome: HandlerOutcome) -> None:
        outcome = seal_outcome(self.options.codec, run.ctx, outcome)
        result = await self.settler.send(run.origin, _settle_request(run.delivery, outcome))
        if outcome.kind == "ack" and result.outcome == _INVALID:
            # For example a result over the broker's size limit: fail the attempt instead of
            # leaving the task leased until its lease runs out.
            log.error("task %s: ack refused: %s", run.ctx.task_id, result.message)
            outcome = HandlerOutcome("error", error=f"ack refused: {result.message}")
            result = await self.settler.send(run.origin, _settle_request(run.delivery, outcome))
        self._report(run, outcome, result)

    def _report(
        self, run: _TaskRun, outcome: HandlerOutcome, result: lease_pb2.SettleResult
    ) -> None:
        ctx = run.ctx
        if result.outcome == _OK:
            # A handler that failed is worth a warning; a retry it asked for (RetryLater) is not.
            failed = outcome.kind in ("error", "dead")
            log.log(
                logging.WARNING if failed else logging.INFO,
                "task %s (%s) attempt %d: %s%s",
                ctx.task_id,
                ctx.type,
                ctx.attempt,
                outcome.kind,
                f" ({outcome.error})" if outcome.error else "",
            )
        elif result.outcome in (_STALE, _NOT_FOUND):
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

    def finished(self, run: _TaskRun) -> None:
        lease_id = run.delivery.lease_id
        self.runs.pop(lease_id, None)
        run.origin.held.discard(lease_id)
        self.capacity.held -= 1
        self.processed += 1
        self._stats.processed += 1
        self._last_activity = time.monotonic()
        if not self.runs:
            self.idle.set()
        self.settled.set()
        if (active := self.connector.active) is not None:
            active.request_credit()


class Worker:
    """Runs handlers for the tasks of some queues, as the broker leases them.

    ```python
    worker = Worker(client, queues=["emails"], handlers=[send_welcome_email], concurrency=16)
    await worker.run()  # until SIGINT/SIGTERM; in-flight tasks get the grace period to finish
    ```

    The worker holds one Lease stream and grants it as many credits as it has free slots, so the
    broker never leases it more tasks than it can run. Leases are extended while handlers run;
    results are acked and failures nacked on the stream. When the stream fails the worker
    reconnects with backoff, and running handlers carry on: their outcome is settled on the new
    stream (a settlement the broker refuses as stale is counted in `stale_settlements`). When
    the broker drains the stream (it is shutting down), the worker opens another one.

    Args:
        client: The client whose channel (and payload codec, if any) the worker uses.
        queues: Queues to take tasks from (1 to 64).
        handlers: One handler per task type; a task of another type is dead-lettered.
        concurrency: Most tasks run at once (1 to 10,000); sync handlers get as many threads.
        lease_duration: Lease length to ask for (a task's own lease_duration wins).
        worker_id: Names the worker in the broker's logs. None: "host:pid".
        shutdown_grace: How long in-flight tasks get to finish at shutdown before they are
            cancelled and nacked (to be retried).
        non_retryable: Exceptions that dead-letter a task in any handler.
        trace_parent: How each attempt's `process` span relates to the producer's `send` span
            (from the task's traceparent header): "child" continues the producer's trace;
            "link" starts a new trace per attempt. Both link to the producer's span.
        tracer_provider: The OpenTelemetry tracer provider for `process` spans. None: the
            client's (`Client(tracer_provider=...)`), else the global one as it is when the
            worker starts running; without one nothing is traced.

    Raises:
        ValueError: An option is out of range, or two handlers share a task type.
    """

    def __init__(
        self,
        client: Client,
        *,
        queues: Sequence[str],
        handlers: Sequence[Handler],
        concurrency: int = 10,
        lease_duration: timedelta = timedelta(seconds=30),
        worker_id: str | None = None,
        shutdown_grace: timedelta = timedelta(seconds=30),
        non_retryable: Sequence[type[BaseException]] = (),
        trace_parent: TraceParent = "child",
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self._client = client
        self._handlers = _handler_map(handlers)
        options = _options(
            queues,
            concurrency,
            lease_duration,
            _default_worker_id() if worker_id is None else worker_id,
            shutdown_grace,
            tuple(non_retryable),
            trace_parent,
        )
        self._options = replace(options, codec=client.codec)  # payloads decoded as the client's
        self._tracing = Tracing(
            client.tracer_provider if tracer_provider is None else tracer_provider
        )
        self._stats = _Stats()
        self._session: _Session | None = None
        self._background: asyncio.Task[None] | None = None

    @property
    def worker_id(self) -> str:
        """How the worker names itself to the broker."""
        return self._options.worker_id

    @property
    def processed(self) -> int:
        """Tasks this worker has finished with (any outcome), over all its runs."""
        return self._stats.processed

    @property
    def stale_settlements(self) -> int:
        """Acks and nacks the broker refused because the lease was no longer current."""
        return self._stats.stale_settlements

    def _begin(self) -> _Session:
        if self._session is not None:
            raise RuntimeError("the worker is already running")
        self._session = _Session(
            self._client.stub, self._options, self._handlers, self._stats, self._tracing.tracer()
        )
        return self._session

    async def _serve(self, session: _Session) -> None:
        options = self._options
        log.info(
            "worker %s starting: broker %s, queues %s, concurrency %d, handlers %s",
            options.worker_id,
            self._client.target,
            ",".join(options.queues),
            options.concurrency,
            ",".join(sorted(self._handlers)),
        )
        try:
            await session.run()
        finally:
            self._session = None

    async def run(self) -> None:
        """Runs until `shutdown()`, SIGINT or SIGTERM (or the broker refuses the worker).

        Signal handlers are installed only when called in the main thread, and removed on return.
        A second signal skips what is left of the grace period. During the grace period the
        worker grants no more credits, but credits granted earlier may still bring tasks; they
        run under the same deadline.

        Raises:
            RuntimeError: The worker is already running.
            TaskbrokerError: The broker refused the stream (for example a bad queue name).
        """
        session = self._begin()
        with _SignalHandlers(session.shutdown):
            await self._serve(session)

    async def shutdown(self) -> None:
        """Stops the worker gracefully and returns once it has stopped. A no-op when idle.

        Raises:
            TaskbrokerError: The worker started with `async with` had stopped on this error.
        """
        if (session := self._session) is not None:
            session.shutdown.request()
            await session.done.wait()
        if self._background is not None:
            background, self._background = self._background, None
            await background

    async def run_until_idle(self, idle_for: timedelta = timedelta(milliseconds=300)) -> int:
        """Processes what is queued, and returns once nothing has arrived or run for `idle_for`.

        Meant for tests and batch jobs (arq's burst mode). Tasks scheduled further out than
        `idle_for` are left for a later run.

        Args:
            idle_for: How long the worker must have been idle.

        Returns:
            How many tasks it processed (any outcome).

        Raises:
            RuntimeError: The worker is already running.
            TaskbrokerError: The broker refused the stream.
        """
        session = self._begin()
        serving = asyncio.create_task(self._serve(session))
        try:
            await _first(asyncio.shield(serving), session.wait_idle(_seconds(idle_for)))
        finally:
            session.shutdown.request()
            await serving
        return session.processed

    async def __aenter__(self) -> Self:
        session = self._begin()
        self._background = asyncio.create_task(self._serve(session), name="taskbroker worker")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()


class _SignalHandlers:
    """SIGINT/SIGTERM request a graceful shutdown while installed (main thread only); the
    previous Python-level handlers are restored afterwards."""

    SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, shutdown: _Shutdown) -> None:
        self._shutdown = shutdown
        self._previous: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None]
        self._previous = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _on_signal(self, sig: signal.Signals) -> None:
        hurry = self._shutdown.requested.is_set()
        log.info("%s: %s", sig.name, "stopping now" if hurry else "shutting down gracefully")
        self._shutdown.request(hurry=hurry)

    def __enter__(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            previous = signal.getsignal(sig)
            try:
                self._loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError):  # no signals on this platform or loop
                continue
            self._previous[sig] = previous

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is None:
            return
        for sig, previous in self._previous.items():
            self._loop.remove_signal_handler(sig)
            if previous is not None:
                signal.signal(sig, previous)


def _handler_map(handlers: Sequence[Handler]) -> dict[str, Handler]:
    by_type: dict[str, Handler] = {}
    for h in handlers:
        if not isinstance(h, Handler):
            raise TypeError(f"handlers: {h!r} is not a Handler (decorate it with @handler)")
        if h.type in by_type:
            raise ValueError(f"handlers: two handlers for task type {h.type!r}")
        by_type[h.type] = h
    return by_type


def _options(
    queues: Sequence[str],
    concurrency: int,
    lease_duration: timedelta,
    worker_id: str,
    shutdown_grace: timedelta,
    non_retryable: ExceptionTypes,
    trace_parent: TraceParent,
) -> _Options:
    names = (queues,) if isinstance(queues, str) else tuple(queues)
    if not names:
        raise ValueError("queues: give at least one queue")
    if not 1 <= concurrency <= MAX_CREDITS:
        raise ValueError(f"concurrency must be 1 to {MAX_CREDITS}")
    if not MIN_LEASE <= lease_duration <= MAX_LEASE:
        raise ValueError("lease_duration must be 10 ms to 12 h")
    if shutdown_grace < timedelta(0):
        raise ValueError("shutdown_grace must not be negative")
    if len(worker_id) > 128 or not worker_id.isprintable():
        raise ValueError("worker_id: at most 128 printable characters")
    if trace_parent not in TRACE_PARENTS:
        raise ValueError(f"trace_parent must be one of {', '.join(TRACE_PARENTS)}")
    return _Options(
        names, worker_id, concurrency, lease_duration, shutdown_grace, non_retryable, trace_parent
    )
