"""floor: the task lifecycle straight on Redis, with no broker in the way. One process
(bench.floor_proc) runs the broker's own enqueue, lease and ack scripts through plain redis-py,
a pipeline of the three per batch of 100. The broker is stopped meanwhile. Drain through the
broker as a % of this says how much of Redis's pace the served path keeps; `ceiling` is the
same lifecycle through the broker's Python store code, in the bench's process."""

from __future__ import annotations

from bench import procfs
from bench.context import Ctx

BATCH = 100
#: A run stops enqueuing after this long (and reports the pace it had).
CAP_S = 5.0
#: How long the process may take to start, connect and load the scripts.
READY_S = 30.0


async def run(ctx: Ctx) -> None:
    total = ctx.options.size(100_000, 10_000)
    metric = ctx.result.metric(
        f"Redis-direct enqueue → lease → ack, pipelined batches of {BATCH}", "tasks/s"
    )
    ctx.result.note(
        f"{total:,} tasks per run by one redis-py process calling the broker's Lua scripts "
        f"(no gRPC, no broker), cap {CAP_S:g} s, broker stopped"
    )
    await ctx.env.stop_broker()
    for run_no in ctx.runs():
        queue = ctx.queue("floor")
        args = ["--redis-url", ctx.env.redis_url, "--queue", queue, "--tasks", str(total)]
        args += ["--batch", str(BATCH), "--cap-s", str(CAP_S)]
        child = await ctx.env.spawn("bench.floor_proc", args, queue)
        await child.wait_event("ready", READY_S)
        redis_pid = ctx.env.redis_server.pid
        redis0 = procfs.cpu_seconds(redis_pid)
        await child.send({"go": True})
        result = await child.wait_event("result", CAP_S + READY_S)
        redis_cpu = procfs.cpu_seconds(redis_pid) - redis0
        await child.stop()
        done, seconds = int(result["tasks"]), float(result["seconds"])
        metric.add(done / seconds, capped=done < total)
        ctx.result.runs.append(
            {
                "run": run_no,
                "tasks": done,
                "seconds": round(seconds, 3),
                # Which side is the limit: the redis-py process or redis-server.
                "floor_proc_cpu_percent": round(100 * float(result["cpu_s"]) / seconds, 1),
                "redis_cpu_percent": round(100 * redis_cpu / seconds, 1),
            }
        )
        await ctx.env.flush()
