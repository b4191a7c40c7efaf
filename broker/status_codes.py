"""Which gRPC status code each BrokerError is: one table, for the gRPC API and the HTTP API
alike (the HTTP API answers with the same code's name and an HTTP status derived from it)."""

from __future__ import annotations

from typing import Final

import grpc

from broker import errors

STATUS_BY_ERROR: Final[dict[type[errors.BrokerError], grpc.StatusCode]] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.TaskNotFound: grpc.StatusCode.NOT_FOUND,
    errors.LeaseStale: grpc.StatusCode.FAILED_PRECONDITION,
    errors.TaskFinished: grpc.StatusCode.FAILED_PRECONDITION,
    errors.IdempotencyConflict: grpc.StatusCode.ALREADY_EXISTS,
    errors.ScheduleNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ScheduleExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.StoreUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Draining: grpc.StatusCode.UNAVAILABLE,
}


def code_for(error: errors.BrokerError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return grpc.StatusCode.INTERNAL
