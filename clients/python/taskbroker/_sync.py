"""SyncClient: the producer calls of Client, and its schedule calls, for synchronous code (web
apps, scripts, threads)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Coroutine, Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

from taskbroker._channel import TlsConfig
from taskbroker._client import KEEP, Client, EnqueueResult, _Keep
from taskbroker._models import (
    CatchUp,
    GroupKeyPage,
    NewTask,
    QueueSettings,
    QueueStats,
    RateLimit,
    Schedule,
    Task,
    TaskId,
)
from taskbroker._options import TaskOptions, checked_options, with_options_doc
from taskbroker._schedule_calls import CatchUpArg
from taskbroker._workflow import EnqueuedWorkflow, Shape
from taskbroker.encryption import PayloadCodec

_T = TypeVar("_T")


class SyncClient:
    """A blocking client for producers and schedules, safe to share between threads.

    It runs an asyncio `Client` on a private event loop in a daemon thread, so it works in any
    thread, including inside frameworks that run their own event loop. Calls from several threads
    are multiplexed over one gRPC channel. Close it (or use `with SyncClient(...) as client:`)
    to stop the thread.

    Args:
        target: "host:port", any gRPC target string, or a list of "ip:port" addresses.
        timeout: Deadline in seconds for each unary call.
        options: Extra gRPC channel options; they override the client's defaults.
        codec: Encodes payloads and decodes results, as in `Client`.
        tls: TLS to the broker, as in `Client`. None: plaintext.
        token: A bearer token for every call, as in `Client`.
        token_file: A file holding the token instead, as in `Client`.

    Raises:
        ValueError: The target list cannot be expressed as one gRPC target, or the TLS or
            token settings cannot be used (as in `Client`).
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float = 10.0,
        options: Sequence[tuple[str, Any]] = (),
        codec: PayloadCodec | None = None,
        tls: TlsConfig | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
    ) -> None:
        self._client = Client(
            target,
            timeout=timeout,
            options=options,
            codec=codec,
            tls=tls,
            token=token,
            token_file=token_file,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="taskbroker-sync-client", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        with self._lock:  # a closed loop would leave the coroutine never awaited
            if self._closed:
                coro.close()
                raise RuntimeError("the taskbroker client is closed")
            future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise RuntimeError("the taskbroker client was closed during the call") from None
        except BaseException:
            future.cancel()  # interrupted (KeyboardInterrupt): do not leave the call running
            raise

    @with_options_doc
    def enqueue(
        self, queue: str, type: str, payload: bytes = b"", **options: Unpack[TaskOptions]
    ) -> TaskId:
        """Enqueues one task; see `Client.enqueue` for the errors.

        Args:
            queue: Queue name, 1-128 characters of [A-Za-z0-9_.-].
            type: Task type, which picks the worker's handler; same alphabet as queue.
            payload: Opaque bytes handed to the handler unchanged (see `taskbroker.codec`).
            **options: The task's options (`TaskOptions`), keyword-only:

        Returns:
            The task's id, a `str` whose `.duplicate` is True when the idempotency key matched
            an earlier task (that task's id is returned; nothing new was enqueued).
        """
        options = checked_options(options)  # a misspelt name fails here, not on the loop
        return self._run(self._client.enqueue(queue, type, payload, **options))

    def enqueue_many(self, tasks: Iterable[NewTask]) -> list[EnqueueResult]:
        """Enqueues tasks, 1,000 per call; see `Client.enqueue_many`.

        Returns:
            One result per task, in the order given.
        """
        return self._run(self._client.enqueue_many(list(tasks)))

    def enqueue_workflow(self, workflow: Shape) -> EnqueuedWorkflow:
        """Enqueues a workflow (`chain`, `group`, `chord`) in one call; see
        `Client.enqueue_workflow`.

        Returns:
            Every task's id in the order the shape lists its tasks, and the ids of the tasks
            it ends with (`.last` when there is one).
        """
        return self._run(self._client.enqueue_workflow(workflow))

    def get_task(self, task_id: str) -> Task:
        """Returns a task; see `Client.get_task`."""
        return self._run(self._client.get_task(task_id))

    def cancel(self, task_id: str) -> Task:
        """Cancels a task that has not finished; see `Client.cancel`."""
        return self._run(self._client.cancel(task_id))

    def stats(self, *queues: str) -> list[QueueStats]:
        """Returns counts and totals per queue; see `Client.stats`."""
        return self._run(self._client.stats(*queues))

    def queue_settings(self, queue: str) -> QueueSettings:
        """Returns a queue's limits; see `Client.queue_settings`."""
        return self._run(self._client.queue_settings(queue))

    def group_keys(self, queue: str, *, page_size: int = 20, page_token: str = "") -> GroupKeyPage:
        """A page of a queue's group keys, the largest backlog first; see `Client.group_keys`."""
        return self._run(self._client.group_keys(queue, page_size=page_size, page_token=page_token))

    def update_queue_settings(
        self,
        queue: str,
        *,
        rate_limit: RateLimit | _Keep | None = KEEP,
        max_concurrency: int | _Keep = KEEP,
        enqueue_rate_limit: RateLimit | _Keep | None = KEEP,
        per_key_max_concurrency: int | _Keep = KEEP,
        per_key_rate_limit: RateLimit | _Keep | None = KEEP,
        priority_aging: timedelta | _Keep | None = KEEP,
    ) -> QueueSettings:
        """Changes the limits given and keeps the others; see `Client.update_queue_settings`."""
        return self._run(
            self._client.update_queue_settings(
                queue,
                rate_limit=rate_limit,
                max_concurrency=max_concurrency,
                enqueue_rate_limit=enqueue_rate_limit,
                per_key_max_concurrency=per_key_max_concurrency,
                per_key_rate_limit=per_key_rate_limit,
                priority_aging=priority_aging,
            )
        )

    # --- schedules: each as the Client method of that name -------------------------------

    def create_schedule(
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
        """Creates a schedule; see `Client.create_schedule`."""
        return self._run(
            self._client.create_schedule(
                name,
                cron,
                task,
                time_zone=time_zone,
                jitter=jitter,
                catch_up=catch_up,
                paused=paused,
            )
        )

    def get_schedule(self, name: str) -> Schedule:
        """Returns a schedule; see `Client.get_schedule`."""
        return self._run(self._client.get_schedule(name))

    def schedules(self, *, page_size: int = 100) -> list[Schedule]:
        """Returns every schedule the caller may read, by name; see `Client.schedules`."""
        return self._run(_collect(self._client.schedules(page_size=page_size)))

    def update_schedule(
        self,
        name: str,
        cron: str,
        task: NewTask,
        *,
        time_zone: str = "UTC",
        jitter: timedelta | None = None,
        catch_up: CatchUpArg = CatchUp.SKIP,
    ) -> Schedule:
        """Replaces a schedule's whole definition; see `Client.update_schedule`."""
        return self._run(
            self._client.update_schedule(
                name, cron, task, time_zone=time_zone, jitter=jitter, catch_up=catch_up
            )
        )

    def delete_schedule(self, name: str) -> None:
        """Deletes a schedule; see `Client.delete_schedule`."""
        self._run(self._client.delete_schedule(name))

    def pause_schedule(self, name: str) -> Schedule:
        """Pauses a schedule; see `Client.pause_schedule`."""
        return self._run(self._client.pause_schedule(name))

    def resume_schedule(self, name: str) -> Schedule:
        """Resumes a schedule from its next tick; see `Client.resume_schedule`."""
        return self._run(self._client.resume_schedule(name))

    def trigger_schedule(self, name: str) -> str:
        """Enqueues a schedule's task now and returns its id; see `Client.trigger_schedule`."""
        return self._run(self._client.trigger_schedule(name))

    def wait(
        self, task_id: str, *, timeout: float | None = None, poll_interval: float = 0.05
    ) -> Task:
        """Blocks until a task has finished and returns it; see `Client.wait`.

        Raises:
            TimeoutError: The task had not finished within `timeout` seconds.
        """
        return self._run(self._client.wait(task_id, timeout=timeout, poll_interval=poll_interval))

    def close(self) -> None:
        """Closes the channel and stops the thread. Closing twice is harmless."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    async def _shutdown(self) -> None:
        # Calls of other threads still running (a long wait()) end now, so no thread is left
        # blocked on a future of a loop that has stopped.
        current = asyncio.current_task()
        others = [task for task in asyncio.all_tasks() if task is not current]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        await self._client.close()
        await self._loop.shutdown_asyncgens()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


async def _collect(items: AsyncIterator[_T]) -> list[_T]:
    return [item async for item in items]
