"""Shutdown: stops a worker run gracefully, moving its lifecycle from RUNNING to STOPPED."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Final

from taskbroker._connector import wait_first
from taskbroker._lifecycle import WorkerState

if TYPE_CHECKING:
    from taskbroker._connector import Connector
    from taskbroker._lifecycle import Lifecycle
    from taskbroker._task_run import RunRegistry
    from taskbroker._worker_options import WorkerOptions

log = logging.getLogger("taskbroker.worker")

#: After the grace period, how long aborted handlers get to have their nacks answered.
ABORT_SETTLE_S: Final = 5.0


class Shutdown:
    """Stops a run: no more credits, in-flight tasks finish within the grace period, the rest
    are cancelled and nacked, then the streams are half-closed.

    Args:
        options: The grace period and the worker's id.
        lifecycle: Moved along as the run stops; its `hurry` skips the rest of the grace.
        registry: The runs in flight.
        connector: Its streams are closed last.
        executor: The handlers' threads.
    """

    def __init__(
        self,
        options: WorkerOptions,
        lifecycle: Lifecycle,
        registry: RunRegistry,
        connector: Connector,
        executor: Executor,
    ) -> None:
        self._options = options
        self._lifecycle = lifecycle
        self._registry = registry
        self._connector = connector
        self._executor = executor

    async def _wait_idle(self, timeout_s: float, *, hurry: bool) -> None:
        """Waits until nothing runs (tasks may still arrive on unused credits meanwhile)."""
        registry, hurried = self._registry, self._lifecycle.hurry
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while registry.runs and not (hurry and hurried.is_set()):
                    if hurry:
                        await wait_first(registry.idle.wait(), hurried.wait())
                    else:
                        await registry.idle.wait()

    async def perform(self, connector_task: asyncio.Task[None]) -> None:
        lifecycle, runs = self._lifecycle, self._registry.runs
        lifecycle.advance(WorkerState.DRAINING)
        grace_s = self._options.shutdown_grace.total_seconds()
        if runs:
            log.info("shutting down: waiting up to %gs for %d tasks", grace_s, len(runs))
        await self._wait_idle(grace_s, hurry=True)
        if runs:
            log.warning("shutting down: cancelling %d unfinished tasks", len(runs))
            lifecycle.advance(WorkerState.ABORTING)
            for run in list(runs.values()):
                run.abort()
            await self._wait_idle(ABORT_SETTLE_S, hurry=False)
        # Synchronously with the last check, so no new run can start.
        lifecycle.advance(WorkerState.CLOSING)
        await self._registry.cancel_all()
        connector_task.cancel()
        await asyncio.gather(connector_task, return_exceptions=True)
        await self._connector.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped", self._options.worker_id)
