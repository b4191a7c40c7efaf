"""Workflows under a broker killed -9 (issue 17): two `python -m broker` replicas move every
queue's workflow outbox; one is killed and restarted while fan-ins and chains are running. From
the workers' history files and the tasks read back at the end: every task ran (lost 0), no
child was delivered before all its parents' handlers had finished (released early 0), no task
was completed twice (released twice 0), and every child saw each parent SUCCEEDED."""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Final

import grpc
import pytest

from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import broker_service_pb2_grpc, task_pb2
from tests.faults.harness import Harness
from tests.faults.observe import QUEUE
from tests.faults.test_broker_faults import Replicas, kill
from tests.support.worker_process import WorkerProcess

#: Each workflow: PARENTS parents fanned into one child, which a grandchild follows. CI: 40;
#: `make soak` runs 1,000 (WORKFLOW_FAULT_COUNT).
WORKFLOWS: Final = int(os.environ.get("WORKFLOW_FAULT_COUNT", "40"))
PARENTS: Final = 4
HANDLER: Final = timedelta(milliseconds=40)
SLOW_HANDLER: Final = timedelta(milliseconds=300)
SLOW_QUEUE: Final = "slow-jobs"


def workflow(n: int) -> list[task_pb2.TaskSpec]:
    # One slow parent per fan-in, so a child released before its last parent ended would be
    # delivered well before that parent's handler ends.
    parents = [
        task_pb2.TaskSpec(
            queue=SLOW_QUEUE if i == 0 else QUEUE, type="job", payload=f"{n}.{i}".encode()
        )
        for i in range(PARENTS)
    ]
    child = task_pb2.TaskSpec(
        queue=QUEUE, type="job", payload=f"{n}.child".encode(), depends_on_positions=range(PARENTS)
    )
    grandchild = task_pb2.TaskSpec(
        queue=QUEUE, type="job", payload=f"{n}.grandchild".encode(), depends_on_positions=[PARENTS]
    )
    return [*parents, child, grandchild]


@pytest.mark.timeout(max(180.0, WORKFLOWS * 0.5))
async def test_a_broker_killed_9_mid_workflow_loses_nothing_and_releases_nothing_early_or_twice(
    replicas: Replicas, tmp_path: Path
) -> None:
    first = await replicas.start("a")
    doomed = await replicas.start("b")
    harness_target = f"ipv4:127.0.0.1:{first.port},127.0.0.1:{doomed.port}"
    harness = Harness(harness_target, tmp_path)
    parents_of: dict[str, list[str]] = {}
    ids: list[str] = []
    try:
        for w in ("w1", "w2"):
            harness.start(w, {"job": "sleep"}, concurrency=8, sleep=HANDLER)
        slow = WorkerProcess(
            harness_target,
            tmp_path / "slow.jsonl",
            worker_id="slow",
            handlers={"job": "sleep"},
            queues=[SLOW_QUEUE],
            concurrency=8,
            sleep=SLOW_HANDLER,
        )
        harness.workers.append(slow)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            stub = broker_service_pb2_grpc.BrokerServiceStub(channel)
            for n in range(WORKFLOWS):
                reply = await stub.Enqueue(bs.EnqueueRequest(tasks=workflow(n)))
                got = [r.task_id for r in reply.results]
                for task_id in got:
                    harness.producer.enqueued(task_id)
                parents_of[got[PARENTS]] = got[:PARENTS]
                parents_of[got[PARENTS + 1]] = [got[PARENTS]]
                ids += got
                if n == WORKFLOWS // 2:  # in the thick of it: outbox entries on the move
                    kill(doomed)
                await asyncio.sleep(0.05)
            restarted = await replicas.start("b-again", port=doomed.port)
            deadline = time.monotonic() + max(90.0, WORKFLOWS * 0.2)
            while True:
                tasks = {t: (await stub.GetTask(bs.GetTaskRequest(task_id=t))).task for t in ids}
                if all(t.state == task_pb2.TASK_STATE_SUCCEEDED for t in tasks.values()):
                    break
                assert time.monotonic() < deadline, {
                    t: (task_pb2.TaskState.Name(v.state), v.last_error)
                    for t, v in tasks.items()
                    if v.state != task_pb2.TASK_STATE_SUCCEEDED
                }
                await asyncio.sleep(0.5)
        codes = await asyncio.gather(*(w.aterminate() for w in harness.workers))
        assert codes == [0] * len(codes), [w.log_text() for w in harness.workers]
    finally:
        harness.close()
    assert restarted.process.poll() is None

    history = harness.history()
    report = history.check({t: "SUCCEEDED" for t in ids})
    assert (report.lost, report.unexpected, report.completed_twice, report.stale_accepted) == (
        (),
        (),
        (),
        (),
    ), report.render()
    # Released early: a child delivered before a parent's handler had ended (its ack is sent
    # after that), measured on the one monotonic clock all processes share.
    acked_at = {
        s.task_id: s.sent_ns
        for s in history.settlements
        if s.kind == "ack" and s.outcome in ("ok", "already") and s.sent_ns is not None
    }
    first_delivery: dict[str, int] = {}
    for d in history.deliveries:
        first_delivery[d.task_id] = min(d.at_ns, first_delivery.get(d.task_id, d.at_ns))
    early = {
        child: [p for p in parents if first_delivery[child] < acked_at[p]]
        for child, parents in parents_of.items()
    }
    assert not {c: p for c, p in early.items() if p}, early
    # Each child ran once its parents succeeded, and got every parent's result.
    for child, parents in parents_of.items():
        results = tasks[child].parent_results
        assert [(r.task_id, r.state) for r in results] == [
            (p, task_pb2.TASK_STATE_SUCCEEDED) for p in parents
        ]
        assert all(r.result for r in results)  # the workers' ids, acked as results
