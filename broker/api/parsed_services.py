"""Health and reflection registered with requests parsed by us, as our own services are.

grpcio parses a request with the deserializer a generated `add_*_to_server` gives it, and answers
bytes that do not parse with UNKNOWN naming an internal class. Here each method's handler is taken
from that same generated function, its deserializer removed, and the parse done first, so
malformed bytes answer INVALID_ARGUMENT with our message, for every service the broker serves.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from broker.api.status import to_status

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context = grpc.aio.ServicerContext[Any, Any]
#: A method's implementation; grpcio's stubs type it for the synchronous server only.
Behaviour = Callable[..., Any]


class _Registrations:
    """Stands in for a server: keeps the method handlers a generated add_*_to_server gives it."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Handler]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """The generic handler wraps the same method handlers, kept below."""

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        self.services[service] = dict(handlers)


def _parser(handler: Handler) -> Callable[[bytes, Context], Any]:
    parse = handler.request_deserializer
    assert parse is not None
    # A generated deserializer is the request class's FromString.
    descriptor = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
    kind = descriptor.full_name if descriptor is not None else "request"

    async def parse_or_abort(raw: bytes, context: Context) -> Any:
        try:
            return parse(raw)
        except DecodeError:
            await context.abort_with_status(
                to_status(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"request is not a valid {kind}",
                    "MALFORMED_REQUEST",
                )
            )

    return parse_or_abort


def _streaming(behaviour: Behaviour, first: Behaviour) -> Behaviour:
    """`behaviour` called on what `first` makes of the request, keeping its kind: an async
    generator stays one (it yields responses), a coroutine function stays one (it writes them
    with context.write, as health's Watch does)."""
    if inspect.isasyncgenfunction(behaviour):

        async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
            async for response in behaviour(await first(request, context), context):
                yield response

        return generator

    async def coroutine(request: Any, context: Context) -> None:
        await behaviour(await first(request, context), context)

    return coroutine


def _parsed(handler: Handler) -> Handler:
    """The handler, taking raw bytes and parsing them first."""
    parse = _parser(handler)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        unary: Behaviour = handler.unary_unary

        async def unary_unary(raw: bytes, context: Context) -> Any:
            return await unary(await parse(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, response_serializer=serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _streaming(handler.unary_stream, parse), response_serializer=serialize
        )
    assert handler.stream_stream is not None, "no client-streaming-only method is wrapped"

    async def parse_each(raws: AsyncIterable[bytes], context: Context) -> AsyncIterator[Any]:
        async def requests() -> AsyncIterator[Any]:
            async for raw in raws:
                yield await parse(raw, context)

        return requests()

    return grpc.stream_stream_rpc_method_handler(
        _streaming(handler.stream_stream, parse_each), response_serializer=serialize
    )


#: Lets a call through, or aborts it (with UNAUTHENTICATED or PERMISSION_DENIED).
Gate: TypeAlias = Callable[[Context], Awaitable[None]]


def _gated(handler: Handler, gate: Gate) -> Handler:
    """The stream-stream handler, run only for calls the gate lets through.

    The first request is received (not parsed) before the gate may refuse the call: a client
    still sending it when the refusal arrives would otherwise see its own send fail (grpcio's
    request-iterator clients report INTERNAL) rather than the refusal."""
    assert handler.stream_stream is not None, "only reflection's stream-stream method is gated"
    behaviour: Behaviour = handler.stream_stream

    async def gated(requests: AsyncIterable[bytes], context: Context) -> AsyncIterator[Any]:
        raws = aiter(requests)
        try:
            first = [await anext(raws)]
        except StopAsyncIteration:
            first = []
        await gate(context)

        async def again() -> AsyncIterator[bytes]:
            for raw in first:
                yield raw
            async for raw in raws:
                yield raw

        async for response in behaviour(again(), context):
            yield response

    return grpc.stream_stream_rpc_method_handler(
        gated, response_serializer=handler.response_serializer
    )


def _generic(
    registrations: _Registrations, gates: Mapping[str, Gate]
) -> list[grpc.GenericRpcHandler]:
    generic = []
    for service, handlers in registrations.services.items():
        parsed = {name: _parsed(h) for name, h in handlers.items()}
        if service in gates:
            parsed = {name: _gated(h, gates[service]) for name, h in parsed.items()}
        generic.append(grpc.method_handlers_generic_handler(service, parsed))
    return generic


def health_and_reflection(
    servicer: health.aio.HealthServicer,
    reflected: tuple[str, ...] | None,
    reflection_gate: Gate | None = None,
) -> list[grpc.GenericRpcHandler]:
    """Handlers for grpc.health.v1.Health (served by `servicer`, open to every caller: probes
    carry no credentials) and server reflection (listing `reflected`; None: not served),
    with requests parsed by us; `reflection_gate` decides who may use reflection."""
    registrations = _Registrations()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, registrations)
    if reflected is not None:
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(reflected), registrations
        )
    gates = {reflection.SERVICE_NAME: reflection_gate} if reflection_gate is not None else {}
    return _generic(registrations, gates)
