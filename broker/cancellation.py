"""Cancellation that survives libraries which turn CancelledError into their own errors."""

from __future__ import annotations

import asyncio


def raise_if_cancelled() -> None:
    """Re-raises CancelledError in a task that was asked to stop.

    redis-py can swallow a cancellation, or surface it as a connection error; a loop that retries
    on that error would then never stop. Loops call this each round and in such except blocks:
    Task.cancelling() still counts the request after the CancelledError itself was lost.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
