"""Queue limits over a real RedisStore, standalone and Cluster: max_concurrency, rate_limit and
enqueue_rate_limit as lease.lua and enqueue.lua enforce them, and the settings that hold them.

Every limit is read from Redis by each call, so what one TaskQueue sees here every replica sees.
"""

from __future__ import annotations

import asyncio

import pytest

from broker.errors import EnqueueRateLimited, InvalidArgument, LimitExceeded
from broker.ids import new_lease_id
from broker.models import QueueSettings, RateLimit, TaskState, Wake
from broker.queue import TaskQueue
from broker.store.redis_store import RedisStore, WakeEvents
from tests.store.test_task_queue_contract import (
    LONG_LEASE_MS,
    STREAM,
    Q,
    enqueue,
    lease,
    request,
    stats,
)


async def limit(tasks: TaskQueue, *names: str, **values: object) -> QueueSettings:
    """Sets the named settings (all given as values) of Q."""
    settings = QueueSettings(**values)  # type: ignore[arg-type]
    return await tasks.update_queue_settings(Q, settings, list(names or values))


async def enqueue_n(tasks: TaskQueue, n: int) -> list[str]:
    return await enqueue(tasks, *(request(str(i).encode()) for i in range(n)))


# --- settings --------------------------------------------------------------------------------


async def test_a_queue_never_configured_has_every_limit_off(tasks: TaskQueue) -> None:
    assert await tasks.queue_settings(Q) == QueueSettings()
    assert (await stats(tasks)).settings == QueueSettings()


async def test_settings_round_trip_and_an_unset_burst_is_the_rate_rounded_up(
    tasks: TaskQueue,
) -> None:
    after = await limit(
        tasks,
        rate_limit=RateLimit(2.5, 0),
        max_concurrency=7,
        enqueue_rate_limit=RateLimit(100, 10),
    )
    expected = QueueSettings(RateLimit(2.5, 3), 7, RateLimit(100, 10))
    assert after == expected
    assert await tasks.queue_settings(Q) == expected
    assert (await stats(tasks)).settings == expected


async def test_an_update_changes_only_what_its_mask_names(tasks: TaskQueue) -> None:
    await limit(tasks, rate_limit=RateLimit(5, 5), max_concurrency=3)
    after = await limit(tasks, "max_concurrency", max_concurrency=9)
    assert after == QueueSettings(rate_limit=RateLimit(5, 5), max_concurrency=9)
    # Named and left unset: turned off.
    after = await limit(tasks, "rate_limit")
    assert after == QueueSettings(max_concurrency=9)


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"rate_limit": RateLimit(-1, 1)}, "settings.rate_limit.per_second"),
        ({"rate_limit": RateLimit(0, 1)}, "settings.rate_limit.per_second"),
        ({"rate_limit": RateLimit(float("nan"), 1)}, "settings.rate_limit.per_second"),
        ({"rate_limit": RateLimit(1, -1)}, "settings.rate_limit.burst"),
        ({"enqueue_rate_limit": RateLimit(2e6, 1)}, "settings.enqueue_rate_limit.per_second"),
        ({"max_concurrency": -1}, "settings.max_concurrency"),
    ],
)
async def test_a_bad_setting_is_refused_naming_its_field_and_nothing_changes(
    tasks: TaskQueue, values: dict[str, object], field: str
) -> None:
    await limit(tasks, max_concurrency=4)
    with pytest.raises(InvalidArgument) as refused:
        await limit(tasks, **values)
    assert refused.value.field == field
    assert await tasks.queue_settings(Q) == QueueSettings(max_concurrency=4)


async def test_an_unknown_setting_in_the_mask_is_refused(tasks: TaskQueue) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await tasks.update_queue_settings(Q, QueueSettings(), ["max_concurency"])
    assert refused.value.field == "update_mask"


# --- max_concurrency -------------------------------------------------------------------------


async def test_max_concurrency_caps_what_is_leased_at_once(tasks: TaskQueue) -> None:
    await limit(tasks, max_concurrency=3)
    await enqueue_n(tasks, 10)
    first = await lease(tasks, 10)
    assert len(first) == 3
    assert await lease(tasks, 10) == []
    await tasks.ack(first[0].task.ref.task_id, first[0].lease_id, b"")
    assert len(await lease(tasks, 10)) == 1  # the freed slot, no more
    s = await stats(tasks)
    assert (s.leased, s.pending) == (3, 6)


async def test_every_way_a_lease_ends_frees_its_slot(tasks: TaskQueue) -> None:
    await limit(tasks, max_concurrency=3)
    await enqueue_n(tasks, 10)
    nacked, dead, cancelled = await lease(tasks, 3)
    await tasks.nack(nacked.task.ref.task_id, nacked.lease_id, "boom", 60_000, False)
    await tasks.nack(dead.task.ref.task_id, dead.lease_id, "boom", None, True)
    await tasks.cancel(cancelled.task.ref.task_id)
    short = await lease(tasks, 10, lease_ms=50)
    assert len(short) == 3
    await asyncio.sleep(0.1)
    assert await tasks.reclaim_expired(Q) >= 3  # expired leases free their slots
    assert len(await lease(tasks, 10)) == 3


async def test_raising_the_cap_lets_more_lease_at_once(tasks: TaskQueue) -> None:
    await limit(tasks, max_concurrency=1)
    await enqueue_n(tasks, 5)
    assert len(await lease(tasks, 5)) == 1
    await limit(tasks, max_concurrency=4)
    assert len(await lease(tasks, 5)) == 3
    await limit(tasks, "max_concurrency")  # off
    assert len(await lease(tasks, 5)) == 1  # the last pending task


async def wakes_within(events: WakeEvents, seconds: float) -> list[str]:
    """The queues woken in the next `seconds` (None answers are confirmations or quiet)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    woken = []
    while (left := end - loop.time()) > 0:
        event = await events.next(timeout_s=left)
        if isinstance(event, Wake):
            woken.append(event.queue)
    return woken


async def test_a_slot_freed_at_the_cap_wakes_every_replica(
    tasks: TaskQueue, store: RedisStore
) -> None:
    """A pump held back by the cap sleeps; the ack that frees a slot publishes a wake, and an
    ack below the cap, or after the wake went, publishes none."""
    await limit(tasks, max_concurrency=2)
    await enqueue_n(tasks, 4)
    await store.ping()
    async with store.wake_events() as events:
        await wakes_within(events, 0.3)  # subscribed
        below = await lease(tasks, 1)
        await tasks.ack(below[0].task.ref.task_id, below[0].lease_id, b"")
        assert await wakes_within(events, 0.3) == []  # not at the cap: no wake
        held = await lease(tasks, 4)  # two leased, the rest held back: blocked
        assert len(held) == 2
        await tasks.ack(held[0].task.ref.task_id, held[0].lease_id, b"")
        assert await wakes_within(events, 0.5) == [Q]
        await tasks.ack(held[1].task.ref.task_id, held[1].lease_id, b"")
        assert await wakes_within(events, 0.3) == []  # one wake per blocked lease call


# --- rate_limit ------------------------------------------------------------------------------


async def test_rate_limit_spends_its_burst_then_says_when_the_next_token_is_due(
    tasks: TaskQueue,
) -> None:
    await limit(tasks, rate_limit=RateLimit(10, 2))
    await enqueue_n(tasks, 10)
    assert len(await lease(tasks, 10)) == 2
    batch = await tasks.lease(Q, [(new_lease_id(), LONG_LEASE_MS, STREAM, "")] * 5)
    assert batch.leases == [] and batch.rate_limited
    assert batch.next_due_ms is not None
    assert 0 < batch.next_due_ms - batch.now_ms <= 100  # one token per 100 ms
    await asyncio.sleep((batch.next_due_ms - batch.now_ms) / 1000 + 0.01)
    assert len(await lease(tasks, 10)) == 1


async def test_an_idle_rate_limited_queue_asks_for_no_wake_up(tasks: TaskQueue) -> None:
    await limit(tasks, rate_limit=RateLimit(10, 1))
    await enqueue_n(tasks, 1)
    assert len(await lease(tasks, 5)) == 1
    batch = await tasks.lease(Q, [(new_lease_id(), LONG_LEASE_MS, STREAM, "")])
    assert batch.leases == [] and not batch.rate_limited and batch.next_due_ms is None


async def test_rate_limit_holds_across_replicas_sharing_redis(
    tasks: TaskQueue, store: RedisStore
) -> None:
    """Two TaskQueues (two replicas) draw from the one bucket in Redis."""
    other = TaskQueue(store, tasks._settings)
    await limit(tasks, rate_limit=RateLimit(1, 4))
    await enqueue_n(tasks, 10)
    got = [len(await lease(t, 3)) for t in (tasks, other, tasks)]
    assert sum(got) == 4 and got[0] == 3


async def test_an_extension_takes_no_token(tasks: TaskQueue) -> None:
    await limit(tasks, rate_limit=RateLimit(0.5, 1))
    await enqueue_n(tasks, 2)
    [held] = await lease(tasks, 2)
    before = (await stats(tasks)).rate_tokens
    await tasks.extend(held.task.ref.task_id, held.lease_id, 60_000)
    after = (await stats(tasks)).rate_tokens
    assert before < 0.5 and after - before < 0.1  # only the refill of a few ms
    assert await lease(tasks, 2) == []


# --- enqueue_rate_limit ----------------------------------------------------------------------


async def test_enqueue_over_its_rate_is_refused_with_a_retry_time_and_nothing_stored(
    tasks: TaskQueue,
) -> None:
    await limit(tasks, enqueue_rate_limit=RateLimit(2, 3))
    await enqueue_n(tasks, 3)
    with pytest.raises(EnqueueRateLimited) as refused:
        await enqueue_n(tasks, 2)
    assert 0.5 <= refused.value.retry_after_s <= 1.0  # two tokens at 2/s
    assert (await stats(tasks)).pending == 3
    await asyncio.sleep(refused.value.retry_after_s + 0.02)
    await enqueue_n(tasks, 2)
    assert (await stats(tasks)).pending == 5


async def test_a_call_larger_than_the_burst_can_never_fit(tasks: TaskQueue) -> None:
    await limit(tasks, enqueue_rate_limit=RateLimit(100, 3))
    with pytest.raises(LimitExceeded, match="burst") as refused:
        await enqueue_n(tasks, 4)
    assert not isinstance(refused.value, EnqueueRateLimited)  # no retry helps
    assert (await stats(tasks)).pending == 0


async def test_concurrent_calls_are_admitted_or_refused_whole(tasks: TaskQueue) -> None:
    """Calls coalesced into one script call still take tokens call by call."""
    await limit(tasks, enqueue_rate_limit=RateLimit(0.1, 5))
    outcomes = await asyncio.gather(
        *(enqueue_n(tasks, 2) for _ in range(4)), return_exceptions=True
    )
    stored = [o for o in outcomes if isinstance(o, list)]
    refused = [o for o in outcomes if isinstance(o, EnqueueRateLimited)]
    assert (len(stored), len(refused)) == (2, 2)
    assert (await stats(tasks)).pending == 4
    for ids in stored:
        for task_id in ids:
            task = await tasks.get(task_id)
            assert task.state is TaskState.PENDING
