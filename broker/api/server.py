"""The grpc.aio server: services, health, reflection, and the one place errors become statuses."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any, Final, NoReturn

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection

from broker.api.access import Rule, rule_for
from broker.api.limits import UnaryLimits, client_of_principal
from broker.api.parsed_services import health_and_reflection
from broker.api.status import error_status, to_status
from broker.auth.authenticate import Authenticator
from broker.auth.authorize import Authorizer
from broker.auth.policy_file import PolicyFile
from broker.auth.principal import ANONYMOUS, Principal, Role, current_principal
from broker.config import Settings
from broker.errors import BrokerError, ForeignLease, PermissionDenied, Unauthenticated
from taskbroker.v1 import admin_service_pb2, broker_service_pb2, schedule_service_pb2

if TYPE_CHECKING:
    from broker.audit import AuditTrail

log = logging.getLogger(__name__)

BROKER_SERVICE = broker_service_pb2.DESCRIPTOR.services_by_name["BrokerService"]
ADMIN_SERVICE = admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"]
SCHEDULE_SERVICE = schedule_service_pb2.DESCRIPTOR.services_by_name["ScheduleService"]
#: The services health reports on by name, beside the server as a whole ('').
SERVICE_NAMES = (
    BROKER_SERVICE.full_name,
    ADMIN_SERVICE.full_name,
    SCHEDULE_SERVICE.full_name,
)

#: gRPC's own receive limit sits above the application task size limit, so an oversized task
#: gets our INVALID_ARGUMENT naming the field rather than the transport's RESOURCE_EXHAUSTED.
TRANSPORT_SLACK_BYTES = 16 * 1024 * 1024

Context = grpc.aio.ServicerContext[bytes, bytes]
Unary = Callable[[Any, Context], Awaitable[Message]]


async def _abort_for(exc: BaseException, context: Context, method: str) -> NoReturn:
    """Maps an exception to a status; no traceback or class name reaches the client."""
    if isinstance(exc, BrokerError):
        await context.abort_with_status(error_status(exc))
    if isinstance(exc, TimeoutError):
        await context.abort_with_status(
            to_status(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded", "DEADLINE_EXCEEDED")
        )
    log.error("%s failed", method, exc_info=exc)
    await context.abort_with_status(
        to_status(grpc.StatusCode.INTERNAL, "internal error", "INTERNAL")
    )


class Gate:
    """Who a call is (Authenticator) and what they may do (Authorizer), under one policy;
    every authentication failure and permission denial goes to the audit trail."""

    def __init__(self, policy: PolicyFile | None, audit: AuditTrail | None = None) -> None:
        self.authenticator = Authenticator(policy)
        self.authorizer = Authorizer(policy, self._record_denial)
        self._audit = audit

    def principal(self, context: grpc.aio.ServicerContext[Any, Any], method: str) -> Principal:
        """The caller, from its metadata and TLS auth context. Raises Unauthenticated."""
        if not self.authenticator.enforced:  # every call is ANONYMOUS: nothing to read
            return ANONYMOUS
        try:
            return self.authenticator.authenticate(
                context.invocation_metadata() or (), context.auth_context()
            )
        except Unauthenticated as exc:
            if self._audit is not None:
                self._audit.unauthenticated(context.peer(), str(exc), method)
            raise

    def _record_denial(self, principal: Principal, error: PermissionDenied) -> None:
        if self._audit is not None:
            self._audit.denied(principal, error.action, error.queue, str(error))

    async def admit_reflection(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Server reflection describes every RPC: with a policy, only for principals that
        hold `read` on some queue."""
        try:
            principal = self.principal(context, "use server reflection")
            if not self.authorizer.may_somewhere(principal, Role.READ):
                denial = PermissionDenied(principal.name, "read", "*", "use server reflection")
                self._record_denial(principal, denial)
                raise denial
        except BrokerError as exc:
            await context.abort_with_status(error_status(exc))


#: The unary methods whose requests carry task data (payloads, results): they alone count
#: against, and are refused past, a client's request_bytes_per_s_per_client. Reads and admin
#: calls of a client in debt are still served.
RATED_METHODS: Final = frozenset(
    {"taskbroker.v1.BrokerService.Enqueue", "taskbroker.v1.BrokerService.Ack"}
)
#: A request larger than this is parsed in an event-loop step of its own, apart from grpcio's
#: copy of it: together, a 4 MiB Enqueue's took up to 10 ms while other clients waited.
PARSE_APART_BYTES: Final = 256 * 1024
#: How long a rated call without a deadline may wait for its client's byte rate (ByteRate
#: caps every wait at its MAX_WAIT_S).
RATE_WAIT_S: Final = float("inf")


def _unary(
    method: descriptor.MethodDescriptor, impl: Unary, limits: UnaryLimits, gate: Gate, rule: Rule
) -> grpc.RpcMethodHandler[bytes, bytes]:
    request_class = message_factory.GetMessageClass(method.input_type)
    name = f"/{method.containing_service.full_name}/{method.name}"
    rated = method.full_name in RATED_METHODS

    async def handle(requests: object, context: Context) -> bytes:
        # Served as a client-streaming method (the wire is the same) so that the caller is
        # authenticated, and waits its turn for its byte rate, before we read its request
        # (until then HTTP/2 flow control holds the sender back). Admitted by size before
        # parsing. With a policy, limits count per principal rather than per address.
        turn: AbstractContextManager[None] = nullcontext()
        try:
            principal = gate.principal(context, name)
            client = client_of_principal(principal)
            peer = context.peer()
            if rated:
                # None without a deadline, whatever grpc's stub says
                remaining: float | None = context.time_remaining()
                turn = await limits.wait_rate(
                    peer, client, RATE_WAIT_S if remaining is None else remaining
                )
        except BrokerError as exc:
            await context.abort_with_status(error_status(exc))
        with turn:
            raw = await _read_request(method, context)
            if rated:
                limits.charge_rate(peer, len(raw), client)
        try:
            admitted = limits.admit(peer, len(raw), client)
        except BrokerError as exc:
            await context.abort_with_status(error_status(exc))
        token = current_principal.set(principal)
        try:
            with admitted:
                return await serve(raw, context)
        finally:
            current_principal.reset(token)

    async def serve(raw: bytes, context: Context) -> bytes:
        if len(raw) > PARSE_APART_BYTES:
            await asyncio.sleep(0)  # grpcio copied it in this step: parse it in the next
        request = await _parse(request_class, raw, method, context)
        try:
            rule.check(gate.authorizer, request)  # before anything is done
            remaining = context.time_remaining()
            async with asyncio.timeout(remaining):
                response = await impl(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if isinstance(exc, ForeignLease):  # the fence decided it, not the authorizer
                gate.authorizer.denied(exc)
            await _abort_for(exc, context, name)
        return response.SerializeToString()

    return grpc.stream_unary_rpc_method_handler(handle)


async def _read_request(method: descriptor.MethodDescriptor, context: Context) -> bytes:
    """The one request of a call served as a streaming one (its bytes, not yet parsed)."""
    raw: object = await context.read()
    if not isinstance(raw, bytes):  # the client half-closed without a request
        await context.abort_with_status(
            to_status(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"no {method.input_type.full_name} was sent",
                "MALFORMED_REQUEST",
            )
        )
    return raw


async def _parse(
    request_class: Any, raw: bytes, method: descriptor.MethodDescriptor, context: Context
) -> Any:
    """The request parsed by us: malformed bytes are INVALID_ARGUMENT, not grpcio's UNKNOWN."""
    try:
        return request_class.FromString(raw)
    except DecodeError:
        await context.abort_with_status(
            to_status(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request is not a valid {method.input_type.full_name}",
                "MALFORMED_REQUEST",
            )
        )


def _stream(
    method: descriptor.MethodDescriptor, impl: Callable[[Context], Awaitable[None]], gate: Gate
) -> grpc.RpcMethodHandler[bytes, bytes]:
    name = f"/{method.containing_service.full_name}/{method.name}"

    async def handle(requests: object, context: Context) -> None:
        # Authenticated before the first frame is read; the frames are checked as they come.
        try:
            principal = gate.principal(context, name)
        except BrokerError as exc:
            await context.abort_with_status(error_status(exc))
        token = current_principal.set(principal)
        try:
            await impl(context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context, name)
        finally:
            current_principal.reset(token)

    return grpc.stream_stream_rpc_method_handler(handle)


def _server_stream(
    method: descriptor.MethodDescriptor,
    impl: Callable[[Any, Context], Awaitable[None]],
    gate: Gate,
    rule: Rule,
) -> grpc.RpcMethodHandler[bytes, bytes]:
    """A server-streaming method (WatchTask): one request, then the responses impl writes
    through the context. Served as a bidirectional one (the wire is the same), so the caller
    is authenticated before its request is read, and the request is parsed by us and checked
    against the method's rule, as a unary call's is. It is not counted among the unary calls
    in flight: it may last long, and its service bounds its own streams."""
    request_class = message_factory.GetMessageClass(method.input_type)
    name = f"/{method.containing_service.full_name}/{method.name}"

    async def handle(requests: object, context: Context) -> None:
        try:
            principal = gate.principal(context, name)
        except BrokerError as exc:
            await context.abort_with_status(error_status(exc))
        raw = await _read_request(method, context)
        request = await _parse(request_class, raw, method, context)
        token = current_principal.set(principal)
        try:
            rule.check(gate.authorizer, request)  # before anything is done
            async with asyncio.timeout(context.time_remaining()):
                await impl(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _abort_for(exc, context, name)
        finally:
            current_principal.reset(token)

    return grpc.stream_stream_rpc_method_handler(handle)


def generic_handler(
    service: descriptor.ServiceDescriptor, impl: object, limits: UnaryLimits, gate: Gate
) -> grpc.GenericRpcHandler:
    """Handlers for every method of a service: each call authenticated (gate), requests parsed
    by us (so malformed bytes are INVALID_ARGUMENT, not grpcio's UNKNOWN naming internal
    classes) and checked against the method's access rule, and unary calls admitted by limits.

    Raises:
        LookupError: a method has no access rule (broker/api/access.py).
    """
    handlers = {}
    for method in service.methods:
        fn = getattr(impl, method.name)
        if method.client_streaming:
            rule_for(service.name, method.name)
            handlers[method.name] = _stream(method, fn, gate)
        elif method.server_streaming:
            handlers[method.name] = _server_stream(
                method, fn, gate, rule_for(service.name, method.name)
            )
        else:
            handlers[method.name] = _unary(
                method, fn, limits, gate, rule_for(service.name, method.name)
            )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def server_options(settings: Settings, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """The gRPC channel arguments the server runs with. gRPC ignores a name it does not know,
    silently: tests/api/test_grpc_options.py checks each against gRPC core's own list.

    reuse_port: this is one of a supervisor's serving processes, which share the port
    (SO_REUSEPORT: the kernel spreads new connections over them).
    """
    limit = settings.max_task_bytes + TRANSPORT_SLACK_BYTES
    options = [
        # gRPC core sets SO_REUSEPORT by default on Linux. A lone broker turns it off, so a
        # second broker started on its port fails to bind instead of silently taking half of
        # its connections; the processes of one supervisor turn it on to share the port.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Find dead workers well inside the shortest useful lease (RELIABILITY.md 3.5).
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_s)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Workers ping an idle Lease stream (the SDK every 20 s): pings at least this far apart
        # are welcome; faster ones earn strikes and, past max_ping_strikes, GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", _ms(settings.min_client_ping_interval_s)),
    ]
    if settings.max_connection_age_s > 0:
        # gRPC adds +-10 % jitter, so a fleet's connections do not all rotate at once.
        options += [
            ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_s)),
            ("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace_s * 1000)),
        ]
    return options


def build_server(
    broker: object,
    admin: object,
    schedules: object,
    settings: Settings,
    unary_limits: UnaryLimits,
    gate: Gate,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    *,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A server with BrokerService, AdminService, ScheduleService, health and (unless settings
    turn it off) reflection registered; the interceptors (RPC metrics) see every call, gate
    authenticates and authorizes our calls and reflection (health stays open to probes), and
    unary_limits admit our unary calls; reuse_port: see server_options."""
    server = grpc.aio.server(
        interceptors=list(interceptors), options=server_options(settings, reuse_port=reuse_port)
    )
    health_servicer = health.aio.HealthServicer()
    reflected = (
        *SERVICE_NAMES,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    server.add_generic_rpc_handlers(
        (
            generic_handler(BROKER_SERVICE, broker, unary_limits, gate),
            generic_handler(ADMIN_SERVICE, admin, unary_limits, gate),
            generic_handler(SCHEDULE_SERVICE, schedules, unary_limits, gate),
            *health_and_reflection(
                health_servicer,
                reflected if settings.reflection else None,
                gate.admit_reflection if gate.authorizer.enforced else None,
            ),
        )
    )
    return server, health_servicer
