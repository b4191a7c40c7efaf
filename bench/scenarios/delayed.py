"""delayed: 1,000 tasks due at instants spread evenly over a window, enqueued before the first is
due, with an idle worker waiting; lateness = handler-start wall time minus due time (from a
header). Shows how promptly the dispatcher wakes for due tasks (it sleeps until the next one)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from bench.context import Ctx
from bench.results import Target
from bench.scenarios.common import PAYLOAD, enqueue_bulk, start_workers, wait_succeeded
from bench.stats import percentile
from bench.worker_proc import TASK_TYPE
from taskbroker import NewTask

COUNT = 1_000
SPREAD_S = 10.0
QUICK_SPREAD_S = 3.0
#: The first task is due this long after the enqueue starts.
LEAD_S = 1.0
#: After the last due time, how long the worker gets to start what is left.
LATE_CAP_S = 5.0
HEADER = "due"


async def run(ctx: Ctx) -> None:
    spread_s = ctx.options.seconds(SPREAD_S, QUICK_SPREAD_S)
    res = ctx.result
    for name in ("p50", "p99", "max"):
        res.metric(f"lateness {name}", "ms", Target("<=", 50) if name == "p99" else None)
    res.note(f"{COUNT:,} tasks due evenly over {spread_s:g} s, one idle worker process")
    for run_no in ctx.runs():
        queue = ctx.queue("delayed")
        (worker,) = await start_workers(ctx, queue, 1, record_header=HEADER, label="delayed")
        first_due = time.time() + LEAD_S
        batch = []
        for i in range(COUNT):
            due = first_due + i * spread_s / COUNT
            when = datetime.fromtimestamp(due, UTC)
            batch.append(
                NewTask(queue, TASK_TYPE, PAYLOAD, schedule_time=when, headers={HEADER: repr(due)})
            )
        async with ctx.client() as client:
            enqueue_s = await enqueue_bulk(client, batch)
            cap_s = first_due + spread_s + LATE_CAP_S - time.time()
            done = await wait_succeeded(client, queue, COUNT, cap_s)
        await worker.stop()
        record = ctx.env.workdir / f"{queue}-delayed-0.json"
        samples_ms = [s * 1000 for s in json.loads(record.read_text())]
        missing = COUNT - len(samples_ms)
        samples_ms += [LATE_CAP_S * 1000] * max(0, missing)  # at least this late
        for name, p in (("p50", 50), ("p99", 99), ("max", 100)):
            res.metric(f"lateness {name}", "ms").add(percentile(samples_ms, p), capped=missing > 0)
        res.runs.append(
            {
                "run": run_no,
                "enqueue_s": round(enqueue_s, 3),
                "enqueued_before_first_due": enqueue_s < LEAD_S,
                "started": len(samples_ms) - max(0, missing),
                "succeeded": done.done,
                "early": sum(1 for s in samples_ms if s < 0),
            }
        )
        await ctx.env.flush()
