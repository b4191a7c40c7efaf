"""The README's quick-start producer: enqueues one `send_welcome` task and prints how it ended."""

import asyncio
import os

from taskbroker import Client


async def main() -> None:
    async with Client(os.environ.get("TASKBROKER_TARGET", "127.0.0.1:50051")) as client:
        task_id = await client.enqueue("emails", "send_welcome", b"ada@example.com")
        task = await client.wait(task_id, timeout=60)  # the worker must be running
        print(task_id, task.state.name, task.result.decode())


if __name__ == "__main__":
    asyncio.run(main())
