"""OpenTelemetry tracing for the broker: a server span per unary RPC, and the OTLP exporter set
up from the standard OTEL_* environment variables.

Only the RPC itself is described (its method and status code): no request or response field,
no metadata other than the incoming trace context, ever goes into a span. The Lease stream is
not traced: it lives as long as a worker does; deliveries carry the producer's trace context in
the task headers (unchanged by the broker) and the SDK worker traces each attempt.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final

import grpc
from opentelemetry import propagate
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode

from broker.telemetry.interceptor import CallStatus, Handler, HandlerInterceptor, ending_status

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.trace import TracerProvider

log = logging.getLogger(__name__)

#: Methods of these services are traced; health checks (polled by load balancers every few
#: seconds) and reflection are not, and an unknown method cannot make up span names.
TRACED_SERVICES: Final = (
    "taskbroker.v1.BrokerService",
    "taskbroker.v1.AdminService",
    "taskbroker.v1.ScheduleService",
)
#: The only exporter protocol we ship (opentelemetry-exporter-otlp-proto-http).
OTLP_PROTOCOL: Final = "http/protobuf"
#: service.name when neither OTEL_SERVICE_NAME nor OTEL_RESOURCE_ATTRIBUTES names one.
DEFAULT_SERVICE_NAME: Final = "taskbroker-broker"
#: Codes that are the server's fault, so its span is an error (semantic conventions for gRPC
#: server spans); the others are the client's and leave the status unset.
SERVER_ERROR_CODES: Final = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)

_Metadata = Iterable[tuple[str, str | bytes]]
_Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class _MetadataGetter(Getter[_Metadata]):
    """Reads text values from gRPC invocation metadata (key/value pairs; keys are lowercase)."""

    def get(self, carrier: _Metadata, key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    def keys(self, carrier: _Metadata) -> list[str]:
        return [k for k, _ in carrier]


_GETTER: Final = _MetadataGetter()


def tracer_provider_from_env() -> SdkTracerProvider | None:
    """An SDK tracer provider exporting over OTLP/HTTP, when the OTEL_* environment asks for one.

    Export is on when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set,
    unless OTEL_TRACES_EXPORTER is "none" (or names no "otlp") or OTEL_SDK_DISABLED is true.
    Everything else (headers, timeout, compression, sampler, batching, resource) is read by the
    OpenTelemetry SDK from its own variables.

    Returns:
        The provider (the caller shuts it down), or None: tracing stays off.
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if not (
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return None
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")}
    if "otlp" not in exporters:
        if exporters - {"none", ""}:
            log.warning("OTEL_TRACES_EXPORTER: only otlp is supported; tracing stays off")
        return None
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or OTLP_PROTOCOL
    )
    if protocol.strip().lower() != OTLP_PROTOCOL:
        log.error(
            "OTLP protocol %r is not supported (only %s); tracing stays off",
            protocol,
            OTLP_PROTOCOL,
        )
        return None
    # Imported here: a broker without export never loads the exporter (and requests).
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = SdkTracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("tracing: exporting spans over OTLP/HTTP (OTEL_EXPORTER_OTLP_* settings)")
    return provider


async def shutdown_provider(provider: SdkTracerProvider) -> None:
    """Flushes and stops a provider made by `tracer_provider_from_env`, off the event loop (the
    last export may take up to the exporter's timeout)."""
    await asyncio.to_thread(provider.shutdown)


class RpcTracing(HandlerInterceptor):
    """A SERVER span per unary RPC of our services, named `<service>/<method>`, with `rpc.system`,
    `rpc.service`, `rpc.method` and `rpc.grpc.status_code`; its parent is the trace context in
    the request metadata (traceparent), when there is one.

    Args:
        tracer_provider: Where the spans go.
    """

    def __init__(self, tracer_provider: TracerProvider) -> None:
        super().__init__()
        self._tracer = tracer_provider.get_tracer("taskbroker.broker")

    def wrap(self, method: str, handler: Handler) -> Handler:
        service, _, name = method.partition("/")
        if service not in TRACED_SERVICES:
            return handler
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        # Our unary methods are served as client-streaming ones (api/server.py reads the
        # request itself), so both kinds carry a span.
        if handler.unary_unary is not None:
            wrapped = self._wrap(service, name, handler.unary_unary)
            return grpc.unary_unary_rpc_method_handler(wrapped, **serializers)
        if handler.stream_unary is not None:
            wrapped = self._wrap(service, name, handler.stream_unary)
            return grpc.stream_unary_rpc_method_handler(wrapped, **serializers)
        return handler

    def _wrap(self, service: str, name: str, behavior: Callable[..., Any]) -> _Behavior:
        tracer = self._tracer
        span_name = f"{service}/{name}"
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}

        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            parent = propagate.extract(context.invocation_metadata() or (), getter=_GETTER)
            with tracer.start_as_current_span(
                span_name,
                context=parent,
                kind=SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                status = CallStatus()
                try:
                    with ending_status(context) as status:
                        return await behavior(request, context)
                except Exception as exc:  # our handlers map every error; this is a bug
                    span.record_exception(exc)
                    raise
                finally:
                    code = status.code
                    span.set_attribute("rpc.grpc.status_code", code.value[0])
                    if code in SERVER_ERROR_CODES:
                        span.set_status(Status(StatusCode.ERROR, code.name))

        return call
