"""gRPC status → SDK exception: one table, refined by the AIP-193 ErrorInfo reason."""

from __future__ import annotations

from typing import Final

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from taskbroker._errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    LeaseStaleError,
    PermissionDeniedError,
    ScheduleNotFoundError,
    TaskbrokerError,
    TaskNotFoundError,
    UnauthenticatedError,
    UnavailableError,
)

#: The ErrorInfo reason the broker gives a settlement refused for a stale lease.
LEASE_STALE_REASON: Final = "LEASE_STALE"
#: ErrorInfo reasons that pick a narrower class than the status code's.
ERROR_BY_REASON: Final[dict[tuple[grpc.StatusCode, str], type[TaskbrokerError]]] = {
    (grpc.StatusCode.FAILED_PRECONDITION, LEASE_STALE_REASON): LeaseStaleError,
    (grpc.StatusCode.NOT_FOUND, "SCHEDULE_NOT_FOUND"): ScheduleNotFoundError,
}

ERROR_BY_CODE: Final[dict[grpc.StatusCode, type[TaskbrokerError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: TaskNotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    # The call may or may not have been applied; like UNAVAILABLE it is worth retrying.
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
}


def _code_of(err: grpc.RpcError) -> grpc.StatusCode:
    # grpc.RpcError itself declares no accessors; the errors grpc raises are also grpc.Call.
    code = err.code() if isinstance(err, grpc.Call | grpc.aio.AioRpcError) else None
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _details_of(err: grpc.RpcError) -> str:
    details = err.details() if isinstance(err, grpc.Call | grpc.aio.AioRpcError) else None
    return details or ""


def _details(err: grpc.RpcError) -> list[any_pb2.Any]:
    """The rich status details of a failed call (none when it carries none)."""
    if not isinstance(err, grpc.Call | grpc.aio.AioRpcError):
        return []
    try:
        status = rpc_status.from_call(err)
    except ValueError:  # details that contradict the status code or message: ignore them
        return []
    return [] if status is None else list(status.details)


def error_reason(err: grpc.RpcError) -> str:
    """The ErrorInfo reason carried in the rich status details, or "" when there is none."""
    for detail in _details(err):
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    return ""


def throttled_for_s(err: grpc.RpcError) -> float | None:
    """For RESOURCE_EXHAUSTED with RetryInfo (the broker refused the call, before doing
    anything, because its client is over a rate): seconds until a retry may succeed. Else None."""
    if _code_of(err) is not grpc.StatusCode.RESOURCE_EXHAUSTED:
        return None
    for detail in _details(err):
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


def error_from_rpc(err: grpc.aio.AioRpcError | grpc.RpcError) -> TaskbrokerError:
    """The SDK exception for a failed gRPC call.

    Args:
        err: The error grpc raised (from grpc.aio or the synchronous API).

    Returns:
        An instance of the `TaskbrokerError` subclass for the status code, or for the code and
        its ErrorInfo reason (ERROR_BY_REASON: a stale lease, a missing schedule), carrying the
        status message, the code and the reason. Codes without a dedicated class give
        `TaskbrokerError` itself.
    """
    code = _code_of(err)
    reason = error_reason(err)
    cls = ERROR_BY_REASON.get((code, reason)) or ERROR_BY_CODE.get(code, TaskbrokerError)
    message = _details_of(err) or code.name.lower().replace("_", " ")
    return cls(message, code, reason)
