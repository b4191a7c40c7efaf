"""The SDK's exceptions: what a broker error means to user code, and the handler outcomes."""

from __future__ import annotations

from datetime import timedelta

import grpc


class TaskbrokerError(Exception):
    """A call to the broker failed. `code` is the gRPC status; `reason` its ErrorInfo reason."""

    def __init__(self, message: str, code: grpc.StatusCode, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class InvalidArgumentError(TaskbrokerError):
    """The request was malformed; the message names the field."""


class TaskNotFoundError(TaskbrokerError):
    """No such task (never existed, or trimmed after its retention)."""


class LeaseStaleError(TaskbrokerError):
    """The lease is no longer current: the settlement was refused (the task may run again)."""


class FailedPreconditionError(TaskbrokerError):
    """The task is not in a state that allows the operation (for example already finished)."""


class AlreadyExistsError(TaskbrokerError):
    """An idempotency key was reused for a different task, or a schedule's name is taken."""


class ScheduleNotFoundError(TaskbrokerError):
    """No schedule has this name (never created, or deleted)."""


class UnauthenticatedError(TaskbrokerError):
    """The broker requires credentials and the call had none it knows (a token or a client
    certificate named in its policy)."""


class PermissionDeniedError(TaskbrokerError):
    """The caller's principal lacks the role the call needs on a queue (the message names
    both), or presented a lease another principal holds; nothing was done."""


class UnavailableError(TaskbrokerError):
    """The broker or its Redis is unreachable; the call may be retried."""


class RetryLater(Exception):  # a handler outcome, not an error (hence no Error suffix)
    """Raised by a handler: retry this task after `delay` instead of the broker's backoff."""

    def __init__(self, delay: timedelta, message: str = "retry requested") -> None:
        super().__init__(message)
        self.delay = delay


class NonRetryable(Exception):
    """Raised by a handler: the task can never succeed; dead-letter it without more attempts."""
