"""A schedule `@every 1s` on two broker replicas (real `python -m broker` processes), one killed
-9 and restarted midway: every tick is enqueued exactly once, with no gap longer than 2 s.

The ticks are read back from the tasks themselves (their taskbroker-tick header), not from a
counter the broker keeps. SCHEDULE_RUN_S sets the run's length (CI: 12 s; `make soak` runs it
for 60 s)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time

import grpc
import pytest
import redis

from taskbroker.v1 import schedule_service_pb2 as sched
from taskbroker.v1 import schedule_service_pb2_grpc, task_pb2
from tests.faults.test_broker_faults import Replicas, kill

RUN_S = float(os.environ.get("SCHEDULE_RUN_S", "12"))
QUEUE = "ticks"


def ticks_enqueued(client: redis.Redis) -> dict[int, list[int]]:
    """Tick -> the creation times (Redis ms) of the tasks enqueued for it, read from the
    tasks' hashes."""
    ticks: dict[int, list[int]] = {}
    for key in client.scan_iter(match=f"tb:{{{QUEUE}}}:t:*", count=1000):
        headers, created = client.hmget(key, ["hdr", "ctime"])
        assert headers is not None and created is not None, key
        ticks.setdefault(int(json.loads(headers)["taskbroker-tick"]), []).append(int(created))
    return ticks


@pytest.mark.timeout(max(120.0, RUN_S + 90))  # three broker starts on a loaded machine
async def test_every_tick_once_across_two_replicas_with_one_killed_9_and_restarted(
    replicas: Replicas, redis_client: redis.Redis
) -> None:
    first = await replicas.start("a")
    doomed = await replicas.start("b")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.port}") as channel:
        stub = schedule_service_pb2_grpc.ScheduleServiceStub(channel)
        template = task_pb2.TaskSpec(queue=QUEUE, type="tick")
        await stub.CreateSchedule(sched.CreateScheduleRequest(
            schedule=sched.Schedule(name="heartbeat", cron="@every 1s", task_template=template)
        ))  # fmt: skip
        started = time.time()
        await asyncio.sleep(RUN_S / 3)
        kill(doomed)
        await asyncio.sleep(RUN_S / 3)
        await replicas.start("b-again", port=doomed.port)
        await asyncio.sleep(RUN_S / 3)
        await stub.PauseSchedule(sched.PauseScheduleRequest(name="heartbeat"))
        ended = time.time()
    enqueued = ticks_enqueued(redis_client)
    duplicates = {t: c for t, c in enqueued.items() if len(c) > 1}
    assert not duplicates, duplicates
    ticks = sorted(enqueued)
    # Each tick's task was stored within 2 s of its tick, the kill included.
    late = {t: c[0] - t for t, c in enqueued.items() if c[0] - t > 2000}
    assert not late, late
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    assert max(gaps) <= 2000, gaps
    # Every second of the run has its tick (give or take the edges).
    assert len(ticks) >= int(ended - started) - 2, (len(ticks), ended - started)
