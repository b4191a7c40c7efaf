"""Per-key stats (TaskQueue.group_keys, group_keys.lua) on standalone Redis and a Cluster: keys
ranked by backlog, paged without gaps or repeats, each key's state, leased count and oldest
pending age, and the scan bound."""

from __future__ import annotations

import asyncio

import pytest

from broker.errors import InvalidArgument
from broker.models import GroupKeyPage, GroupKeyState, RateLimit
from broker.queue import TaskQueue
from broker.store.group_key_stats import group_key_page
from broker.store.redis_store import RedisStore
from tests.store.test_group_keys import enqueue_for
from tests.store.test_queue_limits import limit
from tests.store.test_task_queue_contract import Q, enqueue, lease, request


def ranking(page: GroupKeyPage) -> list[tuple[str, int]]:
    return [(k.group_key, k.pending) for k in page.keys]


async def test_keys_come_largest_backlog_first_then_by_name(tasks: TaskQueue) -> None:
    for key, n in (("a", 5), ("b", 2), ("c", 8), ("d", 2)):
        await enqueue_for(tasks, key, n)
    await enqueue(tasks, request(b"plain"))  # the default group is not a key
    page = await tasks.group_keys(Q, 0, None)
    assert ranking(page) == [("c", 8), ("a", 5), ("b", 2), ("d", 2)]
    assert page.next_cursor is None
    assert (page.ready_keys, page.parked_keys, page.rate_limited_keys) == (4, 0, 0)
    assert page.scanned_keys == 4


async def test_pages_follow_the_ranking_without_gaps_or_repeats(tasks: TaskQueue) -> None:
    for i, n in enumerate((3, 1, 3, 2, 1)):
        await enqueue_for(tasks, f"k{i}", n)
    seen: list[tuple[str, int]] = []
    cursor = None
    for _ in range(3):
        page = await tasks.group_keys(Q, 2, cursor)
        assert len(page.keys) <= 2
        seen += ranking(page)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert cursor is None
    assert seen == [("k0", 3), ("k2", 3), ("k3", 2), ("k1", 1), ("k4", 1)]


async def test_a_key_reports_its_leases_and_its_oldest_pending_task(tasks: TaskQueue) -> None:
    await enqueue_for(tasks, "k", 1, priority=-5)  # the oldest, though leased last
    await asyncio.sleep(0.05)
    await enqueue_for(tasks, "k", 3, priority=5)
    [held] = await lease(tasks, 1)
    assert held.task.priority == 5
    [k] = (await tasks.group_keys(Q, 0, None)).keys
    assert (k.pending, k.leased, k.state) == (3, 1, GroupKeyState.READY)
    task = await tasks.get(held.task.ref.task_id)
    assert k.oldest_ready_ms is not None
    assert k.oldest_ready_ms <= task.create_ms - 40  # the priority -5 task's, not the others'


async def test_each_key_says_why_it_is_not_taking_turns(tasks: TaskQueue) -> None:
    await limit(tasks, per_key_max_concurrency=2)
    await enqueue_for(tasks, "capped", 4)
    await enqueue_for(tasks, "done", 1)
    assert len(await lease(tasks, 10)) == 3  # "capped" is parked at 2, "done" has none left
    await limit(tasks, per_key_rate_limit=RateLimit(0.1, 1))
    await enqueue_for(tasks, "paced", 3)
    assert len(await lease(tasks, 10)) == 1  # "paced" spends its token and waits
    page = await tasks.group_keys(Q, 0, None)
    states = {k.group_key: (k.state, k.pending, k.leased) for k in page.keys}
    assert states == {
        "capped": (GroupKeyState.PARKED, 2, 2),
        "paced": (GroupKeyState.RATE_LIMITED, 2, 1),
        "done": (GroupKeyState.LEASED_ONLY, 0, 1),
    }
    assert [k.group_key for k in page.keys] == ["capped", "paced", "done"]
    assert (page.ready_keys, page.parked_keys, page.rate_limited_keys) == (0, 1, 1)
    assert page.keys_with_leases == 3


async def test_one_call_ranks_at_most_the_keys_it_scans(
    store: RedisStore, tasks: TaskQueue
) -> None:
    for i in range(5):
        await enqueue_for(tasks, f"k{i}", i + 1)
    page = await group_key_page(store, Q, 10, None, scan_limit=3)
    assert page.scanned_keys == 3
    assert len(page.keys) == 3
    assert page.ready_keys == 5  # the totals count every key


async def test_a_queue_without_keys_has_an_empty_page(tasks: TaskQueue) -> None:
    await enqueue(tasks, request(b"plain"))
    page = await tasks.group_keys(Q, 0, None)
    assert (page.keys, page.next_cursor, page.ready_keys, page.scanned_keys) == ([], None, 0, 0)


@pytest.mark.parametrize(("queue", "size", "field"), [("{bad}", 0, "queue"), (Q, -1, "page_size")])
async def test_bad_arguments_name_their_field(
    tasks: TaskQueue, queue: str, size: int, field: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await tasks.group_keys(queue, size, None)
    assert refused.value.field == field
