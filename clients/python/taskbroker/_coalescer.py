"""EnqueueCoalescer: single-task enqueue() calls made at the same time go to the broker together,
in one Enqueue call per queue (group commit), so a producer with many concurrent callers pays
one round trip and one call's overhead for a batch rather than for every task.

A caller alone is never held back: while fewer than MAX_IN_FLIGHT calls for its queue are in
flight, its task goes out at once. Only tasks that arrive while that many are in flight wait,
and they go out together as soon as one of them returns (at most MAX_BATCH_TASKS tasks or
MAX_BATCH_BYTES bytes a call).

A batch holds one queue's tasks, which the broker stores in one script: when it refuses the
batch, nothing of it was stored. Each caller must still get the answer it would have got alone,
so a refused batch of several tasks is resent one task per call:
- refusals that store nothing (a bad field, a reused idempotency key, a missing role, ...):
  every task is resent alone, and only the task at fault fails;
- failures whose outcome is unknown (UNAVAILABLE, a deadline, an internal error): a task with
  an idempotency key is resent alone (the key makes a repeat harmless, as enqueue() retries it
  anyway); a task without one fails with the batch's error, as it would have alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

import grpc

from taskbroker._errors import TaskbrokerError
from taskbroker.v1 import task_pb2

R = TypeVar("R")
Metadata = tuple[tuple[str, str], ...] | None

#: Enqueue calls of one queue in flight at once; more tasks wait to share the next call.
MAX_IN_FLIGHT: Final = 4
#: The broker's limit of tasks per Enqueue call.
MAX_BATCH_TASKS: Final = 1000
#: A batch stops growing here (a larger single task still goes, alone): well under the broker's
#: per-client request bytes, so a batch is never refused for its size alone.
MAX_BATCH_BYTES: Final = 2 * 1024 * 1024
#: Refusals after which the broker has stored nothing of the call.
NOTHING_STORED: Final = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
    }
)

SendBatch = Callable[[list[task_pb2.TaskSpec], Metadata], Awaitable[list[R]]]
SendOne = Callable[[task_pb2.TaskSpec, Metadata], Awaitable[R]]


def _new_future() -> asyncio.Future[R]:
    return asyncio.get_running_loop().create_future()


@dataclass(slots=True)
class _Waiting(Generic[R]):
    spec: task_pb2.TaskSpec
    metadata: Metadata
    size: int
    answer: asyncio.Future[R] = field(default_factory=_new_future)


@dataclass(slots=True)
class _Queue(Generic[R]):
    waiting: deque[_Waiting[R]] = field(default_factory=deque)
    in_flight: int = 0


class EnqueueCoalescer(Generic[R]):
    """Sends single tasks through `send_batch` (one Enqueue call) in groups, and falls back to
    `send_one` (a call of its own, with enqueue()'s retries) per task when a group is refused.
    """

    def __init__(self, send_batch: SendBatch[R], send_one: SendOne[R]) -> None:
        self._send_batch = send_batch
        self._send_one = send_one
        self._queues: dict[str, _Queue[R]] = {}
        self._senders: set[asyncio.Task[None]] = set()

    async def enqueue(self, spec: task_pb2.TaskSpec, metadata: Metadata) -> R:
        """The task's result, or the error it would have met alone."""
        queue = self._queues.setdefault(spec.queue, _Queue())
        waiting = _Waiting[R](spec, metadata, spec.ByteSize())
        queue.waiting.append(waiting)
        if queue.in_flight < MAX_IN_FLIGHT:
            queue.in_flight += 1
            sender = asyncio.create_task(self._send_while_waiting(spec.queue, queue))
            self._senders.add(sender)
            sender.add_done_callback(self._senders.discard)
        # A caller that gives up cancels only its answer: a task not yet sent is skipped, one
        # sent with others has its result dropped.
        return await waiting.answer

    async def _send_while_waiting(self, name: str, queue: _Queue[R]) -> None:
        try:
            while batch := _take(queue.waiting):
                await self._send(batch)
        finally:
            queue.in_flight -= 1
            if not queue.in_flight and not queue.waiting:
                self._queues.pop(name, None)

    async def _send(self, batch: list[_Waiting[R]]) -> None:
        if len(batch) == 1:
            await _settle(batch[0], self._send_one(batch[0].spec, batch[0].metadata))
            return
        try:
            results = await self._send_batch([w.spec for w in batch], batch[0].metadata)
        except TaskbrokerError as error:
            await self._resend_alone(batch, error)
            return
        except BaseException as error:  # a bug or a cancel: every caller learns of it
            for waiting in batch:
                _fail(waiting, error)
            if not isinstance(error, Exception):
                raise
            return
        for waiting, result in zip(batch, results, strict=True):
            if not waiting.answer.done():
                waiting.answer.set_result(result)

    async def _resend_alone(self, batch: list[_Waiting[R]], error: TaskbrokerError) -> None:
        nothing_stored = error.code in NOTHING_STORED
        resend: list[_Waiting[R]] = []
        for waiting in batch:
            if nothing_stored or waiting.spec.idempotency_key:
                resend.append(waiting)
            else:
                _fail(waiting, error)
        await asyncio.gather(*(_settle(w, self._send_one(w.spec, w.metadata)) for w in resend))


def _take(waiting: deque[_Waiting[R]]) -> list[_Waiting[R]]:
    """The next batch: the oldest waiting tasks, up to the count and byte limits; callers that
    gave up meanwhile are skipped."""
    batch: list[_Waiting[R]] = []
    size = 0
    while waiting and len(batch) < MAX_BATCH_TASKS:
        head = waiting[0]
        if head.answer.done():
            waiting.popleft()
            continue
        if batch and size + head.size > MAX_BATCH_BYTES:
            break
        batch.append(waiting.popleft())
        size += head.size
    return batch


async def _settle(waiting: _Waiting[R], call: Awaitable[R]) -> None:
    try:
        result = await call
    except Exception as error:
        _fail(waiting, error)
    else:
        if not waiting.answer.done():
            waiting.answer.set_result(result)


def _fail(waiting: _Waiting[R], error: BaseException) -> None:
    if not waiting.answer.done():
        waiting.answer.set_exception(error)
