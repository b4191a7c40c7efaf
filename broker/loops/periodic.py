"""Periodic: runs a job's run_once() every interval, with jitter, until stopped."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Protocol

from broker.cancellation import raise_if_cancelled
from broker.errors import BrokerError

log = logging.getLogger(__name__)


class Job(Protocol):
    """A maintenance pass."""

    name: str

    async def run_once(self) -> int: ...


class Periodic:
    """Runs job.run_once() every interval_s (±10% jitter, so replicas drift apart). A failed
    pass is logged and the loop goes on; cancellation is never swallowed."""

    def __init__(
        self, job: Job, interval_s: float, pause: Callable[[], float] | None = None
    ) -> None:
        self._job = job
        self._interval_s = interval_s
        # Extra seconds to wait after a pass (a paced job with nothing to do for a while).
        self._pause = pause
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self._job.name)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        failures = 0
        while True:
            raise_if_cancelled()
            try:
                await self._job.run_once()
                failures = 0
            except BrokerError as exc:
                raise_if_cancelled()
                failures += 1
                # One line per outage, not per pass.
                if failures == 1:
                    log.warning("%s: pass failed: %s", self._job.name, exc)
            except Exception:
                raise_if_cancelled()
                log.exception("%s: pass failed", self._job.name)
            raise_if_cancelled()
            extra = self._pause() if self._pause else 0.0
            await asyncio.sleep(self._interval_s * random.uniform(0.9, 1.1) + extra)
