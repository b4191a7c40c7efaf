"""Group commit: concurrent calls for one queue are coalesced into one script call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)

#: A flush returns one result or one exception per item, in order.
Flush = Callable[[str, Sequence[T]], Awaitable[Sequence[R | BaseException]]]


class Batcher(Generic[T, R]):
    """Coalesces items per key (a queue) into batches handed to one flush at a time.

    No timer. A caller that finds its key idle flushes its own items at once, in its own task:
    nothing is handed to another task, so a lone call pays no more than the flush itself. Items
    that arrive while a flush for their key is in flight wait, and go together in the next one
    (run by a task, since it serves several callers). Batching thus adds no latency at low load
    and grows the batch exactly as much as the load does.
    """

    def __init__(self, flush: Flush[T, R], max_cost: int, cost: Callable[[T], int]) -> None:
        self._flush = flush
        self._max_cost = max_cost
        self._cost = cost
        #: Keys with a flush in flight -> the items waiting for the next one. A key is absent
        #: when it is idle.
        self._waiting: dict[str, list[tuple[T, asyncio.Future[R]]]] = {}
        #: Running flusher tasks (the loop keeps only weak references to tasks).
        self._flushers: set[asyncio.Task[None]] = set()

    async def submit(self, key: str, item: T) -> R:
        """Flushes one item, with others that arrive meanwhile, and returns its result (or
        raises its exception)."""
        waiting = self._waiting.get(key)
        if waiting is None:
            [result] = await self._flush_alone(key, [item])
            if isinstance(result, BaseException):
                raise result
            return result
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        waiting.append((item, future))
        # The flush goes on if this caller is cancelled (deadline): other callers share it.
        return await asyncio.shield(future)

    async def submit_many(self, key: str, items: Sequence[T]) -> list[R | BaseException]:
        """Flushes several items (with others that arrive meanwhile) and waits for all: one
        result or exception per item, in order (nothing raises, so one bad item cannot hide
        the others' outcomes)."""
        if not items:
            return []
        waiting = self._waiting.get(key)
        if waiting is None and sum(map(self._cost, items)) <= self._max_cost:
            return await self._flush_alone(key, items)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = [loop.create_future() for _ in items]
        pairs = list(zip(items, futures, strict=True))
        if waiting is None:  # too large for one flush: split by the flusher, as a backlog is
            self._waiting[key] = pairs
            self._start_flusher(key)
        else:
            waiting.extend(pairs)
        return await asyncio.shield(asyncio.gather(*futures, return_exceptions=True))

    async def _flush_alone(self, key: str, items: Sequence[T]) -> list[R | BaseException]:
        """Flushes one caller's items in its own task, marking the key busy meanwhile. Being
        cancelled cancels only this caller's flush; items that arrived meanwhile go on."""
        self._waiting[key] = []
        try:
            results = await self._flush(key, items)
        except Exception as exc:  # every item shares the failure
            return [exc for _ in items]
        finally:
            if self._waiting[key]:
                self._start_flusher(key)
            else:
                del self._waiting[key]
        return list(results)

    def _start_flusher(self, key: str) -> None:
        flusher = asyncio.create_task(self._run(key), name=f"flush {key}")
        self._flushers.add(flusher)
        flusher.add_done_callback(self._flushers.discard)

    async def _run(self, key: str) -> None:
        """Flushes the key's waiting items, batch after batch, until none are left."""
        waiting = self._waiting[key]
        try:
            while waiting:
                size, total = 0, 0
                while size < len(waiting) and (
                    size == 0 or total + self._cost(waiting[size][0]) <= self._max_cost
                ):
                    total += self._cost(waiting[size][0])
                    size += 1
                batch = waiting[:size]
                del waiting[:size]
                await self._flush_batch(key, batch)
        finally:
            if waiting:  # cancelled with items left: they still get their flush
                self._start_flusher(key)
            else:
                del self._waiting[key]

    async def _flush_batch(self, key: str, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush(key, [item for item, _ in batch])
        except Exception as exc:  # every item of the batch shares the failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
