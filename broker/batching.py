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

    No timer: while one flush for a queue is in flight, new items wait and go together in the
    next. An idle queue's item is flushed at once, so batching adds no latency at low load and
    grows the batch exactly as much as the load does.
    """

    def __init__(self, flush: Flush[T, R], max_cost: int, cost: Callable[[T], int]) -> None:
        self._flush = flush
        self._max_cost = max_cost
        self._cost = cost
        self._waiting: dict[str, list[tuple[T, asyncio.Future[R]]]] = {}
        self._flushers: dict[str, asyncio.Task[None]] = {}

    async def submit(self, key: str, item: T) -> R:
        """Queues one item and waits for its result (or raises its exception)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append((item, future))
        if key not in self._flushers:
            self._flushers[key] = asyncio.create_task(self._run(key), name=f"flush {key}")
        # The flush goes on if this caller is cancelled (deadline): other callers share it.
        return await asyncio.shield(future)

    async def submit_many(self, key: str, items: Sequence[T]) -> list[R | BaseException]:
        """Queues several items at once and waits for all: one result or exception per item, in
        order (nothing raises, so one bad item cannot hide the others' outcomes)."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = [loop.create_future() for _ in items]
        self._waiting.setdefault(key, []).extend(zip(items, futures, strict=True))
        if key not in self._flushers:
            self._flushers[key] = asyncio.create_task(self._run(key), name=f"flush {key}")
        return await asyncio.shield(asyncio.gather(*futures, return_exceptions=True))

    async def _run(self, key: str) -> None:
        try:
            while waiting := self._waiting.get(key):
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
            del self._flushers[key]
            if not self._waiting.get(key):
                self._waiting.pop(key, None)
            else:  # an item arrived as we stopped: keep going
                self._flushers[key] = asyncio.create_task(self._run(key), name=f"flush {key}")

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
