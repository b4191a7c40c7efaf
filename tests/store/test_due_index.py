"""The due index: maintenance reaches every queue with work due on time, touches no other queue,
and never hides a due time created while it runs. Standalone and Cluster."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest

from broker.config import Settings
from broker.errors import TaskNotFound
from broker.ids import new_lease_id
from broker.loops.sweeper import Sweeper
from broker.models import Hint, SettleStatus, TaskState
from broker.queue import MAINTAIN_LIMIT, TRIM_SLACK_MS, AckCall, TaskQueue, TaskRequest
from broker.store.keys import QUEUES_KEY, DueKeys, QueueKeys
from broker.store.redis_store import RedisStore
from tests.store.conftest import Topology

#: Queues holding one task delayed far into the future: they must not be touched.
IDLE_QUEUES = 300
#: How often the test runs a maintenance pass, as the broker does (reap interval).
PASS_S = 0.05


async def _many_idle_queues(tasks: TaskQueue) -> None:
    await tasks.enqueue(
        [TaskRequest(f"idle-{i}", "t", delay_ms=3_600_000) for i in range(IDLE_QUEUES)]
    )


async def _now_ms(tasks: TaskQueue, queue: str) -> int:
    (s,) = await tasks.stats([queue])
    return s.now_ms


async def _due_queues(store: RedisStore) -> list[str]:
    """What a pass would look at now (taken with a 0 ms claim: nothing is moved)."""
    return sorted(e.queue for e in await store.take_due(10_000, 0))


async def test_an_expiring_lease_among_many_queues_is_reclaimed_on_time(
    tasks: TaskQueue, store: RedisStore
) -> None:
    await _many_idle_queues(tasks)
    (out,) = await tasks.enqueue([TaskRequest("busy", "t")])
    batch = await tasks.lease("busy", [(new_lease_id(), 300, "stream-1", "")])
    [lease] = batch.leases
    assert await _due_queues(store) == []  # nothing is due: a pass touches no queue

    while True:
        await tasks.maintain_due()
        task = await tasks.get(out.task_id)
        now = await _now_ms(tasks, "busy")
        if task.state is not TaskState.LEASED:
            break
        assert now < lease.expire_ms + 1000, "not reclaimed within 1 s of its deadline"
        await asyncio.sleep(PASS_S)
    assert task.state is TaskState.PENDING
    assert now >= lease.expire_ms
    assert now - lease.expire_ms < 1000


async def test_due_tasks_among_many_queues_are_promoted_on_time(
    tasks: TaskQueue, store: RedisStore
) -> None:
    await _many_idle_queues(tasks)
    await tasks.enqueue([TaskRequest("soon", "t", delay_ms=300)])
    due_ms = await _now_ms(tasks, "soon") + 300

    while True:
        await tasks.maintain_due()
        (s,) = await tasks.stats(["soon"])
        if s.pending == 1:
            break
        assert s.now_ms < due_ms + 1000, "not promoted within 1 s of its due time"
        await asyncio.sleep(PASS_S)
    assert s.scheduled == 0
    assert await _due_queues(store) == []


async def test_a_hint_during_a_pass_is_not_hidden_by_its_raise(
    tasks: TaskQueue, store: RedisStore
) -> None:
    """A maintainer reads the queue (next due: an hour away); a lease made before it settles
    the entry must still be reclaimed on time: the generation check refuses the raise."""
    await tasks.enqueue([TaskRequest("q", "t"), TaskRequest("q", "t", delay_ms=3_600_000)])
    await store.hint([Hint("q", delay_ms=0)])
    [entry] = await store.take_due(10, 500)
    [maintained] = await store.maintain(["q"], 100, 0)
    assert maintained.next_due_ms is not None
    assert maintained.next_due_ms > await _now_ms(tasks, "q") + 3_000_000

    batch = await tasks.lease("q", [(new_lease_id(), 200, "stream-1", "")])  # hints, in between
    [lease] = batch.leases
    assert await store.settle_due([(entry, maintained.next_due_ms)]) == 0  # refused

    started = time.monotonic()
    while (await tasks.get(lease.task.ref.task_id)).state is TaskState.LEASED:
        assert time.monotonic() - started < 2.0, "the raise hid the lease's expiry"
        await tasks.maintain_due()
        await asyncio.sleep(PASS_S)


async def test_an_empty_queue_is_forgotten_and_an_enqueue_racing_it_wins(
    tasks: TaskQueue, store: RedisStore, topology: Topology
) -> None:
    await tasks.enqueue([TaskRequest("gone", "t")])
    [lease] = (await tasks.lease("gone", [(new_lease_id(), 10_000, "s", "")])).leases
    await tasks.ack(lease.task.ref.task_id, lease.lease_id, b"")
    no_retention = TaskQueue(store, Settings(finished_retention_s=0))
    store_fast = RedisStore(topology.client(), finished_retention_ms=0)
    try:
        swept = TaskQueue(store_fast, Settings(finished_retention_s=0))
        cursor, n = 0, 0
        while True:  # one full round of the backstop sweep
            cursor, k = await swept.sweep(cursor, 100)
            n += k
            if cursor == 0:
                break
    finally:
        await store_fast.close()
    assert n >= 1
    assert "gone" not in await no_retention.queues()
    (s,) = await tasks.stats(["gone"])
    assert (s.enqueued_total, s.succeeded_total) == (0, 0)  # its totals went with it

    # The race: an enqueue whose script ran while the queue was being forgotten (here: before
    # the re-check) puts it back, registered and indexed.
    await tasks.enqueue([TaskRequest("racing", "t", delay_ms=200)])
    assert await store.forget_queue("racing") is False
    assert "racing" in await tasks.queues()
    assert await store.client.sismember(QUEUES_KEY, "racing")
    await asyncio.sleep(0.25)
    assert await _due_queues(store) == ["racing"]


async def test_the_sweep_covers_every_queue_once_per_period_in_shares(
    tasks: TaskQueue, store: RedisStore
) -> None:
    """The backstop: a due time the index lost (here: deleted by hand) is found again within
    one sweep period, in small paced shares."""
    await _many_idle_queues(tasks)
    await tasks.enqueue([TaskRequest("lost", "t", delay_ms=100)])
    await tasks.enqueue([TaskRequest("later", "t", delay_ms=30_000)])
    later_ms = await _now_ms(tasks, "later") + 30_000
    for shard in range(store.due.shards):
        await store.client.delete(DueKeys(shard).at)
    await asyncio.sleep(0.15)
    sweeper = Sweeper(tasks, period_s=1.0, interval_s=0.25)
    shares = [await sweeper.run_once() for _ in range(4)]
    assert all(0 < s <= (IDLE_QUEUES + 2) // 4 + 20 for s in shares[:3])
    assert sum(shares) >= IDLE_QUEUES + 2  # one round: every queue once
    assert await sweeper.run_once() == 0  # the next round waits for the period
    (s,) = await tasks.stats(["lost"])
    assert (s.pending, s.scheduled) == (1, 0)  # the sweep did what was due
    at = await store.client.zscore(store.due.keys("later").at, "later")
    assert at is not None and abs(at - later_ms) < 1000  # and indexed what is not yet


async def test_after_redis_lost_everything_a_known_queue_is_registered_and_maintained(
    tasks: TaskQueue, store: RedisStore, topology: Topology
) -> None:
    """Issue 11 §4 on both topologies: no cache in the broker outlives the Redis state."""
    await tasks.enqueue([TaskRequest("known", "t")])
    for client in topology.node_clients():
        try:
            await client.flushall()
        finally:
            await client.aclose()
    (out,) = await tasks.enqueue([TaskRequest("known", "t")])
    assert "known" in await tasks.queues()
    [lease] = (await tasks.lease("known", [(new_lease_id(), 200, "s", "")])).leases
    while (await tasks.get(out.task_id)).state is TaskState.LEASED:
        assert await _now_ms(tasks, "known") < lease.expire_ms + 1000, "reclaimed late"
        await tasks.maintain_due()
        await asyncio.sleep(PASS_S)


async def test_one_pass_trims_a_busy_queues_finished_tasks_beyond_one_calls_limit(
    topology: Topology, settings: Settings
) -> None:
    """A queue completing thousands of tasks a second needs its trims to keep up: one
    maintenance call trims at most MAINTAIN_LIMIT, so a pass goes on with a queue that hit it."""
    store = RedisStore(topology.client(), finished_retention_ms=0)  # its acks hint the trim
    try:
        tasks = TaskQueue(store, replace(settings, finished_retention_s=0))
        await _finish_and_trim_in_one_pass(tasks, store)
    finally:
        await store.close()


async def _finish_and_trim_in_one_pass(tasks: TaskQueue, store: RedisStore) -> None:
    n = 3 * MAINTAIN_LIMIT
    for _ in range(n // 500):
        await tasks.enqueue([TaskRequest("busy", "t") for _ in range(500)])
    finished_ids = []
    for _ in range(n // 100):
        batch = await tasks.lease("busy", [(new_lease_id(), 60_000, "s", "") for _ in range(100)])
        finished_ids += [lease.task.ref.task_id for lease in batch.leases]
        acks = AckCall([], [])
        for lease in batch.leases:
            acks.lease_ids.append(lease.lease_id)
            acks.args += [lease.task.ref.local_id, lease.lease_id, b"", ""]
        assert set(await tasks.ack_many("busy", acks)) == {SettleStatus.OK}
    finished = QueueKeys("busy").done
    assert await store.client.zcard(finished) == n
    await asyncio.sleep((TRIM_SLACK_MS + 200) / 1000)  # past retention 0 plus the trim slack

    assert await tasks.maintain_due() >= n  # one pass, as the maintainer runs it
    left = await store.client.zcard(finished)
    assert left == 0, f"{left} of {n} finished tasks left after one pass"
    with pytest.raises(TaskNotFound):  # the task itself is gone, not only its index entry
        await tasks.get(finished_ids[0])
