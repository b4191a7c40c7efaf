"""BrokerError → gRPC status (the code from broker/status_codes.py), with an AIP-193 ErrorInfo on
every error."""

from __future__ import annotations

import math
from typing import Final

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from broker import errors
from broker.status_codes import code_for

DOMAIN: Final = "taskbroker.v1"


def to_status(
    code: grpc.StatusCode,
    message: str,
    reason: str,
    field: str = "",
    retry_after_s: float | None = None,
) -> grpc.Status:
    """A rich status: the code, a message a human can act on, and ErrorInfo (plus BadRequest
    naming the field for INVALID_ARGUMENT, and RetryInfo saying when a retry may succeed)."""
    details = []
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN))
    details.append(info)
    if retry_after_s is not None:
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(1, math.ceil(retry_after_s * 1000)))
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
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
    retry_after_s = error.retry_after_s if isinstance(error, errors.RateLimited) else None
    return to_status(code_for(error), str(error), error.reason, field, retry_after_s)
