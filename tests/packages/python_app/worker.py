"""An application's worker, run from a venv outside the repository that installed the SDK.

TASKBROKER_TARGET and TASKBROKER_QUEUE pick the broker and queue. Runs until SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import logging
import os

from taskbroker import Client, TaskContext, Worker, handler


@handler("greet")
async def greet(ctx: TaskContext, payload: bytes) -> bytes:
    return b"hello " + payload


async def main() -> None:
    async with Client(os.environ.get("TASKBROKER_TARGET", "localhost:50051")) as client:
        queue = os.environ.get("TASKBROKER_QUEUE", "greetings")
        await Worker(client, queues=[queue], handlers=[greet], concurrency=4).run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    asyncio.run(main())
