"""OpenTelemetry tracing for producers and workers: `send` and `process` spans (messaging
semantic conventions) and W3C trace context carried in task headers.

The SDK uses the OpenTelemetry API only and never configures a tracer provider: the application
does (docs/observability.md, "Tracing"). While none is configured nothing is recorded or
injected: a worker checks once when it starts running (then one attribute test per task), a
producer once per call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import (
    INVALID_SPAN,
    Link,
    NoOpTracer,
    NoOpTracerProvider,
    ProxyTracerProvider,
    SpanKind,
    Status,
    StatusCode,
)

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer, TracerProvider
    from opentelemetry.util.types import AttributeValue

    from taskbroker._handler import HandlerOutcome, TaskContext

#: How a worker's `process` span relates to the producer's `send` span: "child" continues the
#: producer's trace (the default), "link" starts a new trace that links to it.
TraceParent: TypeAlias = Literal["child", "link"]
TRACE_PARENTS: Final = ("child", "link")

#: The instrumentation scope, and `messaging.system` (semantic conventions: a custom system).
TRACER_NAME: Final = "taskbroker"
SYSTEM: Final = "taskbroker"
#: The W3C Trace Context header; a task whose headers already carry one keeps its headers.
TRACEPARENT: Final = "traceparent"
#: The broker's limits on task headers (TaskSpec.headers in task.proto).
MAX_HEADERS: Final = 64
MAX_HEADER_VALUE_BYTES: Final = 4096

# Messaging semantic conventions (https://opentelemetry.io/docs/specs/semconv/messaging/).
MESSAGING_SYSTEM: Final = "messaging.system"
MESSAGING_OPERATION_TYPE: Final = "messaging.operation.type"
MESSAGING_OPERATION_NAME: Final = "messaging.operation.name"
MESSAGING_DESTINATION_NAME: Final = "messaging.destination.name"
MESSAGING_MESSAGE_ID: Final = "messaging.message.id"
MESSAGING_BATCH_MESSAGE_COUNT: Final = "messaging.batch.message_count"
MESSAGING_CLIENT_ID: Final = "messaging.client.id"
ERROR_TYPE: Final = "error.type"
# Our own, under the system's namespace as the conventions ask.
TASKBROKER_ATTEMPT: Final = "messaging.taskbroker.attempt"
TASKBROKER_TASK_TYPE: Final = "messaging.taskbroker.task_type"
TASKBROKER_OUTCOME: Final = "messaging.taskbroker.outcome"


def _version() -> str | None:
    try:
        return metadata.version("taskbroker")
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        return None


class Tracing:
    """The tracer of a client or a worker, or None while tracing is off.

    Without an explicit provider it follows the global one, looked up on every use, so a
    provider the application sets after creating the client is still picked up. The tracer is
    made once per provider.

    Args:
        provider: A tracer provider to use instead of the global one.
    """

    __slots__ = ("_explicit", "_provider", "_tracer")

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._explicit = provider
        self._provider: TracerProvider | None = None
        self._tracer: Tracer | None = None

    @property
    def provider(self) -> TracerProvider | None:
        """The explicit provider, None when following the global one."""
        return self._explicit

    def tracer(self) -> Tracer | None:
        """The tracer to use now; None when no provider is configured (nothing to record)."""
        provider = self._explicit if self._explicit is not None else trace.get_tracer_provider()
        if provider is not self._provider:
            tracer = None
            # The proxy stands in until the application sets a provider; spans it makes are
            # non-recording, so skip the work altogether.
            if not isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider)):
                tracer = provider.get_tracer(TRACER_NAME, _version())
                if isinstance(tracer, NoOpTracer):  # for example OTEL_SDK_DISABLED=true
                    tracer = None
            self._provider, self._tracer = provider, tracer
        return self._tracer


# --- producer -------------------------------------------------------------------------------


def start_send(tracer: Tracer, queues: Sequence[str]) -> Span:
    """Starts the PRODUCER span of one `enqueue` or `enqueue_many` call (a batch is one span,
    which every task of it points at: the conventions' batch send without per-message spans).

    Args:
        tracer: The tracer.
        queues: Each task's queue, in order.

    Returns:
        The span, not yet current.
    """
    attributes: dict[str, AttributeValue] = {
        MESSAGING_SYSTEM: SYSTEM,
        MESSAGING_OPERATION_TYPE: "send",
        MESSAGING_OPERATION_NAME: "send",
    }
    first = queues[0]
    name = "send"
    # A call that spans queues has no single destination: the conventions then leave it out.
    if all(q == first for q in queues):
        name = f"send {first}"
        attributes[MESSAGING_DESTINATION_NAME] = first
    if len(queues) != 1:  # the conventions set the count only on batches
        attributes[MESSAGING_BATCH_MESSAGE_COUNT] = len(queues)
    return tracer.start_span(name, kind=SpanKind.PRODUCER, attributes=attributes)


def trace_headers(span: Span) -> dict[str, str]:
    """The headers that carry `span`'s context (traceparent, tracestate, baggage: whatever the
    global propagator writes), for tasks and for the Enqueue call's gRPC metadata."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


def current_trace_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current context as gRPC metadata (so the broker's RPC spans join the caller's
    trace), or None when there is nothing to send."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items()) or None


@contextmanager
def use_span(span: Span) -> Iterator[None]:
    """Makes `span` current; unlike `trace.use_span` it leaves errors to `end_span`."""
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)


def add_trace_headers(headers: MutableMapping[str, str], carrier: Mapping[str, str]) -> None:
    """Adds the trace headers to a task's, unless the caller set a traceparent of their own:
    then the task keeps the headers it was given. Within the broker's header limits only: a
    trace is not worth refusing the task for."""
    if TRACEPARENT in headers:
        return
    for key, value in carrier.items():
        if len(headers) >= MAX_HEADERS:
            return
        if key not in headers and len(value.encode()) <= MAX_HEADER_VALUE_BYTES:
            headers[key] = value


def end_span(span: Span, error: BaseException | None) -> None:
    """Ends a span, as ERROR with the exception recorded when there is one."""
    if error is not None:
        span.record_exception(error)
        span.set_attribute(ERROR_TYPE, type(error).__qualname__)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


# --- worker ---------------------------------------------------------------------------------


def start_process(
    tracer: Tracer, ctx: TaskContext, worker_id: str, parent: TraceParent
) -> tuple[Span, Context]:
    """Starts the CONSUMER span of one attempt, from the trace context in the task's headers.

    Args:
        tracer: The tracer.
        ctx: The attempt's context (ids, queue, type, attempt, headers).
        worker_id: The worker's id, as `messaging.client.id`.
        parent: "child": the producer's span is the parent; "link": a new trace. Either way
            the span links to the producer's span.

    Returns:
        The span, and the context to make current while the handler runs (the span in the
        extracted context, so baggage from the producer stays visible).
    """
    # A fresh base context: the worker's own ambient context (the stream reader's) is no parent.
    extracted = propagate.extract(ctx.headers, context=otel_context.Context())
    producer = trace.get_current_span(extracted).get_span_context()
    links = [Link(producer)] if producer.is_valid else None
    if parent == "link":
        extracted = trace.set_span_in_context(INVALID_SPAN, extracted)
    span = tracer.start_span(
        f"process {ctx.queue}",
        context=extracted,
        kind=SpanKind.CONSUMER,
        links=links,
        attributes={
            MESSAGING_SYSTEM: SYSTEM,
            MESSAGING_OPERATION_TYPE: "process",
            MESSAGING_OPERATION_NAME: "process",
            MESSAGING_DESTINATION_NAME: ctx.queue,
            MESSAGING_MESSAGE_ID: ctx.task_id,
            MESSAGING_CLIENT_ID: worker_id,
            TASKBROKER_ATTEMPT: ctx.attempt,
            TASKBROKER_TASK_TYPE: ctx.type,
        },
    )
    return span, trace.set_span_in_context(span, extracted)


def end_process(span: Span, outcome: HandlerOutcome | None) -> None:
    """Ends an attempt's span: ERROR unless the handler's outcome is an ack.

    Args:
        span: The attempt's span.
        outcome: What the attempt came to; None when it was cancelled (worker shutdown).
    """
    if outcome is None:
        span.set_attribute(ERROR_TYPE, "cancelled")
        span.set_status(Status(StatusCode.ERROR, "cancelled"))
    else:
        span.set_attribute(TASKBROKER_OUTCOME, outcome.kind)
        if outcome.kind != "ack":
            # RetryLater counts too: the attempt did not complete, as the task's errors say.
            exc = outcome.exception
            if exc is not None:
                span.record_exception(exc)
            span.set_attribute(ERROR_TYPE, "_OTHER" if exc is None else type(exc).__qualname__)
            span.set_status(Status(StatusCode.ERROR, outcome.error))
    span.end()
