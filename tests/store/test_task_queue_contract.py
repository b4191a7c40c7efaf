"""TaskQueue over a real RedisStore: the same contract on standalone Redis and on a Redis Cluster.

Every test drives TaskQueue directly (no gRPC) and checks what users see: a task's state from
get(), and a queue's counts from stats().
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

import broker.queue
from broker.config import Settings
from broker.errors import ForeignLease, IdempotencyConflict, LeaseStale, TaskFinished, TaskNotFound
from broker.ids import new_lease_id
from broker.models import (
    HeldLease,
    Lease,
    QueueStats,
    SettleResult,
    SettleStatus,
    Task,
    TaskRef,
    TaskState,
)
from broker.queue import AckCall, TaskQueue, TaskRequest
from broker.store.keys import QUEUES_KEY, QueueKeys
from broker.store.redis_store import RedisStore
from tests.store.conftest import Topology

Q = "emails"
#: The queue's retry backoff (Settings below): 50 ms, doubling, capped at 200 ms.
BACKOFF_INITIAL_MS = 50
BACKOFF_MAX_MS = 200
#: Long enough that no lease in a test expires unless the test waits for it.
LONG_LEASE_MS = 10_000
#: The Lease stream the tests' leases are made for.
STREAM = "stream-1"
#: How long a detached lease waits for a resume (Settings below).
RESUME_WINDOW_MS = 100


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def settings(topology: Topology) -> Settings:
    return Settings(
        redis_url=topology.url,
        redis_cluster=topology.is_cluster,
        backoff_initial_s=BACKOFF_INITIAL_MS / 1000,
        backoff_max_s=BACKOFF_MAX_MS / 1000,
        resume_window_s=RESUME_WINDOW_MS / 1000,
    )


@pytest.fixture
def tasks(store: RedisStore, settings: Settings) -> TaskQueue:
    return TaskQueue(store, settings)


class _FixedJitter:
    """Stands in for the `random` module in broker.queue: every jitter draw is `value`."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.fixture
def fixed_jitter(monkeypatch: pytest.MonkeyPatch) -> _FixedJitter:
    """Pins the nack jitter, so a backoff's delay is known (a real draw may be 0: no delay)."""
    jitter = _FixedJitter(0.999)
    monkeypatch.setattr(broker.queue, "random", jitter)
    return jitter


# --- helpers ----------------------------------------------------------------------------------


def request(payload: bytes = b"{}", queue: str = Q, **fields: Any) -> TaskRequest:
    return TaskRequest(queue, "send", payload, **fields)


async def enqueue(tasks: TaskQueue, *requests: TaskRequest) -> list[str]:
    outcomes = await tasks.enqueue(requests)
    assert not any(o.duplicate for o in outcomes)
    return [o.task_id for o in outcomes]


async def enqueue_one(tasks: TaskQueue, payload: bytes = b"{}", **fields: Any) -> str:
    (task_id,) = await enqueue(tasks, request(payload, **fields))
    return task_id


async def lease(
    tasks: TaskQueue, n: int = 1, lease_ms: int = LONG_LEASE_MS, queue: str = Q
) -> list[Lease]:
    batch = await tasks.lease(queue, [(new_lease_id(), lease_ms, STREAM, "") for _ in range(n)])
    return batch.leases


async def lease_one(tasks: TaskQueue, lease_ms: int = LONG_LEASE_MS, queue: str = Q) -> Lease:
    leases = await lease(tasks, 1, lease_ms, queue)
    assert len(leases) == 1, "nothing was leased"
    return leases[0]


async def stats(tasks: TaskQueue, queue: str = Q) -> QueueStats:
    (result,) = await tasks.stats([queue])
    return result


async def redis_now_ms(tasks: TaskQueue) -> int:
    """Redis's clock, which judges every due time and expiry."""
    return (await stats(tasks)).now_ms


def errors(task: Task) -> list[tuple[int, str]]:
    return [(e.attempt, e.message) for e in task.errors]


async def sleep_until(tasks: TaskQueue, due_ms: int, margin_ms: int = 15) -> None:
    """Sleeps until Redis's clock has passed due_ms (bounded: due times here are short)."""
    wait_ms = due_ms - await redis_now_ms(tasks) + margin_ms
    assert wait_ms < 1000, f"a test waits at most 1 s, not {wait_ms} ms"
    await asyncio.sleep(max(wait_ms, 0) / 1000)


# --- 1. ack -----------------------------------------------------------------------------------


async def test_ack_settles_task_and_a_repeated_ack_answers_again(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks, b"hello")
    leased = await lease_one(tasks)
    assert leased.task.ref.task_id == task_id
    assert (leased.task.state, leased.task.attempt, leased.task.payload) == (
        TaskState.LEASED, 1, b"hello",
    )  # fmt: skip

    first = await tasks.ack(task_id, leased.lease_id, b"sent")
    repeat = await tasks.ack(task_id, leased.lease_id, b"sent")

    assert first.status is SettleStatus.OK
    assert repeat.status is SettleStatus.AGAIN
    task = await tasks.get(task_id)
    assert task.state is TaskState.SUCCEEDED
    assert (task.result, task.attempt, task.lease_id) == (b"sent", 1, None)
    assert task.finish_ms is not None and task.finish_ms >= task.create_ms > 0
    s = await stats(tasks)
    assert (s.enqueued_total, s.succeeded_total) == (1, 1)
    assert (s.pending, s.scheduled, s.leased, s.dead) == (0, 0, 0, 0)


async def test_one_lease_and_one_ack_call_of_many_tasks_settle_each_task_once(
    tasks: TaskQueue, topology: Topology
) -> None:
    """The scripts gather a batch's sorted-set members into one command, sent in chunks of
    1,000 arguments: 600 tasks take a lease and an ack call of more than one chunk each."""
    n, keys = 600, QueueKeys(Q)
    await enqueue(tasks, *(request(b"") for _ in range(n)))
    leases = await lease(tasks, n)
    assert len(leases) == n
    args: list[str | bytes] = []
    for held in leases:
        args += [held.task.ref.local_id, held.lease_id, b"", ""]
    call = AckCall([held.lease_id for held in leases], args)
    async with topology.client() as client:
        expiries = await client.zrange(keys.leased, 0, -1, withscores=True)
        assert len(expiries) == n
        assert {pair[1] for pair in expiries} == {leases[0].expire_ms}

        assert await tasks.ack_many(Q, call) == [SettleStatus.OK] * n
        assert await tasks.ack_many(Q, call) == [SettleStatus.AGAIN] * n
        assert await client.zcard(keys.done) == n
    s = await stats(tasks)
    assert (s.pending, s.leased, s.succeeded_total) == (0, 0, n)
    for held in (leases[0], leases[n // 2], leases[-1]):
        task = await tasks.get(held.task.ref.task_id)
        assert task.state is TaskState.SUCCEEDED and task.finish_ms is not None


# --- 2. fencing -------------------------------------------------------------------------------


async def test_ack_after_lease_lost_is_refused_and_task_succeeds_once(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks)
    first = await lease_one(tasks, lease_ms=50)
    await asyncio.sleep(0.08)  # the 50 ms lease has expired

    assert await tasks.reclaim_expired(Q) == 1
    second = await lease_one(tasks, lease_ms=LONG_LEASE_MS)
    assert second.task.ref.task_id == task_id
    assert second.task.attempt == 2
    assert second.lease_id != first.lease_id

    with pytest.raises(LeaseStale):
        await tasks.ack(task_id, first.lease_id, b"from the first worker")
    assert (await tasks.ack(task_id, second.lease_id, b"from the second")).status is SettleStatus.OK
    with pytest.raises(LeaseStale):  # still refused once the task has finished
        await tasks.ack(task_id, first.lease_id, b"from the first worker")

    task = await tasks.get(task_id)
    assert task.state is TaskState.SUCCEEDED
    assert (task.result, task.attempt) == (b"from the second", 2)
    assert errors(task) == [(1, "lease expired")]
    s = await stats(tasks)
    assert (s.succeeded_total, s.reclaimed_total, s.dead_lettered_total) == (1, 1, 0)


# --- 3. nack ----------------------------------------------------------------------------------


@pytest.mark.usefixtures("fixed_jitter")
async def test_nack_retries_after_a_doubling_capped_backoff(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks, max_attempts=5)
    # Attempt n waits nominal/2 + jitter * nominal/2 with nominal = min(max, initial * 2^(n-1)):
    # 50, 100, 200, then still 200 ms (equal jitter).
    for attempt, cap in [(1, 50), (2, 100), (3, 200), (4, 200)]:
        leased = await lease_one(tasks)
        assert leased.task.attempt == attempt
        before = await redis_now_ms(tasks)
        result = await tasks.nack(task_id, leased.lease_id, f"boom {attempt}", None, False)
        after = await redis_now_ms(tasks)

        task = await tasks.get(task_id)
        delay = math.floor(cap / 2 + 0.999 * cap / 2)
        assert result.status is SettleStatus.OK
        assert result.state is TaskState.SCHEDULED and task.state is TaskState.SCHEDULED
        assert task.schedule_ms == result.time_ms
        assert before <= task.schedule_ms <= after + cap
        assert before + delay <= task.schedule_ms <= after + delay
        if attempt < 4:
            await sleep_until(tasks, task.schedule_ms)
            count, _ = await tasks.promote_due(Q)
            assert count == 1
            assert (await tasks.get(task_id)).state is TaskState.PENDING

    s = await stats(tasks)
    assert (s.retried_total, s.failed_total, s.scheduled, s.dead) == (4, 4, 1, 0)


async def test_nack_backoff_is_never_sooner_than_half_the_nominal_delay(tasks: TaskQueue) -> None:
    ids = await enqueue(tasks, *(request(str(i).encode()) for i in range(20)))
    leases = await lease(tasks, 20)
    before = await redis_now_ms(tasks)
    results = await asyncio.gather(
        *(tasks.nack(x.task.ref.task_id, x.lease_id, "boom", None, False) for x in leases)
    )
    after = await redis_now_ms(tasks)

    assert all(r.status is SettleStatus.OK for r in results)
    for task_id in ids:
        task = await tasks.get(task_id)
        # Equal jitter: the first retry comes between half the initial backoff and all of it.
        assert task.state is TaskState.SCHEDULED
        assert before + BACKOFF_INITIAL_MS // 2 <= task.schedule_ms <= after + BACKOFF_INITIAL_MS


async def test_nack_honours_the_workers_retry_delay(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks)
    leased = await lease_one(tasks)
    before = await redis_now_ms(tasks)
    result = await tasks.nack(task_id, leased.lease_id, "rate limited", 150, False)
    after = await redis_now_ms(tasks)

    task = await tasks.get(task_id)
    assert result.state is TaskState.SCHEDULED and task.state is TaskState.SCHEDULED
    assert before + 150 <= task.schedule_ms <= after + 150  # not the 50 ms backoff

    await sleep_until(tasks, task.schedule_ms)
    assert (await tasks.promote_due(Q))[0] == 1
    assert (await tasks.get(task_id)).state is TaskState.PENDING


async def test_nack_with_zero_retry_delay_is_pending_at_once(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks)
    leased = await lease_one(tasks)
    result = await tasks.nack(task_id, leased.lease_id, "try again", 0, False)
    repeat = await tasks.nack(task_id, leased.lease_id, "try again", 0, False)

    assert result.state is TaskState.PENDING
    assert (repeat.status, repeat.state) == (SettleStatus.AGAIN, TaskState.PENDING)
    assert (await tasks.get(task_id)).state is TaskState.PENDING
    assert (await lease_one(tasks)).task.attempt == 2


async def test_nack_with_dead_letter_skips_remaining_attempts(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks, max_attempts=5)
    leased = await lease_one(tasks)
    result = await tasks.nack(task_id, leased.lease_id, "poison", None, True)

    assert result.state is TaskState.DEAD
    task = await tasks.get(task_id)
    assert (task.state, task.attempt, task.last_error) == (TaskState.DEAD, 1, "poison")
    assert task.finish_ms is not None and task.finish_ms > 0
    s = await stats(tasks)
    assert (s.dead, s.dead_lettered_total, s.retried_total, s.pending) == (1, 1, 0, 0)


async def test_last_attempts_nack_dead_letters(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks, max_attempts=2)
    first = await lease_one(tasks)
    assert (await tasks.nack(task_id, first.lease_id, "boom 1", 0, False)).state is (
        TaskState.PENDING
    )
    second = await lease_one(tasks)
    assert second.task.attempt == 2
    assert (await tasks.nack(task_id, second.lease_id, "boom 2", 0, False)).state is (
        TaskState.DEAD
    )

    task = await tasks.get(task_id)
    assert (task.state, task.attempt) == (TaskState.DEAD, 2)
    assert await lease(tasks) == []
    s = await stats(tasks)
    assert (s.dead, s.retried_total, s.dead_lettered_total, s.failed_total) == (1, 1, 1, 2)


async def test_dead_letter_keeps_every_attempts_error_in_order(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks, max_attempts=3)
    first = await lease_one(tasks)
    await tasks.nack(task_id, first.lease_id, "boom 1", 0, False)
    await lease_one(tasks, lease_ms=30)
    await asyncio.sleep(0.05)
    assert await tasks.reclaim_expired(Q) == 1
    third = await lease_one(tasks)
    await tasks.nack(task_id, third.lease_id, "boom 3", 0, False)

    task = await tasks.get(task_id)
    assert task.state is TaskState.DEAD
    assert errors(task) == [(1, "boom 1"), (2, "lease expired"), (3, "boom 3")]
    assert task.last_error == "boom 3"
    times = [e.time_ms for e in task.errors]
    assert times == sorted(times) and times[0] >= task.create_ms


# --- 4. extend --------------------------------------------------------------------------------


async def test_extend_pushes_the_lease_out_past_its_first_expiry(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks)
    leased = await lease_one(tasks, lease_ms=50)

    result = await tasks.extend(task_id, leased.lease_id, 5_000)

    assert result.status is SettleStatus.OK
    assert result.expire_ms >= leased.expire_ms + 4_900
    assert (await tasks.get(task_id)).lease_expire_ms == result.expire_ms
    await asyncio.sleep(0.08)  # past the first 50 ms deadline
    assert await tasks.reclaim_expired(Q) == 0
    assert (await tasks.ack(task_id, leased.lease_id, b"")).status is SettleStatus.OK


async def test_extend_without_duration_renews_the_original_length(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks)
    leased = await lease_one(tasks, lease_ms=2_000)
    before = await redis_now_ms(tasks)

    result = await tasks.extend(task_id, leased.lease_id, None)

    after = await redis_now_ms(tasks)
    assert before + 2_000 <= result.expire_ms <= after + 2_000


async def test_extend_with_a_stale_lease_is_refused(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks)
    first = await lease_one(tasks, lease_ms=30)
    await asyncio.sleep(0.05)
    assert await tasks.reclaim_expired(Q) == 1
    second = await lease_one(tasks)

    with pytest.raises(LeaseStale):
        await tasks.extend(task_id, first.lease_id, 5_000)
    with pytest.raises(LeaseStale):  # a lease id never issued for this task
        await tasks.extend(task_id, new_lease_id(), 5_000)
    assert (await tasks.get(task_id)).lease_expire_ms == second.expire_ms
    await tasks.ack(task_id, second.lease_id, b"")
    with pytest.raises(LeaseStale):  # the task has finished
        await tasks.extend(task_id, second.lease_id, 5_000)


# --- 5. streams ending: detach, resume, undo ---------------------------------------------------


def held(leased: Lease) -> HeldLease:
    return HeldLease(leased.task.ref, leased.lease_id)


async def test_detached_lease_ends_after_the_resume_window_spending_the_attempt(
    tasks: TaskQueue,
) -> None:
    task_id = await enqueue_one(tasks)
    leased = await lease_one(tasks)

    before = await redis_now_ms(tasks)
    count, expiry = await tasks.detach(STREAM, [held(leased)], "lease stream closed")
    assert count == 1 and before <= expiry <= before + RESUME_WINDOW_MS + 50
    assert await tasks.reclaim_expired(Q) == 0  # the window is still open
    await sleep_until(tasks, expiry)
    assert await tasks.reclaim_expired(Q) == 1

    task = await tasks.get(task_id)
    assert (task.state, task.attempt, task.lease_id) == (TaskState.PENDING, 1, None)
    assert errors(task) == [(1, "lease stream closed")]
    # Detaching the same lease again does nothing; settling it is refused.
    assert (await tasks.detach(STREAM, [held(leased)], "lease stream closed"))[0] == 0
    with pytest.raises(LeaseStale):
        await tasks.ack(task_id, leased.lease_id, b"")
    assert (await lease_one(tasks)).task.attempt == 2


async def test_detached_lease_of_the_last_attempt_dead_letters(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks, max_attempts=1)
    leased = await lease_one(tasks)

    _, expiry = await tasks.detach(STREAM, [held(leased)], "lease stream closed")
    await sleep_until(tasks, expiry)
    assert await tasks.reclaim_expired(Q) == 1

    task = await tasks.get(task_id)
    assert task.state is TaskState.DEAD
    assert errors(task) == [(1, "lease stream closed")]
    s = await stats(tasks)
    assert (s.dead, s.pending, s.leased, s.dead_lettered_total) == (1, 0, 0, 1)


async def test_resume_keeps_the_lease_id_and_attempt_and_renews_the_expiry(
    tasks: TaskQueue,
) -> None:
    task_id = await enqueue_one(tasks)
    leased = await lease_one(tasks, lease_ms=1_000)
    await tasks.detach(STREAM, [held(leased)], "lease stream closed")

    before = await redis_now_ms(tasks)
    [result] = await tasks.resume("stream-2", [held(leased)])
    assert isinstance(result, SettleResult) and result.status is SettleStatus.OK
    assert before + 1_000 <= result.expire_ms <= await redis_now_ms(tasks) + 1_000
    await asyncio.sleep(RESUME_WINDOW_MS / 1000 + 0.05)
    assert await tasks.reclaim_expired(Q) == 0  # resumed: the window no longer applies

    task = await tasks.get(task_id)
    assert (task.state, task.attempt, task.lease_id) == (TaskState.LEASED, 1, leased.lease_id)
    assert (await tasks.ack(task_id, leased.lease_id, b"done")).status is SettleStatus.OK
    assert errors(await tasks.get(task_id)) == []


async def test_a_stream_cannot_detach_a_lease_another_stream_resumed(tasks: TaskQueue) -> None:
    """Stream ownership: the old stream's broker ends it after the worker moved its leases."""
    task_id = await enqueue_one(tasks)
    leased = await lease_one(tasks)
    await tasks.resume("stream-2", [held(leased)])  # the worker moved it while STREAM was open

    assert (await tasks.detach(STREAM, [held(leased)], "lease stream closed"))[0] == 0
    assert await tasks.unlease(STREAM, [held(leased)]) == 0
    assert (await tasks.get(task_id)).state is TaskState.LEASED


async def test_resume_of_a_lease_that_is_no_longer_current_is_refused(tasks: TaskQueue) -> None:
    acked_id, expired_id = await enqueue(tasks, request(b"a"), request(b"b"))
    by_id = {x.task.ref.task_id: x for x in await lease(tasks, 2, lease_ms=50)}
    await tasks.ack(acked_id, by_id[acked_id].lease_id, b"")
    await asyncio.sleep(0.08)
    assert await tasks.reclaim_expired(Q) == 1
    again = await lease_one(tasks)  # the expired task, re-leased to someone else
    assert again.task.ref.task_id == expired_id

    results = await tasks.resume(
        "stream-2",
        [held(by_id[acked_id]), held(by_id[expired_id]), HeldLease(TaskRef(Q, "0" * 26), "0" * 32)],
    )
    assert [type(r) for r in results] == [LeaseStale, LeaseStale, TaskNotFound]
    assert (await tasks.get(expired_id)).lease_id == again.lease_id


async def test_unlease_returns_an_unsent_task_to_its_place_without_spending_an_attempt(
    tasks: TaskQueue,
) -> None:
    first, second = await enqueue(tasks, request(b"1"), request(b"2"))
    leased = await lease_one(tasks)
    assert leased.task.ref.task_id == first

    assert await tasks.unlease(STREAM, [held(leased)]) == 1
    assert await tasks.unlease(STREAM, [held(leased)]) == 0

    task = await tasks.get(first)
    assert (task.state, task.attempt, task.lease_id, errors(task)) == (
        TaskState.PENDING,
        0,
        None,
        [],
    )
    s = await stats(tasks)
    assert (s.pending, s.leased, s.reclaimed_total) == (2, 0, 0)
    again = await lease_one(tasks)  # FIFO order is kept: it is first again
    assert (again.task.ref.task_id, again.task.attempt) == (first, 1)
    with pytest.raises(LeaseStale):
        await tasks.ack(first, leased.lease_id, b"")
    assert second != first


# --- 6. priorities ----------------------------------------------------------------------------


async def test_higher_priority_first_and_fifo_within_a_priority(tasks: TaskQueue) -> None:
    priorities = [0, 5, -3, 5, 0, 1000, -1000, -3, 0, 1000, 5, -1000]
    ids = await enqueue(tasks, *(request(priority=p) for p in priorities[:6]))
    ids += await enqueue(tasks, *(request(priority=p) for p in priorities[6:]))

    # The oldest ready task is found across priority bands, whatever its priority.
    assert (await stats(tasks)).oldest_ready_ms == (await tasks.get(ids[0])).create_ms
    leases = await lease(tasks, len(ids) + 1)

    want = [ids[i] for i in sorted(range(len(ids)), key=lambda i: -priorities[i])]  # stable sort
    assert [x.task.ref.task_id for x in leases] == want
    assert [x.task.priority for x in leases] == sorted(priorities, reverse=True)


# --- 7. delays --------------------------------------------------------------------------------


async def test_delayed_task_is_not_leased_before_it_is_due(tasks: TaskQueue) -> None:
    delayed = await enqueue_one(tasks, delay_ms=200)
    task = await tasks.get(delayed)
    assert task.state is TaskState.SCHEDULED
    assert task.schedule_ms >= task.create_ms + 200
    ready = await enqueue_one(tasks)

    assert (await lease_one(tasks)).task.ref.task_id == ready
    batch = await tasks.lease(Q, [(new_lease_id(), LONG_LEASE_MS, STREAM, "")])
    assert batch.leases == []
    assert batch.next_due_ms == task.schedule_ms
    assert (await stats(tasks)).scheduled == 1

    await sleep_until(tasks, task.schedule_ms)
    due = await lease_one(tasks)
    assert due.task.ref.task_id == delayed
    assert due.task.attempt == 1


# --- 8. cancel --------------------------------------------------------------------------------


async def test_cancelled_pending_task_is_never_leased(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks)

    task, revoked = await tasks.cancel(task_id)

    assert (task.state, revoked) == (TaskState.CANCELLED, None)
    assert await lease(tasks) == []
    assert (await tasks.get(task_id)).state is TaskState.CANCELLED
    s = await stats(tasks)
    assert (s.pending, s.cancelled_total) == (0, 1)
    with pytest.raises(TaskFinished):
        await tasks.cancel(task_id)


async def test_cancel_of_a_leased_task_revokes_the_lease(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks)
    leased = await lease_one(tasks)

    task, revoked = await tasks.cancel(task_id)

    assert (task.state, revoked) == (TaskState.CANCELLED, leased.lease_id)
    with pytest.raises(LeaseStale):
        await tasks.ack(task_id, leased.lease_id, b"")
    assert (await tasks.get(task_id)).state is TaskState.CANCELLED


async def test_cancel_of_a_finished_task_is_refused(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks)
    leased = await lease_one(tasks)
    await tasks.ack(task_id, leased.lease_id, b"")

    with pytest.raises(TaskFinished):
        await tasks.cancel(task_id)
    assert (await tasks.get(task_id)).state is TaskState.SUCCEEDED


# --- 9. idempotency ---------------------------------------------------------------------------


async def test_idempotency_key_repeat_returns_the_first_task(tasks: TaskQueue) -> None:
    (first,) = await tasks.enqueue([request(b"a", idempotency_key="order-42")])
    (again,) = await tasks.enqueue([request(b"a", idempotency_key="order-42")])

    assert not first.duplicate
    assert again.duplicate and again.task_id == first.task_id
    s = await stats(tasks)
    assert (s.enqueued_total, s.pending) == (1, 1)


async def test_idempotency_key_reused_for_another_task_is_refused(tasks: TaskQueue) -> None:
    (first,) = await tasks.enqueue([request(b"a", idempotency_key="order-42")])

    with pytest.raises(IdempotencyConflict):
        await tasks.enqueue([request(b"b", idempotency_key="order-42")])
    with pytest.raises(IdempotencyConflict):  # nothing of the refused call is stored
        await tasks.enqueue([request(b"c"), request(b"b", idempotency_key="order-42")])

    s = await stats(tasks)
    assert (s.enqueued_total, s.pending) == (1, 1)
    assert (await tasks.get(first.task_id)).payload == b"a"


# --- 10. dead-letter administration -----------------------------------------------------------


async def _dead_letter_all(tasks: TaskQueue, ids: Sequence[str]) -> None:
    """Leases every task and releases them in enqueue order, a few per call (max_attempts=1)."""
    by_id = {x.task.ref.task_id: x for x in await lease(tasks, len(ids))}
    assert sorted(by_id) == sorted(ids)
    for start in range(0, len(ids), 7):
        chunk = [held(by_id[t]) for t in ids[start : start + 7]]
        assert (await tasks.detach(STREAM, chunk, "worker crashed"))[0] == len(chunk)
    await asyncio.sleep(RESUME_WINDOW_MS / 1000 + 0.02)
    assert await tasks.reclaim_expired(Q) == len(ids)


async def test_dead_letters_page_redrive_and_delete(tasks: TaskQueue) -> None:
    ids = await enqueue(tasks, *(request(str(i).encode(), max_attempts=1) for i in range(25)))
    await _dead_letter_all(tasks, ids)
    assert (await stats(tasks)).dead == 25

    pages: list[list[str]] = []
    cursor: tuple[int, str] | None = None
    while True:
        page = await tasks.list_dead(Q, 10, cursor)
        pages.append([t.ref.task_id for t in page.tasks])
        assert all(t.state is TaskState.DEAD for t in page.tasks)
        cursor = page.next_cursor
        if cursor is None:
            break
        assert len(pages) < 5, "paging does not end"
    assert [len(p) for p in pages] == [10, 10, 5]
    assert [t for p in pages for t in p] == ids  # oldest first, no repeats

    assert await tasks.redrive_dead(Q, [], every=True) == 25
    for task_id in ids:
        task = await tasks.get(task_id)
        assert (task.state, task.attempt) == (TaskState.PENDING, 0)
        assert errors(task) == [(1, "worker crashed")]  # the history is kept
    s = await stats(tasks)
    assert (s.pending, s.dead) == (25, 0)

    await _dead_letter_all(tasks, ids)
    assert await tasks.delete_dead(Q, [], every=True) == 25
    for task_id in ids:
        with pytest.raises(TaskNotFound):
            await tasks.get(task_id)
    assert (await tasks.list_dead(Q, 10, None)).tasks == []
    s = await stats(tasks)
    assert (s.pending, s.leased, s.dead) == (0, 0, 0)


# --- 11. trim ---------------------------------------------------------------------------------


async def test_trim_deletes_finished_tasks_past_retention_only(
    store: RedisStore, settings: Settings
) -> None:
    tasks = TaskQueue(store, replace(settings, finished_retention_s=0))
    done, cancelled, dead, pending = await enqueue(
        tasks, request(b"done"), request(b"cancelled"), request(b"dead", max_attempts=1),
        request(b"pending"),
    )  # fmt: skip
    first, second = await lease(tasks, 2)
    assert (first.task.ref.task_id, second.task.ref.task_id) == (done, cancelled)
    await tasks.ack(done, first.lease_id, b"ok")
    await tasks.cancel(cancelled)
    third = await lease_one(tasks)
    await tasks.nack(dead, third.lease_id, "poison", None, True)

    assert await tasks.trim(Q) == 2

    for task_id in (done, cancelled):
        with pytest.raises(TaskNotFound):
            await tasks.get(task_id)
    assert (await tasks.get(dead)).state is TaskState.DEAD  # dead letters have their own retention
    assert (await tasks.get(pending)).state is TaskState.PENDING
    assert await tasks.trim(Q) == 0


async def test_trim_deletes_a_backlog_larger_than_one_script_call(
    store: RedisStore, settings: Settings
) -> None:
    tasks = TaskQueue(store, replace(settings, finished_retention_s=0))
    ids = await enqueue(tasks, *(request(str(i).encode()) for i in range(600)))
    leases = await lease(tasks, 600)
    await asyncio.gather(*(tasks.ack(x.task.ref.task_id, x.lease_id, b"") for x in leases))

    assert await tasks.trim(Q) == 600
    for task_id in (ids[0], ids[499], ids[500], ids[-1]):
        with pytest.raises(TaskNotFound):
            await tasks.get(task_id)


# --- 12. script resilience --------------------------------------------------------------------


async def _script_flush(topology: Topology) -> None:
    for client in topology.node_clients():
        try:
            await client.script_flush()
        finally:
            await client.aclose()


async def test_every_operation_works_after_script_flush(
    tasks: TaskQueue, topology: Topology, store: RedisStore, settings: Settings
) -> None:
    warm = await enqueue_one(tasks)
    await tasks.ack(warm, (await lease_one(tasks)).lease_id, b"")  # scripts are now loaded

    await _script_flush(topology)

    acked, nacked, released, expired, cancelled = await enqueue(
        tasks, *(request(max_attempts=1) for _ in range(5))
    )
    leases = {x.task.ref.task_id: x for x in await lease(tasks, 4)}
    assert sorted(leases) == sorted([acked, nacked, released, expired])
    await _script_flush(topology)  # again, mid-lifecycle: settlements reload their scripts
    assert (await tasks.extend(acked, leases[acked].lease_id, 5_000)).status is SettleStatus.OK
    assert (await tasks.ack(acked, leases[acked].lease_id, b"r")).status is SettleStatus.OK
    await tasks.nack(nacked, leases[nacked].lease_id, "boom", None, False)
    assert await tasks.unlease(STREAM, [held(leases[released])]) == 1
    again = await lease_one(tasks)
    assert again.task.ref.task_id == released
    assert (await tasks.resume(STREAM, [held(again)]))[0].status is SettleStatus.OK  # type: ignore[union-attr]
    assert (await tasks.detach(STREAM, [held(again)], "x"))[0] == 1
    # Enqueued after the last lease: a lease call after its due time would promote it first.
    delayed = await enqueue_one(tasks, delay_ms=100)
    await tasks.extend(expired, leases[expired].lease_id, 10)
    await asyncio.sleep(RESUME_WINDOW_MS / 1000 + 0.03)
    assert await tasks.reclaim_expired(Q) == 2
    await sleep_until(tasks, (await tasks.get(delayed)).schedule_ms)
    assert (await tasks.promote_due(Q))[0] == 1
    await tasks.cancel(cancelled)
    assert await tasks.redrive_dead(Q, [], every=True) == 3
    assert (await stats(tasks)).pending == 4
    leases = {x.task.ref.task_id: x for x in await lease(tasks, 4)}
    for x in leases.values():
        await tasks.nack(x.task.ref.task_id, x.lease_id, "again", None, True)
    assert len((await tasks.list_dead(Q, 10, None)).tasks) == 4
    assert await tasks.delete_dead(Q, [], every=True) == 4
    assert (await tasks.get(acked)).result == b"r"
    assert await TaskQueue(store, replace(settings, finished_retention_s=0)).trim(Q) == 3

    assert delayed in leases
    s = await stats(tasks)
    assert (s.pending, s.scheduled, s.leased, s.dead) == (0, 0, 0, 0)
    assert (s.enqueued_total, s.succeeded_total, s.cancelled_total) == (7, 2, 1)


# --- 13. hash tags ----------------------------------------------------------------------------


async def _all_keys(topology: Topology) -> dict[str, list[str]]:
    """Every key in Redis, by the node that holds it."""
    found: dict[str, list[str]] = {}
    for url, client in zip(topology.node_urls, topology.node_clients(), strict=True):
        try:
            found[url] = [k.decode() async for k in client.scan_iter(count=1000)]
        finally:
            await client.aclose()
    return found


async def test_each_queues_keys_share_one_slot(tasks: TaskQueue, topology: Topology) -> None:
    queues = ("alpha", "beta")
    for q in queues:
        done, nacked, dead, _ = await enqueue(
            tasks, request(queue=q, idempotency_key="k1"), request(queue=q),
            request(queue=q, max_attempts=1), request(queue=q),
        )  # fmt: skip
        await enqueue(tasks, request(queue=q, delay_ms=60_000))
        by_id = {x.task.ref.task_id: x for x in await lease(tasks, 3, queue=q)}
        await tasks.ack(done, by_id[done].lease_id, b"")
        await tasks.nack(nacked, by_id[nacked].lease_id, "boom", 0, False)
        await tasks.nack(dead, by_id[dead].lease_id, "boom", None, True)
        await lease_one(tasks, queue=q)  # one stays leased
        await tasks.set_paused(q, True)
        await stats(tasks, q)

    by_node = await _all_keys(topology)
    keys = [k for node_keys in by_node.values() for k in node_keys]

    others = {k for k in keys if not any(f"{{{q}}}" in k for q in queues)}
    # The registry and the due index's shards (each shard's keys share their own slot).
    assert QUEUES_KEY in others
    index = others - {QUEUES_KEY}
    assert index and all(k.startswith("tb:{~due") for k in index)
    for shard in {k.split("}")[0] for k in index}:
        assert len({key_slot(k.encode()) for k in index if k.startswith(shard + "}")}) == 1
    for q in queues:
        mine = [k for k in keys if f"{{{q}}}" in k]
        kinds = {k.split(":")[2] for k in mine}
        # What still waits is one fresh task (stream "f" + index "fp") and one retried task
        # (zset "pending"); which of the two lease_one took depends on their scores, so
        # either pending layout may remain, and at least one of them must.
        waiting = kinds - {"scheduled", "leased", "done", "dead", "stats", "meta", "t", "idem"}
        assert waiting in ({"pending"}, {"f", "fp"}), kinds
        assert kinds - waiting == {
            "scheduled", "leased", "done", "dead", "stats", "meta", "t", "idem",
        }  # fmt: skip
        assert {key_slot(k.encode()) for k in mine} == {key_slot(q.encode())}
        holders = [node for node, node_keys in by_node.items() if any(k in mine for k in node_keys)]
        assert len(holders) == 1


# --- 14. group commit -------------------------------------------------------------------------


@pytest.mark.parametrize("topology", ["standalone"], indirect=True)
async def test_concurrent_enqueues_share_script_calls(tasks: TaskQueue, topology: Topology) -> None:
    admin = aioredis.Redis.from_url(topology.url)
    try:
        await admin.config_resetstat()
        outcomes = await asyncio.gather(
            *(tasks.enqueue([request(str(i).encode())]) for i in range(200))
        )
        commandstats = cast("dict[str, dict[str, Any]]", await admin.info("commandstats"))
    finally:
        await admin.aclose()

    ids = [o.task_id for (o,) in outcomes]
    assert len(set(ids)) == 200
    assert not any(o.duplicate for (o,) in outcomes)
    for i, task_id in enumerate(ids):
        assert (await tasks.get(task_id)).payload == str(i).encode()
    script_calls = sum(
        int(commandstats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )
    assert 0 < script_calls < 200, script_calls
    s = await stats(tasks)
    assert (s.enqueued_total, s.pending) == (200, 200)


async def test_a_lease_records_the_stream_that_holds_it(
    tasks: TaskQueue, store: RedisStore
) -> None:
    first, second = await enqueue(tasks, request(), request())
    batch = await tasks.lease(
        Q,
        [
            (new_lease_id(), LONG_LEASE_MS, "stream-a", ""),
            (new_lease_id(), LONG_LEASE_MS, "stream-b", ""),
        ],
    )
    held = {le.task.ref.task_id: le for le in batch.leases}
    for task_id, stream in ((first, "stream-a"), (second, "stream-b")):
        key = QueueKeys(Q).task(tasks.ref("t", task_id).local_id)
        assert await store.client.hget(key, "sid") == stream.encode()
        assert await store.client.hget(key, "lid") == held[task_id].lease_id.encode()


async def test_a_lease_bound_to_a_principal_is_settled_only_by_it(tasks: TaskQueue) -> None:
    task_id = await enqueue_one(tasks)
    batch = await tasks.lease(Q, [(new_lease_id(), LONG_LEASE_MS, STREAM, "x")])
    [leased] = batch.leases
    lease_id = leased.lease_id
    with pytest.raises(ForeignLease):
        await tasks.ack(task_id, lease_id, b"forged", holder="y")
    with pytest.raises(ForeignLease):
        await tasks.nack(task_id, lease_id, "forged", None, True, holder="y")
    with pytest.raises(ForeignLease):
        await tasks.extend(task_id, lease_id, None, holder="y")
    [refused] = await tasks.resume("stream-2", [held(leased)], holder="y")
    assert isinstance(refused, ForeignLease)
    assert (await tasks.get(task_id)).state is TaskState.LEASED
    [resumed] = await tasks.resume("stream-2", [held(leased)], holder="x")
    assert isinstance(resumed, SettleResult)
    assert (await tasks.ack(task_id, lease_id, b"ok", holder="x")).status is SettleStatus.OK
    # A repeat by anyone answers AGAIN: the lease is no longer current, nothing can be done.
    assert (await tasks.ack(task_id, lease_id, b"ok", holder="y")).status is SettleStatus.AGAIN


async def test_a_lease_made_or_presented_without_a_policy_is_unbound(tasks: TaskQueue) -> None:
    first, second = await enqueue(tasks, request(), request())
    batch = await tasks.lease(
        Q,
        [(new_lease_id(), LONG_LEASE_MS, STREAM, ""), (new_lease_id(), LONG_LEASE_MS, STREAM, "x")],
    )
    by_id = {le.task.ref.task_id: le.lease_id for le in batch.leases}
    # Leased before a policy: any principal settles it (an upgrade strands no lease).
    assert (await tasks.ack(first, by_id[first], b"", holder="y")).status is SettleStatus.OK
    # Presented after the policy was removed: anonymous settles it, as before policies.
    assert (await tasks.ack(second, by_id[second], b"", holder="")).status is SettleStatus.OK


def test_a_lease_slot_is_the_lease_scripts_slot_arguments_in_order() -> None:
    # RedisStore.lease hands each LeaseSlot tuple to the script as it is.
    from broker.store import argv

    assert argv.LeaseSlot._fields == ("lease_id", "lease_ms", "stream_id", "holder")
