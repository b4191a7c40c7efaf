"""`python -m bench.workflow_proc`: a raw-gRPC worker for the fanin scenario. It acks every task
it is given (with a small result), in one Settlements frame per Deliveries frame, and times the
two ends of a dependency hop in its own clock: when the broker answers a parent's ack (its
SettleResult arrives) and when a child (a task with parent_ids) is delivered.

Raw grpc.aio on the generated stubs rather than an SDK Worker: the SDK answers acks inside its
session, and the ack's answer is one end of what is measured. The worker takes only the fields
every version of the protocol has (a baseline without task dependencies is never started: the
scenario checks first).

Events on stdout (bench.protocol): `ready` once the stream is open; `child` for each task with
parents, once the answers to all its parents' acks are in: its id, `parents` (how many),
`parent_results` (how many the delivery carried), `after_last_ack_s` (delivery minus the last
of its parents' ack answers, perf_counter in this process), `acks_span_s` (the first of those
answers to the last) and `t` (wall time of the delivery);
`failed` if an ack was refused; `exit` on the way out (SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from bench.protocol import emit
from taskbroker._client import DEFAULT_OPTIONS
from taskbroker.v1 import broker_service_pb2_grpc, lease_pb2

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub

#: Each ack carries a result this long (a parent's "small result", handed to its child).
RESULT = b"r" * 16


@dataclass(slots=True)
class _Child:
    """A delivered task with parents, waiting for the answers to its parents' acks."""

    task_id: str
    parents: tuple[str, ...]
    parent_results: int
    delivered: float  # perf_counter
    wall: float  # time.time


class _Tracker:
    """When each ack was answered, and the children still to report."""

    def __init__(self) -> None:
        self.answered: dict[str, float] = {}
        self.children: list[_Child] = []
        self.acked = 0

    def delivered(self, task: Any, now: float, wall: float) -> None:
        if task.parent_ids:
            self.children.append(
                _Child(task.id, tuple(task.parent_ids), len(task.parent_results), now, wall)
            )

    def settled(self, result: Any, now: float) -> None:
        if result.outcome != lease_pb2.SETTLE_OUTCOME_OK:
            emit("failed", task_id=result.task_id, message=result.message[:200])
        self.answered[result.task_id] = now
        self.acked += 1

    def report(self) -> None:
        """Emits `child` for each child whose parents' acks have all been answered."""
        waiting = []
        for child in self.children:
            answers = [self.answered.get(p) for p in child.parents]
            if any(a is None for a in answers):
                waiting.append(child)
                continue
            known = [a for a in answers if a is not None]
            last = max(known)
            emit(
                "child",
                id=child.task_id,
                parents=len(child.parents),
                parent_results=child.parent_results,
                after_last_ack_s=child.delivered - last,
                acks_span_s=last - min(known),
                t=child.wall,
            )
        self.children = waiting


async def _serve(stub: BrokerServiceAsyncStub, args: argparse.Namespace, tracker: _Tracker) -> None:
    call = stub.Lease()
    opening = lease_pb2.LeaseOpen(queues=[args.queue], worker_id="fanin", credits=args.credits)
    await call.write(lease_pb2.LeaseRequest(open=opening))
    first = await call.read()
    if not isinstance(first, lease_pb2.LeaseResponse) or first.WhichOneof("frame") != "opened":
        raise RuntimeError(f"no `opened` answer: {first!r}")
    emit("ready")
    try:
        while (frame := await call.read()) is not grpc.aio.EOF:
            now, wall = time.perf_counter(), time.time()
            assert isinstance(frame, lease_pb2.LeaseResponse)
            kind = frame.WhichOneof("frame")
            if kind == "deliveries":
                deliveries = frame.deliveries.deliveries
                for d in deliveries:
                    tracker.delivered(d.task, now, wall)
                acks = [
                    lease_pb2.AckRequest(task_id=d.task.id, lease_id=d.lease_id, result=RESULT)
                    for d in deliveries
                ]
                # The credits spent come back with the acks: the stream never runs dry.
                frame_out = lease_pb2.Settlements(acks=acks, credits=len(acks))
                await call.write(lease_pb2.LeaseRequest(settlements=frame_out))
            elif kind == "settle_results":
                for r in frame.settle_results.results:
                    tracker.settled(r, now)
            tracker.report()
    finally:
        call.cancel()


async def main(args: argparse.Namespace) -> None:
    tracker = _Tracker()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    options = list(DEFAULT_OPTIONS.items())
    async with grpc.aio.insecure_channel(args.target, options=options) as channel:
        stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
        serving = asyncio.create_task(_serve(stub, args, tracker))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait([serving, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
        if not serving.cancelled() and (error := serving.exception()) is not None:
            raise error  # the stream ended before we were told to stop
    emit("exit", acked=tracker.acked)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.workflow_proc")
    p.add_argument("--target", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--credits", type=int, default=1_000)
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
