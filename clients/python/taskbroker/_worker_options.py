"""Worker options: a Worker's settings, checked once against the broker's limits."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Final

from taskbroker._handler import ExceptionTypes
from taskbroker._tracing import TRACE_PARENTS, TraceParent

if TYPE_CHECKING:
    from taskbroker.encryption import PayloadCodec

#: The broker's limits for Lease streams (lease.proto).
MAX_CREDITS: Final = 10_000
MIN_LEASE: Final = timedelta(milliseconds=10)
MAX_LEASE: Final = timedelta(hours=12)


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """A worker's settings, as `Worker(...)` took them (see its docstring)."""

    queues: tuple[str, ...]
    worker_id: str
    concurrency: int
    lease_duration: timedelta
    shutdown_grace: timedelta
    non_retryable: ExceptionTypes
    trace_parent: TraceParent = "child"
    codec: PayloadCodec | None = None


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


def checked_options(
    queues: Sequence[str],
    concurrency: int,
    lease_duration: timedelta,
    worker_id: str,
    shutdown_grace: timedelta,
    non_retryable: ExceptionTypes,
    trace_parent: TraceParent,
) -> WorkerOptions:
    """The options, once each is within the broker's limits.

    Raises:
        ValueError: An option is out of range.
    """
    names = (queues,) if isinstance(queues, str) else tuple(queues)
    if not names:
        raise ValueError("queues: give at least one queue")
    if not 1 <= concurrency <= MAX_CREDITS:
        raise ValueError(f"concurrency must be 1 to {MAX_CREDITS}")
    if not MIN_LEASE <= lease_duration <= MAX_LEASE:
        raise ValueError("lease_duration must be 10 ms to 12 h")
    if shutdown_grace < timedelta(0):
        raise ValueError("shutdown_grace must not be negative")
    if len(worker_id) > 128 or not worker_id.isprintable():
        raise ValueError("worker_id: at most 128 printable characters")
    if trace_parent not in TRACE_PARENTS:
        raise ValueError(f"trace_parent must be one of {', '.join(TRACE_PARENTS)}")
    return WorkerOptions(
        names, worker_id, concurrency, lease_duration, shutdown_grace, non_retryable, trace_parent
    )
