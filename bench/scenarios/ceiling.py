"""ceiling: the raw cost of the task lifecycle with the broker's own code and Lua scripts but no
gRPC: in this process, TaskQueue.enqueue (validation + the enqueue script), RedisStore.lease and
RedisStore.ack, in batches of 100, one batch after another. The broker is stopped meanwhile. It
shows what the broker's Python store code costs per task; `floor` is Redis's own pace for the
same scripts, with no broker code in the way."""

from __future__ import annotations

import time

from bench import procfs
from bench.context import Ctx
from bench.scenarios.common import PAYLOAD
from bench.worker_proc import TASK_TYPE
from broker.config import Settings
from broker.ids import new_lease_id
from broker.models import SettleStatus
from broker.queue import TaskQueue, TaskRequest
from broker.store.connect import redis_client
from broker.store.redis_store import RedisStore

BATCH = 100
LEASE_MS = 30_000
#: A run stops early after this long (and reports the pace it had).
CAP_S = 5.0


async def run(ctx: Ctx) -> None:
    total = ctx.options.size(50_000, 10_000)
    metric = ctx.result.metric(f"enqueue → lease → ack, batches of {BATCH}", "tasks/s")
    ctx.result.note(
        f"{total:,} tasks per run through TaskQueue/RedisStore in-process (no gRPC), "
        "one batch at a time, broker stopped"
    )
    await ctx.env.stop_broker()
    settings = Settings()
    for run_no in ctx.runs():
        store = RedisStore(redis_client(settings, ctx.env.redis_url))
        redis_pid = ctx.env.redis_server.pid
        cpu0, redis0 = time.process_time(), procfs.cpu_seconds(redis_pid)
        try:
            queue = ctx.queue("ceiling")
            done, seconds = await _lifecycle(TaskQueue(store, settings), store, queue, total)
        finally:
            await store.close()
        cpu, redis_cpu = time.process_time() - cpu0, procfs.cpu_seconds(redis_pid) - redis0
        metric.add(done / seconds, capped=done < total)
        ctx.result.runs.append(
            {
                "run": run_no,
                "tasks": done,
                "seconds": round(seconds, 3),
                # Which side is the limit: this Python process (redis-py) or redis-server.
                "bench_cpu_percent": round(100 * cpu / seconds, 1),
                "redis_cpu_percent": round(100 * redis_cpu / seconds, 1),
            }
        )
        await ctx.env.flush()


async def _lifecycle(
    tasks: TaskQueue, store: RedisStore, queue: str, total: int
) -> tuple[int, float]:
    """Runs `total` tasks through their life (enqueue through the queue's rules; lease and ack
    straight on its store, as the dispatcher and a coalesced ack batch do). Returns (tasks
    done, seconds)."""
    requests = [TaskRequest(queue, TASK_TYPE, PAYLOAD) for _ in range(BATCH)]
    done = 0
    started = time.perf_counter()
    deadline = started + CAP_S
    while done < total and time.perf_counter() < deadline:
        await tasks.enqueue(requests)
        batch = await store.lease(
            queue, [(new_lease_id(), LEASE_MS, "bench", "") for _ in range(BATCH)]
        )
        acks: list[str | bytes] = []
        for lease in batch.leases:  # argv.AckItem: id, lease id, result, holder
            acks += (lease.task.ref.local_id, lease.lease_id, b"", "")
        results = await store.ack(queue, acks)
        if len(results) != BATCH or any(r is not SettleStatus.OK for r in results):
            raise RuntimeError(f"a batch leased {len(batch.leases)} and acked {results[:3]}...")
        done += BATCH
    return done, time.perf_counter() - started
