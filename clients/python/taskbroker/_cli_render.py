"""How the `taskbroker` CLI shows what the broker returns: tables of tasks, queues, stats,
dead letters, audit records and schedules for a terminal, and their JSON documents for --json."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Final

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from taskbroker._client import EnqueueResult
from taskbroker._models import AuditRecord, QueueSettings, QueueStats, Schedule, Task

#: Width of tables written to a pipe or file (unless COLUMNS says otherwise): wide enough that
#: the stats table is never squeezed, which rich would otherwise do at its default of 80.
PIPE_WIDTH: Final = 160
#: Console width below which the stats table drops its cell padding.
COMPACT_BELOW: Final = 100
#: Bytes of a binary payload or result shown (as hex) in a table; --json shows them all.
HEX_PREVIEW_BYTES: Final = 32


def consoles() -> tuple[Console, Console]:
    """The consoles for stdout and stderr; stdout is PIPE_WIDTH wide when it is not a terminal."""
    out = Console(highlight=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(highlight=False, width=PIPE_WIDTH)
    return out, Console(stderr=True, highlight=False)


def _printable(data: bytes) -> str | None:
    """The bytes as text when they are UTF-8 made of printable characters (and whitespace)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if all(c.isprintable() or c in "\n\r\t" for c in text) else None


def _bytes_cell(data: bytes) -> Text:
    if not data:
        return Text("(empty)", style="dim")
    text = _printable(data)
    if text is not None:
        return Text(text)
    more = "…" if len(data) > HEX_PREVIEW_BYTES else ""
    return Text(f"<{len(data)} bytes> {data[:HEX_PREVIEW_BYTES].hex(' ')}{more}")


def _bytes_doc(data: bytes) -> dict[str, object]:
    text = _printable(data)
    return (
        {"size": len(data), "text": text}
        if text is not None
        else {"size": len(data), "hex": data.hex()}
    )


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _time_cell(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC" if value is not None else "-"


def _age_cell(age: timedelta | None) -> str:
    if age is None:
        return "-"
    seconds = age.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _headers_cell(headers: Mapping[str, str]) -> Text:
    return Text(", ".join(f"{k}={v}" for k, v in sorted(headers.items())) or "-")


def task_doc(task: Task) -> dict[str, object]:
    """A task as a JSON object (times in ISO 8601, bytes as {"size", "text" | "hex"})."""
    return {
        "id": task.id,
        "queue": task.queue,
        "type": task.type,
        "state": task.state.name,
        "priority": task.priority,
        "attempt": task.attempt,
        "max_attempts": task.max_attempts,
        "headers": task.headers,
        "create_time": _iso(task.create_time),
        "schedule_time": _iso(task.schedule_time),
        "lease_expire_time": _iso(task.lease_expire_time),
        "finish_time": _iso(task.finish_time),
        "last_error": task.last_error,
        "errors": [
            {"attempt": e.attempt, "message": e.message, "time": _iso(e.time)} for e in task.errors
        ],
        "payload": _bytes_doc(task.payload),
        "result": _bytes_doc(task.result),
        "parent_ids": list(task.parent_ids),
        "waiting_for": list(task.waiting_for),
        "parent_results": [
            {
                "task_id": p.task_id,
                "state": p.state.name,
                "result": _bytes_doc(p.result),
                "result_omitted": p.result_omitted,
            }
            for p in task.parent_results
        ],
        "parent_failure_policy": task.parent_failure_policy.value,
        "child_ids": list(task.child_ids),
        "child_count": task.child_count,
    }


def task_view(task: Task) -> Table:
    """A task as a two-column grid: field, value."""
    grid = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    grid.add_column(style="bold")
    grid.add_column()
    rows: list[tuple[str, str | Text]] = [
        ("id", Text(task.id)),
        ("queue", Text(task.queue)),
        ("type", Text(task.type)),
        ("state", task.state.name),
        ("priority", str(task.priority)),
        ("attempt", f"{task.attempt} of {task.max_attempts}"),
        ("created", _time_cell(task.create_time)),
        ("scheduled", _time_cell(task.schedule_time)),
        ("lease expires", _time_cell(task.lease_expire_time)),
        ("finished", _time_cell(task.finish_time)),
        ("headers", _headers_cell(task.headers)),
        ("last error", Text(task.last_error or "-")),
        ("payload", _bytes_cell(task.payload)),
        ("result", _bytes_cell(task.result)),
    ]
    if task.parent_ids:
        rows += [
            ("parents", str(len(task.parent_ids))),
            ("waiting for", Text("\n".join(task.waiting_for) or "-")),
            ("on parent failure", task.parent_failure_policy.value),
        ]
    if task.child_count:
        more = task.child_count - len(task.child_ids)
        listed = "\n".join(task.child_ids) + (f"\n… and {more} more" if more > 0 else "")
        rows.append(("children", Text(listed or str(task.child_count))))
    for name, value in rows:
        grid.add_row(name, value)
    return grid


def parents_table(task: Task) -> Table:
    """The tasks a task depends on, in order: how each ended, with its result."""
    ended = {p.task_id: p for p in task.parent_results}
    waiting = set(task.waiting_for)
    table = Table(title="parents", title_justify="left")
    table.add_column("parent")
    table.add_column("state")
    table.add_column("result")
    for parent_id in task.parent_ids:
        parent = ended.get(parent_id)
        if parent is None:
            state, result = "waited for" if parent_id in waiting else "-", Text("-")
        else:
            state = parent.state.name + (" (waited for)" if parent_id in waiting else "")
            omitted = Text("(omitted: over 1 MiB in all)", style="dim")
            result = omitted if parent.result_omitted else _bytes_cell(parent.result)
        table.add_row(Text(parent_id), state, result)
    return table


def errors_table(task: Task) -> Table:
    """A task's failed attempts, one row each."""
    table = Table(title="errors", title_justify="left")
    table.add_column("attempt", justify="right")
    table.add_column("time")
    table.add_column("error")
    for error in task.errors:
        table.add_row(str(error.attempt), _time_cell(error.time), Text(error.message))
    return table


def stats_doc(stats: QueueStats) -> dict[str, object]:
    """A queue's stats as a JSON object."""
    age = stats.oldest_pending_age
    return {
        "queue": stats.queue,
        "pending": stats.pending,
        "scheduled": stats.scheduled,
        "waiting": stats.waiting,
        "leased": stats.leased,
        "dead": stats.dead,
        "paused": stats.paused,
        "enqueued_total": stats.enqueued_total,
        "succeeded_total": stats.succeeded_total,
        "failed_total": stats.failed_total,
        "retried_total": stats.retried_total,
        "reclaimed_total": stats.reclaimed_total,
        "dead_lettered_total": stats.dead_lettered_total,
        "cancelled_total": stats.cancelled_total,
        "oldest_pending_age_s": age.total_seconds() if age is not None else None,
        "settings": settings_doc(stats.settings),
        "rate_limit_tokens": stats.rate_limit_tokens,
    }


def settings_doc(settings: QueueSettings) -> dict[str, object]:
    """A queue's limits as a JSON object: rates as {per_second, burst}, durations in seconds,
    null (or 0) where off."""
    doc = dataclasses.asdict(settings)
    if settings.priority_aging is not None:
        doc["priority_aging"] = settings.priority_aging.total_seconds()
    return doc


#: Counts, totals and the age of the oldest pending task. Two-line headers, and no padding on
#: terminals narrower than COMPACT_BELOW, keep the table within 80 columns for short queue names.
_STATS_COLUMNS: Final = (
    "pending",
    "scheduled",
    "leased",
    "dead",
    "enqueued",
    "succeeded",
    "failed",
    "retried",
    "dead-\nlettered",
    "oldest\npending",
)


def stats_table(all_stats: Sequence[QueueStats], width: int) -> Table:
    """Queues' counts and totals, one row per queue, for a console `width` columns wide."""
    padding = (0, 0) if width < COMPACT_BELOW else (0, 1)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=padding)
    table.add_column("queue", no_wrap=True, vertical="bottom")
    for column in _STATS_COLUMNS:
        table.add_column(column, justify="right", vertical="bottom")
    table.add_column("paused", vertical="bottom")
    for s in all_stats:
        counts = (s.pending, s.scheduled, s.leased, s.dead)
        totals = (
            s.enqueued_total,
            s.succeeded_total,
            s.failed_total,
            s.retried_total,
            s.dead_lettered_total,
        )
        age = _age_cell(s.oldest_pending_age)
        paused = Text("paused", style="yellow") if s.paused else Text("-")
        table.add_row(Text(s.queue), *(str(n) for n in counts + totals), age, paused)
    return table


def dead_table(tasks: Sequence[Task]) -> Table:
    """Dead letters, one row each."""
    table = Table()
    table.add_column("task id", no_wrap=True)
    table.add_column("type")
    table.add_column("attempts", justify="right")
    table.add_column("dead since")
    table.add_column("last error")
    for task in tasks:
        attempts = f"{task.attempt}/{task.max_attempts}"
        since = _time_cell(task.finish_time)
        table.add_row(Text(task.id), Text(task.type), attempts, since, Text(task.last_error))
    return table


def enqueued_table(results: Sequence[EnqueueResult]) -> Table:
    """Enqueued task ids, each marked when it was a duplicate."""
    table = Table()
    table.add_column("task id", no_wrap=True)
    table.add_column("duplicate")
    for result in results:
        table.add_row(Text(result.task_id), "yes (idempotency key)" if result.duplicate else "-")
    return table


def audit_doc(record: AuditRecord) -> dict[str, object]:
    """An audit record as a JSON object."""
    return {
        "time": _iso(record.time),
        "principal": record.principal,
        "action": record.action,
        "target": record.target,
        "outcome": record.outcome,
        "detail": record.detail,
    }


def audit_table(records: Sequence[AuditRecord]) -> Table:
    """Audit records, one row each."""
    table = Table()
    for column in ("time", "principal", "action", "target", "outcome", "detail"):
        table.add_column(column)
    for r in records:
        # Text, not markup: a queue name or message in brackets is shown as it is.
        table.add_row(
            _time_cell(r.time),
            Text(r.principal),
            Text(r.action),
            Text(r.target),
            Text(r.outcome),
            Text(r.detail),
        )
    return table


def _seconds(value: timedelta | None) -> float | None:
    return value.total_seconds() if value is not None else None


def schedule_doc(schedule: Schedule) -> dict[str, object]:
    """A schedule as a JSON object (times in ISO 8601, durations in seconds)."""
    t = schedule.task
    return {
        "name": schedule.name,
        "cron": schedule.cron,
        "time_zone": schedule.time_zone,
        "jitter_s": _seconds(schedule.jitter),
        "catch_up": schedule.catch_up.value,
        "paused": schedule.paused,
        "next_fire_time": _iso(schedule.next_fire_time),
        "last_fire_time": _iso(schedule.last_fire_time),
        "last_task_id": schedule.last_task_id or None,
        "create_time": _iso(schedule.create_time),
        "update_time": _iso(schedule.update_time),
        "task": {
            "queue": t.queue,
            "type": t.type,
            "payload": _bytes_doc(t.payload),
            "priority": t.priority,
            "max_attempts": t.max_attempts,
            "headers": dict(t.headers or {}),
            "group_key": t.group_key,
            "delay_s": _seconds(t.delay),
            "lease_duration_s": _seconds(t.lease_duration),
            "initial_backoff_s": _seconds(t.initial_backoff),
            "max_backoff_s": _seconds(t.max_backoff),
        },
    }


def _duration_cell(value: timedelta | None) -> str:
    return f"{value.total_seconds():g}s" if value else "-"


def schedule_view(schedule: Schedule) -> Table:
    """A schedule as a two-column grid: field, value."""
    t = schedule.task
    grid = Table(show_header=False, box=None, padding=(0, 2, 0, 0))
    grid.add_column(style="bold")
    grid.add_column()
    rows: list[tuple[str, str | Text]] = [
        ("name", Text(schedule.name)),
        ("cron", Text(schedule.cron)),
        ("time zone", Text(schedule.time_zone or "UTC")),
        ("paused", "yes" if schedule.paused else "no"),
        ("next fire", _time_cell(schedule.next_fire_time)),
        ("last fire", _time_cell(schedule.last_fire_time)),
        ("last task", Text(schedule.last_task_id or "-")),
        ("jitter", _duration_cell(schedule.jitter)),
        ("catch-up", schedule.catch_up.value),
        ("queue", Text(t.queue)),
        ("type", Text(t.type)),
        ("payload", _bytes_cell(t.payload)),
        ("priority", str(t.priority)),
        ("max attempts", str(t.max_attempts)),
        ("group key", Text(t.group_key or "-")),
        ("delay", _duration_cell(t.delay)),
        ("headers", _headers_cell(t.headers or {})),
        ("created", _time_cell(schedule.create_time)),
        ("updated", _time_cell(schedule.update_time)),
    ]
    for name, value in rows:
        grid.add_row(name, value)
    return grid


def schedules_table(schedules: Sequence[Schedule]) -> Table:
    """Schedules, one row each."""
    table = Table()
    for column in ("name", "cron", "zone", "queue", "type", "next fire", "last task", "paused"):
        table.add_column(column, no_wrap=column in ("name", "last task"))
    for s in schedules:
        paused = Text("paused", style="yellow") if s.paused else Text("-")
        table.add_row(
            Text(s.name),
            Text(s.cron),
            Text(s.time_zone or "UTC"),
            Text(s.task.queue),
            Text(s.task.type),
            _time_cell(s.next_fire_time),
            Text(s.last_task_id or "-"),
            paused,
        )
    return table
