"""OpenTelemetry tracing end to end: producer `send` spans, worker `process` spans across a
retry, broker RPC spans, trace context in task headers, and that no payload or header value
leaks into spans, logs or metrics.

Each test passes its own SDK tracer provider (with an in-memory exporter) to the Client and the
Broker, and the Worker inherits the client's: the global provider, which OpenTelemetry lets a
process set only once, is never touched.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta

import aiohttp
import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2
from opentelemetry import baggage, trace
from opentelemetry import context as otel_context
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from broker.app import Broker
from broker.config import Settings
from broker.telemetry.tracing import tracer_provider_from_env
from taskbroker import Client, NewTask, TaskContext, TaskState, Worker, handler
from taskbroker.v1 import broker_service_pb2
from tests.conftest import RunningBroker

QUICK_RETRY = timedelta(milliseconds=20)
#: A valid W3C traceparent a caller might set itself (trace id ...0af7, parent id ...b7ad).
CALLER_TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@dataclass
class Traced:
    broker: RunningBroker
    client: Client
    exporter: InMemorySpanExporter
    provider: TracerProvider

    def spans(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        (span,) = self.spans(name)
        return span


@pytest.fixture
def provider() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
async def traced(
    settings: Settings, provider: tuple[TracerProvider, InMemorySpanExporter]
) -> AsyncIterator[Traced]:
    tracer_provider, exporter = provider
    broker = Broker(settings, tracer_provider=tracer_provider)
    await broker.start()
    await broker.wake_listener.connected.wait()
    running = RunningBroker(broker)
    async with Client(running.target, tracer_provider=tracer_provider) as client:
        yield Traced(running, client, exporter, tracer_provider)
    await running.close()


def new_worker(client: Client, *handlers: object, **options: object) -> Worker:
    return Worker(
        client,
        queues=["jobs"],
        handlers=handlers,  # type: ignore[arg-type]
        worker_id="trace-worker",
        shutdown_grace=timedelta(seconds=2),
        **options,  # type: ignore[arg-type]
    )


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def trace_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.trace_id)


def attempt_of(span: ReadableSpan) -> int:
    value = (span.attributes or {})["messaging.taskbroker.attempt"]
    assert isinstance(value, int)
    return value


def traceparent_of(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"00-{trace_id(span):032x}-{span_id(span):016x}-{span.context.trace_flags:02x}"


# --- producer -> worker ---------------------------------------------------------------------


async def test_a_retried_task_gives_one_send_span_and_a_child_process_span_per_attempt(
    traced: Traced,
) -> None:
    @handler("flaky")
    async def flaky(ctx: TaskContext, payload: bytes) -> bytes:
        if ctx.attempt == 1:
            raise ConnectionError("smtp down")
        return b"sent"

    task_id = await traced.client.enqueue(
        "jobs", "flaky", initial_backoff=QUICK_RETRY, max_backoff=QUICK_RETRY
    )
    async with new_worker(traced.client, flaky):
        task = await traced.client.wait(task_id, timeout=5)
    assert (task.state, task.attempt) == (TaskState.SUCCEEDED, 2)

    send = traced.one("send jobs")
    assert send.kind is SpanKind.PRODUCER
    assert dict(send.attributes or {}) == {
        "messaging.system": "taskbroker",
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": "jobs",
        "messaging.message.id": task_id,
    }
    first, second = sorted(traced.spans("process jobs"), key=attempt_of)
    for attempt, span in enumerate((first, second), start=1):
        assert span.kind is SpanKind.CONSUMER
        assert trace_id(span) == trace_id(send)
        assert span.parent is not None and span.parent.span_id == span_id(send)
        assert [link.context.span_id for link in span.links] == [span_id(send)]
        assert {
            k: v
            for k, v in (span.attributes or {}).items()
            if k != "error.type" and k != "messaging.taskbroker.outcome"
        } == {
            "messaging.system": "taskbroker",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": "jobs",
            "messaging.message.id": task_id,
            "messaging.client.id": "trace-worker",
            "messaging.taskbroker.attempt": attempt,
            "messaging.taskbroker.task_type": "flaky",
        }
    assert first.status.status_code is StatusCode.ERROR
    assert first.status.description == "ConnectionError: smtp down"
    assert (first.attributes or {})["error.type"] == "ConnectionError"
    assert (first.attributes or {})["messaging.taskbroker.outcome"] == "error"
    (event,) = first.events
    assert event.name == "exception"
    assert (event.attributes or {})["exception.type"] == "ConnectionError"
    assert second.status.status_code is StatusCode.UNSET
    assert (second.attributes or {})["messaging.taskbroker.outcome"] == "ack"
    assert not second.events

    # The broker's Enqueue span is a child of the send span (trace context in gRPC metadata).
    enqueue = traced.one("taskbroker.v1.BrokerService/Enqueue")
    assert enqueue.parent is not None and enqueue.parent.span_id == span_id(send)


async def test_user_spans_nest_under_the_process_span_in_sync_and_async_handlers(
    traced: Traced,
) -> None:
    tracer = traced.provider.get_tracer("tests")

    @handler("in_thread")
    def in_thread(ctx: TaskContext, payload: bytes) -> None:
        with tracer.start_as_current_span("sync work"):
            pass

    @handler("on_loop")
    async def on_loop(ctx: TaskContext, payload: bytes) -> None:
        with tracer.start_as_current_span("async work"):
            pass

    await traced.client.enqueue("jobs", "in_thread")
    await traced.client.enqueue("jobs", "on_loop")
    assert await new_worker(traced.client, in_thread, on_loop).run_until_idle() == 2

    process = {
        (s.attributes or {})["messaging.taskbroker.task_type"]: s
        for s in traced.spans("process jobs")
    }
    sync_work, async_work = traced.one("sync work"), traced.one("async work")
    assert sync_work.parent is not None and sync_work.parent.span_id == span_id(
        process["in_thread"]
    )
    assert async_work.parent is not None and async_work.parent.span_id == span_id(
        process["on_loop"]
    )


async def test_link_mode_starts_a_new_trace_linked_to_the_producer(traced: Traced) -> None:
    @handler("job")
    async def job(ctx: TaskContext, payload: bytes) -> None:
        pass

    await traced.client.enqueue("jobs", "job")
    assert await new_worker(traced.client, job, trace_parent="link").run_until_idle() == 1

    send, process = traced.one("send jobs"), traced.one("process jobs")
    assert process.parent is None
    assert trace_id(process) != trace_id(send)
    assert [link.context.span_id for link in process.links] == [span_id(send)]


def test_an_unknown_trace_parent_mode_is_refused() -> None:
    client = Client("127.0.0.1:1")
    with pytest.raises(ValueError, match="trace_parent"):
        Worker(client, queues=["jobs"], handlers=[], trace_parent="sibling")  # type: ignore[arg-type]


async def test_enqueue_many_is_one_batch_send_span_that_every_task_points_at(
    traced: Traced,
) -> None:
    seen: dict[str, str] = {}

    @handler("job")
    async def job(ctx: TaskContext, payload: bytes) -> None:
        seen[ctx.task_id] = ctx.headers["traceparent"]

    results = await traced.client.enqueue_many(NewTask("jobs", "job") for _ in range(3))
    await traced.client.enqueue_many([NewTask("jobs", "job"), NewTask("other", "job")])
    assert await new_worker(traced.client, job).run_until_idle() == 4  # "other" waits

    batch = traced.one("send jobs")
    assert (batch.attributes or {})["messaging.batch.message_count"] == 3
    assert "messaging.message.id" not in (batch.attributes or {})
    assert {seen[r.task_id] for r in results} == {traceparent_of(batch)}
    mixed = traced.one("send")  # two queues: no single destination
    assert "messaging.destination.name" not in (mixed.attributes or {})
    assert (mixed.attributes or {})["messaging.batch.message_count"] == 2


async def test_a_traceparent_set_by_the_caller_is_kept_and_headers_reach_the_worker_unchanged(
    traced: Traced,
) -> None:
    headers = {"traceparent": CALLER_TRACEPARENT, "tracestate": "vendor=1", "tenant": "acme"}
    seen: list[dict[str, str]] = []

    @handler("job")
    async def job(ctx: TaskContext, payload: bytes) -> None:
        seen.append(dict(ctx.headers))

    task_id = await traced.client.enqueue("jobs", "job", headers=headers)
    injected_id = await traced.client.enqueue("jobs", "job", headers={"tenant": "acme"})
    assert await new_worker(traced.client, job).run_until_idle() == 2

    # The broker stores and delivers headers exactly as enqueued.
    assert (await traced.client.get_task(task_id)).headers == headers
    assert seen[0] == headers
    process = traced.spans("process jobs")[0]
    assert f"{trace_id(process):032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert process.parent is not None and f"{process.parent.span_id:016x}" == "b7ad6b7169203331"

    sends = traced.spans("send jobs")
    injected = {"tenant": "acme", "traceparent": traceparent_of(sends[1])}
    assert (await traced.client.get_task(injected_id)).headers == injected
    assert seen[1] == injected


async def test_trace_headers_never_push_a_task_over_the_header_limits(traced: Traced) -> None:
    full = {f"h{i}": "v" for i in range(64)}  # the broker's limit
    task_id = await traced.client.enqueue("jobs", "job", headers=full)
    assert (await traced.client.get_task(task_id)).headers == full

    # A 6 KB baggage header would be refused (4 KiB per value): it is left out, not the task.
    big = baggage.set_baggage("b", "v" * 3000, baggage.set_baggage("a", "v" * 3000))
    token = otel_context.attach(big)
    try:
        task_id = await traced.client.enqueue("jobs", "job")
    finally:
        otel_context.detach(token)
    headers = (await traced.client.get_task(task_id)).headers
    assert set(headers) == {"traceparent"}


async def test_a_repeated_idempotency_key_is_a_duplicate_though_its_traceparent_differs(
    traced: Traced,
) -> None:
    first = await traced.client.enqueue("jobs", "job", b"42", idempotency_key="welcome-42")
    again = await traced.client.enqueue_many(
        [NewTask("jobs", "job", b"42", idempotency_key="welcome-42")]
    )
    assert [(r.task_id, r.duplicate) for r in again] == [(first, True)]


async def test_without_a_tracer_provider_nothing_is_injected(running: RunningBroker) -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    seen: list[dict[str, str]] = []

    @handler("job")
    async def job(ctx: TaskContext, payload: bytes) -> None:
        seen.append(dict(ctx.headers))

    async with Client(running.target) as client:
        task_id = await client.enqueue("jobs", "job", headers={"tenant": "acme"})
        assert await new_worker(client, job).run_until_idle() == 1
        assert (await client.get_task(task_id)).headers == {"tenant": "acme"}
    assert seen == [{"tenant": "acme"}]


# --- privacy --------------------------------------------------------------------------------


async def test_no_payload_result_or_header_value_reaches_spans_logs_or_metrics(
    traced: Traced, caplog: pytest.LogCaptureFixture
) -> None:
    secrets = ("payload-7f3a9c", "result-51de0b", "alice@example.com", "token-e29a41")

    @handler("private")
    async def private(ctx: TaskContext, payload: bytes) -> bytes:
        if ctx.attempt == 1:
            raise ConnectionError("upstream refused")
        return b"result-51de0b"

    caplog.set_level(logging.DEBUG)
    task_id = await traced.client.enqueue(
        "jobs",
        "private",
        b"payload-7f3a9c",
        headers={"x-user": "alice@example.com", "authorization": "token-e29a41"},
        initial_backoff=QUICK_RETRY,
        max_backoff=QUICK_RETRY,
    )
    async with new_worker(traced.client, private):
        task = await traced.client.wait(task_id, timeout=5)
    assert (task.state, task.result) == (TaskState.SUCCEEDED, b"result-51de0b")

    spans = traced.exporter.get_finished_spans()
    assert {s.name for s in spans} >= {"send jobs", "process jobs"}
    texts: list[str] = []
    for s in spans:
        texts += [s.name, s.status.description or "", repr(dict(s.attributes or {}))]
        texts += [f"{e.name} {dict(e.attributes or {})}" for e in s.events]
        texts += [repr(dict(link.attributes or {})) for link in s.links]
    texts += [record.getMessage() for record in caplog.records]
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{traced.broker.broker.http_port}/metrics") as response,
    ):
        texts.append(await response.text())
    for secret in secrets:
        assert not [t for t in texts if secret in t], secret


# --- broker ---------------------------------------------------------------------------------


async def test_a_unary_rpc_is_a_server_span_under_the_callers_trace_context(
    traced: Traced,
) -> None:
    metadata = (("traceparent", CALLER_TRACEPARENT),)
    stub = traced.broker.stub
    await stub.Stats(broker_service_pb2.StatsRequest(), metadata=metadata)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.GetTask(broker_service_pb2.GetTaskRequest(task_id="jobs:nope"))
    assert raised.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)

    stats = traced.one("taskbroker.v1.BrokerService/Stats")
    assert stats.kind is SpanKind.SERVER
    assert dict(stats.attributes or {}) == {
        "rpc.system": "grpc",
        "rpc.service": "taskbroker.v1.BrokerService",
        "rpc.method": "Stats",
        "rpc.grpc.status_code": 0,
    }
    assert f"{trace_id(stats):032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert stats.parent is not None and f"{stats.parent.span_id:016x}" == "b7ad6b7169203331"

    get = traced.one("taskbroker.v1.BrokerService/GetTask")
    assert get.parent is None  # no trace context sent: a root span
    assert (get.attributes or {})["rpc.grpc.status_code"] == raised.value.code().value[0]
    assert get.status.status_code is StatusCode.UNSET  # the caller's mistake, not the server's


async def test_health_checks_are_not_traced(traced: Traced) -> None:
    channel = traced.broker.channel
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    await check(health_pb2.HealthCheckRequest())
    await traced.client.stats()

    names = {s.name for s in traced.exporter.get_finished_spans()}
    assert names == {"taskbroker.v1.BrokerService/Stats"}


# --- exporter configuration -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "exports"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_TRACES_EXPORTER": "none",
            },
            False,
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"},
            False,
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            },
            False,
        ),
    ],
    ids=["unset", "endpoint", "traces-endpoint", "exporter-none", "sdk-disabled", "grpc-protocol"],
)
def test_the_broker_exports_only_when_an_otlp_endpoint_is_configured(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], exports: bool
) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_TRACES_EXPORTER",
        "OTEL_SDK_DISABLED",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    provider = tracer_provider_from_env()

    assert (provider is not None) is exports
    if provider is not None:
        assert provider.resource.attributes["service.name"] == "taskbroker-broker"
        processors = provider._active_span_processor._span_processors
        assert [type(p) for p in processors] == [BatchSpanProcessor]
        provider.shutdown()


async def test_a_broker_with_an_otlp_endpoint_exports_its_spans_there(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    received: list[ExportTraceServiceRequest] = []

    async def collect(request: web.Request) -> web.Response:
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    try:
        broker = Broker(settings)
        await broker.start()
        running = RunningBroker(broker)
        async with Client(running.target) as client:
            await client.stats("jobs")
        await running.close()  # shuts the provider down, which flushes the batch
    finally:
        await runner.cleanup()

    spans = [
        (resource.resource, span)
        for request in received
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    (resource, stats), *_ = [(r, s) for r, s in spans if s.name.endswith("/Stats")]
    assert stats.name == "taskbroker.v1.BrokerService/Stats"
    service = [a.value.string_value for a in resource.attributes if a.key == "service.name"]
    assert service == ["taskbroker-broker"]
