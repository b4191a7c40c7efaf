"""Batcher: a lone call is flushed from its caller's own task; concurrent calls share flushes,
in arrival order, within the cost limit; each caller gets its own result or error; a caller
that gives up does not stop a flush others share."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from broker.batching import Batcher


class Store:
    """A flush that records each batch and the task it ran in. While `holding`, each flush waits
    until the test releases it (release). Items "bad..." fail alone; a batch holding "boom"
    fails as a whole."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.tasks: list[asyncio.Task[object] | None] = []
        self.holding = False
        self._held: list[asyncio.Event] = []
        self._started = asyncio.Event()

    async def flush(self, key: str, items: Sequence[str]) -> list[str | BaseException]:
        self.batches.append(list(items))
        self.tasks.append(asyncio.current_task())
        self._started.set()
        if self.holding:
            held = asyncio.Event()
            self._held.append(held)
            await held.wait()
        if "boom" in items:
            raise RuntimeError("the whole batch failed")
        return [ValueError(i) if i.startswith("bad") else f"{key}:{i}" for i in items]

    async def flushing(self, batches: int) -> None:
        """Waits until that many flushes have started."""
        while len(self.batches) < batches:
            self._started.clear()
            await self._started.wait()

    def release(self, batch: int) -> None:
        self._held[batch].set()


def batcher(store: Store, max_cost: int = 100) -> Batcher[str, str]:
    return Batcher[str, str](store.flush, max_cost, len)


async def hold_first(store: Store, b: Batcher[str, str]) -> asyncio.Task[str]:
    """A call of "first" whose flush stays in flight until released (batch 0)."""
    store.holding = True
    first = asyncio.create_task(b.submit("q", "first"))
    await store.flushing(1)
    return first


def submit_all(b: Batcher[str, str], items: Sequence[str]) -> list[asyncio.Task[str]]:
    return [asyncio.create_task(b.submit("q", item)) for item in items]


async def test_a_lone_call_is_flushed_in_the_callers_own_task() -> None:
    store = Store()
    b = batcher(store)

    async def caller() -> tuple[str, asyncio.Task[object] | None]:
        return await b.submit("q", "a"), asyncio.current_task()

    result, task = await asyncio.create_task(caller())

    assert result == "q:a"
    assert store.batches == [["a"]]
    assert store.tasks == [task]


async def test_calls_arriving_during_a_flush_share_the_next_one_in_arrival_order() -> None:
    store = Store()
    b = batcher(store)
    first = await hold_first(store, b)
    later = submit_all(b, ["b", "c", "d"])
    await asyncio.sleep(0)
    store.holding = False
    store.release(0)

    assert await first == "q:first"
    assert await asyncio.gather(*later) == ["q:b", "q:c", "q:d"]
    assert store.batches == [["first"], ["b", "c", "d"]]
    assert store.tasks[1] not in [*later, first]  # a flush shared by three has its own task


async def test_keys_are_batched_apart() -> None:
    store = Store()
    b = batcher(store)
    first = await hold_first(store, b)
    other = asyncio.create_task(b.submit("r", "x"))  # its key is idle: flushed at once

    await store.flushing(2)
    assert store.batches == [["first"], ["x"]]
    store.release(0)
    store.release(1)
    assert (await first, await other) == ("q:first", "r:x")


async def test_a_bad_item_fails_alone() -> None:
    store = Store()
    b = batcher(store)
    first = await hold_first(store, b)
    good, bad = submit_all(b, ["good", "bad one"])
    await asyncio.sleep(0)
    store.holding = False
    store.release(0)

    assert await first == "q:first"
    assert await good == "q:good"
    with pytest.raises(ValueError, match="bad one"):
        await bad
    assert store.batches[1] == ["good", "bad one"]


async def test_a_failed_flush_fails_every_item_of_its_batch_and_no_other() -> None:
    store = Store()
    b = batcher(store)
    with pytest.raises(RuntimeError, match="whole batch"):
        await b.submit("q", "boom")

    first = await hold_first(store, b)
    shared = submit_all(b, ["a", "boom"])
    await asyncio.sleep(0)
    store.holding = False
    store.release(0)

    assert await first == "q:first"
    for call in shared:
        with pytest.raises(RuntimeError, match="whole batch"):
            await call
    assert await b.submit("q", "after") == "q:after"  # the key is usable again


async def test_a_cancelled_caller_does_not_cancel_the_flush_others_share() -> None:
    store = Store()
    b = batcher(store)
    first = await hold_first(store, b)
    leaving, staying = submit_all(b, ["leaving", "staying"])
    await asyncio.sleep(0)
    store.release(0)
    assert await first == "q:first"
    await store.flushing(2)  # the shared flush is in flight

    leaving.cancel()
    await asyncio.sleep(0)
    store.release(1)

    assert await staying == "q:staying"
    assert leaving.cancelled()
    assert store.batches == [["first"], ["leaving", "staying"]]


async def test_a_cancelled_lone_caller_leaves_the_calls_that_arrived_meanwhile_flushed() -> None:
    store = Store()
    b = batcher(store)
    first = await hold_first(store, b)
    [later] = submit_all(b, ["later"])
    await asyncio.sleep(0)
    store.holding = False

    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await later == "q:later"
    assert store.batches == [["first"], ["later"]]


async def test_a_batch_stays_within_the_cost_limit() -> None:
    store = Store()
    b = batcher(store, max_cost=5)
    first = await hold_first(store, b)
    names = ["aa", "bb", "c", "dddddddd", "ee"]  # costs 2, 2, 1, 8 (over the limit alone), 2
    later = submit_all(b, names)
    await asyncio.sleep(0)
    store.holding = False
    store.release(0)

    assert await first == "q:first"
    assert await asyncio.gather(*later) == [f"q:{n}" for n in names]
    assert store.batches == [["first"], ["aa", "bb", "c"], ["dddddddd"], ["ee"]]


async def test_submit_many_answers_each_item_in_order_without_raising() -> None:
    store = Store()
    b = batcher(store)

    a, bad, c = await b.submit_many("q", ["a", "bad b", "c"])

    assert (a, c) == ("q:a", "q:c")
    assert isinstance(bad, ValueError)
    assert bad.args == ("bad b",)
    assert await b.submit_many("q", []) == []
    assert store.batches == [["a", "bad b", "c"]]


async def test_submit_many_over_the_cost_limit_is_split_in_order() -> None:
    store = Store()
    b = batcher(store, max_cost=4)

    results = await b.submit_many("q", ["aa", "bb", "cc", "dd", "ee"])

    assert results == ["q:aa", "q:bb", "q:cc", "q:dd", "q:ee"]
    assert store.batches == [["aa", "bb"], ["cc", "dd"], ["ee"]]


async def test_submit_many_joins_a_flush_in_flight() -> None:
    store = Store()
    b = batcher(store)
    first = await hold_first(store, b)
    many = asyncio.create_task(b.submit_many("q", ["a", "b"]))
    [one] = submit_all(b, ["c"])
    await asyncio.sleep(0)
    store.holding = False
    store.release(0)

    assert await first == "q:first"
    assert await many == ["q:a", "q:b"]
    assert await one == "q:c"
    assert store.batches == [["first"], ["a", "b", "c"]]
