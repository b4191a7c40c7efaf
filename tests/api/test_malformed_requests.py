"""Bytes that do not parse, sent to the health and reflection services, answer INVALID_ARGUMENT
with our message (as our own services do), and well-formed calls still work."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.conftest import RunningBroker
from tests.support.tasks import error_reason

GARBAGE = b"\xff\xff\xff\xff\x0f"


def _assert_ours(err: grpc.aio.AioRpcError, message_type: str) -> None:
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
    assert err.details() == f"request is not a valid {message_type}"
    assert error_reason(err) == "MALFORMED_REQUEST"


@pytest.mark.parametrize(
    ("method", "message_type"),
    [
        ("/grpc.health.v1.Health/Check", "grpc.health.v1.HealthCheckRequest"),
        ("/grpc.health.v1.Health/List", "grpc.health.v1.HealthListRequest"),
    ],
)
async def test_malformed_unary_health_calls_are_invalid_argument(
    running: RunningBroker, method: str, message_type: str
) -> None:
    call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = running.channel.unary_unary(method)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(GARBAGE, timeout=5)
    _assert_ours(err.value, message_type)


async def test_a_malformed_health_watch_is_invalid_argument(running: RunningBroker) -> None:
    method = "/grpc.health.v1.Health/Watch"
    call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = running.channel.unary_stream(method)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in call(GARBAGE, timeout=5):
            pass
    _assert_ours(err.value, "grpc.health.v1.HealthCheckRequest")


async def test_a_malformed_reflection_request_is_invalid_argument(running: RunningBroker) -> None:
    method = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    stream: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = running.channel.stream_stream(method)
    call = stream(timeout=5)
    await call.write(GARBAGE)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call.read()
    _assert_ours(err.value, "grpc.reflection.v1alpha.ServerReflectionRequest")


async def test_health_watch_and_reflection_still_answer_well_formed_calls(
    running: RunningBroker,
) -> None:
    health = health_pb2_grpc.HealthStub(running.channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service="liveness"))
    first = await asyncio.wait_for(watch.read(), 5)
    assert isinstance(first, health_pb2.HealthCheckResponse)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()

    reflect = reflection_pb2_grpc.ServerReflectionStub(running.channel)
    call = reflect.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    answer = await asyncio.wait_for(call.read(), 5)
    assert isinstance(answer, reflection_pb2.ServerReflectionResponse)
    names = {s.name for s in answer.list_services_response.service}
    assert "taskbroker.v1.BrokerService" in names
    await call.done_writing()
