"""An application's producer: enqueues five greet tasks and waits until they have succeeded.

Exits 1 when a task did not succeed with the worker's result. TASKBROKER_TARGET and
TASKBROKER_QUEUE pick the broker and queue.
"""

from __future__ import annotations

import asyncio
import os
import sys

from taskbroker import Client, TaskState


async def main() -> int:
    async with Client(os.environ.get("TASKBROKER_TARGET", "localhost:50051")) as client:
        queue = os.environ.get("TASKBROKER_QUEUE", "greetings")
        names = [f"user-{i}".encode() for i in range(5)]
        ids = [await client.enqueue(queue, "greet", name) for name in names]
        for name, task_id in zip(names, ids, strict=True):
            task = await client.wait(task_id, timeout=60)
            if task.state is not TaskState.SUCCEEDED or task.result != b"hello " + name:
                print(f"task {task_id}: {task.state.name} {task.result!r}", file=sys.stderr)
                return 1
    print(f"{len(ids)} tasks succeeded")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
