"""A workflow: resize an album's photos in parallel, then send one email linking all of them.

A chord: one `resize` task per photo (fan-out), then one `send_album` task that waits for every
resize to succeed and reads their results in `ctx.parent_results` (fan-in). All of it goes to
the broker in one call. The example runs its own worker and producer against the broker at
TASKBROKER_TARGET (default 127.0.0.1:50051) and exits once the mail is sent.
"""

import asyncio
import os

from taskbroker import (
    Client,
    NewTask,
    Task,
    TaskContext,
    Worker,
    chord,
    from_json,
    handler,
    json_payload,
)


@handler("resize")
async def resize(ctx: TaskContext, payload: bytes) -> bytes:
    photo = from_json(payload)["photo"]
    await asyncio.sleep(0.05)  # the image work
    return json_payload({"photo": photo, "url": f"https://cdn.example.com/small/{photo}"})


@handler("send_album")
async def send_album(ctx: TaskContext, payload: bytes) -> bytes:
    # One result per resize, in the order the photos were given.
    links = [from_json(parent.result)["url"] for parent in ctx.parent_results]
    to = from_json(payload)["to"]
    print(f"album mail to {to}: {len(links)} photos, first {links[0]}", flush=True)
    return json_payload({"to": to, "photos": links})


async def run(target: str, photos: list[str]) -> Task:
    """Runs a worker, enqueues the album's workflow and returns the finished mail task."""
    async with (
        Client(target) as client,
        Worker(client, queues=["album-images", "album-emails"], handlers=[resize, send_album]),
    ):
        resizes = [NewTask("album-images", "resize", json_payload({"photo": p})) for p in photos]
        mail = NewTask("album-emails", "send_album", json_payload({"to": "ada@example.com"}))
        workflow = await client.enqueue_workflow(chord(resizes, mail))
        return await client.wait(workflow.last, timeout=60)


def main() -> None:
    photos = [f"IMG_{n:04}.jpg" for n in range(1, 9)]
    mail = asyncio.run(run(os.environ.get("TASKBROKER_TARGET", "127.0.0.1:50051"), photos))
    print(mail.state.name, len(from_json(mail.result)["photos"]), "photos")


if __name__ == "__main__":
    main()
