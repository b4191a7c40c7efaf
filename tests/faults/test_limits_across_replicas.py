"""Queue limits hold across broker replicas and worker processes, checked from the workers' own
history (when each handler ran), not from a counter the broker reports."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Final

from taskbroker import Client, RateLimit
from tests.faults.observe import QUEUE, until_stats
from tests.faults.test_broker_faults import Fleet, Replicas
from tests.support.history import History

#: Worker processes and credits each, as the issue asks: far more credits than the cap.
WORKERS: Final = 8
CREDITS: Final = 50
MAX_CONCURRENCY: Final = 20
HANDLER: Final = timedelta(milliseconds=100)
TASKS: Final = 400
#: The rate limit test's rate and how long it measures; the soak tier (make soak) runs the
#: issue's 200/s over 10 s through LIMITS_RATE=200 LIMITS_RATE_S=10.
RATE_LIMIT: Final = float(os.environ.get("LIMITS_RATE", "100"))
RATE_RUN_S: Final = float(os.environ.get("LIMITS_RATE_S", "3"))


def most_at_once(history: History) -> int:
    """The largest number of handlers running at one instant: each runs from its delivery to
    the end its settlement records (inside its lease)."""
    ends = {
        (s.task_id, s.lease_id): s.sent_ns if s.sent_ns is not None else s.at_ns
        for s in history.settlements
    }
    events: list[tuple[int, int]] = []
    for d in history.deliveries:
        end = ends.get((d.task_id, d.lease_id))
        assert end is not None, f"{d.task_id} never settled"
        events += [(d.at_ns, 1), (end, -1)]
    running = peak = 0
    for _, step in sorted(events):  # at a tie an end (-1) sorts before a start
        running += step
        peak = max(peak, running)
    return peak


async def test_max_concurrency_holds_across_two_replicas_and_eight_workers(
    replicas: Replicas, tmp_path: Path
) -> None:
    a, b = await replicas.start("a"), await replicas.start("b")
    target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
    async with Client(target) as client:
        await client.update_queue_settings(QUEUE, max_concurrency=MAX_CONCURRENCY)
        fleet = Fleet(target, tmp_path)
        try:
            for i in range(WORKERS):
                fleet.start_jobs(f"w{i}", concurrency=CREDITS, lease=timedelta(seconds=30),
                                 sleep=HANDLER)  # fmt: skip
            await fleet.enqueue(client, TASKS)
            await until_stats(client, lambda s: s.succeeded_total == TASKS, 60, "all done")
            await fleet.stop()
        finally:
            fleet.close()
    history = fleet.history()
    peak = most_at_once(history)
    # Never above the cap, and the cap is used: a freed slot is refilled at once (a wake), not
    # after a poll.
    assert MAX_CONCURRENCY // 2 <= peak <= MAX_CONCURRENCY, peak
    assert len({d.worker for d in history.deliveries}) > 1


async def test_rate_limit_paces_leases_across_two_replicas(
    replicas: Replicas, tmp_path: Path
) -> None:
    rate = RATE_LIMIT
    count = round(rate * RATE_RUN_S) + 20
    a, b = await replicas.start("a"), await replicas.start("b")
    target = f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"
    async with Client(target) as client:
        # A burst of 1 would lose each token's lateness (the time from its due time to the
        # lease call that takes it: the bucket is full meanwhile); a few absorb it.
        await client.update_queue_settings(QUEUE, rate_limit=RateLimit(rate, 5))
        fleet = Fleet(target, tmp_path)
        try:
            for i in range(2):
                fleet.start_jobs(f"w{i}", concurrency=100, lease=timedelta(seconds=30),
                                 sleep=timedelta(0))  # fmt: skip
            await fleet.enqueue(client, count)
            await until_stats(
                client, lambda s: s.succeeded_total == count, RATE_RUN_S * 3 + 20, "all done"
            )
            await fleet.stop()
        finally:
            fleet.close()
    starts = sorted(d.at_ns for d in fleet.history().deliveries)
    # From the 20th delivery on (the workers are connected and steady) to the last.
    steady = starts[19:]
    measured = (len(steady) - 1) / ((steady[-1] - steady[0]) / 1e9)
    assert abs(measured - rate) / rate <= 0.05, measured


async def test_a_small_tenant_behind_a_big_backlog_is_served_within_the_first_completions(
    replicas: Replicas, tmp_path: Path
) -> None:
    """The issue's bar through real workers: 100 tasks of one key enqueued after 10,000 of
    another all complete within about the first 300 completions (keys alternate)."""
    a = await replicas.start("a")
    target = f"127.0.0.1:{a.port}"
    async with Client(target) as client:
        await client.pause(QUEUE)
        fleet = Fleet(target, tmp_path)
        try:
            fleet.start_jobs("w", concurrency=50, lease=timedelta(seconds=30), sleep=timedelta(0))
            await fleet.enqueue(client, 10_000, group_key="whale")
            small = set(await fleet.enqueue(client, 100, first=10_000, group_key="minnow"))
            await client.resume(QUEUE)
            await until_stats(client, lambda s: s.succeeded_total == 10_100, 90, "all done")
            await fleet.stop()
        finally:
            fleet.close()
    acked = sorted((s.at_ns, s.task_id) for s in fleet.history().settlements if s.outcome == "ok")
    order = [task_id for _, task_id in acked]
    last_small = max(order.index(task_id) for task_id in small)
    assert last_small < 300, last_small
