"""Client: the asyncio connection to one or more brokers, for producers, admins and workers."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import random
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self, TypeVar, Unpack

import grpc

from taskbroker._channel import (
    DEFAULT_TARGET,
    ENV_TARGET,
    ENV_TOKEN,
    ENV_TOKEN_FILE,
    BearerToken,
    ChannelConfigError,
    TlsConfig,
    channel_credentials,
    open_channel,
    tls_options,
)
from taskbroker._coalescer import EnqueueCoalescer, Metadata
from taskbroker._codec_hooks import decode_task, encode_specs
from taskbroker._convert import (
    audit_record_from_proto,
    group_key_page_from_proto,
    settings_from_proto,
    settings_to_proto,
    stats_from_proto,
    task_from_proto,
    task_spec,
)
from taskbroker._models import (
    AuditRecord,
    GroupKeyPage,
    NewTask,
    QueueSettings,
    QueueStats,
    RateLimit,
    Task,
    TaskId,
)
from taskbroker._options import TaskOptions, checked_options, with_options_doc
from taskbroker._schedule_calls import ScheduleCalls
from taskbroker._status import error_from_rpc, throttled_for_s
from taskbroker._tracing import (
    MESSAGING_MESSAGE_ID,
    Tracing,
    add_trace_headers,
    current_trace_metadata,
    end_span,
    start_send,
    trace_headers,
    use_span,
)
from taskbroker._workflow import EnqueuedWorkflow, Shape, layout
from taskbroker.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    broker_service_pb2,
    broker_service_pb2_grpc,
    schedule_service_pb2_grpc,
    task_pb2,
)

if TYPE_CHECKING:  # the async stubs exist only in the generated .pyi files
    from opentelemetry.trace import TracerProvider

    from taskbroker.encryption import PayloadCodec
    from taskbroker.v1.admin_service_pb2_grpc import AdminServiceAsyncStub
    from taskbroker.v1.broker_service_pb2_grpc import BrokerServiceAsyncStub
    from taskbroker.v1.schedule_service_pb2_grpc import ScheduleServiceAsyncStub

_Request = TypeVar("_Request")
_Response = TypeVar("_Response")

#: The broker refuses larger Enqueue, RedriveDeadTasks and DeleteDeadTasks calls (see the protos).
MAX_TASKS_PER_CALL: Final = 1000
#: Serialized size at which enqueue_many starts a new call. The broker's receive limit is its
#: task size limit plus 16 MiB (broker/api/server.py), so 8 MiB per call stays well inside it while
#: any single task the broker accepts (1 MiB in all by default) still fits.
MAX_BATCH_BYTES: Final = 8 * 1024 * 1024
#: Retries of an UNAVAILABLE Enqueue whose tasks all carry idempotency keys (so a retry of a call
#: that was in fact applied returns the same ids instead of storing the tasks twice).
ENQUEUE_RETRIES: Final = 3
#: Enqueue waits out a broker's rate limit (RESOURCE_EXHAUSTED with RetryInfo) up to this long
#: in all, then raises: the caller slows down instead of failing, unless the broker stays busy.
ENQUEUE_THROTTLED_MAX_S: Final = 30.0
#: The three sleeps total 0.875-1.75 s, which outlasts gRPC's default 1 s (+-20 %) reconnect
#: backoff, so the last retry reaches a broker that came back right after the first failure.
ENQUEUE_BACKOFF_INITIAL_S: Final = 0.25
ENQUEUE_BACKOFF_MAX_S: Final = 2.0
#: wait() never pauses longer than this before watching again after a watch broke (unless
#: asked to), and watches again at most WAIT_RETRIES times in a row with nothing received.
WAIT_PAUSE_MAX_S: Final = 1.0
WAIT_RETRIES: Final = 3
_FINISHED_STATES: Final = frozenset(
    {task_pb2.TASK_STATE_SUCCEEDED, task_pb2.TASK_STATE_DEAD, task_pb2.TASK_STATE_CANCELLED}
)

#: Channel options. Keepalive pings every 20 s find a dead broker or NAT drop on a quiet Lease
#: stream well before a lease runs out; the broker accepts pings every 5 s by default
#: (its min_client_ping_interval_s), so it will not answer with GOAWAY too_many_pings.
DEFAULT_OPTIONS: Final[Mapping[str, Any]] = {
    "grpc.lb_policy_name": "round_robin",
    "grpc.keepalive_time_ms": 20_000,
    "grpc.keepalive_timeout_ms": 10_000,
    "grpc.keepalive_permit_without_calls": 1,
    # 0: keep pinging on a stream that carries no data for a long time (a worker waiting for work).
    "grpc.http2.max_pings_without_data": 0,
    # Pages of dead letters and leased tasks can carry many payloads of up to the broker's limit.
    "grpc.max_receive_message_length": -1,
    "grpc.primary_user_agent": "taskbroker-python",
    # A replica that restarts (a rolling deploy) is reconnected within about 100 ms, not gRPC's
    # default 1 s doubling to 2 min: a worker whose broker drains needs another replica at once
    # to resume its leases on.
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 5_000,
}


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """The outcome of one enqueued task.

    Attributes:
        task_id: The task's id.
        duplicate: True when the idempotency key matched an earlier task: task_id is that task's
            and nothing new was stored.
    """

    task_id: str
    duplicate: bool


def channel_target(target: str | Sequence[str]) -> str:
    """The gRPC target for one address or name, or for a list of IP literals.

    A single string is used as is ("host:port", "dns:///name:port", "ipv4:a:p,b:p", ...), so a
    DNS name with several addresses is balanced over all of them. A list of "ip:port" entries
    becomes gRPC's static "ipv4:" (or "ipv6:") target; gRPC has no static resolver for a list of
    names, so a list of host names is refused.

    Raises:
        ValueError: The list is empty, or mixes names or address families.
    """
    targets = [target] if isinstance(target, str) else list(target)
    if not targets:
        raise ValueError("target: give at least one address")
    if len(targets) == 1:
        return targets[0]
    families: set[int] = set()
    entries: list[str] = []
    for entry in targets:
        host, sep, port = entry.rpartition(":")
        try:
            address = ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        except ValueError:
            address = None
        if not sep or not port.isdigit() or address is None:
            raise ValueError(
                f"target: {entry!r} is not an ip:port; several brokers are given as IP literals, "
                "or as one DNS name that resolves to several addresses"
            )
        families.add(address.version)
        entries.append(f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}")
    if len(families) > 1:
        raise ValueError("target: IPv4 and IPv6 addresses cannot be mixed in one list")
    return f"ipv{families.pop()}:{','.join(entries)}"


def _chunks(specs: Sequence[task_pb2.TaskSpec]) -> Iterator[list[task_pb2.TaskSpec]]:
    """Consecutive runs of at most MAX_TASKS_PER_CALL tasks and (past one task) MAX_BATCH_BYTES."""
    chunk: list[task_pb2.TaskSpec] = []
    size = 0
    for spec in specs:
        spec_size = spec.ByteSize()
        if chunk and (len(chunk) == MAX_TASKS_PER_CALL or size + spec_size > MAX_BATCH_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(spec)
        size += spec_size
    if chunk:
        yield chunk


def _enqueue_backoff_s(retry: int) -> float:
    """Exponential backoff with equal jitter: at least half the cap, so retries do spread out."""
    cap = min(ENQUEUE_BACKOFF_MAX_S, ENQUEUE_BACKOFF_INITIAL_S * 2.0**retry)
    return cap / 2 + random.uniform(0, cap / 2)


class _Keep:
    """update_queue_settings' default: leave this setting as it is."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()


class Client(ScheduleCalls):
    """An asyncio client of one or more taskbroker brokers.

    Use it as `async with Client("localhost:50051") as client:`. The gRPC channel is opened on
    first use, inside the running event loop, and is bound to that loop. Several targets (or one
    DNS name with several addresses) are balanced with gRPC's round_robin policy. Every failed
    call raises a `TaskbrokerError` subclass, never a raw grpc exception.

    Args:
        target: "host:port", any gRPC target string, or a list of "ip:port" addresses.
        timeout: Deadline in seconds for each unary call.
        options: Extra gRPC channel options; they override the client's defaults.
        tracer_provider: The OpenTelemetry tracer provider for the `send` spans of enqueue
            calls (and of the workers using this client). None: the global one; while no
            provider is configured nothing is traced.
        codec: Encodes payloads on enqueue and decodes payloads and results on get_task and
            wait (and, in workers using this client, the reverse); see taskbroker.encryption.
        tls: Connect with TLS (and a client certificate, if it names one). None: plaintext.
        token: A bearer token sent as `authorization: Bearer <token>` on every call. Sent
            only over TLS or to a loopback address.
        token_file: A file holding the token instead (re-read when it changes).

    Raises:
        ValueError: The target list cannot be expressed as one gRPC target, a TLS or token
            file cannot be read (ChannelConfigError), or a token would go in the clear to
            another host.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float = 10.0,
        options: Sequence[tuple[str, Any]] = (),
        tracer_provider: TracerProvider | None = None,
        codec: PayloadCodec | None = None,
        tls: TlsConfig | None = None,
        token: str | None = None,
        token_file: str | Path | None = None,
    ) -> None:
        self.codec = codec
        self._target = channel_target(target)
        self._tracing = Tracing(tracer_provider)
        self._timeout = timeout
        self._coalescer = EnqueueCoalescer[EnqueueResult](self._enqueue_batch, self._enqueue_one)
        self._options = list({**DEFAULT_OPTIONS, **dict(tls_options(tls)), **dict(options)}.items())
        bearer = None if token is None and token_file is None else BearerToken(token, token_file)
        self._credentials = channel_credentials(self._target, tls, bearer)
        self._channel: grpc.aio.Channel | None = None
        self._stub: BrokerServiceAsyncStub | None = None
        self._admin: AdminServiceAsyncStub | None = None
        self._schedules: ScheduleServiceAsyncStub | None = None
        self._closed = False

    @classmethod
    def from_env(
        cls,
        target: str | Sequence[str] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Self:
        """A client configured by the environment, as the CLI is: TASKBROKER_TARGET (unless
        `target` is given; default 127.0.0.1:50051), TASKBROKER_TLS_CA,
        TASKBROKER_TLS_CLIENT_CERT, TASKBROKER_TLS_CLIENT_KEY, TASKBROKER_TLS_SERVER_NAME (or
        TASKBROKER_TLS=1 for the system's CAs), and TASKBROKER_TOKEN or TASKBROKER_TOKEN_FILE.
        Other arguments are as for `Client`.

        Raises:
            ValueError: as `Client`, or both TASKBROKER_TOKEN and TASKBROKER_TOKEN_FILE are set.
        """
        env = os.environ if environ is None else environ
        if env.get(ENV_TOKEN) and env.get(ENV_TOKEN_FILE):
            raise ChannelConfigError(f"set {ENV_TOKEN} or {ENV_TOKEN_FILE}, not both")
        kwargs.setdefault("tls", TlsConfig.from_env(env))
        kwargs.setdefault("token", env.get(ENV_TOKEN) or None)
        kwargs.setdefault("token_file", env.get(ENV_TOKEN_FILE) or None)
        return cls(target or env.get(ENV_TARGET) or DEFAULT_TARGET, **kwargs)

    # --- plumbing the worker runtime shares --------------------------------------------------

    @property
    def target(self) -> str:
        """The gRPC target string the channel connects to."""
        return self._target

    @property
    def timeout(self) -> float:
        """Deadline in seconds for each unary call."""
        return self._timeout

    @property
    def tracer_provider(self) -> TracerProvider | None:
        """The tracer provider given to the client; None: it follows the global one."""
        return self._tracing.provider

    @property
    def channel(self) -> grpc.aio.Channel:
        """The grpc.aio channel, opened on first access.

        Raises:
            RuntimeError: The client was closed.
        """
        if self._closed:
            raise RuntimeError("the taskbroker client is closed")
        if self._channel is None:
            self._channel = open_channel(self._target, self._options, self._credentials)
        return self._channel

    @property
    def stub(self) -> BrokerServiceAsyncStub:
        """The BrokerService stub on `channel`."""
        if self._stub is None or self._channel is None:
            self._stub = broker_service_pb2_grpc.BrokerServiceStub(self.channel)
        return self._stub

    @property
    def admin(self) -> AdminServiceAsyncStub:
        """The AdminService stub on `channel`."""
        if self._admin is None or self._channel is None:
            self._admin = admin_service_pb2_grpc.AdminServiceStub(self.channel)
        return self._admin

    @property
    def schedule_stub(self) -> ScheduleServiceAsyncStub:
        """The ScheduleService stub on `channel`."""
        if self._schedules is None or self._channel is None:
            self._schedules = schedule_service_pb2_grpc.ScheduleServiceStub(self.channel)
        return self._schedules

    async def _unary(
        self, method: grpc.aio.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        try:
            metadata = current_trace_metadata() if self._tracing.tracer() is not None else None
            return await method(request, timeout=self._timeout, metadata=metadata)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from None

    # --- producing --------------------------------------------------------------------------

    @with_options_doc
    async def enqueue(
        self, queue: str, type: str, payload: bytes = b"", **options: Unpack[TaskOptions]
    ) -> TaskId:
        """Enqueues one task.

        Calls made at the same time on one Client share Enqueue calls to the broker (one per
        queue, up to 1,000 tasks), and each gets its own task's answer, as if sent alone.

        With an idempotency key, a call that fails UNAVAILABLE is retried (up to 3 times, with
        jittered backoff): the key makes a repeat of an applied call harmless. Without one, the
        outcome is unknown and UnavailableError is raised at once. A call the broker refuses
        for its client's request byte rate (nothing stored) is sent again after the delay the
        broker names, for up to 30 s in all.

        Args:
            queue: Queue name, 1-128 characters of [A-Za-z0-9_.-].
            type: Task type, which picks the worker's handler; same alphabet as queue.
            payload: Opaque bytes handed to the handler unchanged (see `taskbroker.codec`).
            **options: The task's options (`TaskOptions`), keyword-only:

        Returns:
            The task's id, a `str` (`TaskId`). With an idempotency key that matched an earlier
            task, it is that task's id and `.duplicate` is True: nothing new was enqueued.

        Raises:
            InvalidArgumentError: An option is out of range; the message names the field.
            AlreadyExistsError: The idempotency key was used for a different task.
            UnavailableError: The broker or its Redis could not be reached.
            ValueError: schedule_time is a naive datetime.
            TypeError: An option's name is unknown.
        """
        new = NewTask(queue, type, payload, **checked_options(options))  # warns from here
        (result,) = await self._send([task_spec(new)], coalesce=True)
        return TaskId(result.task_id, duplicate=result.duplicate)

    async def enqueue_many(self, tasks: Iterable[NewTask]) -> list[EnqueueResult]:
        """Enqueues tasks in as few calls as the broker's limits allow (1,000 tasks per call).

        Calls are made one after another; if one fails, the tasks of earlier calls stay enqueued
        (give every task an idempotency key to make the whole batch safe to resend). Within a
        call, a queue that refuses its tasks does not stop the other queues' (reason
        `ENQUEUE_PARTLY_STORED` for a queue over its enqueue rate). A call whose tasks all carry
        idempotency keys is retried on UNAVAILABLE, as in `enqueue`.

        Args:
            tasks: The tasks, in the order their results are wanted.

        Returns:
            One result per task, in the order given; `duplicate` marks a task whose idempotency
            key matched an earlier task (its id is returned and nothing new was stored).

        Raises:
            InvalidArgumentError: A task is malformed; the message names the field, indexed
                within the failing call.
            AlreadyExistsError: An idempotency key was used for a different task.
            UnavailableError: The broker or its Redis could not be reached.
            ValueError: A schedule_time is a naive datetime.
        """
        return await self._send([task_spec(t) for t in tasks])

    async def enqueue_workflow(self, workflow: Shape) -> EnqueuedWorkflow:
        """Enqueues a workflow (`chain`, `group`, `chord`, nested as needed) in one Enqueue
        call: the broker stores every task, or none.

        Each task that waits for others is stored WAITING and becomes pending once they have
        all succeeded; if one ends DEAD or CANCELLED, the task's `parent_failure_policy`
        decides (default: it is cancelled, and so are the tasks after it). A task's own
        `depends_on` ids are kept: it waits for those too.

        ```python
        resizes = group(*(NewTask("media", "resize", name) for name in photos))
        enqueued = await client.enqueue_workflow(
            chord(resizes, NewTask("emails", "send_album", b"ada@example.com"))
        )
        album_mail = await client.wait(enqueued.last)
        ```

        With every task carrying an idempotency key, a call that fails UNAVAILABLE is retried
        (up to 3 times), as in `enqueue`.

        Args:
            workflow: The shape, or a single NewTask.

        Returns:
            Every task's id in the order the shape lists its tasks, and the ids of the tasks
            it ends with (`.last` when there is one).

        Raises:
            InvalidArgumentError: A task is malformed or a `depends_on` id does not exist; the
                message names the field, indexed within the call. Nothing was stored.
            AlreadyExistsError: An idempotency key was used for a different task.
            UnavailableError: The broker or its Redis could not be reached.
            ValueError: The workflow has more than 1,000 tasks (one call's limit), or a
                schedule_time is a naive datetime.
            TypeError: The workflow is not a NewTask, chain or group.
        """
        laid = layout(workflow)
        if len(laid.tasks) > MAX_TASKS_PER_CALL:
            raise ValueError(
                f"a workflow is enqueued in one call, of at most {MAX_TASKS_PER_CALL} tasks; "
                f"this one has {len(laid.tasks)}"
            )
        specs = [task_spec(task) for task in laid.tasks]
        for spec, parents in zip(specs, laid.parents, strict=True):
            spec.depends_on_positions.extend(parents)
        results = await self._send(specs, one_call=True)
        ids = tuple(TaskId(r.task_id, duplicate=r.duplicate) for r in results)
        return EnqueuedWorkflow(ids, tuple(ids[i] for i in laid.last))

    async def _send(
        self, specs: list[task_pb2.TaskSpec], coalesce: bool = False, one_call: bool = False
    ) -> list[EnqueueResult]:
        """Enqueues the tasks in a `send` span (one per call, a batch too) when tracing is on:
        each task's headers and each Enqueue call's metadata carry its context. `coalesce`: one
        task, which may share an Enqueue call with other callers' (EnqueueCoalescer; the call
        then carries the first one's trace context, each task its own in its headers).
        `one_call`: the tasks go in one Enqueue call, however large (their positions refer
        to each other)."""
        encode_specs(self.codec, specs)
        tracer = self._tracing.tracer()
        if tracer is None or not specs:
            return await self._enqueue(specs, None, coalesce, one_call)
        span = start_send(tracer, [spec.queue for spec in specs])
        error: BaseException | None = None
        try:
            carrier = trace_headers(span)
            for spec in specs:
                add_trace_headers(spec.headers, carrier)
            with use_span(span):  # client-side gRPC instrumentation, if any, nests under it
                results = await self._enqueue(specs, tuple(carrier.items()), coalesce, one_call)
            if len(results) == 1:
                span.set_attribute(MESSAGING_MESSAGE_ID, results[0].task_id)
            return results
        except BaseException as exc:
            error = exc
            raise
        finally:
            end_span(span, error)

    async def _enqueue(
        self,
        specs: list[task_pb2.TaskSpec],
        metadata: Metadata,
        coalesce: bool,
        one_call: bool = False,
    ) -> list[EnqueueResult]:
        if coalesce:
            return [await self._coalescer.enqueue(specs[0], metadata)]
        if one_call:
            return await self._enqueue_call(specs, metadata)
        results: list[EnqueueResult] = []
        for chunk in _chunks(specs):
            results.extend(await self._enqueue_call(chunk, metadata))
        return results

    async def _enqueue_one(self, spec: task_pb2.TaskSpec, metadata: Metadata) -> EnqueueResult:
        (result,) = await self._enqueue_call([spec], metadata)
        return result

    async def _enqueue_batch(
        self, specs: list[task_pb2.TaskSpec], metadata: Metadata
    ) -> list[EnqueueResult]:
        # No retry of its own: the coalescer resends what a failed batch leaves unknown.
        return await self._enqueue_call(specs, metadata, retries=0)

    async def _enqueue_call(
        self, specs: list[task_pb2.TaskSpec], metadata: Metadata, retries: int = ENQUEUE_RETRIES
    ) -> list[EnqueueResult]:
        request = broker_service_pb2.EnqueueRequest(tasks=specs)
        retryable = all(spec.idempotency_key for spec in specs)
        retry = 0
        throttled_s = 0.0
        while True:
            try:
                response = await self.stub.Enqueue(
                    request, timeout=self._timeout, metadata=metadata
                )
            except grpc.RpcError as err:
                wait_s = throttled_for_s(err)
                if wait_s is not None and throttled_s + wait_s <= ENQUEUE_THROTTLED_MAX_S:
                    # Refused before anything was stored: sending it again is always safe.
                    await asyncio.sleep(wait_s)
                    throttled_s += wait_s
                    continue
                error = error_from_rpc(err)
                unavailable = error.code is grpc.StatusCode.UNAVAILABLE
                if retryable and unavailable and retry < retries:
                    await asyncio.sleep(_enqueue_backoff_s(retry))
                    retry += 1
                    continue
                raise error from None
            return [EnqueueResult(r.task_id, r.duplicate) for r in response.results]

    # --- reading and cancelling -------------------------------------------------------------

    async def get_task(self, task_id: str) -> Task:
        """Returns a task as the broker holds it now.

        Args:
            task_id: The id `enqueue` returned.

        Returns:
            The task.

        Raises:
            TaskNotFoundError: No such task (never existed, or trimmed after its retention).
            InvalidArgumentError: The id is malformed.
            UnavailableError: The broker or its Redis could not be reached.
        """
        response = await self._unary(
            self.stub.GetTask, broker_service_pb2.GetTaskRequest(task_id=task_id)
        )
        return decode_task(self.codec, task_from_proto(response.task))

    async def cancel(self, task_id: str) -> Task:
        """Cancels a task that has not finished; a worker holding it has its lease revoked.

        Args:
            task_id: The task's id.

        Returns:
            The task, now CANCELLED.

        Raises:
            FailedPreconditionError: The task already finished.
            TaskNotFoundError: No such task.
            UnavailableError: The broker or its Redis could not be reached.
        """
        response = await self._unary(
            self.stub.CancelTask, broker_service_pb2.CancelTaskRequest(task_id=task_id)
        )
        return task_from_proto(response.task)

    async def stats(self, *queues: str) -> list[QueueStats]:
        """Returns counts and totals per queue.

        Args:
            *queues: Queues to report (at most 1,000). None: every queue the broker knows.

        Returns:
            One entry per queue, in the order asked (by name when none were named).

        Raises:
            InvalidArgumentError: A queue name is malformed.
            UnavailableError: The broker or its Redis could not be reached.
        """
        response = await self._unary(
            self.stub.Stats, broker_service_pb2.StatsRequest(queues=list(queues))
        )
        return [stats_from_proto(s) for s in response.queues]

    async def wait(
        self,
        task_id: str,
        *,
        # A plain number, like Client(timeout=...), so SyncClient.wait can take the same argument.
        timeout: float | None = None,  # noqa: ASYNC109
        poll_interval: float = 0.05,
    ) -> Task:
        """Waits until a task has finished (SUCCEEDED, DEAD or CANCELLED) and returns it.

        Watches the task with WatchTask: the broker streams its changes, so the finish arrives
        as it happens, through whichever broker the call reaches. A watch that breaks (a broker
        draining or restarting: UNAVAILABLE) is opened again, after `poll_interval` seconds,
        doubling up to a second, up to 3 times in a row with nothing received; the next such
        failure raises UnavailableError.

        Args:
            task_id: The task's id.
            timeout: Give up after this many seconds. None: wait as long as it takes.
            poll_interval: The first pause before watching again after a watch broke, in
                seconds.

        Returns:
            The finished task, with its result or errors.

        Raises:
            TimeoutError: The task had not finished within `timeout`.
            TaskNotFoundError: No such task.
            UnavailableError: The broker or its Redis could not be reached.
            ValueError: poll_interval is not positive.
        """
        if poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        request = broker_service_pb2.WatchTaskRequest(task_id=task_id)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pause_s = poll_interval
        failures = 0
        async with asyncio.timeout(timeout):
            while True:
                metadata = current_trace_metadata() if self._tracing.tracer() is not None else None
                # The deadline goes to the broker too, so it lets go of the watch in time even
                # when this process cannot tell it.
                remaining = None if deadline is None else max(0.001, deadline - loop.time())
                call = self.stub.WatchTask(request, timeout=remaining, metadata=metadata)
                try:
                    async for response in call:
                        failures, pause_s = 0, poll_interval
                        # Only a finished task is converted: the states on the way are not
                        # needed here (and a newer broker may send states this SDK predates).
                        if response.task.state in _FINISHED_STATES:
                            return decode_task(self.codec, task_from_proto(response.task))
                except grpc.RpcError as err:
                    error = error_from_rpc(err)
                    if error.code is grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                        raise TimeoutError(f"task {task_id} had not finished") from None
                    if error.code is grpc.StatusCode.UNIMPLEMENTED:  # a broker before WatchTask
                        return await self._poll_until_finished(task_id, poll_interval)
                    failures += 1
                    if error.code is not grpc.StatusCode.UNAVAILABLE or failures > WAIT_RETRIES:
                        raise error from None
                finally:
                    call.cancel()
                # Broken (or ended without a finish, which a broker does not do): watch again.
                await asyncio.sleep(pause_s)
                pause_s = min(pause_s * 2, max(WAIT_PAUSE_MAX_S, poll_interval))

    async def _poll_until_finished(self, task_id: str, poll_interval: float) -> Task:
        """wait() against a broker without WatchTask: GetTask, at growing intervals."""
        interval_s = poll_interval
        while not (task := await self.get_task(task_id)).state.finished:
            await asyncio.sleep(interval_s)
            interval_s = min(interval_s * 1.5, max(WAIT_PAUSE_MAX_S, poll_interval))
        return task

    # --- administration ---------------------------------------------------------------------

    async def queues(self) -> list[str]:
        """Returns the names of the queues the broker knows, sorted.

        Raises:
            UnavailableError: The broker or its Redis could not be reached.
        """
        response = await self._unary(self.admin.ListQueues, admin_service_pb2.ListQueuesRequest())
        return list(response.queues)

    async def dead_letters(self, queue: str, *, page_size: int = 100) -> AsyncIterator[Task]:
        """Yields a queue's dead letters, oldest first, fetching a page at a time.

        Args:
            queue: The queue.
            page_size: Tasks per call, 1 to 1,000 (fewer when they are large: a page holds
                about 2 MiB).

        Yields:
            Each dead task, with its errors.

        Raises:
            InvalidArgumentError: The queue name is malformed.
            UnavailableError: The broker or its Redis could not be reached.
        """
        token = ""
        while True:
            request = admin_service_pb2.ListDeadTasksRequest(
                queue=queue, page_size=page_size, page_token=token
            )
            response = await self._unary(self.admin.ListDeadTasks, request)
            for task in response.tasks:
                yield task_from_proto(task)
            token = response.next_page_token
            if not token:
                return

    async def redrive(self, queue: str, task_ids: Sequence[str] = (), *, all: bool = False) -> int:
        """Moves dead letters back to pending with a fresh set of attempts.

        Args:
            queue: The queue.
            task_ids: The dead letters to redrive (sent 1,000 per call). Ignored with `all`.
            all: Redrive every dead letter of the queue.

        Returns:
            How many tasks went back to pending (ids that were not dead letters are skipped).

        Raises:
            InvalidArgumentError: No ids and not `all`, or an id of another queue.
            UnavailableError: The broker or its Redis could not be reached.
        """
        total = 0
        for ids in self._id_chunks(task_ids, all):
            request = admin_service_pb2.RedriveDeadTasksRequest(queue=queue, task_ids=ids, all=all)
            response = await self._unary(self.admin.RedriveDeadTasks, request)
            total += response.redriven_count
        return total

    async def delete_dead(
        self, queue: str, task_ids: Sequence[str] = (), *, all: bool = False
    ) -> int:
        """Deletes dead letters for good.

        Args:
            queue: The queue.
            task_ids: The dead letters to delete (sent 1,000 per call). Ignored with `all`.
            all: Delete every dead letter of the queue.

        Returns:
            How many tasks were deleted (ids that were not dead letters are skipped).

        Raises:
            InvalidArgumentError: No ids and not `all`, or an id of another queue.
            UnavailableError: The broker or its Redis could not be reached.
        """
        total = 0
        for ids in self._id_chunks(task_ids, all):
            request = admin_service_pb2.DeleteDeadTasksRequest(queue=queue, task_ids=ids, all=all)
            response = await self._unary(self.admin.DeleteDeadTasks, request)
            total += response.deleted_count
        return total

    @staticmethod
    def _id_chunks(task_ids: Sequence[str], every: bool) -> list[list[str]]:
        if every or not task_ids:  # one call; without ids the broker explains what is missing
            return [[]]
        ids = list(task_ids)
        return [ids[i : i + MAX_TASKS_PER_CALL] for i in range(0, len(ids), MAX_TASKS_PER_CALL)]

    async def pause(self, queue: str) -> None:
        """Stops leasing from a queue; enqueues are still accepted and held leases unaffected.

        Raises:
            InvalidArgumentError: The queue name is malformed.
            UnavailableError: The broker or its Redis could not be reached.
        """
        await self._unary(self.admin.PauseQueue, admin_service_pb2.PauseQueueRequest(queue=queue))

    async def resume(self, queue: str) -> None:
        """Resumes leasing from a paused queue.

        Raises:
            InvalidArgumentError: The queue name is malformed.
            UnavailableError: The broker or its Redis could not be reached.
        """
        await self._unary(self.admin.ResumeQueue, admin_service_pb2.ResumeQueueRequest(queue=queue))

    async def queue_settings(self, queue: str) -> QueueSettings:
        """Returns a queue's limits (every one off for a queue never configured).

        Raises:
            InvalidArgumentError: The queue name is malformed.
            UnavailableError: The broker or its Redis could not be reached.
        """
        response = await self._unary(
            self.admin.GetQueueSettings, admin_service_pb2.GetQueueSettingsRequest(queue=queue)
        )
        return settings_from_proto(response.settings)

    async def update_queue_settings(
        self,
        queue: str,
        *,
        rate_limit: RateLimit | _Keep | None = KEEP,
        max_concurrency: int | _Keep = KEEP,
        enqueue_rate_limit: RateLimit | _Keep | None = KEEP,
        per_key_max_concurrency: int | _Keep = KEEP,
        per_key_rate_limit: RateLimit | _Keep | None = KEEP,
        priority_aging: timedelta | _Keep | None = KEEP,
    ) -> QueueSettings:
        """Changes the limits given (None or 0 turns one off) and keeps the others; every
        broker replica applies them to its next lease or enqueue.

        Returns:
            The queue's settings after the change.

        Raises:
            InvalidArgumentError: A value is out of range (nothing was changed).
            PermissionDeniedError: The caller is not an admin of the queue.
            UnavailableError: The broker or its Redis could not be reached.
        """
        given = {
            "rate_limit": rate_limit,
            "max_concurrency": max_concurrency,
            "enqueue_rate_limit": enqueue_rate_limit,
            "per_key_max_concurrency": per_key_max_concurrency,
            "per_key_rate_limit": per_key_rate_limit,
            "priority_aging": priority_aging,
        }
        changed = {name: value for name, value in given.items() if not isinstance(value, _Keep)}
        if not changed:
            return await self.queue_settings(queue)
        request = admin_service_pb2.UpdateQueueSettingsRequest(
            queue=queue,
            settings=settings_to_proto(QueueSettings(**changed)),  # type: ignore[arg-type]
        )
        request.update_mask.paths.extend(changed)
        response = await self._unary(self.admin.UpdateQueueSettings, request)
        return settings_from_proto(response.settings)

    async def group_keys(
        self, queue: str, *, page_size: int = 20, page_token: str = ""
    ) -> GroupKeyPage:
        """Returns a page of a queue's group keys, the most pending tasks first, with each key's
        pending and leased counts and oldest pending age, and how many keys are parked or rate
        limited.

        Args:
            queue: The queue.
            page_size: Keys per page, 1 to 100.
            page_token: A previous page's next_page_token; '' for the first page.

        Raises:
            InvalidArgumentError: The queue name or page token is malformed.
            UnavailableError: The broker or its Redis could not be reached.
        """
        request = admin_service_pb2.ListGroupKeysRequest(
            queue=queue, page_size=page_size, page_token=page_token
        )
        return group_key_page_from_proto(await self._unary(self.admin.ListGroupKeys, request))

    async def audit_records(self, *, page_size: int = 100) -> AsyncIterator[AuditRecord]:
        """Yields the broker's audit trail (admin actions, permission denials, authentication
        failures), newest first, fetching a page at a time.

        Args:
            page_size: Records per call, 1 to 1,000.

        Raises:
            UnavailableError: The broker or its Redis could not be reached.
        """
        token = ""
        while True:
            request = admin_service_pb2.ListAuditRecordsRequest(
                page_size=page_size, page_token=token
            )
            response = await self._unary(self.admin.ListAuditRecords, request)
            for record in response.records:
                yield audit_record_from_proto(record)
            token = response.next_page_token
            if not token:
                return

    # --- lifetime ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Closes the channel, cancelling calls still in flight. Closing twice is harmless."""
        self._closed = True
        channel, self._channel = self._channel, None
        self._stub = self._admin = self._schedules = None
        if channel is not None:
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
