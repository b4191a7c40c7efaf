"""`python -m bench.worker_proc`: one SDK `Worker` in a process of its own, as users run it.

Handler modes: `noop` returns at once; `fail` raises NonRetryable (the task is dead-lettered);
`hang` never returns (to be killed holding its tasks). With --record-header, every handler
notes its start wall time minus the epoch seconds in that header (the producer's send time, or
the due time), and the worker writes them to --record-file when it stops (SIGTERM).

Events on stdout (bench.protocol): `ready` once the Lease stream is open; `started` with the
wall time at which the n-th handler started, for each n in --notify-at; `exit` on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.protocol import emit
from taskbroker import Client, NonRetryable, TaskContext, Worker, handler

TASK_TYPE = "bench"


class _Tracker:
    """Counts handler starts and emits `started` at the counts the parent asked for."""

    def __init__(self, notify_at: set[int], header: str) -> None:
        self.started = 0
        self._notify_at = notify_at
        self._header = header
        self.samples: list[float] = []

    def start(self, ctx: TaskContext) -> None:
        now = time.time()
        self.started += 1
        if self._header:
            self.samples.append(now - float(ctx.headers[self._header]))
        if self.started in self._notify_at:
            emit("started", n=self.started, t=now)


def _handler_func(
    mode: str, tracker: _Tracker
) -> Callable[[TaskContext, bytes], Awaitable[bytes | None]]:
    async def run(ctx: TaskContext, payload: bytes) -> bytes | None:
        tracker.start(ctx)
        if mode == "fail":
            raise NonRetryable("bench: fails on purpose")
        if mode == "hang":
            await asyncio.Event().wait()
        return None

    return run


async def _wait_open(worker: Worker) -> None:
    """Waits for the worker's first stream to open. The SDK has no public hook for this, so it
    peeks at the session; if that changes, it falls back to a pause long enough to connect."""
    session: Any = getattr(worker, "_session", None)
    opened = getattr(getattr(session, "connector", None), "opened", None)
    if isinstance(opened, asyncio.Event):
        await opened.wait()
    else:
        await asyncio.sleep(1.0)


def _write(path: Path, samples: list[float]) -> None:
    path.write_text(json.dumps(samples))


async def main(args: argparse.Namespace) -> None:
    tracker = _Tracker({int(n) for n in args.notify_at.split(",") if n}, args.record_header)
    bench_handler = handler(TASK_TYPE)(_handler_func(args.mode, tracker))
    async with Client(args.target) as client:
        worker = Worker(
            client,
            queues=[args.queue],
            handlers=[bench_handler],
            concurrency=args.concurrency,
            lease_duration=timedelta(milliseconds=args.lease_ms),
            worker_id=args.worker_id,
            shutdown_grace=timedelta(milliseconds=args.shutdown_grace_ms),
        )
        running = asyncio.create_task(worker.run())
        opened = asyncio.create_task(_wait_open(worker))
        await asyncio.wait([running, opened], return_when=asyncio.FIRST_COMPLETED)
        if opened.done():
            emit("ready")
        await running  # until SIGTERM; raises if the broker refused the worker
    if args.record_file:
        _write(Path(args.record_file), tracker.samples)
    emit("exit", processed=worker.processed, started=tracker.started)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.worker_proc")
    p.add_argument("--target", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--mode", choices=["noop", "fail", "hang"], default="noop")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument("--lease-ms", type=int, default=30_000)
    p.add_argument("--shutdown-grace-ms", type=int, default=2_000)
    p.add_argument("--worker-id", default=None)
    p.add_argument("--notify-at", default="", help="comma-separated handler-start counts")
    p.add_argument("--record-header", default="", help="header holding epoch seconds")
    p.add_argument("--record-file", default="")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
