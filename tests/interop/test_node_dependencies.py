"""Task dependencies through the Node.js client (clients/node): a Node producer enqueues a graph
in one call (`enqueueMany` with `dependsOnPositions`) and single tasks with `dependsOn`, and a
Node handler reads its parents' results in `ctx.parentResults`. Each side is checked against
the Python SDK, on an in-process broker."""

from __future__ import annotations

import json

import pytest

from taskbroker import Client, NewTask, ParentFailurePolicy, TaskState, chord
from tests.conftest import RunningBroker
from tests.interop.node_process import NODE, QUEUE, WAIT_S, NodeWorker
from tests.interop.test_node_interop import produce

pytestmark = pytest.mark.skipif(
    NODE is None, reason="node is not installed: the Node.js interop tests need it on PATH"
)


async def test_a_node_handler_reads_its_parents_results_in_order(
    client: Client, node_worker: NodeWorker
) -> None:
    members = [NewTask(QUEUE, "echo", f"photo {i}".encode()) for i in range(3)]
    flow = await client.enqueue_workflow(chord(members, NewTask(QUEUE, "parents")))

    done = await client.wait(flow.last, timeout=WAIT_S)
    assert done.state is TaskState.SUCCEEDED, node_worker.text()
    assert json.loads(done.result) == [
        {"task_id": task_id, "state": "TASK_STATE_SUCCEEDED", "result": f"photo {i}"}
        for i, task_id in enumerate(flow.task_ids[:3])
    ]


async def test_a_node_producer_enqueues_a_graph_in_one_call(
    node: str, running: RunningBroker, client: Client, node_worker: NodeWorker
) -> None:
    line = await produce(
        node, running.target, "--type", "echo", "--payload", "pic", "--parents", "3", "--wait"
    )

    task_ids = line["task_ids"]
    assert isinstance(task_ids, list) and len(task_ids) == 4 and task_ids[3] == line["task_id"]
    assert line["state"] == "TASK_STATE_SUCCEEDED", node_worker.text()
    assert [p["result"] for p in json.loads(str(line["result"]))] == ["pic-0", "pic-1", "pic-2"]
    child = await client.get_task(str(line["task_id"]))
    assert (child.type, child.parent_ids) == ("parents", tuple(task_ids[:3]))
    assert (await client.get_task(task_ids[0])).child_ids == (line["task_id"],)


async def test_a_node_producer_task_waits_for_ids_with_its_policy(
    node: str, running: RunningBroker, client: Client
) -> None:
    parent = await client.enqueue(QUEUE, "echo", b"first")

    line = await produce(
        node,
        running.target,
        "--type",
        "echo",
        "--depends-on",
        parent,
        "--on-parent-failure",
        "run",
    )

    child = await client.get_task(str(line["task_id"]))
    assert (child.state, child.parent_ids, child.waiting_for) == (
        TaskState.WAITING,
        (parent,),
        (parent,),
    )
    assert child.parent_failure_policy is ParentFailurePolicy.RUN
