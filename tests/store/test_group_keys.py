"""Group keys over a real RedisStore, standalone and Cluster: leases go round-robin across the
keys with ready tasks (and the default group), priority and FIFO hold within a key, and
per_key_max_concurrency holds for every key."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker.errors import InvalidArgument
from broker.ids import new_lease_id
from broker.models import RateLimit, TaskState
from broker.queue import TaskQueue
from broker.store.keys import QueueKeys
from broker.store.redis_store import RedisStore
from tests.store.test_queue_limits import limit, wakes_within
from tests.store.test_task_queue_contract import (
    LONG_LEASE_MS,
    STREAM,
    Q,
    enqueue,
    lease,
    request,
    stats,
)


async def enqueue_for(tasks: TaskQueue, key: str, n: int, **fields: Any) -> list[str]:
    return await enqueue(
        tasks, *(request(f"{key}{i}".encode(), group_key=key, **fields) for i in range(n))
    )


async def lease_payloads(tasks: TaskQueue, n: int) -> list[str]:
    return [le.task.payload.decode() for le in await lease(tasks, n)]


async def test_keys_take_turns_whatever_their_backlog(tasks: TaskQueue) -> None:
    await enqueue_for(tasks, "big", 10)
    await enqueue_for(tasks, "small", 3)
    order = [p for _ in range(8) for p in await lease_payloads(tasks, 1)]
    assert order == ["big0", "small0", "big1", "small1", "big2", "small2", "big3", "big4"]


async def test_one_lease_call_serves_the_keys_round_robin(tasks: TaskQueue) -> None:
    await enqueue_for(tasks, "a", 5)
    await enqueue_for(tasks, "b", 1)
    await enqueue_for(tasks, "c", 5)
    assert await lease_payloads(tasks, 7) == ["a0", "b0", "c0", "a1", "c1", "a2", "c2"]
    # The next call goes on where this one stopped: a and c keep alternating.
    assert await lease_payloads(tasks, 2) == ["a3", "c3"]


async def test_priority_and_fifo_hold_within_a_key(tasks: TaskQueue) -> None:
    await enqueue(
        tasks,
        request(b"low", group_key="k", priority=-5),
        request(b"first", group_key="k"),
        request(b"urgent", group_key="k", priority=9),
        request(b"second", group_key="k"),
    )
    assert await lease_payloads(tasks, 4) == ["urgent", "first", "second", "low"]


async def test_the_default_group_takes_its_turn_like_a_key(tasks: TaskQueue) -> None:
    await enqueue(tasks, *(request(f"plain{i}".encode()) for i in range(3)))
    await enqueue_for(tasks, "k", 3)
    got = await lease_payloads(tasks, 6)
    assert sorted(got[0:2]) == ["k0", "plain0"] and sorted(got[2:4]) == ["k1", "plain1"]
    assert sorted(got) == sorted([f"plain{i}" for i in range(3)] + [f"k{i}" for i in range(3)])


async def test_a_small_tenant_is_not_starved_by_a_big_backlog(tasks: TaskQueue) -> None:
    """The issue's bar, on the store: 100 tasks of one key enqueued after 2,000 of another are
    all leased within the first ~300."""
    await enqueue_for(tasks, "whale", 1000)
    await enqueue_for(tasks, "whale", 1000)
    small = set(await enqueue_for(tasks, "minnow", 100))
    seen = 0
    while small:
        for le in await lease(tasks, 50):
            seen += 1
            small.discard(le.task.ref.task_id)
            await tasks.ack(le.task.ref.task_id, le.lease_id, b"")
    assert seen <= 300, seen


async def test_per_key_max_concurrency_holds_for_each_key(tasks: TaskQueue) -> None:
    await limit(tasks, per_key_max_concurrency=2)
    await enqueue_for(tasks, "a", 5)
    await enqueue_for(tasks, "b", 5)
    await enqueue(tasks, request(b"plain0"), request(b"plain1"), request(b"plain2"))
    first = await lease(tasks, 20)
    by_key = sorted(le.task.group_key for le in first)
    assert by_key == ["", "", "", "a", "a", "b", "b"]  # the default group is not bound
    assert await lease(tasks, 20) == []
    done = next(le for le in first if le.task.group_key == "a")
    await tasks.ack(done.task.ref.task_id, done.lease_id, b"")
    assert [le.task.group_key for le in await lease(tasks, 20)] == ["a"]


async def test_a_parked_key_is_woken_when_one_of_its_leases_ends(
    tasks: TaskQueue, store: RedisStore
) -> None:
    await limit(tasks, per_key_max_concurrency=1)
    await enqueue_for(tasks, "a", 3)
    await store.ping()
    async with store.wake_events() as events:
        await wakes_within(events, 0.3)
        [held] = await lease(tasks, 5)
        assert await lease(tasks, 5) == []  # "a" is parked at its cap
        await tasks.nack(held.task.ref.task_id, held.lease_id, "boom", 60_000, False)
        assert Q in await wakes_within(events, 0.5)
    assert [le.task.payload for le in await lease(tasks, 5)] == [b"a1"]


async def test_lifting_the_per_key_cap_unparks_every_key(tasks: TaskQueue) -> None:
    await limit(tasks, per_key_max_concurrency=1)
    await enqueue_for(tasks, "a", 3)
    await enqueue_for(tasks, "b", 3)
    assert len(await lease(tasks, 10)) == 2
    await limit(tasks, "per_key_max_concurrency")
    assert len(await lease(tasks, 10)) == 4


async def test_retries_and_delays_wait_under_their_key(tasks: TaskQueue) -> None:
    [delayed] = await enqueue_for(tasks, "k", 1, delay_ms=50)
    await enqueue_for(tasks, "other", 1)
    [other] = await lease(tasks, 5)
    await tasks.nack(other.task.ref.task_id, other.lease_id, "boom", 0, False)
    await asyncio.sleep(0.1)
    again = await lease(tasks, 5)
    assert sorted((le.task.group_key, le.task.attempt) for le in again) == [("k", 1), ("other", 2)]
    assert delayed in {le.task.ref.task_id for le in again}


async def test_a_grouped_task_reads_back_with_its_key_and_counts_as_pending(
    tasks: TaskQueue,
) -> None:
    [task_id] = await enqueue_for(tasks, "acme:eu@1", 1)
    await enqueue_for(tasks, "b", 2)
    task = await tasks.get(task_id)
    assert (task.group_key, task.state) == ("acme:eu@1", TaskState.PENDING)
    s = await stats(tasks)
    assert s.pending == 3
    assert s.oldest_ready_ms == task.schedule_ms  # the oldest of the keys' next tasks
    await tasks.cancel(task_id)
    assert (await stats(tasks)).pending == 2
    assert {le.task.group_key for le in await lease(tasks, 5)} == {"b"}


@pytest.mark.parametrize("key", ["{tag}", "a b", "x" * 129, "é"])
async def test_a_malformed_group_key_is_refused(tasks: TaskQueue, key: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await tasks.enqueue([request(group_key=key)])
    assert refused.value.field == "tasks[0].group_key"


async def test_a_drained_key_leaves_no_group_state_behind(
    tasks: TaskQueue, store: RedisStore
) -> None:
    await limit(tasks, per_key_max_concurrency=1)
    await enqueue_for(tasks, "k", 2)
    for _ in range(2):
        for le in await lease(tasks, 5):
            await tasks.ack(le.task.ref.task_id, le.lease_id, b"")
    k = QueueKeys(Q)
    names = (k.group_rotation, k.group_parked, k.group_leased, k.group("k"))
    assert [await store.client.exists(name) for name in names] == [0, 0, 0, 0]


async def test_per_key_rate_limit_paces_each_key_and_says_when_to_look_again(
    tasks: TaskQueue,
) -> None:
    await limit(tasks, per_key_rate_limit=RateLimit(10, 2))
    await enqueue_for(tasks, "a", 5)
    await enqueue_for(tasks, "b", 5)
    await enqueue(tasks, request(b"plain0"), request(b"plain1"), request(b"plain2"))
    batch = await tasks.lease(Q, [(new_lease_id(), LONG_LEASE_MS, STREAM, "")] * 20)
    got = sorted(le.task.group_key or "-" for le in batch.leases)
    assert got == ["-", "-", "-", "a", "a", "b", "b"]  # each key's burst; the default unbound
    assert batch.next_due_ms is not None
    assert 0 < batch.next_due_ms - batch.now_ms <= 100  # the keys' next token
    assert not batch.rate_limited  # other keys may go on: the pump does not rest
    assert await lease(tasks, 20) == []
    await asyncio.sleep((batch.next_due_ms - batch.now_ms) / 1000 + 0.02)
    assert sorted(le.task.group_key for le in await lease(tasks, 20)) == ["a", "b"]


async def test_lifting_the_per_key_rate_lets_waiting_keys_go(tasks: TaskQueue) -> None:
    await limit(tasks, per_key_rate_limit=RateLimit(0.1, 1))
    await enqueue_for(tasks, "a", 3)
    assert len(await lease(tasks, 5)) == 1
    assert await lease(tasks, 5) == []
    await limit(tasks, "per_key_rate_limit")
    assert len(await lease(tasks, 5)) == 2


# --- priority_aging ---------------------------------------------------------------------------


async def enqueue_aging_mix(tasks: TaskQueue, **fields: Any) -> None:
    """ "old" (priority 0), then 60+ ms later "mid" (priority 5) and "high" (priority 10)."""
    await enqueue(tasks, request(b"old", **fields))
    await asyncio.sleep(0.06)
    await enqueue(tasks, request(b"mid", priority=5, **fields))
    await enqueue(tasks, request(b"high", priority=10, **fields))


async def test_without_aging_priority_is_strict(tasks: TaskQueue) -> None:
    await enqueue_aging_mix(tasks)
    assert await lease_payloads(tasks, 3) == ["high", "mid", "old"]


@pytest.mark.parametrize("fields", [{}, {"group_key": "k"}, {"delay_ms": 1}])
async def test_with_aging_a_task_gains_a_point_per_step_of_waiting(
    tasks: TaskQueue, fields: dict[str, Any]
) -> None:
    """With 10 ms a point, "old" waited 60+ ms: worth 6 points, more than "mid"'s 5, less than
    "high"'s 10. Fresh tasks, a group key's, and promoted ones (the pending set) alike."""
    await limit(tasks, "priority_aging", priority_aging_ms=10)
    await enqueue_aging_mix(tasks, **fields)
    await asyncio.sleep(0.01)
    assert await lease_payloads(tasks, 3) == ["high", "old", "mid"]


async def test_aging_orders_one_task_at_a_time_too(tasks: TaskQueue) -> None:
    await limit(tasks, "priority_aging", priority_aging_ms=10)
    await enqueue_aging_mix(tasks)
    assert [p for _ in range(3) for p in await lease_payloads(tasks, 1)] == ["high", "old", "mid"]
