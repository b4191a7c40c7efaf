"""RpcMetrics: the gRPC server interceptor that times every RPC by method and status code, for
the Prometheus collector (broker/web/metrics.py)."""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from broker.telemetry.interceptor import CallStatus, Handler, HandlerInterceptor, ending_status
from broker.timings import RPC_BUCKETS, Buckets


class RpcMetrics(HandlerInterceptor):
    """Times every RPC by method and final status code; for the Lease stream, its lifetime.

    Unknown methods are passed through untimed, so a client cannot grow the label set.
    """

    def __init__(self) -> None:
        super().__init__()
        self.durations: dict[tuple[str, str], Buckets] = {}

    def _observe(self, method: str, code: str, started: float) -> None:
        key = (method, code)
        buckets = self.durations.get(key)
        if buckets is None:
            buckets = self.durations[key] = Buckets(RPC_BUCKETS)
        buckets.observe(time.perf_counter() - started)

    def wrap(self, method: str, handler: Handler) -> Handler:
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            wrapped = self._wrap(method, handler.unary_unary)
            return grpc.unary_unary_rpc_method_handler(wrapped, **serializers)
        if handler.unary_stream is not None:
            wrapped = self._wrap(method, handler.unary_stream)
            return grpc.unary_stream_rpc_method_handler(wrapped, **serializers)
        if handler.stream_unary is not None:
            wrapped = self._wrap(method, handler.stream_unary)
            return grpc.stream_unary_rpc_method_handler(wrapped, **serializers)
        if handler.stream_stream is not None:
            wrapped = self._wrap(method, handler.stream_stream)
            return grpc.stream_stream_rpc_method_handler(wrapped, **serializers)
        return handler

    def _wrap(self, method: str, behavior: Callable[..., Any]) -> Any:
        """The behavior, timed: a coroutine function (unary responses, and streams written
        through the context, as Lease is) or an async generator (streams that yield)."""
        observe = self._observe

        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started = time.perf_counter()
                status = CallStatus()
                try:
                    with ending_status(context) as status:
                        responses: AsyncIterator[Any] = behavior(request, context)
                        async for response in responses:
                            yield response
                finally:
                    observe(method, status.code.name, started)

            return stream

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = time.perf_counter()
            status = CallStatus()
            try:
                with ending_status(context) as status:
                    return await behavior(request, context)
            finally:
                observe(method, status.code.name, started)

        return call
