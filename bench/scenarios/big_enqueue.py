"""big_enqueue: 24 concurrent Enqueue calls of 16 x 1 MiB payloads (384 MiB at once) on a fresh
broker: its peak RSS (VmHWM) above its idle RSS, per MiB of payload it accepted, with the
default max_inflight_request_bytes and with the limit lifted; calls refused with
RESOURCE_EXHAUSTED; and that every accepted task was stored (nothing lost, nothing partial)."""

from __future__ import annotations

import asyncio

import grpc

from bench import procfs
from bench.context import Ctx
from bench.results import Target
from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, task_pb2

CALLS = 24
TASKS_PER_CALL = 16
#: Just under the default task size limit (1 MiB, counting the task's type too).
PAYLOAD_BYTES = 1024 * 1024 - 1024
#: Let the broker settle after start.
SETTLE_S = 1.0
MIB = 1024 * 1024
#: The two brokers measured: the defaults, and no request-byte limit (the copies per byte).
VARIANTS = {
    "default limits": {},
    "no byte limit": {
        "TASKBROKER_MAX_INFLIGHT_REQUEST_BYTES": str(64 * 1024 * MIB),
        "TASKBROKER_MAX_INFLIGHT_REQUEST_BYTES_PER_CLIENT": str(64 * 1024 * MIB),
        "TASKBROKER_REQUEST_BYTES_PER_S_PER_CLIENT": "0",
    },
}

#: gRPC holds every arriving request before the broker can refuse it (about 1x what is sent
#: at once); the limit bounds the copies made after that.
TARGETS = {"default limits": Target("<=", 1.2)}


async def _call(stub: broker_service_pb2_grpc.BrokerServiceAsyncStub, queue: str) -> bool:
    """One Enqueue; whether it was accepted (False: RESOURCE_EXHAUSTED)."""
    payload = bytes(PAYLOAD_BYTES)
    tasks = [task_pb2.TaskSpec(queue=queue, type="blob", payload=payload)] * TASKS_PER_CALL
    try:
        await stub.Enqueue(bs.EnqueueRequest(tasks=tasks), timeout=120)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return False
    return True


async def run(ctx: Ctx) -> None:
    res = ctx.result
    res.note(
        f"{CALLS} concurrent Enqueue calls of {TASKS_PER_CALL} x 1 MiB over one connection "
        "(raw gRPC, no retries); a fresh broker per run and variant"
    )
    for run_no in ctx.runs():
        details: dict[str, object] = {"run": run_no}
        for variant, env in VARIANTS.items():
            broker = await ctx.env.start_broker(env)
            await asyncio.sleep(SETTLE_S)
            rss0 = procfs.rss_bytes(broker.pid)
            queue = ctx.queue("big")
            async with grpc.aio.insecure_channel(
                broker.target, options=[("grpc.max_send_message_length", 64 * MIB)]
            ) as channel:
                stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
                accepted = await asyncio.gather(*(_call(stub, queue) for _ in range(CALLS)))
                stats = await stub.Stats(bs.StatsRequest(queues=[queue]))
            peak = procfs.peak_rss_bytes(broker.pid) - rss0
            stored = stats.queues[0].pending
            n_ok = sum(accepted)
            res.metric(f"peak RSS added, {variant}", "MiB").add(peak / MIB)
            res.metric(f"calls accepted, {variant}", "calls").add(n_ok)
            sent = CALLS * TASKS_PER_CALL * PAYLOAD_BYTES
            res.metric(
                f"peak RSS added per payload byte sent, {variant}", "x", TARGETS.get(variant)
            ).add(peak / sent)
            res.metric(f"tasks lost, {variant}", "tasks", Target("<=", 0, "= 0")).add(
                n_ok * TASKS_PER_CALL - stored
            )
            details[variant] = {"rss0": rss0, "peak_added": peak, "accepted": n_ok}
            await ctx.env.flush()
        res.runs.append(details)
