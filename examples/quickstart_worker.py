"""The README's quick-start worker: runs `send_welcome` tasks of the `emails` queue until Ctrl-C."""

import asyncio
import os

from taskbroker import Client, TaskContext, Worker, handler


@handler("send_welcome")
async def send_welcome(ctx: TaskContext, payload: bytes) -> bytes:
    print(f"welcome mail to {payload.decode()}, attempt {ctx.attempt}", flush=True)
    return b"sent"  # stored as the task's result


def make_worker(client: Client) -> Worker:  # also for `taskbroker worker MODULE:make_worker`
    return Worker(client, queues=["emails"], handlers=[send_welcome], concurrency=16)


async def main() -> None:
    async with Client(os.environ.get("TASKBROKER_TARGET", "127.0.0.1:50051")) as client:
        await make_worker(client).run()  # until Ctrl-C or SIGTERM; running tasks may finish


if __name__ == "__main__":
    asyncio.run(main())
