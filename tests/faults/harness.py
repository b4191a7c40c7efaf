"""Harness: the worker processes of one fault test, against one broker, and everyone's history
files (producer and workers), so the test can check them together at the end."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path

from taskbroker import Client, NewTask, Task
from tests.faults.observe import QUEUE
from tests.support.history import History, HistoryWriter, Report
from tests.support.worker_process import HandlerMode, WorkerProcess


class Harness:
    """Starts worker processes on QUEUE and records what the producer had acknowledged."""

    def __init__(self, target: str, directory: Path) -> None:
        self._target = target
        self._dir = directory
        self.producer = HistoryWriter(directory / "producer.jsonl")
        self.workers: list[WorkerProcess] = []

    def start(
        self,
        worker_id: str,
        handlers: Mapping[str, HandlerMode],
        *,
        concurrency: int,
        lease: timedelta = timedelta(seconds=30),
        sleep: timedelta | None = None,
        target: str | None = None,
    ) -> WorkerProcess:
        """Starts a worker whose history is `<worker_id>.jsonl`, against the broker or `target`
        (a proxy in front of it)."""
        worker = WorkerProcess(
            target or self._target,
            self._dir / f"{worker_id}.jsonl",
            worker_id=worker_id,
            handlers=handlers,
            queues=[QUEUE],
            concurrency=concurrency,
            lease=lease,
            sleep=sleep,
        )
        self.workers.append(worker)
        return worker

    async def enqueue(
        self,
        client: Client,
        count: int,
        task_type: str = "job",
        max_attempts: int | None = None,
        *,
        first: int = 0,
        group_key: str | None = None,
    ) -> list[str]:
        """Enqueues `count` tasks (payloads `first`, `first`+1, ...) and records each
        acknowledged one."""
        results = await client.enqueue_many(
            NewTask(
                QUEUE, task_type, str(i).encode(), max_attempts=max_attempts, group_key=group_key
            )
            for i in range(first, first + count)
        )
        for result in results:
            self.producer.enqueued(result.task_id)
        return [r.task_id for r in results]

    def history(self) -> History:
        return History.load([self.producer.path, *(w.history for w in self.workers)])

    def check(self, tasks: Mapping[str, Task]) -> Report:
        """The history checker's report, given every task's final state."""
        return self.history().check({t.id: t.state.name for t in tasks.values()})

    def close(self) -> None:
        for worker in self.workers:
            worker.close()
        self.producer.close()
