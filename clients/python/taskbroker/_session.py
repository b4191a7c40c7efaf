"""Session: one run of a worker, from the first stream opened to the last one closed.

`Session` builds the parts of a run and passes each its collaborators; `Dispatcher` turns what
the streams receive (deliveries, revocations, resume answers) into task runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from taskbroker._connector import ActiveStream, Capacity, Connector, Settler
from taskbroker._lease_keeper import KeeperClock, epoch_s
from taskbroker._lifecycle import Lifecycle, WorkerState
from taskbroker._shutdown import Shutdown
from taskbroker._task_run import STALE_OUTCOMES, RunRegistry, Stats, TaskRun, TaskRunner
from taskbroker.v1 import lease_pb2

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from taskbroker._handler import Handler
    from taskbroker._lease_stream import LeaseStream
    from taskbroker._worker_options import WorkerOptions
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

log = logging.getLogger("taskbroker.worker")


class Dispatcher:
    """The streams' listener: starts a run per delivery, and stops the runs whose lease was
    revoked or lost. Also says which leases a new stream should resume, and applies the
    broker's answers."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        runner: TaskRunner,
        registry: RunRegistry,
        capacity: Capacity,
    ) -> None:
        self._lifecycle = lifecycle
        self._runner = runner
        self._registry = registry
        self._capacity = capacity

    def on_deliveries(self, stream: LeaseStream, deliveries: Sequence[lease_pb2.Delivery]) -> None:
        if not self._lifecycle.accepting:
            # The stream is closing: the broker hands these back to the queue when it ends.
            log.debug("ignoring %d tasks delivered while closing", len(deliveries))
            return
        for delivery in deliveries:
            self._capacity.held += 1
            self._registry.start(TaskRun(self._runner, stream, delivery))
            log.debug(
                "task %s (%s) attempt %d delivered",
                delivery.task.id,
                delivery.task.type,
                delivery.task.attempt,
            )
        self._registry.arrived()

    def on_revoked(self, stream: LeaseStream, leases: Sequence[lease_pb2.RevokedLease]) -> None:
        for lease in leases:
            if run := self._registry.runs.get(lease.lease_id):
                log.info("task %s: lease revoked (%s)", lease.task_id, lease.reason)
                run.revoke(lease.reason)

    def on_drain(self, stream: LeaseStream) -> None:
        log.info("lease stream %s: the broker is shutting down", stream.stream_id)

    def held_leases(self) -> list[lease_pb2.HeldLease]:
        """The leases of the tasks still running or settling, to move to a new stream."""
        return [
            lease_pb2.HeldLease(task_id=run.ctx.task_id, lease_id=lease_id)
            for lease_id, run in self._registry.runs.items()
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
            run = self._registry.runs.get(held.lease_id)
            if run is None:
                continue
            if answer.outcome == lease_pb2.SETTLE_OUTCOME_OK:
                run.origin.held.discard(held.lease_id)
                run.origin = stream
                stream.held.add(held.lease_id)
                run.lease_renewed(epoch_s(answer.lease_expire_time))
            elif answer.outcome in STALE_OUTCOMES:
                log.warning(
                    "task %s: lease lost while reconnecting (%s); stopping its handler",
                    run.ctx.task_id,
                    answer.message or "stale",
                )
                run.revoke("lease lost")
        if asked:
            moved = sum(1 for a in answers if a.outcome == lease_pb2.SETTLE_OUTCOME_OK)
            log.info(
                "lease stream %s: resumed %d of %d leases", stream.stream_id, moved, len(asked)
            )
            self._registry.settled.set()  # a retiring stream may now hold nothing: it can close


class Session:
    """One run of a worker: builds its parts, runs them until a stop is requested (or the
    broker refuses the worker), then shuts down.

    Args:
        stub: The BrokerService stub.
        options: The worker's options.
        handlers: Handler per task type.
        stats: The worker's counters, kept across runs.
        tracer: Looked up once per run: None (no provider configured) costs nothing per task.
    """

    def __init__(
        self,
        stub: BrokerServiceAsyncStub,
        options: WorkerOptions,
        handlers: dict[str, Handler],
        stats: Stats,
        tracer: Tracer | None,
    ) -> None:
        self.lifecycle = Lifecycle()
        self._registry = registry = RunRegistry()
        capacity = Capacity(options.concurrency, self.lifecycle)
        active = ActiveStream()
        self._keeper_clock = KeeperClock(registry.runs)
        runner = TaskRunner(
            options,
            handlers,
            tracer,
            self.lifecycle,
            Settler(active),
            self._keeper_clock,
            registry,
            capacity,
            active.request_credit,
            stats,
        )
        dispatcher = Dispatcher(self.lifecycle, runner, registry, capacity)
        self._connector = Connector(
            stub,
            options,
            capacity,
            active,
            self.lifecycle,
            dispatcher,
            dispatcher.held_leases,
            dispatcher.resumed,
            registry.settled,
        )
        self._shutdown = Shutdown(
            options, self.lifecycle, registry, self._connector, runner.executor
        )

    @property
    def processed(self) -> int:
        """Tasks finished in this run (any outcome)."""
        return self._registry.processed

    async def run(self) -> None:
        """Runs until a stop is requested, then stops gracefully.

        Raises:
            TaskbrokerError: The broker refused the stream.
        """
        connector = asyncio.create_task(self._connector.run(), name="taskbroker lease connector")
        clock = asyncio.create_task(self._keeper_clock.run(), name="taskbroker lease keeper clock")
        requested = asyncio.create_task(self.lifecycle.stop_requested.wait())
        try:
            await asyncio.wait([connector, requested], return_when=asyncio.FIRST_COMPLETED)
        finally:
            requested.cancel()
            try:
                await self._shutdown.perform(connector)
            finally:
                clock.cancel()  # runs until here: tasks finishing in the grace keep their leases
                await asyncio.gather(clock, return_exceptions=True)
                self.lifecycle.advance(WorkerState.STOPPED)
        if not connector.cancelled() and (error := connector.exception()) is not None:
            raise error

    async def wait_idle(self, idle_for_s: float) -> None:
        """Returns once a stream has opened and nothing ran or arrived for `idle_for_s`."""
        await self._connector.opened.wait()
        registry = self._registry
        registry.last_activity_s = max(registry.last_activity_s, time.monotonic())
        while True:
            await registry.idle.wait()
            quiet_s = time.monotonic() - registry.last_activity_s
            if quiet_s >= idle_for_s:
                return
            await asyncio.sleep(idle_for_s - quiet_s)
