"""fairness: what group keys cost on the drain. One SDK worker process drains the same backlog
three ways in each run: tasks without keys (the plain lease path), tasks spread over 1,000 group
keys, and the same keys with per_key_max_concurrency 5 (the queue leases round-robin across the
keys and parks a key at its cap). The keyed rates are also given as a % of the plain one
measured in the same run; the queue's drain without any limit set is the drain scenario's."""

from __future__ import annotations

import time

from bench.context import Ctx
from bench.scenarios.common import (
    PAYLOAD,
    first_start,
    start_workers,
    stop_workers,
    wait_succeeded,
)
from bench.scenarios.drain import enqueue_capped
from bench.worker_proc import TASK_TYPE
from taskbroker import Client, NewTask

KEYS = 1_000
PER_KEY_CAP = 5
DRAIN_CAP_S = 10.0
ENQUEUE_CAP_S = 8.0
#: (label, group keys, per_key_max_concurrency)
SHAPES = (
    ("no keys", 0, 0),
    (f"{KEYS:,} keys", KEYS, 0),
    (f"{KEYS:,} keys, per-key cap {PER_KEY_CAP}", KEYS, PER_KEY_CAP),
)


def _tasks(queue: str, n: int, keys: int) -> list[NewTask]:
    if not keys:
        return [NewTask(queue, TASK_TYPE, PAYLOAD) for _ in range(n)]
    return [NewTask(queue, TASK_TYPE, PAYLOAD, group_key=f"tenant-{i % keys}") for i in range(n)]


async def run(ctx: Ctx) -> None:
    size = 5_000 if ctx.options.quick else 20_000
    res = ctx.result
    for label, _, _ in SHAPES:
        res.metric(f"drain {size // 1000}k, {label}", "tasks/s")
    for label, keys, _ in SHAPES:
        if keys:
            res.metric(f"{label}, as % of no keys", "%")
    res.note(f"one worker process, {ctx.options.concurrency} concurrent no-op handlers")
    for run_no in ctx.runs():
        rates: dict[str, float] = {}
        for label, keys, cap in SHAPES:
            rates[label] = await _one(ctx, size, label, keys, cap)
            await ctx.env.flush()
        for label, keys, _ in SHAPES:
            if keys and rates["no keys"]:
                share = 100 * rates[label] / rates["no keys"]
                res.metric(f"{label}, as % of no keys", "%").add(share)
        res.runs.append({"run": run_no, **{k: round(v, 1) for k, v in rates.items()}})


async def _one(ctx: Ctx, size: int, label: str, keys: int, cap: int) -> float:
    queue = ctx.queue(f"fair{keys}x{cap}")
    async with ctx.client() as client:
        await _prepare(client, queue, cap)
        workers = await start_workers(ctx, queue, 1)
        enqueued, _ = await enqueue_capped(client, _tasks(queue, size, keys), ENQUEUE_CAP_S)
        resumed = time.time()
        await client.resume(queue)
        done = await wait_succeeded(client, queue, enqueued, DRAIN_CAP_S)
    start = first_start(workers) or resumed
    rate = done.done / max(done.at - start, 1e-9)
    ctx.result.metric(f"drain {size // 1000}k, {label}", "tasks/s").add(
        rate, capped=done.capped or enqueued < size
    )
    if done.capped:
        await ctx.env.reap_children()
    else:
        await stop_workers(workers)
    return rate


async def _prepare(client: Client, queue: str, cap: int) -> None:
    await client.pause(queue)
    if cap:
        await client.update_queue_settings(queue, per_key_max_concurrency=cap)
