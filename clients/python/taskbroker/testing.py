"""Run a handler in a unit test, without a broker (as Temporal's ActivityEnvironment does).

```python
from taskbroker import testing

async def test_send_email() -> None:
    outcome = await testing.run_handler(send_email, b'{"to": "a@example.com"}')
    assert outcome.kind == "ack"
```

The outcome is decided by the same code the worker uses, so "retry", "dead" and "error" mean
here exactly what they mean for a task on a broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import timedelta

from taskbroker._handler import Handler, HandlerOutcome, OutcomeKind, TaskContext, invoke
from taskbroker._models import ParentResult

__all__ = ["HandlerOutcome", "OutcomeKind", "run_handler"]


async def run_handler(
    h: Handler,
    payload: bytes = b"",
    *,
    attempt: int = 1,
    max_attempts: int = 5,
    headers: Mapping[str, str] | None = None,
    task_id: str = "test:01TESTTASK0000000000000000",
    queue: str = "test",
    cancel_after: timedelta | None = None,
    parent_results: Sequence[ParentResult] = (),
) -> HandlerOutcome:
    """Runs a handler once, as a worker would, and returns how the attempt would be settled.

    Args:
        h: The handler (a function decorated with `@handler`).
        payload: The task's payload.
        attempt: The attempt number the context reports.
        max_attempts: The attempt limit the context reports.
        headers: The task's headers.
        task_id: The task id the context reports.
        queue: The queue the context reports.
        cancel_after: Set `ctx.cancelled` this long after the handler starts, as a revoked
            lease would. None: never.
        parent_results: What the context reports of the task's parents (a fan-in handler's
            input); `ctx.parent_ids` are their ids.

    Returns:
        The outcome: kind "ack" (with `result`), "retry" (with `retry_delay`), "dead" or "error"
        (with `error`). The handler's timeout applies; a sync handler runs in a thread.
    """
    ctx = TaskContext(
        task_id=task_id,
        type=h.type,
        queue=queue,
        attempt=attempt,
        max_attempts=max_attempts,
        headers=headers or {},
        payload=payload,
        lease_id="0" * 32,
        parent_ids=[parent.task_id for parent in parent_results],
        parent_results=parent_results,
    )
    canceller: asyncio.TimerHandle | None = None
    if cancel_after is not None:
        loop = asyncio.get_running_loop()
        canceller = loop.call_later(cancel_after.total_seconds(), ctx._cancel, "cancelled")
    try:
        return await invoke(h, ctx, payload)
    finally:
        if canceller is not None:
            canceller.cancel()
