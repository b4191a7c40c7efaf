"""memory: Redis memory per queued task (100-byte payload) while pending, delayed and dead, and
what is left once tasks completed under TASKBROKER_FINISHED_RETENTION_S=0.

Memory is INFO `used_memory` less `mem_clients_normal`: client buffers come and go with the
broker's connection pool and would otherwise blur small deltas. The broker trims finished tasks
in its janitor pass (at start, then every 30 s); to measure without waiting up to 30 s the
broker is restarted after the completions, which runs that pass at once."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from bench.context import Ctx
from bench.results import Target
from bench.scenarios.common import (
    POLL_S,
    enqueue_bulk,
    start_workers,
    stop_workers,
    tasks,
    wait_succeeded,
)
from bench.scenarios.pipeline import BATCH, produce
from bench.worker_proc import TASK_TYPE
from broker.embedded_redis import RECOMMENDED_HASH_VALUE_BYTES
from taskbroker import Client, NewTask

BROKER_ENV = {"TASKBROKER_FINISHED_RETENTION_S": "0"}
#: Issue 15: a pending task with a 100-byte payload, on a redis-server with stock settings.
PENDING_TARGET = Target("<=", 250)
#: redis-server's default hash-max-listpack-value (the bench's Redis runs with the recommended
#: RECOMMENDED_HASH_VALUE_BYTES, which only changes how tasks with a hash are encoded).
STOCK_HASH_VALUE_BYTES = 64
#: Producing and draining the residual batch stops here (a slow broker completes fewer).
RESIDUAL_CAP_S = 8.0
QUICK_RESIDUAL_CAP_S = 5.0
DEAD_CAP_S = 15.0
TRIM_CAP_S = 15.0
#: The residual producer waits while more than this many tasks are unfinished, so that what it
#: enqueued by its cap is drained within DRAIN_CAP_S.
MAX_BACKLOG = 3_000
DRAIN_CAP_S = 8.0


async def task_bytes(ctx: Ctx) -> int:
    info = await ctx.env.info("memory")
    return int(info["used_memory"]) - int(info.get("mem_clients_normal", 0))


async def _count(ctx: Ctx, pattern: str) -> int:
    return sum([1 async for _ in ctx.env.r.scan_iter(match=pattern, count=1000)])


async def run(ctx: Ctx) -> None:
    o = ctx.options
    sizes = {
        "pending": o.size(20_000, 2_000),
        "delayed": o.size(20_000, 2_000),
        "dead": o.size(3_000, 1_000),
        "residual": o.size(100_000, 10_000),
    }
    res = ctx.result
    res.metric("pending task, stock Redis settings", "B/task", PENDING_TARGET)
    res.metric("pending task", "B/task")
    res.metric("delayed task", "B/task")
    res.metric("dead task", "B/task")
    res.metric("residual after completions", "bytes")
    res.metric("residual task keys", "keys", Target("<=", 0, "= 0"))
    res.note(
        f"per-task figures from {sizes['pending']:,} pending, {sizes['delayed']:,} "
        f"delayed, {sizes['dead']:,} dead tasks; residual after up to {sizes['residual']:,} "
        "completed with finished retention 0 (janitor pass forced by a broker restart); "
        "residual bytes include the keyspace hash table, which Redis does not shrink at once"
    )
    for run_no in ctx.runs():
        details: dict[str, object] = {"run": run_no}
        async with ctx.client() as client:
            await client.enqueue(ctx.queue("warmup"), TASK_TYPE, b"")  # scripts loaded
            await ctx.env.r.config_set("hash-max-listpack-value", STOCK_HASH_VALUE_BYTES)
            try:
                stock = await _queued(ctx, client, "pending", sizes["pending"])
            finally:
                await ctx.env.r.config_set("hash-max-listpack-value", RECOMMENDED_HASH_VALUE_BYTES)
            res.metric("pending task, stock Redis settings", "B/task").add(stock)
            for kind in ("pending", "delayed"):
                per_task = await _queued(ctx, client, kind, sizes[kind])
                res.metric(f"{kind} task", "B/task").add(per_task)
            if (dead := await _dead(ctx, client, sizes["dead"])) is not None:
                res.metric("dead task", "B/task").add(dead)
        details |= await _residual(ctx, sizes["residual"])
        res.runs.append(details)
        await ctx.env.flush()


async def _queued(ctx: Ctx, client: Client, kind: str, n: int) -> float:
    queue = ctx.queue(kind)  # a fresh queue each call
    delay = timedelta(hours=1) if kind == "delayed" else None
    batch = [NewTask(queue, TASK_TYPE, b"x" * 100, delay=delay) for _ in range(n)]
    before = await task_bytes(ctx)
    await enqueue_bulk(client, batch)
    return (await task_bytes(ctx) - before) / n


async def _dead(ctx: Ctx, client: Client, n: int) -> float | None:
    queue = ctx.queue("dead")
    workers = await start_workers(ctx, queue, 1, mode="fail", label="dead")
    before = await task_bytes(ctx)
    await enqueue_bulk(client, tasks(queue, n, max_attempts=1))
    deadline = time.monotonic() + DEAD_CAP_S
    while True:
        dead = (await client.stats(queue))[0].dead
        if dead >= n or time.monotonic() >= deadline:
            break
        await asyncio.sleep(POLL_S)
    await stop_workers(workers)
    if dead < n:
        ctx.result.note(f"dead: only {dead:,} of {n:,} dead-lettered within {DEAD_CAP_S:g} s")
        return None
    return (await task_bytes(ctx) - before) / n


async def _residual(ctx: Ctx, n: int) -> dict[str, object]:
    queue = ctx.queue("residual")
    tag = f"tb:{{{queue}}}:"
    workers = await start_workers(ctx, queue, 2, label="residual")
    before = await task_bytes(ctx)
    all_tasks = tasks(queue, n)
    batches = [all_tasks[i : i + BATCH] for i in range(0, n, BATCH)]
    cap_s = ctx.options.seconds(RESIDUAL_CAP_S, QUICK_RESIDUAL_CAP_S)
    async with ctx.client() as client:  # bound to this broker: it is restarted below
        sent = await produce(client, batches, cap_s, max_backlog=MAX_BACKLOG)
        done = await wait_succeeded(client, queue, sent, DRAIN_CAP_S)
    await stop_workers(workers)
    if done.capped:
        ctx.result.note(f"residual: only {done.done:,} of {sent:,} completed; run skipped")
        return {"completed": done.done, "enqueued": sent}
    await ctx.env.restart_broker()  # the janitor trims at start
    deadline = time.monotonic() + TRIM_CAP_S
    while True:
        if not await ctx.env.r.zcard(tag + "done") or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.1)
    residual = await task_bytes(ctx) - before
    task_keys = await _count(ctx, tag + "t:*")
    other_keys = await _count(ctx, tag + "*") - task_keys
    capped = sent < n
    ctx.result.metric("residual after completions", "bytes").add(residual, capped=capped)
    ctx.result.metric("residual task keys", "keys").add(task_keys, capped=capped)
    return {
        "completed": done.done,
        "residual_bytes": residual,
        "residual_task_keys": task_keys,
        "finished_index_entries": await ctx.env.r.zcard(tag + "done"),
        "other_queue_keys": other_keys,
    }
