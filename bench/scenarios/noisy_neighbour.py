"""noisy_neighbour: one client misbehaves (bench.noisy_proc: more Lease streams than allowed,
settlements frames at and past the limits, concurrent 4 MiB Enqueue calls) while a victim client
makes single-task Enqueue calls: the victim's p99 with the noise over its p99 just before
(target <= 2), its failed calls, and its tasks lost (stored count against accepted calls).

The broker is restarted for every run, so the first window beside the noise meets a cold broker
(its heap grows by some 100 MB then); a second window, right after it with the noise still
going, shows the steady state (docs/benchmarks.md, "2026-12-07: the noisy neighbour, part by
part")."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc

from bench.context import Ctx
from bench.results import Target
from bench.stats import percentile
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, task_pb2

#: The noisy client connects over IPv6 (::1) and the victim over IPv4, so the broker sees two
#: clients (per-client limits count by address). Listening on every address needs --insecure.
BROKER_ENV = {"TASKBROKER_LISTEN": "[::]:{port}", "TASKBROKER_INSECURE": "1"}
CALLS = 600
QUICK_CALLS = 200
#: Between the victim's calls: it samples the noise over time rather than in one burst.
PAUSE_S = 0.005


async def _victim(
    stub: broker_service_pb2_grpc.BrokerServiceAsyncStub, queue: str, n: int, errors: Counter[str]
) -> list[float]:
    """n single-task Enqueue calls one after the other; their latencies in ms."""
    request = bs.EnqueueRequest(tasks=[task_pb2.TaskSpec(queue=queue, type="t", payload=b"v")])
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        try:
            await stub.Enqueue(request, timeout=10)
            latencies.append((time.perf_counter() - started) * 1000)
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] += 1
        await asyncio.sleep(PAUSE_S)
    return latencies


async def run(ctx: Ctx) -> None:
    n = ctx.options.size(CALLS, QUICK_CALLS)
    res = ctx.result
    res.metric("victim Enqueue p99, alone", "ms")
    res.metric("victim Enqueue p99, beside the noisy client", "ms")
    res.metric("victim p99 ratio (noisy / alone)", "x", Target("<=", 2.0))
    res.metric("victim Enqueue p99, beside the noisy client, second window", "ms")
    res.metric("victim p99 ratio, second window (noisy / alone)", "x")
    res.metric("victim calls failed", "calls", Target("<=", 0, "= 0"))
    res.metric("victim tasks lost", "tasks", Target("<=", 0, "= 0"))
    res.note(f"{n} sequential single-task Enqueue calls by the victim per phase")
    for run_no in ctx.runs():
        broker = await ctx.env.restart_broker()
        queue, noise = ctx.queue("victim"), ctx.queue("noise")
        errors: Counter[str] = Counter()
        async with grpc.aio.insecure_channel(broker.target) as channel:
            stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
            warm = await _victim(stub, queue, 50, errors)  # warm-up: scripts loaded, connections up
            alone = await _victim(stub, queue, n, errors)
            child = await ctx.env.spawn(
                "bench.noisy_proc", ["--target", f"[::1]:{broker.port}", "--queue", noise], "noisy"
            )
            await child.wait_event("ready", 60)
            noisy = await _victim(stub, queue, n, errors)
            steady = await _victim(stub, queue, n, errors)
            assert child.proc.stdin is not None
            child.proc.stdin.close()
            done = await child.wait_event("done", 60)
            await child.stop()
            stored = (await stub.Stats(bs.StatsRequest(queues=[queue]))).queues[0].pending
        p_alone, p_noisy = percentile(alone, 99), percentile(noisy, 99)
        failed = sum(errors.values())
        res.metric("victim Enqueue p99, alone", "ms").add(p_alone)
        res.metric("victim Enqueue p99, beside the noisy client", "ms").add(p_noisy)
        res.metric("victim p99 ratio (noisy / alone)", "x").add(p_noisy / p_alone)
        p_steady = percentile(steady, 99)
        res.metric("victim Enqueue p99, beside the noisy client, second window", "ms").add(p_steady)
        res.metric("victim p99 ratio, second window (noisy / alone)", "x").add(p_steady / p_alone)
        res.metric("victim calls failed", "calls").add(failed)
        accepted = len(warm) + len(alone) + len(noisy) + len(steady)
        res.metric("victim tasks lost", "tasks").add(accepted - stored)
        res.runs.append(
            {"run": run_no, "victim_errors": dict(errors), "noisy_counts": done["counts"]}
        )
        await ctx.env.reap_children()
        await ctx.env.flush()
