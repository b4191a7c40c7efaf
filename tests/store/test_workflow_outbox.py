"""The workflow outbox step by step (issue 17), on one Redis and on a 3-master Cluster: a mover
that dies between any two steps, or two movers on the same entries, neither lose a child's
release nor repeat it. No broker process here: the test is the only mover, and runs each step
itself."""

from __future__ import annotations

import asyncio

from broker.ids import new_lease_id, parse_task_id
from broker.models import Lease, TaskState
from broker.queue import TaskQueue, TaskRequest
from broker.store.keys import QueueKeys
from broker.store.redis_store import RedisStore
from broker.store.workflow_store import Tell
from broker.workflows import MAX_CONCURRENT_DRAINS, OutboxMover
from tests.store.test_task_queue_contract import LONG_LEASE_MS, STREAM

PARENTS_Q, CHILD_Q = "parents", "children"


def request(queue: str, payload: bytes = b"{}", **fields: object) -> TaskRequest:
    return TaskRequest(queue, "job", payload, **fields)  # type: ignore[arg-type]


async def lease_all(tasks: TaskQueue, queue: str, n: int) -> list[Lease]:
    batch = await tasks.lease(
        queue, [(new_lease_id(), LONG_LEASE_MS, STREAM, "") for _ in range(n)]
    )
    return batch.leases


async def ack(tasks: TaskQueue, lease: Lease, result: bytes) -> None:
    await tasks.ack(lease.task.ref.task_id, lease.lease_id, result)


async def state(tasks: TaskQueue, task_id: str) -> TaskState:
    return (await tasks.get(task_id)).state


async def fan_in(tasks: TaskQueue, parents: int) -> list[str]:
    outcomes = await tasks.enqueue(
        [request(PARENTS_Q, str(i).encode()) for i in range(parents)]
        + [request(CHILD_Q, depends_on_positions=tuple(range(parents)))]
    )
    return [o.task_id for o in outcomes]


async def test_a_child_waits_until_the_mover_has_moved_every_parent_s_end(
    store: RedisStore, tasks: TaskQueue
) -> None:
    *parents, child = await fan_in(tasks, 3)
    mover = OutboxMover(store, tasks.workflow)
    assert await mover.drain(CHILD_Q) == 1  # the link request
    for lease in await lease_all(tasks, PARENTS_Q, 3):
        await ack(tasks, lease, b"r" + lease.task.payload)
    # The acks appended their ends to the parents' outbox; nobody moved them yet.
    assert await tasks.workflow.outbox_length(PARENTS_Q) == 3
    assert await state(tasks, child) == TaskState.WAITING
    assert await mover.drain(PARENTS_Q) == 3
    assert await state(tasks, child) == TaskState.PENDING
    (delivered,) = await lease_all(tasks, CHILD_Q, 1)
    assert delivered.links is not None
    got = [(p.task_id, p.state, p.type, p.result) for p in delivered.links.parent_results]
    assert got == [
        (p, TaskState.SUCCEEDED, "job", b"r" + str(i).encode()) for i, p in enumerate(parents)
    ]


async def test_an_entry_moved_again_after_a_mover_died_before_deleting_it_changes_nothing(
    store: RedisStore, tasks: TaskQueue
) -> None:
    parent, child = await fan_in(tasks, 1)
    mover = OutboxMover(store, tasks.workflow)
    await mover.drain(CHILD_Q)
    (lease,) = await lease_all(tasks, PARENTS_Q, 1)
    await ack(tasks, lease, b"once")
    (entry,) = await tasks.workflow.read_outbox(PARENTS_Q, 10)
    # A mover ran the resolve step, then died before its XDEL: the entry is still there.
    assert entry.state is not None and entry.children is not None
    assert entry.type == "job"
    outcomes = await tasks.workflow.resolve(
        CHILD_Q,
        [
            Tell(CHILD_Q, parse_task_id("c", c).local_id, parent, entry.state, "job", entry.result)
            for c in entry.children
        ],
    )
    assert outcomes == ["run"]
    (child_lease,) = await lease_all(tasks, CHILD_Q, 1)
    # The next mover moves the same entry: the child is not released a second time.
    assert await mover.drain(PARENTS_Q) == 1
    assert await tasks.workflow.outbox_length(PARENTS_Q) == 0
    assert await state(tasks, child) == TaskState.LEASED
    assert await lease_all(tasks, CHILD_Q, 1) == []
    await ack(tasks, child_lease, b"")
    assert await state(tasks, child) == TaskState.SUCCEEDED


async def test_two_movers_on_the_same_outbox_release_a_fan_in_once(
    store: RedisStore, tasks: TaskQueue
) -> None:
    n = 200
    *_, child = await fan_in(tasks, n)
    first, second = OutboxMover(store, tasks.workflow), OutboxMover(store, tasks.workflow)
    await first.drain(CHILD_Q)
    leases = await lease_all(tasks, PARENTS_Q, n)
    await asyncio.gather(*(ack(tasks, le, b"x") for le in leases))
    # Both claim in turn and race through the resolve steps (the claim only saves work).
    await asyncio.gather(first.drain(PARENTS_Q), second.drain(PARENTS_Q), first.drain(PARENTS_Q))
    await first.drain(PARENTS_Q)
    assert await state(tasks, child) == TaskState.PENDING
    keys = QueueKeys(CHILD_Q)
    ref = parse_task_id("c", child)
    assert int(await store.client.hget(keys.task(ref.local_id), "wait") or 0) == 0
    (stats,) = await tasks.stats([CHILD_Q])
    assert (stats.pending, stats.waiting) == (1, 0)


async def test_a_link_made_after_the_parent_ended_releases_the_child(
    store: RedisStore, tasks: TaskQueue
) -> None:
    (parent,) = [o.task_id for o in await tasks.enqueue([request(PARENTS_Q)])]
    (lease,) = await lease_all(tasks, PARENTS_Q, 1)
    # The child is enqueued (its link request stored) before the parent's ack, and linked after.
    (child,) = [o.task_id for o in await tasks.enqueue([request(CHILD_Q, depends_on=(parent,))])]
    await ack(tasks, lease, b"early")
    mover = OutboxMover(store, tasks.workflow)
    assert await tasks.workflow.outbox_length(PARENTS_Q) == 0  # no child was linked at the ack
    await mover.drain(CHILD_Q)
    assert await state(tasks, child) == TaskState.PENDING


async def test_a_fresh_parent_gets_its_hash_when_linked_and_still_runs_once(
    store: RedisStore, tasks: TaskQueue
) -> None:
    (parent,) = [
        o.task_id for o in await tasks.enqueue([request(PARENTS_Q)])
    ]  # fresh: a stream entry
    (child,) = [o.task_id for o in await tasks.enqueue([request(CHILD_Q, depends_on=(parent,))])]
    mover = OutboxMover(store, tasks.workflow)
    await mover.drain(CHILD_Q)
    assert await state(tasks, parent) == TaskState.PENDING
    leases = await lease_all(tasks, PARENTS_Q, 5)
    assert [le.task.ref.task_id for le in leases] == [parent]
    await ack(tasks, leases[0], b"")
    await mover.drain(PARENTS_Q)
    assert await state(tasks, child) == TaskState.PENDING


async def test_waiting_tasks_are_never_trimmed_and_finished_ones_take_their_links_along(
    store: RedisStore, tasks: TaskQueue
) -> None:
    parent, child = await fan_in(tasks, 1)
    (stuck_parent,) = [o.task_id for o in await tasks.enqueue([request("slow")])]
    (stuck,) = [
        o.task_id for o in await tasks.enqueue([request(CHILD_Q, depends_on=(stuck_parent,))])
    ]
    mover = OutboxMover(store, tasks.workflow)
    await mover.drain(CHILD_Q)
    (lease,) = await lease_all(tasks, PARENTS_Q, 1)
    await ack(tasks, lease, b"")
    await mover.drain(PARENTS_Q)
    (child_lease,) = await lease_all(tasks, CHILD_Q, 1)
    await ack(tasks, child_lease, b"")
    await asyncio.sleep(0.01)
    # Retention 0: every finished task goes; the waiting one stays, with its parents' record.
    await store.trim_finished(PARENTS_Q, 0, 0, 100)
    await store.trim_finished(CHILD_Q, 0, 0, 100)
    p, c = (parse_task_id("id", t) for t in (parent, child))
    assert (
        await store.client.exists(
            QueueKeys(PARENTS_Q).task(p.local_id),
            QueueKeys(PARENTS_Q).children(p.local_id),
            QueueKeys(CHILD_Q).task(c.local_id),
            QueueKeys(CHILD_Q).parents(c.local_id),
        )
        == 0
    )
    assert await state(tasks, stuck) == TaskState.WAITING
    assert list((await tasks.links(await tasks.get(stuck))).waiting_for) == [stuck_parent]


async def test_many_queues_kicked_at_once_are_drained_a_bounded_number_at_a_time(
    store: RedisStore, tasks: TaskQueue
) -> None:
    (parent,) = [o.task_id for o in await tasks.enqueue([request(PARENTS_Q)])]
    queues = [f"children-{i}" for i in range(3 * MAX_CONCURRENT_DRAINS)]
    for queue in queues:  # each child's link request waits in its own queue's outbox
        await tasks.enqueue([request(queue, depends_on=(parent,))])
    mover = OutboxMover(store, tasks.workflow)
    running = peak = 0
    drain = mover.drain

    async def counted(queue: str) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            return await drain(queue)
        finally:
            running -= 1

    mover.drain = counted  # type: ignore[method-assign]
    for queue in queues:
        mover.kick(queue)
    await mover.idle()
    assert peak == MAX_CONCURRENT_DRAINS
    assert [await tasks.workflow.outbox_length(q) for q in queues] == [0] * len(queues)


async def test_a_parent_of_over_1000_children_trimmed_before_its_end_is_moved_loses_none(
    store: RedisStore, tasks: TaskQueue
) -> None:
    (parent,) = [o.task_id for o in await tasks.enqueue([request(PARENTS_Q)])]
    children: list[str] = []
    for _ in range(2):  # 1,200 children, each naming the parent by id
        outcomes = await tasks.enqueue([request(CHILD_Q, depends_on=(parent,))] * 600)
        children += [o.task_id for o in outcomes]
    mover = OutboxMover(store, tasks.workflow)
    await mover.drain(CHILD_Q)
    (lease,) = await lease_all(tasks, PARENTS_Q, 1)
    await ack(tasks, lease, b"done")
    (entry,) = await tasks.workflow.read_outbox(PARENTS_Q, 10)
    assert entry.children is None  # too many to list: copied beside the entry
    # Every broker was down past the parent's retention: it is trimmed, its children's set too.
    await asyncio.sleep(0.01)
    await store.trim_finished(PARENTS_Q, 0, 0, 100)
    assert await store.client.exists(QueueKeys(PARENTS_Q).children(lease.task.ref.local_id)) == 0
    assert await mover.drain(PARENTS_Q) == 1
    (stats,) = await tasks.stats([CHILD_Q])
    assert (stats.pending, stats.waiting) == (len(children), 0)
    # The copy went with the entry.
    assert await store.client.exists(QueueKeys(PARENTS_Q).outbox_children(entry.entry_id)) == 0


async def test_the_sweep_after_a_reconnect_finds_every_outbox_with_entries(
    store: RedisStore, tasks: TaskQueue
) -> None:
    # The tb:flow announcements of these were lost (no one listened): only the sweep finds them.
    (parent,) = [o.task_id for o in await tasks.enqueue([request(PARENTS_Q)])]
    queues = [f"swept-{i}" for i in range(5)]
    for queue in queues:
        await tasks.enqueue([request(queue, depends_on=(parent,))])
    await tasks.enqueue([request("nothing-waits-here")])
    mover = OutboxMover(store, tasks.workflow)
    assert await mover.sweep() == len(queues)
    await mover.idle()
    assert await tasks.workflow.outbox_lengths(queues) == [0] * len(queues)
    assert (await tasks.links(await tasks.get(parent))).child_count == len(queues)
