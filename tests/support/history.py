"""A fault test's history, and the checker run on it after the queues are drained.

Producers and workers, in any process, append one JSON object per line to their own file through a
`HistoryWriter`; `History.load` merges the files in the order the events were seen. Timestamps are
`time.monotonic_ns()`, which on Linux is CLOCK_MONOTONIC, one clock for every process on the
machine, so records of different processes can be ordered against each other.

What is recorded (RELIABILITY.md section 7.2):

- `Enqueued`: an Enqueue the broker acknowledged (so the task must not be lost).
- `Delivered`: a worker started a handler for a lease (task id, lease id, attempt, worker).
- `Settled`: the broker's answer to an ack or nack: `ok` (applied), `already` (a repeat of an
  applied settlement), `stale` (refused: the lease is no longer current, or the task is gone), or
  `unknown` (no definite answer, for example UNAVAILABLE; such a settlement may or may not have
  been applied, and the checker never counts it as either). `sent_ns`, when known, is when the
  worker's handler ended, before the settlement was sent.
- `WorkerExit`: a worker's own counters when it stopped gracefully.

`History.check` takes every task's final state (from GetTask, after the drain) and reports lost
tasks, tasks completed by two leases, settlements accepted for a lease that was no longer the
task's newest, and how many deliveries were duplicates.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, TypeAlias, cast

__all__ = [
    "Delivered",
    "Enqueued",
    "History",
    "HistoryWriter",
    "Record",
    "Report",
    "SettleKind",
    "SettleOutcome",
    "Settled",
    "WorkerExit",
]

SettleKind: TypeAlias = Literal["ack", "nack"]
SettleOutcome: TypeAlias = Literal["ok", "already", "stale", "unknown"]

#: Final states in which a task is accounted for (acked, or in the dead letters with its errors).
ACCOUNTED_FOR: Final = frozenset({"SUCCEEDED", "DEAD"})
#: How many task ids a rendered report lists per finding.
_EXAMPLES: Final = 3


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The broker acknowledged an Enqueue of this task."""

    at_ns: int
    task_id: str


@dataclass(frozen=True, slots=True)
class Delivered:
    """A worker started a handler for this lease."""

    at_ns: int
    task_id: str
    lease_id: str
    attempt: int
    worker: str


@dataclass(frozen=True, slots=True)
class Settled:
    """The broker answered an ack or nack of this lease."""

    at_ns: int
    task_id: str
    lease_id: str
    kind: SettleKind
    outcome: SettleOutcome
    worker: str
    sent_ns: int | None = None


@dataclass(frozen=True, slots=True)
class WorkerExit:
    """A worker stopped gracefully; its own counters at that point."""

    at_ns: int
    worker: str
    processed: int
    stale_settlements: int


Record: TypeAlias = Enqueued | Delivered | Settled | WorkerExit

_TYPES: Final[dict[str, type[Record]]] = {
    "enqueued": Enqueued,
    "delivered": Delivered,
    "settled": Settled,
    "worker_exit": WorkerExit,
}
_NAMES: Final = {cls: name for name, cls in _TYPES.items()}


class HistoryWriter:
    """Appends records to one JSONL file. Each record is one `write` to an O_APPEND descriptor,
    unbuffered, so records survive a SIGKILL right after the call and writers in several threads
    do not interleave."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: Record) -> None:
        """Appends one record.

        Raises:
            RuntimeError: The writer was closed.
        """
        if self._fd is None:
            raise RuntimeError(f"history writer for {self.path} is closed")
        fields = {"record": _NAMES[type(record)], **_fields(record)}
        os.write(self._fd, (json.dumps(fields, separators=(",", ":")) + "\n").encode())

    def enqueued(self, task_id: str) -> None:
        self.write(Enqueued(time.monotonic_ns(), task_id))

    def delivered(self, task_id: str, lease_id: str, attempt: int, worker: str) -> None:
        self.write(Delivered(time.monotonic_ns(), task_id, lease_id, attempt, worker))

    def settled(
        self,
        task_id: str,
        lease_id: str,
        kind: SettleKind,
        outcome: SettleOutcome,
        worker: str,
        sent_ns: int | None = None,
    ) -> None:
        self.write(Settled(time.monotonic_ns(), task_id, lease_id, kind, outcome, worker, sent_ns))

    def worker_exit(self, worker: str, processed: int, stale_settlements: int) -> None:
        self.write(WorkerExit(time.monotonic_ns(), worker, processed, stale_settlements))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _current_lease(delivered: list[Delivered], settled: Settled) -> str | None:
    """The lease `settled` must name: the task's newest delivered lease when the answer was
    recorded, or, for a nack, when it was sent (Report.stale_accepted says why). `delivered`
    holds the task's deliveries recorded before the answer, in time order."""
    until_ns = settled.at_ns
    if settled.kind == "nack" and settled.sent_ns is not None:
        until_ns = settled.sent_ns
    before = [d for d in delivered if d.at_ns <= until_ns]
    return before[-1].lease_id if before else None


def _fields(record: Record) -> dict[str, object]:
    return {name: getattr(record, name) for name in type(record).__dataclass_fields__}


def _parse(line: str) -> Record:
    raw = json.loads(line)
    if not isinstance(raw, dict):
        raise ValueError(f"not a history record: {line!r}")
    fields = cast("dict[str, object]", raw)
    cls = _TYPES.get(str(fields.pop("record", "")))
    if cls is None:
        raise ValueError(f"unknown history record: {line!r}")
    return cls(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Report:
    """What the checker found. Task-id tuples are sorted; empty means the property held.

    Attributes:
        enqueued: Acknowledged enqueues.
        deliveries: Deliveries recorded.
        tasks_delivered: Distinct tasks among them.
        lost: Acknowledged enqueues whose task did not end SUCCEEDED or DEAD.
        unexpected: Tasks delivered that were never (acknowledged as) enqueued.
        completed_twice: Tasks acked as a first ack (outcome ok, not a repeat) by two leases.
        stale_accepted: Tasks with an ack or nack accepted for a lease that was not the task's
            most recently delivered lease: when the answer came, for an ack; when it was sent
            (if known), for a nack. An accepted nack makes its task deliverable again at once
            (full-jitter backoff may be ~0), so its next lease may be recorded before the answer.
        duplicate_deliveries: deliveries - tasks_delivered.
        stale_refused: Settlements the broker refused as stale (fencing at work; not a fault).
    """

    enqueued: int
    deliveries: int
    tasks_delivered: int
    lost: tuple[str, ...]
    unexpected: tuple[str, ...]
    completed_twice: tuple[str, ...]
    stale_accepted: tuple[str, ...]
    duplicate_deliveries: int
    stale_refused: int

    @property
    def ok(self) -> bool:
        """No task lost, unexpected, completed twice or settled through a stale lease."""
        return not (self.lost or self.unexpected or self.completed_twice or self.stale_accepted)

    def render(self) -> str:
        """The findings as a small text table."""
        rows: list[tuple[str, int, str]] = [
            ("enqueued (acknowledged)", self.enqueued, ""),
            ("deliveries", self.deliveries, f"{self.tasks_delivered} distinct tasks"),
            ("duplicate deliveries", self.duplicate_deliveries, ""),
            ("stale settlements refused", self.stale_refused, ""),
            ("lost", len(self.lost), _examples(self.lost)),
            ("unexpected", len(self.unexpected), _examples(self.unexpected)),
            ("completed twice", len(self.completed_twice), _examples(self.completed_twice)),
            ("stale settlement accepted", len(self.stale_accepted), _examples(self.stale_accepted)),
        ]
        width = max(len(name) for name, _, _ in rows)
        lines = [f"{'check':<{width}}  {'count':>6}  detail"]
        lines += [f"{name:<{width}}  {count:>6}  {detail}".rstrip() for name, count, detail in rows]
        return "\n".join(lines)


def _examples(task_ids: tuple[str, ...]) -> str:
    shown = ", ".join(task_ids[:_EXAMPLES])
    return shown + (", ..." if len(task_ids) > _EXAMPLES else "")


@dataclass(frozen=True, slots=True)
class History:
    """Records from every writer of a test, in the order they happened."""

    records: tuple[Record, ...]

    @classmethod
    def load(cls, paths: Iterable[Path]) -> History:
        """Reads and merges history files (missing files count as empty).

        A last line without its newline (a writer killed mid-write) is skipped; any other
        malformed line is an error.

        Raises:
            ValueError: A complete line is not a history record.
        """
        records: list[Record] = []
        for path in paths:
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            lines = text.split("\n")
            # After the last "\n" there is "" or a torn record.
            records.extend(_parse(line) for line in lines[:-1] if line)
        # A stable sort: records of one file with equal timestamps keep their order.
        records.sort(key=lambda r: r.at_ns)
        return cls(tuple(records))

    @property
    def enqueues(self) -> list[Enqueued]:
        return [r for r in self.records if isinstance(r, Enqueued)]

    @property
    def deliveries(self) -> list[Delivered]:
        return [r for r in self.records if isinstance(r, Delivered)]

    @property
    def settlements(self) -> list[Settled]:
        return [r for r in self.records if isinstance(r, Settled)]

    @property
    def exits(self) -> list[WorkerExit]:
        return [r for r in self.records if isinstance(r, WorkerExit)]

    def deliveries_per_task(self) -> Counter[str]:
        return Counter(r.task_id for r in self.deliveries)

    def check(self, final_states: Mapping[str, str]) -> Report:
        """Runs the checker.

        Args:
            final_states: Task id -> TaskState name ("SUCCEEDED", "DEAD", ...) read after the
                queues were drained. A task missing from it counts as not accounted for.

        Returns:
            The report.
        """
        enqueued = {r.task_id for r in self.enqueues}
        deliveries = self.deliveries
        delivered = {r.task_id for r in deliveries}
        leases: defaultdict[str, list[Delivered]] = defaultdict(list)  # per task, in time order
        first_acks: defaultdict[str, set[str]] = defaultdict(set)
        stale_accepted: set[str] = set()
        stale_refused = 0
        for record in self.records:
            if isinstance(record, Delivered):
                leases[record.task_id].append(record)
            elif isinstance(record, Settled):
                if record.outcome == "stale":
                    stale_refused += 1
                    continue
                if record.outcome != "ok":
                    continue  # a repeat, or an answer we never got
                if _current_lease(leases[record.task_id], record) != record.lease_id:
                    stale_accepted.add(record.task_id)
                if record.kind == "ack":
                    first_acks[record.task_id].add(record.lease_id)
        return Report(
            enqueued=len(enqueued),
            deliveries=len(deliveries),
            tasks_delivered=len(delivered),
            lost=tuple(sorted(t for t in enqueued if final_states.get(t) not in ACCOUNTED_FOR)),
            unexpected=tuple(sorted(delivered - enqueued)),
            completed_twice=tuple(sorted(t for t, leases in first_acks.items() if len(leases) > 1)),
            stale_accepted=tuple(sorted(stale_accepted)),
            duplicate_deliveries=len(deliveries) - len(delivered),
            stale_refused=stale_refused,
        )
