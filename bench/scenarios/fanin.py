"""fanin: task dependencies (issue 17). PARENTS parents in one Enqueue call and one child that
depends on all of them by id in a second (the queue paused until both are stored, so no parent
ends before its child names it), leased and acked with small results by one
raw-gRPC worker process (bench/workflow_proc.py), which also times the hop: from the answer to
the last parent's ack to the child's delivery, both in the worker's clock. Also the whole
fan-in, from just before the Enqueue call (the bench process) to the child's delivery (the
worker's wall clock), and a chain of CHAIN_HOPS one-parent hops (each task depends on the one
before it): ack answered → next task delivered, per hop.

A broker without task dependencies (a --baseline before issue 17) would store the child as an
ordinary task and deliver it at once, so each run first enqueues a parent and a child and
checks that the child is WAITING: if not, the scenario is skipped on that side, not measured.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

import grpc

from bench.children import Child
from bench.context import Ctx
from bench.scenarios.common import PAYLOAD
from bench.stats import median, percentile
from bench.worker_proc import TASK_TYPE
from bench.workflow_proc import RESULT
from taskbroker._client import DEFAULT_OPTIONS
from taskbroker.v1 import admin_service_pb2 as ad
from taskbroker.v1 import admin_service_pb2_grpc, broker_service_pb2_grpc, task_pb2
from taskbroker.v1 import broker_service_pb2 as bs

if TYPE_CHECKING:
    from taskbroker.v1.admin_service_pb2_grpc import AdminServiceAsyncStub
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

#: Tasks per Enqueue call at most (broker/queue.py MAX_TASKS_PER_CALL), and parents of one task
#: at most (broker/dependencies.py MAX_PARENTS): the 1,000 parents fill one call, and their
#: child names them by id in a second.
MAX_TASKS_PER_CALL: Final = 1_000
PARENTS: Final = 1_000
QUICK_PARENTS: Final = 50
CHAIN_HOPS: Final = 50
QUICK_CHAIN_HOPS: Final = 10
#: How long the child of a fan-in, or the end of a chain, may take to arrive.
CAP_S: Final = 60.0
WORKER_READY_S: Final = 30.0
#: Credits of the worker's stream: every parent of the fan-in is delivered at once.
CREDITS: Final = MAX_TASKS_PER_CALL
NO_DEPENDENCIES: Final = (
    "the broker has no task dependencies (issue 17): a child enqueued with "
    "depends_on_positions was not stored WAITING"
)


def _spec(
    queue: str, positions: Sequence[int] = (), parents: Sequence[str] = ()
) -> task_pb2.TaskSpec:
    return task_pb2.TaskSpec(
        queue=queue,
        type=TASK_TYPE,
        payload=PAYLOAD,
        depends_on_positions=list(positions),
        depends_on=list(parents),
    )


async def _enqueue(stub: BrokerServiceAsyncStub, specs: list[task_pb2.TaskSpec]) -> list[str]:
    response = await stub.Enqueue(bs.EnqueueRequest(tasks=specs), timeout=30)
    return [r.task_id for r in response.results]


async def unsupported(stub: BrokerServiceAsyncStub, queue: str) -> str:
    """Why the broker cannot run this scenario ('' when it can): a child of a pending parent
    must be WAITING. The probe's tasks are cancelled again when it is."""
    try:
        parent, child = await _enqueue(stub, [_spec(queue), _spec(queue, [0])])
        got = await stub.GetTask(bs.GetTaskRequest(task_id=child), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return f"the broker refused a dependent task ({exc.code().name}: {exc.details()})"
    if got.task.state != task_pb2.TASK_STATE_WAITING:
        return NO_DEPENDENCIES
    await stub.CancelTask(bs.CancelTaskRequest(task_id=parent), timeout=10)  # and its child
    return ""


def _names(parents: int, hops: int) -> tuple[str, str, str, str]:
    fan = f"fan-in {parents:,} → 1"
    return (
        f"{fan}: last parent's ack → child delivered",
        f"{fan}: Enqueue → child delivered",
        f"chain hop ({hops} hops): ack → child delivered, p50",
        f"chain hop ({hops} hops): ack → child delivered, max",
    )


async def run(ctx: Ctx) -> None:
    parents = ctx.options.size(PARENTS, QUICK_PARENTS)
    hops = ctx.options.size(CHAIN_HOPS, QUICK_CHAIN_HOPS)
    after_ack, end_to_end, hop_p50, hop_max = _names(parents, hops)
    options = list(DEFAULT_OPTIONS.items())
    async with grpc.aio.insecure_channel(ctx.env.target, options=options) as channel:
        stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        reason = await unsupported(stub, ctx.queue("fanin-probe"))
        if reason:
            if ctx.env.side.name == "current":
                raise RuntimeError(reason)
            ctx.result.skipped = reason
            return
        for name in (after_ack, end_to_end, hop_p50, hop_max):
            ctx.result.metric(name, "ms")
        ctx.result.note(
            f"{parents:,} parents in one Enqueue call and their child in a second (depends_on "
            "ids), the queue paused until both are stored; "
            "one raw-gRPC worker process acking each delivery frame in one Settlements frame "
            f"(results of {len(RESULT)} bytes); ack answer and delivery timed in the worker"
        )
        for run_no in ctx.runs():
            queue = ctx.queue("fanin")
            worker = await ctx.env.spawn(
                "bench.workflow_proc",
                ["--target", ctx.env.target, "--queue", queue, "--credits", str(CREDITS)],
                f"{queue}-worker",
            )
            await worker.wait_event("ready", WORKER_READY_S)
            details: dict[str, object] = {"run": run_no, "parents": parents, "hops": hops}
            fan = await _fan_in(stub, admin, worker, queue, parents)
            ctx.result.metric(after_ack, "ms").add(fan["after_last_ack_ms"])
            ctx.result.metric(end_to_end, "ms").add(fan["end_to_end_ms"])
            if fan["parent_results"] != parents:
                ctx.result.note(
                    f"the child's delivery carried {fan['parent_results']:g} parent results, "
                    f"not {parents}"
                )
            chain = await _chain(stub, worker, queue, hops)
            ctx.result.metric(hop_p50, "ms").add(median(chain))
            ctx.result.metric(hop_max, "ms").add(percentile(chain, 100))
            await worker.stop()
            ctx.result.runs.append(details | fan | {"chain_hops_ms": [round(h, 3) for h in chain]})


async def _fan_in(
    stub: BrokerServiceAsyncStub,
    admin: AdminServiceAsyncStub,
    worker: Child,
    queue: str,
    parents: int,
) -> dict[str, float]:
    # Paused while both calls store, so no parent ends before its child names it.
    await admin.PauseQueue(ad.PauseQueueRequest(queue=queue), timeout=10)
    sent = time.time()
    ids = await _enqueue(stub, [_spec(queue) for _ in range(parents)])
    ids += await _enqueue(stub, [_spec(queue, parents=ids)])
    enqueued = time.time()
    await admin.ResumeQueue(ad.ResumeQueueRequest(queue=queue), timeout=10)
    child = ids[-1]
    event = await worker.wait_event("child", CAP_S, lambda e: e.get("id") == child)
    return {
        "enqueue_call_ms": round((enqueued - sent) * 1000, 3),
        "after_last_ack_ms": float(event["after_last_ack_s"]) * 1000,
        "end_to_end_ms": (float(event["t"]) - sent) * 1000,
        # The parents' acks were answered over this long: the mover works through their
        # outbox entries meanwhile.
        "parents_acks_span_ms": round(float(event["acks_span_s"]) * 1000, 3),
        "parent_results": float(event["parent_results"]),
    }


async def _chain(stub: BrokerServiceAsyncStub, worker: Child, queue: str, hops: int) -> list[float]:
    """A chain of hops + 1 tasks, each depending on the one before; the ms of every hop."""
    ids = await _enqueue(stub, [_spec(queue, [i - 1] if i else []) for i in range(hops + 1)])
    await worker.wait_event("child", CAP_S, lambda e: e.get("id") == ids[-1])
    wanted = set(ids[1:])
    return [
        float(e["after_last_ack_s"]) * 1000
        for e in worker.events
        if e.get("event") == "child" and e.get("id") in wanted
    ]
