"""One Enqueue call with tasks for several queues, over a real RedisStore, standalone and
Cluster: each queue's tasks are stored by a script of their own (standalone: all in one write),
a queue that refuses its tasks does not stop the others, and a rate refusal after anything of
the call was stored carries no retry (a client resending the whole call would store the rest
twice)."""

from __future__ import annotations

import asyncio

import pytest

from broker.errors import EnqueueRateLimited, IdempotencyConflict, PartlyStored, RateLimited
from broker.models import QueueSettings, RateLimit
from broker.queue import TaskQueue, TaskRequest
from broker.store.redis_store import STAGE_PAYLOAD_BYTES, RedisStore
from tests.store.test_task_queue_contract import enqueue, lease, request, stats

QUEUES = ("q-a", "q-b", "q-c")


async def throttle(tasks: TaskQueue, queue: str, burst: int) -> None:
    """Gives `queue` an enqueue_rate_limit of `burst` tasks, then one a minute."""
    limit = QueueSettings(enqueue_rate_limit=RateLimit(1 / 60, burst))
    await tasks.update_queue_settings(queue, limit, ["enqueue_rate_limit"])


async def pending(tasks: TaskQueue, queue: str) -> int:
    return (await stats(tasks, queue)).pending


async def test_each_queue_gets_its_own_tasks_and_the_ids_follow_the_call(
    tasks: TaskQueue,
) -> None:
    # Interleaved, so the answer must be put back in the call's order.
    calls = [request(f"{i}".encode(), queue=QUEUES[i % 3]) for i in range(9)]
    ids = await enqueue(tasks, *calls)
    assert [task_id.rpartition(":")[0] for task_id in ids] == [c.queue for c in calls]
    for queue in QUEUES:
        leased = await lease(tasks, 5, queue=queue)
        assert sorted(lease.task.ref.task_id for lease in leased) == sorted(
            task_id for task_id in ids if task_id.startswith(f"{queue}:")
        )
        assert [lease.task.payload for lease in leased] == [
            c.payload for c in calls if c.queue == queue
        ]


async def test_delayed_tasks_of_several_queues_are_each_in_the_due_index(
    tasks: TaskQueue, store: RedisStore
) -> None:
    await enqueue(tasks, request(queue="q-a", delay_ms=50), request(queue="q-b", delay_ms=50))
    assert [(await stats(tasks, q)).scheduled for q in ("q-a", "q-b")] == [1, 1]
    due: set[str] = set()
    for _ in range(100):  # the maintenance pass finds a queue through its due-index entry
        due |= {entry.queue for entry in await store.due.take(10, 1_000)}
        if due >= {"q-a", "q-b"}:
            break
        await asyncio.sleep(0.02)
    assert due == {"q-a", "q-b"}


async def test_a_queue_over_its_rate_does_not_stop_the_others_and_gets_no_retry(
    tasks: TaskQueue,
) -> None:
    await throttle(tasks, "q-b", burst=1)
    await enqueue(tasks, request(queue="q-b"))  # spends the burst
    calls = [request(queue="q-a"), request(queue="q-b"), request(queue="q-c")]
    with pytest.raises(PartlyStored) as refused:
        await tasks.enqueue(calls)
    assert not isinstance(refused.value, RateLimited)  # no RetryInfo on the wire
    assert "'q-b'" in str(refused.value)
    assert "other 2 task(s) were" in str(refused.value)
    assert [await pending(tasks, q) for q in QUEUES] == [1, 1, 1]


async def test_a_rate_refusal_with_nothing_stored_keeps_its_retry(tasks: TaskQueue) -> None:
    await throttle(tasks, "q-a", burst=1)
    await throttle(tasks, "q-b", burst=1)
    await enqueue(tasks, request(queue="q-a"), request(queue="q-b"))
    with pytest.raises(EnqueueRateLimited) as refused:
        await tasks.enqueue([request(queue="q-a"), request(queue="q-b")])
    assert refused.value.retry_after_s > 0
    assert [await pending(tasks, q) for q in ("q-a", "q-b")] == [1, 1]


async def test_a_reused_key_in_one_queue_names_its_task_and_the_others_are_stored(
    tasks: TaskQueue,
) -> None:
    await enqueue(tasks, request(b"first", queue="q-b", idempotency_key="k"))
    calls = [
        request(queue="q-a"),
        request(queue="q-b"),
        request(b"different", queue="q-b", idempotency_key="k"),
        request(queue="q-c"),
    ]
    with pytest.raises(IdempotencyConflict) as refused:
        await tasks.enqueue(calls)
    assert str(refused.value).startswith("tasks[2].idempotency_key")
    assert [await pending(tasks, q) for q in QUEUES] == [1, 1, 1]


async def test_payloads_written_ahead_are_stored_in_several_queues(tasks: TaskQueue) -> None:
    big = b"x" * (STAGE_PAYLOAD_BYTES + 1)
    ids = await enqueue(tasks, request(big, queue="q-a"), request(b"small", queue="q-b"))
    (leased,) = await lease(tasks, queue="q-a")
    assert (leased.task.ref.task_id, leased.task.payload) == (ids[0], big)
    (leased,) = await lease(tasks, queue="q-b")
    assert (leased.task.ref.task_id, leased.task.payload) == (ids[1], b"small")


async def test_a_later_wave_of_a_graph_refused_for_rate_says_the_first_was_stored(
    tasks: TaskQueue,
) -> None:
    await throttle(tasks, "q-a", burst=1)
    parent = request(b"parent", queue="q-a")
    child = TaskRequest("q-a", "send", b"child", depends_on_positions=(0,))
    with pytest.raises(PartlyStored) as refused:
        await tasks.enqueue([parent, child])
    assert "other 1 task(s) were" in str(refused.value)
