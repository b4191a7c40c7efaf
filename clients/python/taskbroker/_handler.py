"""Task handlers: the `handler` decorator, the `TaskContext` they receive, and how their outcome
(a return value or an exception) becomes an ack or a nack.

The outcome mapping lives here so that the worker and `taskbroker.testing` agree on it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import timedelta
from types import MappingProxyType
from typing import Final, Literal, TypeAlias, cast

from taskbroker._errors import NonRetryable, RetryLater
from taskbroker._models import ParentResult

#: Exception classes, as handler options take them.
ExceptionTypes: TypeAlias = tuple[type[BaseException], ...]

#: An async handler (run on the event loop) or a plain function (run in the worker's threads).
HandlerFunc: TypeAlias = (
    Callable[["TaskContext", bytes], Awaitable[bytes | None]]
    | Callable[["TaskContext", bytes], bytes | None]
)

#: What a handler's attempt comes to.
#: ack: succeeded (with `result`); retry: retry after `retry_delay` (RetryLater);
#: dead: dead-letter now; error: failed, retried after the broker's backoff.
OutcomeKind: TypeAlias = Literal["ack", "retry", "dead", "error"]

#: The broker keeps at most 4 KiB of an error message; longer ones are cut here already.
MAX_ERROR_CHARS: Final = 4096
#: The broker accepts retry delays of 0 to 7 days (NackRequest.retry_delay).
MAX_RETRY_DELAY: Final = timedelta(days=7)


class TaskContext:
    """What a handler knows about the task it runs, and its cancellation signal.

    `cancelled` turns true when the handler should stop: the task was cancelled (the broker
    revoked the lease), the lease was lost, the handler timed out, or the worker is shutting down.
    Async handlers can `await ctx.wait_cancelled()`; sync handlers can poll `ctx.cancelled`.

    Attributes:
        task_id: The task's id.
        type: The task type, which picked this handler.
        queue: The queue the task came from.
        attempt: This delivery's attempt number, from 1.
        max_attempts: Deliveries before the task is dead-lettered.
        headers: The task's headers (read-only).
        payload: The task's payload (also the handler's second argument).
        lease_id: The lease this attempt holds.
        group_key: The tenant the task was enqueued for ("" when none).
        parent_ids: The tasks this one depends on (`depends_on`, or its place in a workflow),
            in order; () when none.
        parent_results: How each parent ended, in parent order: its id, state (SUCCEEDED, or
            with `parent_failure_policy="run"` also DEAD or CANCELLED), the bytes its worker
            acked with and whether the broker left them out (`result_omitted`: the results
            carried with one task total at most 1 MiB). A fan-in handler reads the fan-out's
            results here, decoded by the worker's payload codec if it has one.
    """

    __slots__ = (
        "_cancel_reason",
        "_cancelled_event",
        "_headers",
        "_headers_view",
        "attempt",
        "group_key",
        "lease_id",
        "max_attempts",
        "parent_ids",
        "parent_results",
        "payload",
        "queue",
        "task_id",
        "type",
    )

    def __init__(
        self,
        *,
        task_id: str,
        type: str,
        queue: str,
        attempt: int,
        max_attempts: int,
        headers: Mapping[str, str],
        payload: bytes,
        lease_id: str,
        group_key: str = "",
        parent_ids: Sequence[str] = (),
        parent_results: Sequence[ParentResult] = (),
    ) -> None:
        self.task_id = task_id
        self.type = type
        self.queue = queue
        self.attempt = attempt
        self.max_attempts = max_attempts
        self._headers = headers
        self._headers_view: Mapping[str, str] | None = None
        self.payload = payload
        self.lease_id = lease_id
        self.group_key = group_key
        self.parent_ids = tuple(parent_ids)
        self.parent_results = tuple(parent_results)
        self._cancel_reason = ""
        self._cancelled_event: asyncio.Event | None = None  # made when someone waits on it

    @property
    def headers(self) -> Mapping[str, str]:
        """The task's headers (read-only), copied on first use: most handlers never look."""
        if self._headers_view is None:
            self._headers_view = MappingProxyType(dict(self._headers))
        return self._headers_view

    @property
    def cancelled(self) -> bool:
        """Whether the handler has been asked to stop."""
        return bool(self._cancel_reason)

    @property
    def cancel_reason(self) -> str:
        """Why the handler was asked to stop ("" while it has not been)."""
        return self._cancel_reason

    async def wait_cancelled(self) -> None:
        """Returns once the handler has been asked to stop."""
        if self._cancelled_event is None:
            self._cancelled_event = asyncio.Event()
            if self.cancelled:
                self._cancelled_event.set()
        await self._cancelled_event.wait()

    def _cancel(self, reason: str) -> None:
        """Sets the signal (on the event loop's thread); the first reason sticks."""
        if not self.cancelled:
            self._cancel_reason = reason or "cancelled"
            if self._cancelled_event is not None:
                self._cancelled_event.set()

    def __repr__(self) -> str:  # no payload or headers: they may hold personal data
        return f"TaskContext(task_id={self.task_id!r}, type={self.type!r}, attempt={self.attempt})"


@dataclass(frozen=True, slots=True)
class Handler:
    """A function registered for a task type, with its options. Made by `@handler(...)`.

    Attributes:
        type: The task type it handles.
        func: `async def f(ctx, payload) -> bytes | None` or the same as a plain function.
        timeout: Longest an attempt may run; None: no limit.
        retry_on: When set, only these exceptions are retried; any other dead-letters the task.
            None: every exception is retried (except the non-retryable ones).
        non_retryable: Exceptions that dead-letter the task at once (besides `NonRetryable`).
    """

    type: str
    func: HandlerFunc
    timeout: timedelta | None = None
    retry_on: ExceptionTypes | None = None
    non_retryable: ExceptionTypes = ()

    @property
    def is_async(self) -> bool:
        """Whether the function is a coroutine function (run on the loop, not in a thread)."""
        func = self.func
        # A callable object with an async __call__ counts too.
        return inspect.iscoroutinefunction(func) or (
            not inspect.isroutine(func) and inspect.iscoroutinefunction(type(func).__call__)
        )


def handler(
    task_type: str,
    /,
    *,
    timeout: timedelta | None = None,
    retry_on: Sequence[type[BaseException]] | None = None,
    non_retryable: Sequence[type[BaseException]] = (),
) -> Callable[[HandlerFunc], Handler]:
    """Registers a function as the handler of a task type.

    ```python
    @handler("send_email", timeout=timedelta(seconds=30), non_retryable=(ValueError,))
    async def send_email(ctx: TaskContext, payload: bytes) -> bytes | None: ...
    ```

    Returning bytes (or None) acks the task with that result. Raising `RetryLater(delay)` retries
    it after `delay`; raising `NonRetryable`, or an exception listed in `non_retryable`,
    dead-letters it; any other exception fails the attempt, and the broker retries it after its
    backoff until the task runs out of attempts.

    Args:
        task_type: The task type, as producers enqueue it.
        timeout: Longest an attempt may run. An async handler is cancelled when it runs out; a
            sync one is abandoned (its thread cannot be stopped) with `ctx.cancelled` set. The
            attempt then fails with "timed out after ...". None: no limit.
        retry_on: When given, only these exceptions are retried; any other one dead-letters the
            task. None: every exception is retried.
        non_retryable: Exceptions that dead-letter the task without further attempts.

    Returns:
        A decorator that turns the function into a `Handler`.

    Raises:
        ValueError: The task type is empty or the timeout is not positive.
    """
    if not task_type:
        raise ValueError("handler: the task type must not be empty")
    if timeout is not None and timeout <= timedelta(0):
        raise ValueError("handler: timeout must be positive")

    def decorate(func: HandlerFunc) -> Handler:
        return Handler(
            type=task_type,
            func=func,
            timeout=timeout,
            retry_on=None if retry_on is None else tuple(retry_on),
            non_retryable=tuple(non_retryable),
        )

    return decorate


@dataclass(frozen=True, slots=True)
class HandlerOutcome:
    """What one attempt came to, and so how the worker settles it.

    Attributes:
        kind: "ack" (acked with `result`), "retry" (nacked with `retry_delay`), "dead"
            (nacked and dead-lettered) or "error" (nacked; retried after the broker's backoff).
        result: The handler's return value, for "ack".
        retry_delay: The delay the handler asked for, for "retry".
        error: The error message stored with the task, for the other kinds.
        exception: What the handler raised, if it raised (for the worker's trace span; not
            compared, not shown).
    """

    kind: OutcomeKind
    result: bytes = b""
    retry_delay: timedelta | None = None
    error: str = ""
    exception: BaseException | None = field(default=None, compare=False, repr=False)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    message = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return message[:MAX_ERROR_CHARS]


def outcome_for_exception(
    exc: BaseException, h: Handler, non_retryable: ExceptionTypes = ()
) -> HandlerOutcome:
    """The outcome of an attempt that raised `exc`.

    Args:
        exc: What the handler raised.
        h: The handler, whose `retry_on` and `non_retryable` options apply.
        non_retryable: Further dead-lettering exceptions (the worker's own option).

    Returns:
        "retry" for RetryLater, "dead" for NonRetryable or a non-retryable type (or a type outside
        `retry_on`), "error" otherwise.
    """
    if isinstance(exc, RetryLater):
        delay = min(max(exc.delay, timedelta(0)), MAX_RETRY_DELAY)
        return HandlerOutcome("retry", retry_delay=delay, error=_describe(exc), exception=exc)
    dead = isinstance(exc, (NonRetryable, *h.non_retryable, *non_retryable))
    if h.retry_on is not None and not isinstance(exc, h.retry_on):
        dead = True
    return HandlerOutcome("dead" if dead else "error", error=_describe(exc), exception=exc)


def outcome_for_result(value: object) -> HandlerOutcome:
    """The outcome of an attempt that returned `value` (bytes or None acks; anything else fails).

    Args:
        value: What the handler returned.

    Returns:
        "ack" with the bytes, or "error" naming the wrong type.
    """
    if value is None:
        return HandlerOutcome("ack")
    if isinstance(value, bytes | bytearray | memoryview):
        return HandlerOutcome("ack", result=bytes(value))
    return HandlerOutcome(
        "error", error=f"TypeError: handler returned {type(value).__name__}, not bytes or None"
    )


async def _call(h: Handler, ctx: TaskContext, payload: bytes, executor: Executor | None) -> object:
    if h.is_async:
        func = cast("Callable[[TaskContext, bytes], Awaitable[bytes | None]]", h.func)
        return await func(ctx, payload)
    # Context variables (for example a trace span) follow the call into the thread.
    call = functools.partial(contextvars.copy_context().run, h.func, ctx, payload)
    return await asyncio.get_running_loop().run_in_executor(executor, call)


async def invoke(
    h: Handler,
    ctx: TaskContext,
    payload: bytes,
    *,
    executor: Executor | None = None,
    non_retryable: ExceptionTypes = (),
) -> HandlerOutcome:
    """Runs a handler once, within its timeout, and maps what happens to an outcome.

    Args:
        h: The handler.
        ctx: Its context.
        payload: The task's payload.
        executor: Where a sync handler runs; None: the loop's default executor.
        non_retryable: The worker's extra dead-lettering exceptions.

    Returns:
        The outcome. Never raises for what the handler does.

    Raises:
        asyncio.CancelledError: The task running `invoke` was cancelled.
    """
    limit_s = None if h.timeout is None else h.timeout.total_seconds()
    # No timeout context to build, enter and leave for every task of a handler without one.
    deadline = None if limit_s is None else asyncio.timeout(limit_s)
    try:
        if deadline is None:
            value = await _call(h, ctx, payload, executor)
        else:
            async with deadline:
                value = await _call(h, ctx, payload, executor)
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            ctx._cancel("worker shut down")
            raise
        return outcome_for_exception(exc, h, non_retryable)  # raised by the handler itself
    except Exception as exc:
        if deadline is not None and deadline.expired():
            ctx._cancel("timed out")
            return HandlerOutcome("error", error=f"timed out after {limit_s:g}s", exception=exc)
        return outcome_for_exception(exc, h, non_retryable)
    return outcome_for_result(value)
