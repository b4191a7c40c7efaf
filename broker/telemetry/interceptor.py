"""HandlerInterceptor: the base of the server interceptors that wrap a method's handler (RPC
metrics, RPC tracing)."""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeAlias, cast

import grpc

#: A method's handler, as grpc.aio hands it to an interceptor.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"  # subscriptable only in the stubs


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps each method's handler once: the generic handlers give the same handler object for
    every call of a method, so the wrapped one is cached rather than rebuilt per call."""

    def __init__(self) -> None:
        #: method -> (its handler, the wrapped handler)
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    @abc.abstractmethod
    def wrap(self, method: str, handler: Handler) -> Handler:
        """Returns the handler to use for `method` ("package.Service/Method")."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.lstrip("/")
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self.wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped


class CallStatus:
    """The status code a call ended with, as seen by an interceptor (see `ending_status`)."""

    __slots__ = ("code",)

    def __init__(self) -> None:
        self.code = grpc.StatusCode.UNKNOWN  # until the call ends one way or another


@contextlib.contextmanager
def ending_status(context: grpc.aio.ServicerContext[Any, Any]) -> Iterator[CallStatus]:
    """Records in the yielded CallStatus how the call inside the block ended: the code the
    handler set or aborted with (OK when none), CANCELLED, or UNKNOWN for a bug. Exceptions go
    on."""
    status = CallStatus()
    try:
        yield status
    except asyncio.CancelledError:
        status.code = grpc.StatusCode.CANCELLED
        raise
    except grpc.aio.AbortError:
        status.code = _final_code(context)
        raise
    else:
        status.code = _final_code(context)


def _final_code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    # None until a handler sets a code or aborts (the stubs do not say so).
    code = cast("grpc.StatusCode | None", context.code())
    return grpc.StatusCode.OK if code is None else code
