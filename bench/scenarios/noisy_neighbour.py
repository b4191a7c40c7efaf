"""noisy_neighbour: one client misbehaves (bench.noisy_proc: more Lease streams than allowed,
settlements frames at and past the limits, concurrent 4 MiB Enqueue calls) while a victim client
makes single-task Enqueue calls: the victim's p99 with the noise over its p99 just before
(target <= 2), its failed calls, and its tasks lost (stored count against accepted calls).

Beside it, gRPC's own floor (bench.bare_grpc_proc): the same pace of health Checks against a bare
grpc.aio server (no broker, no Redis), alone and beside 4 MiB calls at the broker's byte limit per
client. Large messages alone raise a small call's p99 by that much, whatever the broker does.

The broker is restarted for every run, so the first window beside the noise meets a cold broker
(its heap grows by some 100 MB then); a second window, right after it with the noise still
going, shows the steady state (docs/benchmarks.md, "2026-12-07: the noisy neighbour, part by
part")."""

from __future__ import annotations

import asyncio
import functools
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.context import Ctx
from bench.results import Target
from bench.stats import percentile
from broker.config import Settings
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, task_pb2

#: The noisy client connects over IPv6 (::1) and the victim over IPv4, so the broker sees two
#: clients (per-client limits count by address). Listening on every address needs --insecure.
BROKER_ENV = {"TASKBROKER_LISTEN": "[::]:{port}", "TASKBROKER_INSECURE": "1"}
CALLS = 600
QUICK_CALLS = 200
#: Between the victim's calls: it samples the noise over time rather than in one burst.
PAUSE_S = 0.005
FLOOR_ALONE = "gRPC alone: health Check p99, bare server"
FLOOR_BESIDE = "gRPC alone: health Check p99, beside 4 MiB calls at the byte limit"
FLOOR_RATIO = "gRPC alone: p99 ratio (beside / alone)"


async def _paced(
    call: Callable[[], Awaitable[object]], n: int, errors: Counter[str]
) -> list[float]:
    """n calls one after the other, PAUSE_S apart; the latencies of those that succeeded, in ms."""
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        try:
            await call()
            latencies.append((time.perf_counter() - started) * 1000)
        except grpc.aio.AioRpcError as exc:
            errors[exc.code().name] += 1
        await asyncio.sleep(PAUSE_S)
    return latencies


async def _grpc_floor(ctx: Ctx, n: int) -> tuple[float, float]:
    """The victim's pace of health Checks against a bare grpc.aio server, alone and beside 4 MiB
    calls at the broker's byte limit per client (bench.bare_grpc_proc): the p99s gRPC alone
    gives, with no broker and no Redis.

    Raises:
        RuntimeError: a health Check failed (the floor would be measured on fewer calls).
    """
    errors: Counter[str] = Counter()
    server = await ctx.env.spawn("bench.bare_grpc_proc", ["--serve"], "bare-grpc")
    port = int((await server.wait_event("ready", 30))["port"])
    rate = Settings().request_bytes_per_s_per_client
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        check = functools.partial(stub.Check, health_pb2.HealthCheckRequest(), timeout=10)
        await _paced(check, 50, errors)
        alone = await _paced(check, n, errors)
        args = ["--noise", f"[::1]:{port}", "--bytes-per-s", str(rate)]
        noise = await ctx.env.spawn("bench.bare_grpc_proc", args, "bare-grpc-noise")
        await noise.wait_event("ready", 30)
        beside = await _paced(check, n, errors)
        assert noise.proc.stdin is not None
        noise.proc.stdin.close()
        await noise.wait_event("done", 30)
        await noise.stop()
    await server.stop()  # after the channel closed: no GOAWAY for it to log
    if errors:
        raise RuntimeError(f"the bare gRPC server failed health Checks: {dict(errors)}")
    return percentile(alone, 99), percentile(beside, 99)


async def run(ctx: Ctx) -> None:
    n = ctx.options.size(CALLS, QUICK_CALLS)
    res = ctx.result
    res.metric("victim Enqueue p99, alone", "ms")
    res.metric("victim Enqueue p99, beside the noisy client", "ms")
    res.metric("victim p99 ratio (noisy / alone)", "x", Target("<=", 2.0))
    res.metric("victim Enqueue p99, beside the noisy client, second window", "ms")
    res.metric("victim p99 ratio, second window (noisy / alone)", "x")
    res.metric(FLOOR_ALONE, "ms")
    res.metric(FLOOR_BESIDE, "ms")
    res.metric(FLOOR_RATIO, "x")
    res.metric("victim calls failed", "calls", Target("<=", 0, "= 0"))
    res.metric("victim tasks lost", "tasks", Target("<=", 0, "= 0"))
    res.note(f"{n} sequential single-task Enqueue calls by the victim per phase")
    for run_no in ctx.runs():
        broker = await ctx.env.restart_broker()
        queue, noise = ctx.queue("victim"), ctx.queue("noise")
        errors: Counter[str] = Counter()
        async with grpc.aio.insecure_channel(broker.target) as channel:
            stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
            request = bs.EnqueueRequest(
                tasks=[task_pb2.TaskSpec(queue=queue, type="t", payload=b"v")]
            )
            victim = functools.partial(stub.Enqueue, request, timeout=10)
            warm = await _paced(victim, 50, errors)  # warm-up: scripts loaded, connections up
            alone = await _paced(victim, n, errors)
            child = await ctx.env.spawn(
                "bench.noisy_proc", ["--target", f"[::1]:{broker.port}", "--queue", noise], "noisy"
            )
            await child.wait_event("ready", 60)
            noisy = await _paced(victim, n, errors)
            steady = await _paced(victim, n, errors)
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
        floor_alone, floor_beside = await _grpc_floor(ctx, n)
        res.metric(FLOOR_ALONE, "ms").add(floor_alone)
        res.metric(FLOOR_BESIDE, "ms").add(floor_beside)
        res.metric(FLOOR_RATIO, "x").add(floor_beside / floor_alone)
