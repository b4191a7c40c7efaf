"""pipeline: a producer enqueues in batches of 500 while SDK workers consume at the same time;
end-to-end rate from the first Enqueue call to the last ack the broker counted."""

from __future__ import annotations

import asyncio
import time

from bench.context import Ctx
from bench.results import Target
from bench.scenarios.common import (
    POLL_S,
    Completion,
    start_workers,
    stop_workers,
    tasks,
    wait_succeeded,
)
from taskbroker import Client, NewTask

TARGET = Target(">=", 10_000)  # issue 15
BATCH = 500
WORKER_PROCS = 2
#: The producer stops at this point; what it enqueued is then waited for up to DRAIN_CAP_S.
CAP_S = 8.0
QUICK_CAP_S = 5.0
DRAIN_CAP_S = 3.0


async def produce(
    client: Client, batches: list[list[NewTask]], cap_s: float, max_backlog: int = 0
) -> int:
    """Enqueues batch after batch until done or cap_s has passed. Returns how many tasks.

    With max_backlog, waits while more than that many enqueued tasks have not succeeded yet,
    so that what was enqueued by the cap can still be drained soon after it.
    """
    deadline = time.monotonic() + cap_s
    sent = 0
    for batch in batches:
        while max_backlog and time.monotonic() < deadline:
            (stats,) = await client.stats(batch[0].queue)
            if sent - stats.succeeded_total <= max_backlog:
                break
            await asyncio.sleep(POLL_S)
        if time.monotonic() >= deadline:
            break
        await client.enqueue_many(batch)
        sent += len(batch)
    return sent


async def run(ctx: Ctx) -> None:
    size = ctx.options.size(100_000, 10_000)
    metric = ctx.result.metric(f"end-to-end {size // 1000}k, batches of {BATCH}", "tasks/s", TARGET)
    cap_s = ctx.options.seconds(CAP_S, QUICK_CAP_S)
    ctx.result.note(
        f"one producer (the bench process), {WORKER_PROCS} worker processes, "
        f"concurrency {ctx.options.concurrency} each; the producer stops after {cap_s:g} s "
        "if not done"
    )
    for run_no in ctx.runs():
        queue = ctx.queue("pipeline")
        all_tasks = tasks(queue, size)
        batches = [all_tasks[i : i + BATCH] for i in range(0, size, BATCH)]
        async with ctx.client() as client:
            workers = await start_workers(ctx, queue, WORKER_PROCS)
            started = time.time()
            sent = await produce(client, batches, cap_s)
            done: Completion = await wait_succeeded(client, queue, sent, DRAIN_CAP_S)
        capped = sent < size or done.capped
        metric.add(done.done / (done.at - started), capped=capped)
        if capped:
            await ctx.env.reap_children()
        else:
            await stop_workers(workers)
        ctx.result.runs.append(
            {"run": run_no, "enqueued": sent, "succeeded": done.done, "seconds": done.at - started}
        )
        await ctx.env.flush()
