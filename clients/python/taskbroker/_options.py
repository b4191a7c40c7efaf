"""The options of a task to enqueue: one typed, documented definition that NewTask,
Client.enqueue and SyncClient.enqueue share."""

from __future__ import annotations

import inspect
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final, TypedDict, TypeVar, cast

if TYPE_CHECKING:
    from taskbroker._models import ParentFailurePolicyArg

_T = TypeVar("_T")


class TaskOptions(TypedDict, total=False):
    """The options of a task to enqueue (`NewTask`, `Client.enqueue`, `SyncClient.enqueue`).

    Every option may be left out; None means the same as leaving it out.

    Attributes:
        priority: -1000 to 1000; higher runs first, FIFO within one priority. Default 0.
        delay: Run no earlier than this long after the broker accepts the task. Not with
            schedule_time.
        schedule_time: Run no earlier than this timezone-aware instant. Not with delay.
        max_attempts: Deliveries before the task is dead-lettered, 1-1000. None: the broker
            default (5).
        lease_duration: Lease length for this task, overriding the worker's; 10 ms to 12 h.
        idempotency_key: Deduplicates retries within the broker's window (default 24 h):
            a repeat returns the first task's id. At most 256 characters.
        headers: Free-form metadata returned with every delivery (for example traceparent).
        initial_backoff: Backoff cap for the first retry, 1 ms to 7 days. None: the broker
            default (1 s).
        max_backoff: Largest backoff cap, at least initial_backoff, at most 7 days. None: the
            broker default (10 min).
        group_key: The tenant (customer, account) the task belongs to, 1-128 characters of
            [A-Za-z0-9_.:@-]: the queue leases round-robin across keys, and its
            per_key_max_concurrency holds for each. None: the queue's default group.
        depends_on: Ids of tasks this one waits for (at most 1,000): it is stored WAITING and
            becomes pending once every one has succeeded. Each must exist. To enqueue a whole
            graph in one call, use `Client.enqueue_workflow` with `chain`, `group`, `chord`.
        parent_failure_policy: What happens when a task it depends on ends DEAD or CANCELLED
            (`ParentFailurePolicy`, or "cancel", "run", "wait"). None: cancel.
        retry_initial: Deprecated name of initial_backoff (warns).
        retry_max: Deprecated name of max_backoff (warns).
    """

    priority: int
    delay: timedelta | None
    schedule_time: datetime | None
    max_attempts: int | None
    lease_duration: timedelta | None
    idempotency_key: str | None
    headers: Mapping[str, str] | None
    initial_backoff: timedelta | None
    max_backoff: timedelta | None
    group_key: str | None
    depends_on: Sequence[str] | None
    parent_failure_policy: ParentFailurePolicyArg | None
    # Kept so that code written for the first names still type-checks; they warn at run time.
    retry_initial: timedelta | None
    retry_max: timedelta | None


#: Options renamed to the words of the API (taskbroker.v1.RetryPolicy): old name -> new name.
#: The old names keep working, with a DeprecationWarning.
RENAMED: Final[Mapping[str, str]] = {
    "retry_initial": "initial_backoff",
    "retry_max": "max_backoff",
}

#: The line of a docstring under which `with_options_doc` writes the options' documentation.
OPTIONS_LINE: Final = "**options:"


def checked_options(options: TaskOptions) -> TaskOptions:
    """The options under their current names, once every name is known to be an option.

    `**options: Unpack[TaskOptions]` is checked by type checkers only; at run time this keeps
    the TypeError that a misspelt keyword argument raised when the options were parameters.
    Call it from the function that takes the options, so that the DeprecationWarning of an
    old name points at its caller.

    Raises:
        TypeError: A name is not an option, or an option has a value under both its old and
            its new name.
    """
    unknown = sorted(options.keys() - TaskOptions.__optional_keys__)
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r} (not a task option)")
    if options.keys().isdisjoint(RENAMED):
        return options
    current: dict[str, object] = dict(options)
    for old, new in RENAMED.items():
        if old not in current:
            continue
        warn_renamed(old, stacklevel=4)
        value = current.pop(old)
        if value is not None and current.get(new) is not None:
            raise TypeError(f"give {new} only ({old} is its deprecated name)")
        if value is not None:
            current[new] = value
    return cast(TaskOptions, current)


def warn_renamed(old: str, *, stacklevel: int = 3) -> None:
    """Warns that the option `old` has a new name. The default stacklevel points at the caller
    of the function that calls this one."""
    warnings.warn(
        f"{old} is deprecated: use {RENAMED[old]}, the name in taskbroker.v1.RetryPolicy",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def with_options_doc(target: _T) -> _T:
    """Writes TaskOptions' documentation into the docstring of `target` (a function or class),
    below its one line that starts with `**options:`, so that help() shows every option where
    it is taken, while the text itself is written once.

    Raises:
        ValueError: The docstring has no such line.
    """
    if target.__doc__ is None or TaskOptions.__doc__ is None:  # python -OO drops docstrings
        return target
    lines = target.__doc__.splitlines()
    options_doc = textwrap.dedent(
        inspect.cleandoc(TaskOptions.__doc__).partition("Attributes:\n")[2]
    )
    for index, line in enumerate(lines):
        if line.lstrip().startswith(OPTIONS_LINE):
            indent = line[: len(line) - len(line.lstrip())] + "    "
            block = [indent + text if text else text for text in options_doc.splitlines()]
            lines[index + 1 : index + 1] = block
            target.__doc__ = "\n".join(lines)
            return target
    raise ValueError(f"{target!r}: no {OPTIONS_LINE!r} line in the docstring")
