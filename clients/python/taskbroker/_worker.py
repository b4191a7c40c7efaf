"""Worker: the public worker runtime; runs handlers for the tasks a broker leases to it.

A run is a `Session` (`_session.py`). The modules of the runtime import in one direction only,
each from those below it (tests/sdk/test_worker_layers.py holds them to it):
`_worker` → `_session` → `_shutdown` → `_task_run` → `_lease_keeper` → `_connector` →
`_lease_stream` → `_lifecycle` → `_worker_options`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import timedelta
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Final, Self

from taskbroker._connector import wait_first
from taskbroker._handler import Handler
from taskbroker._session import Session
from taskbroker._task_run import Stats
from taskbroker._tracing import TraceParent, Tracing

# The broker's limits, re-exported where tests/test_pinned_constants.py pins them.
from taskbroker._worker_options import MAX_CREDITS as MAX_CREDITS
from taskbroker._worker_options import MAX_LEASE as MAX_LEASE
from taskbroker._worker_options import MIN_LEASE as MIN_LEASE
from taskbroker._worker_options import checked_options, default_worker_id

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from taskbroker._client import Client
    from taskbroker._lifecycle import Lifecycle

log = logging.getLogger("taskbroker.worker")


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
        options = checked_options(
            queues,
            concurrency,
            lease_duration,
            default_worker_id() if worker_id is None else worker_id,
            shutdown_grace,
            tuple(non_retryable),
            trace_parent,
        )
        self._options = replace(options, codec=client.codec)  # payloads decoded as the client's
        self._tracing = Tracing(
            client.tracer_provider if tracer_provider is None else tracer_provider
        )
        self._stats = Stats()
        self._session: Session | None = None
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

    def _begin(self) -> Session:
        if self._session is not None:
            raise RuntimeError("the worker is already running")
        self._session = Session(
            self._client.stub, self._options, self._handlers, self._stats, self._tracing.tracer()
        )
        return self._session

    async def _serve(self, session: Session) -> None:
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
        with _SignalHandlers(session.lifecycle):
            await self._serve(session)

    async def shutdown(self) -> None:
        """Stops the worker gracefully and returns once it has stopped. A no-op when idle.

        Raises:
            TaskbrokerError: The worker started with `async with` had stopped on this error.
        """
        if (session := self._session) is not None:
            session.lifecycle.request_stop()
            await session.lifecycle.stopped.wait()
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
            await wait_first(asyncio.shield(serving), session.wait_idle(idle_for.total_seconds()))
        finally:
            session.lifecycle.request_stop()
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

    def __init__(self, lifecycle: Lifecycle) -> None:
        self._lifecycle = lifecycle
        self._previous: dict[signal.Signals, Callable[[int, FrameType | None], object] | int | None]
        self._previous = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _on_signal(self, sig: signal.Signals) -> None:
        hurry = self._lifecycle.stop_requested.is_set()
        log.info("%s: %s", sig.name, "stopping now" if hurry else "shutting down gracefully")
        self._lifecycle.request_stop(hurry=hurry)

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
