"""BrokerError → gRPC status, one table, with an AIP-193 ErrorInfo on every error."""

from __future__ import annotations

from typing import Final

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker import errors

DOMAIN: Final = "taskbroker.v1"

STATUS_BY_ERROR: Final[dict[type[errors.BrokerError], grpc.StatusCode]] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.TaskNotFound: grpc.StatusCode.NOT_FOUND,
    errors.LeaseStale: grpc.StatusCode.FAILED_PRECONDITION,
    errors.TaskFinished: grpc.StatusCode.FAILED_PRECONDITION,
    errors.IdempotencyConflict: grpc.StatusCode.ALREADY_EXISTS,
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


def to_status(code: grpc.StatusCode, message: str, reason: str, field: str = "") -> grpc.Status:
    """A rich status: the code, a message a human can act on, and ErrorInfo (plus BadRequest
    naming the field for INVALID_ARGUMENT)."""
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    details.append(info)
    if field:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
                ]
            )
        )
        details.append(bad)
    status = status_pb2.Status(code=code.value[0], message=message, details=details)
    rich: grpc.Status = rpc_status.to_status(status)
    return rich


def error_status(error: errors.BrokerError) -> grpc.Status:
    field = error.field if isinstance(error, errors.InvalidArgument) else ""
    return to_status(code_for(error), str(error), error.reason, field)
