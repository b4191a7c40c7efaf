"""`make demo`: run the scenario end to end and check that no task was lost.

Uses the broker at TASKBROKER_TARGET (default 127.0.0.1:50051, where `make run` serves); when
nothing answers there it starts one the same way `make run` does, and stops it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time

from examples.producer import produce
from taskbroker import Client, TaskState, UnavailableError


async def _broker_answers(target: str) -> bool:
    async with Client(target, timeout=1.0) as client:
        try:
            await client.queues()
        except UnavailableError:
            return False
        return True


def _start_broker(target: str) -> subprocess.Popen[bytes]:
    data_dir = tempfile.mkdtemp(prefix="taskbroker-demo-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TASKBROKER_")}
    # The demo's own broker serves its dashboard on a free port (its log says which), so a
    # broker already on 8080 does not stop the demo.
    env |= {
        "TASKBROKER_LISTEN": target,
        "TASKBROKER_DATA_DIR": data_dir,
        "TASKBROKER_HTTP_LISTEN": "127.0.0.1:0",
    }
    return subprocess.Popen([sys.executable, "-m", "broker"], env=env)


async def _wait_until_finished(client: Client, ids: list[str], deadline_s: float) -> int:
    """Polls until every task finished. Returns how many are still unfinished at the deadline."""
    unfinished = set(ids)
    end = time.monotonic() + deadline_s
    while unfinished and time.monotonic() < end:
        for task_id in list(unfinished):
            if (await client.get_task(task_id)).state.finished:
                unfinished.discard(task_id)
        await asyncio.sleep(0.5)
    return len(unfinished)


async def run(target: str, time_scale: float) -> int:
    """Runs the scenario. Returns the process exit code."""
    os.environ["TASKBROKER_DEMO_TIME_SCALE"] = str(time_scale)
    from examples.worker import make_worker  # after TIME_SCALE is set

    started = time.monotonic()
    async with Client(target) as client:
        worker = make_worker(client)
        async with worker:
            ids = await produce(client, time_scale)
            print(f"enqueued {len(ids)} tasks; waiting for them to finish ...")
            lost = await _wait_until_finished(client, ids, deadline_s=50)
        tasks = [await client.get_task(i) for i in ids]
        stats = {s.queue: s for s in await client.stats("emails", "images")}
    succeeded = sum(t.state is TaskState.SUCCEEDED for t in tasks)
    dead = sum(t.state is TaskState.DEAD for t in tasks)
    retried = sum(s.retried_total for s in stats.values())
    print(f"{'queue':<8} {'enqueued':>9} {'succeeded':>10} {'retried':>8} {'dead':>5}")
    for name, s in stats.items():
        print(
            f"{name:<8} {s.enqueued_total:>9} {s.succeeded_total:>10} "
            f"{s.retried_total:>8} {s.dead_lettered_total:>5}"
        )
    print(
        f"tasks: {len(ids)}; succeeded {succeeded}, dead-lettered {dead}, retried {retried} "
        f"times, unfinished {lost}; {time.monotonic() - started:.1f} s"
    )
    if lost or succeeded + dead != len(ids):
        print("FAILED: some tasks did not finish", file=sys.stderr)
        return 1
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--target", default=os.environ.get("TASKBROKER_TARGET", "127.0.0.1:50051"))
    parser.add_argument("--time-scale", type=float, default=0.1, help="1.0: the blog's timing")
    args = parser.parse_args()
    broker = None
    if not asyncio.run(_broker_answers(args.target)):
        print(f"no broker at {args.target}: starting one as `make run` does")
        broker = _start_broker(args.target)
        for _ in range(100):
            if asyncio.run(_broker_answers(args.target)):
                break
            time.sleep(0.1)
    try:
        code = asyncio.run(run(args.target, args.time_scale))
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(20)
    sys.exit(code)


if __name__ == "__main__":
    main()
