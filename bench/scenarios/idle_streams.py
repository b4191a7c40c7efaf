"""idle_streams: 1,000 idle Lease streams (raw grpc.aio streams with one credit each, from one
client process over 10 connections) on one freshly started broker: the broker's RSS before and
after (VmRSS), its CPU time over an idle window (/proc/<pid>/stat), and Redis connected_clients
before and after: the dispatcher serves every stream of a queue with one pump, so streams must
not cost Redis connections or polling."""

from __future__ import annotations

import asyncio

from bench import procfs
from bench.context import Ctx
from bench.results import Target

STREAMS = 1_000
CHANNELS = 10
IDLE_S = 10.0
QUICK_IDLE_S = 3.0
#: Let the broker settle after start and after the streams opened.
SETTLE_S = 1.0
MIB = 1024 * 1024


async def _clients(ctx: Ctx) -> int:
    return int((await ctx.env.info("clients"))["connected_clients"])


async def run(ctx: Ctx) -> None:
    idle_s = ctx.options.seconds(IDLE_S, QUICK_IDLE_S)
    res = ctx.result
    res.metric("broker RSS, no streams", "MiB")
    res.metric(f"broker RSS, {STREAMS:,} idle streams", "MiB", Target("<=", 150))
    res.metric("broker RSS per stream", "KiB")
    res.metric(f"broker CPU while idle ({idle_s:g} s)", "% of a core", Target("<=", 2, "<= 2 %"))
    res.metric("Redis connected_clients added", "clients", Target("<", 10, "< 10 (not per stream)"))
    res.note(
        f"{STREAMS:,} streams over {CHANNELS} connections, 1 credit each, one "
        "queue; a fresh broker per run"
    )
    for run_no in ctx.runs():
        broker = await ctx.env.restart_broker()
        await asyncio.sleep(SETTLE_S)
        rss0, clients0 = procfs.rss_bytes(broker.pid), await _clients(ctx)
        queue = ctx.queue("idle")
        args = ["--target", broker.target, "--queue", queue, "--streams", str(STREAMS)]
        child = await ctx.env.spawn(
            "bench.streams_proc", [*args, "--channels", str(CHANNELS)], f"{queue}-streams"
        )
        ready = await child.wait_event("ready", 120)
        await asyncio.sleep(SETTLE_S)
        rss1, clients1 = procfs.rss_bytes(broker.pid), await _clients(ctx)
        cpu0 = procfs.tree_cpu_seconds(broker.pid)
        redis_cpu0 = procfs.cpu_seconds(ctx.env.redis_server.pid)
        await asyncio.sleep(idle_s)
        cpu = procfs.tree_cpu_seconds(broker.pid) - cpu0
        redis_cpu = procfs.cpu_seconds(ctx.env.redis_server.pid) - redis_cpu0
        res.metric("broker RSS, no streams", "MiB").add(rss0 / MIB)
        res.metric(f"broker RSS, {STREAMS:,} idle streams", "MiB").add(rss1 / MIB)
        res.metric("broker RSS per stream", "KiB").add((rss1 - rss0) / 1024 / STREAMS)
        res.metric(f"broker CPU while idle ({idle_s:g} s)", "% of a core").add(100 * cpu / idle_s)
        res.metric("Redis connected_clients added", "clients").add(clients1 - clients0)
        res.runs.append(
            {
                "run": run_no,
                "streams": ready["streams"],
                "redis_clients_before": clients0,
                "redis_clients_after": clients1,
                "broker_cpu_s": round(cpu, 3),
                "redis_cpu_s": round(redis_cpu, 3),
            }
        )
        await ctx.env.reap_children()
        await ctx.env.flush()
