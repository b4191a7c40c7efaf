"""Small builders for requests used across tests."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from taskbroker.v1 import broker_service_pb2 as bs
from taskbroker.v1 import task_pb2

if TYPE_CHECKING:
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub


def spec(
    queue: str = "emails", type_: str = "send", payload: bytes = b"{}", **fields: object
) -> task_pb2.TaskSpec:
    s = task_pb2.TaskSpec(queue=queue, type=type_, payload=payload)
    for name, value in fields.items():
        if isinstance(value, timedelta):
            d = duration_pb2.Duration()
            d.FromTimedelta(value)
            getattr(s, name).CopyFrom(d)
        elif hasattr(value, "DESCRIPTOR"):
            getattr(s, name).CopyFrom(value)
        elif name == "headers":
            s.headers.update(value)  # type: ignore[call-overload]
        elif isinstance(value, list):  # a repeated field
            getattr(s, name).extend(value)
        else:
            setattr(s, name, value)
    return s


async def enqueue(stub: BrokerServiceAsyncStub, *specs: task_pb2.TaskSpec) -> list[str]:
    response = await stub.Enqueue(bs.EnqueueRequest(tasks=list(specs)))
    return [r.task_id for r in response.results]


async def get(stub: BrokerServiceAsyncStub, task_id: str) -> task_pb2.Task:
    return (await stub.GetTask(bs.GetTaskRequest(task_id=task_id))).task


def error_reason(error: grpc.aio.AioRpcError) -> str:
    """The ErrorInfo reason carried in the status details (AIP-193)."""
    status = rpc_status.from_call(error)
    assert status is not None, "no rich status details"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return str(info.reason)
    raise AssertionError("no ErrorInfo in status details")
